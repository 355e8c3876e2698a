// Shared by decode_matmul.cc and decode_attention.cc, the CPU kernels of a decode step that
// lmjax/ops/decode_kernels.py compiles into one library and registers with XLA as FFI targets.
// Written with GCC/Clang vector extensions (16 fp32 lanes: AVX-512 where the compiler targets it,
// NEON or SSE elsewhere) and intrinsics only where GCC's lowering is poor.

#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
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


// A spin-wait's pause: frees the core's shared resources for its sibling hyperthread.
inline void pause() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#else
  std::this_thread::yield();
#endif
}

// Work split into tasks that threads claim from one counter.
struct Tasks {
  virtual ~Tasks() = default;
  virtual void work() = 0;
};

// Helper threads of our own that spin for a while after each job before they sleep. XLA's intra-op
// pool parks its idle threads, and waking one took longer than a decode step's matmul (~40 us), so
// the calling thread ended up doing the whole job (one row's int8 step 15 ms; BUILD_NOTES). As
// llama.cpp's threads do, ours poll between the step's kernels. Started on first use, one fewer than
// XLA's thread count; a job submitted while another is running gets no helpers (its caller works
// alone). Never destroyed: the threads outlive static destructors without touching them.
class Helpers {
 public:
  static Helpers& get(int64_t threads) {
    static Helpers* helpers = new Helpers(std::max<int64_t>(0, threads - 1));
    return *helpers;
  }
  int64_t count() const { return count_; }

  // Offers `job` to the helpers; false (and nothing offered) if another job holds them.
  bool submit(std::shared_ptr<Tasks> job) {
    if (count_ == 0 || busy_.exchange(true, std::memory_order_acquire)) return false;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      job_ = std::move(job);
      epoch_.fetch_add(1, std::memory_order_release);
    }
    wake_.notify_all();
    return true;
  }

  // After the submitter saw every task done: helpers that look later find no job.
  void release() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      job_.reset();
    }
    busy_.store(false, std::memory_order_release);
  }

 private:
  explicit Helpers(int64_t count) : count_(count) {
    for (int64_t t = 0; t < count_; ++t) std::thread([this] { loop(); }).detach();
  }

  void loop() {
    uint64_t seen = 0;
    for (;;) {
      const auto spin_until = std::chrono::steady_clock::now() + std::chrono::milliseconds(2);
      while (epoch_.load(std::memory_order_acquire) == seen && std::chrono::steady_clock::now() < spin_until) {
        pause();
      }
      std::shared_ptr<Tasks> job;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, [&] { return epoch_.load(std::memory_order_relaxed) != seen; });
        seen = epoch_.load(std::memory_order_relaxed);
        job = job_;
      }
      if (job) job->work();
    }
  }

  const int64_t count_;
  std::atomic<bool> busy_{false};
  std::atomic<uint64_t> epoch_{0};
  std::mutex mutex_;
  std::condition_variable wake_;
  std::shared_ptr<Tasks> job_;
};

// Tasks 0..chunks-1 of a problem, claimed from one counter by the calling thread and the helpers; the
// caller waits only for tasks some running thread has claimed. Shared ownership keeps the problem
// alive for a helper that starts after the call returned (it finds nothing left).
template <typename P>
struct Parallel : Tasks, std::enable_shared_from_this<Parallel<P>> {
  P problem;
  void (*run)(const P&, int64_t task);
  int64_t chunks = 0;
  std::atomic<int64_t> next{0}, done{0};

  void work() override {
    for (int64_t i; (i = next.fetch_add(1, std::memory_order_relaxed)) < chunks;) {
      run(problem, i);
      done.fetch_add(1, std::memory_order_release);
    }
  }

  // `parallel`: offer the tasks to the helpers (sized by XLA's intra-op thread count), else run alone.
  ffi::Error launch(ffi::ThreadPool& pool, bool parallel) {
    Helpers& helpers = Helpers::get(pool.num_threads());
    const bool helped = parallel && chunks > 1 && helpers.submit(this->shared_from_this());
    work();
    while (done.load(std::memory_order_acquire) < chunks) pause();
    if (helped) helpers.release();
    return ffi::Error::Success();
  }
};

}  // namespace lmjax
