// Shared by decode_matmul.cc, decode_attention.cc and flash_attention.cc, the CPU kernels that
// lmjax/ops/decode_kernels.py compiles into one library and registers with XLA as FFI targets.
// Written with GCC/Clang vector extensions (16 fp32 lanes with AVX-512, 8 elsewhere: AVX2, NEON, SSE)
// and intrinsics only where GCC's lowering is poor.

#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace lmjax {

// One register of fp32 lanes: 16 with AVX-512; 8 elsewhere, where GCC splits a 64-byte vector into halves
// passed through the stack (on an AVX2 EPYC SmolLM2's fp32 matvecs read 10-15 GB/s that way).
#ifdef __AVX512F__
constexpr int kLanes = 16;
#else
constexpr int kLanes = 8;
#endif
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

// e^x for x <= 0 in kLanes lanes: x = n ln2 + r, e^r by Cephes' expf polynomial (|r| <= ln2 / 2, ~1 ulp),
// times 2^n built in the exponent bits; exactly 0 below -87 (where fp32 underflows), so -inf too.
inline vfloat exp_nonpositive(vfloat x) {
  const vint underflow = x < -87.0f;
  x = x < -87.0f ? -87.0f : x;
  const vint n = __builtin_convertvector(x * 1.44269504088896341f - 0.5f, vint);  // round to nearest
  const vfloat nf = __builtin_convertvector(n, vfloat);
  const vfloat r = x - nf * 0.693359375f + nf * 2.12194440e-4f;
  vfloat y = 1.9875691500e-4f * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r * r + r + 1.0f;
  const vint scaled = (vint)y + (n << 23);
  return (vfloat)(scaled & ~underflow);
}

// A spin-wait's pause: frees the core's shared resources for its sibling hyperthread.
inline void pause() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#else
  std::this_thread::yield();
#endif
}

// Spins until done() holds, yielding the core after a while: the thread waited for may have been
// preempted (2 cores, XLA's threads and ours), and spinning would only delay it.
template <typename Done>
inline void wait_until(Done done) {
  for (int spins = 0; !done(); ++spins) {
    if (spins < 4096) pause();
    else std::this_thread::yield();
  }
}

// Work split into tasks that threads claim from one counter.
struct Tasks {
  virtual ~Tasks() = default;
  virtual void work() = 0;
};

// Helper threads of our own that spin for a while after each job before they sleep. XLA's intra-op
// pool parks its idle threads, and waking one took longer than a decode step's matmul (~40 us), so
// the calling thread ended up doing the whole job (one row's int8 step 15 ms; BUILD_NOTES). As
// llama.cpp's threads do, ours poll between the step's kernels, and a job reaches a polling helper
// through atomics only: a mutex between submitter and helper made a helper that saw the job wait on the
// lock, a futex sleep and wake per call (profiled, SmolLM2's int8 step: its 90 matmuls of
// w1/w3, w2 and wo took 5.3 ms with the mutex, 4.2 ms without). The mutex and condition variable
// serve only helpers that spun 2 ms without a job and sleep. Started on first use, one fewer than
// XLA's thread count; a job submitted while another is running gets no helpers (its caller works
// alone). Never destroyed: the threads outlive static destructors without touching them.
class Helpers {
 public:
  static Helpers& get(int64_t threads) {
    static Helpers* helpers = new Helpers(std::max<int64_t>(0, threads - 1));
    return *helpers;
  }

  // How many helper threads there are (a job runs on at most this many plus its caller).
  int64_t count() const { return count_; }

  // Offers `job` to the helpers; false (and nothing offered) if another job holds them. The job must
  // stay alive until `release` returns.
  bool submit(Tasks* job) {
    if (count_ == 0 || busy_.exchange(true, std::memory_order_acquire)) return false;
    job_.store(job);
    epoch_.fetch_add(1);
    if (sleepers_.load() > 0) {  // a helper between its last check of epoch_ and its wait holds the mutex
      { std::lock_guard<std::mutex> lock(mutex_); }
      wake_.notify_all();
    }
    return true;
  }

  // After the submitter saw every task done: withdraws the job and waits for helpers still inside it
  // (they find no task left), so the caller may free it.
  void release() {
    job_.store(nullptr);
    wait_until([&] { return active_.load() == 0; });
    busy_.store(false, std::memory_order_release);
  }

 private:
  explicit Helpers(int64_t count) : count_(count) {
    for (int64_t t = 0; t < count_; ++t) std::thread([this] { loop(); }).detach();
  }

  void loop() {
    uint64_t seen = epoch_.load();
    for (;;) {
      const auto spin_until = std::chrono::steady_clock::now() + std::chrono::milliseconds(2);
      while (epoch_.load(std::memory_order_acquire) == seen && std::chrono::steady_clock::now() < spin_until) {
        pause();
      }
      if (epoch_.load() == seen) {
        std::unique_lock<std::mutex> lock(mutex_);
        sleepers_.fetch_add(1);
        wake_.wait(lock, [&] { return epoch_.load() != seen; });
        sleepers_.fetch_sub(1);
      }
      seen = epoch_.load();
      // Sequentially consistent with release(): either it sees this helper active, or the helper sees
      // the job withdrawn.
      active_.fetch_add(1);
      if (Tasks* job = job_.load()) job->work();
      active_.fetch_sub(1);
    }
  }

  const int64_t count_;
  // job_, epoch_, active_ and sleepers_ stay sequentially consistent (their default): submit/loop and
  // release/loop are Dekker pairs (each side stores, then loads the other's), which acquire/release
  // ordering would not keep.
  std::atomic<bool> busy_{false};
  std::atomic<uint64_t> epoch_{0};
  std::atomic<int64_t> active_{0}, sleepers_{0};
  std::atomic<Tasks*> job_{nullptr};
  std::mutex mutex_;
  std::condition_variable wake_;
};

// Tasks 0..chunks-1 of a problem, claimed from one counter by the calling thread and the helpers; the
// caller waits only for tasks some running thread has claimed, then for helpers to leave (`release`).
// Each thread that takes part gets its own `slot` (0 .. helpers' count), for scratch no other touches;
// threads past `max_slots` leave the job to the others.
template <typename P>
struct Parallel : Tasks {
  P problem;
  void (*run)(const P&, int64_t task, int64_t slot);
  int64_t chunks = 0;
  int64_t max_slots = INT64_MAX;
  std::atomic<int64_t> next{0}, done{0}, slots{0};

  void work() override {
    const int64_t slot = slots.fetch_add(1, std::memory_order_relaxed);
    if (slot >= max_slots) return;
    for (int64_t i; (i = next.fetch_add(1, std::memory_order_relaxed)) < chunks;) {
      run(problem, i, slot);
      done.fetch_add(1, std::memory_order_release);
    }
  }

  // `parallel`: offer the tasks to the helpers (sized by XLA's intra-op thread count), else run alone.
  ffi::Error launch(ffi::ThreadPool& pool, bool parallel) {
    Helpers& helpers = Helpers::get(pool.num_threads());
    const bool helped = parallel && chunks > 1 && helpers.submit(this);
    work();
    wait_until([&] { return done.load(std::memory_order_acquire) >= chunks; });
    if (helped) helpers.release();
    return ffi::Error::Success();
  }
};

}  // namespace lmjax
