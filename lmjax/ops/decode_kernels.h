// Shared by decode_matmul.cc and decode_attention.cc, the CPU kernels of a decode step that
// lmjax/ops/decode_kernels.py compiles into one library and registers with XLA as FFI targets.
// Written with GCC/Clang vector extensions (16 fp32 lanes: AVX-512 where the compiler targets it,
// NEON or SSE elsewhere) and intrinsics only where GCC's lowering is poor.

#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace lmjax {

constexpr int kLanes = 16;
typedef float vfloat __attribute__((vector_size(kLanes * sizeof(float))));
typedef int32_t vint __attribute__((vector_size(kLanes * sizeof(int32_t))));

// Below this many bytes read, a helper thread's wake-up costs more than it saves.
constexpr int64_t kParallelBytes = 1 << 17;

inline vfloat load(const float* p) {
  vfloat v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline float sum_lanes(vfloat v) {
  float total = 0.0f;
  for (int i = 0; i < kLanes; ++i) total += v[i];
  return total;
}


// Tasks 0..chunks-1 of a problem, claimed from one counter by the calling thread and by helpers on
// XLA's intra-op pool; the caller waits only for tasks some running thread has claimed. Shared owns
// the problem so that a helper that starts after the call returned finds nothing left and exits.
template <typename P>
struct Parallel : std::enable_shared_from_this<Parallel<P>> {
  P problem;
  void (*run)(const P&, int64_t task);
  int64_t chunks = 0;
  std::atomic<int64_t> next{0}, done{0};

  void work() {
    for (int64_t i; (i = next.fetch_add(1, std::memory_order_relaxed)) < chunks;) {
      run(problem, i);
      done.fetch_add(1, std::memory_order_release);
    }
  }

  ffi::Error launch(ffi::ThreadPool& pool, int64_t threads) {
    std::shared_ptr<Parallel> self = this->shared_from_this();
    for (int64_t t = 1; t < std::min(threads, chunks); ++t) pool.Schedule([self] { self->work(); });
    work();
    while (done.load(std::memory_order_acquire) < chunks) std::this_thread::yield();
    return ffi::Error::Success();
  }
};

}  // namespace lmjax
