// Causal self-attention for training on a CPU, forward and backward, as XLA FFI custom calls
// (lmjax/ops/flash_attention_cpu.py builds on them; lmjax/ops/decode_kernels.py compiles and registers).
// FlashAttention-2's algorithm (Dao 2023, arXiv:2307.08691, Algorithms 1 and 2): 64 x 64 tiles of scores
// that never leave the cache, an online softmax in the forward, and a backward that recomputes the
// probabilities from the forward's log-sum-exp. Why: XLA:CPU materialises [T, S] scores in fp32 and
// passes over them ~10 times a training step, bound by memory from 1k positions on (BUILD_NOTES).
//
// q [B, T, N, H] (already scaled by 1/sqrt(H)), k and v [B, T, K, H], heads n = kv_head * G + g (GQA),
// fp32 or bf16 operands; segment_ids [B, T]; a key at t' is visible to a query at t iff t' <= t, both
// have one segment id, and t - t' < window when window > 0 (ops/attention.py's causal rule). Every
// matmul is flash_attention_tiles.h's `gemm`. Needs AVX-512 (and AVX-512 BF16 for bf16 operands):
// LmjaxFlashAttentionDtypes says which this build takes.

#include <cmath>
#include <initializer_list>
#include <limits>
#include <vector>

#include "decode_kernels.h"

#if defined(__AVX512F__)
#include "flash_attention_mask.h"

namespace lmjax {
namespace {

constexpr int64_t kDqSlots = 8;  // threads of a backward call, each with its own dQ buffer

// Every operand of the tiles' matmuls arrives in the layout they read it (ops/flash_attention_cpu.py
// rearranges them with XLA's transposes, which ran 4x faster than a packing pass here): K and V
// "by dim" [B, K, tiles, H / step, kTile, step] (B of q k^T and dO v^T), "by row" [B, K, tiles,
// kTile / step, H, step] (B of P v and dS k), and for the backward q and dO as [B, N, H, T] (A of the
// products summed over query rows).
template <typename E>
struct Problem {
  Shape sh;
  const E *q, *dout;  // [B, T, N, H]
  const E *keys_by_dim, *values_by_dim, *keys_by_row, *values_by_row;
  const E *q_transposed, *dout_transposed;
  const float *lse, *delta;  // backward: [B, N, T]
  const Mask* mask;
  float *out, *lse_out;  // forward: [B, T, N, H], [B, N, T]
  float *dq, *dk, *dv;   // backward: [B, T, N, H] (thread slot 0's sums), [B, T, K, H] x 2
  float* dq_scratch;     // backward: [slots - 1][B, T, N, H], the other threads' sums of dQ
  int64_t dq_size;

  const E* kv_block(const E* packed, int64_t b, int64_t kv, int64_t j) const {
    return packed + ((b * sh.K + kv) * sh.tiles() + j) * kTile * sh.H;
  }
  const E* head_rows(const E* transposed, int64_t b, int64_t n) const {
    return transposed + (b * sh.N + n) * sh.H * sh.T;
  }
};

inline float max_of_row(const float* row) {
  __m512 m = _mm512_loadu_ps(row);
  for (int64_t c = 16; c < kTile; c += 16) m = _mm512_max_ps(m, _mm512_loadu_ps(row + c));
  return _mm512_reduce_max_ps(m);
}

// P = exp(S - m) for a row of scores in place; returns its sum.
inline float exp_row(float* row, float m) {
  vfloat total{};
  for (int64_t c = 0; c < kTile; c += kLanes) {
    const vfloat e = exp_nonpositive(load(row + c) - m);
    std::memcpy(row + c, &e, sizeof(e));
    total += e;
  }
  return _mm512_reduce_add_ps((__m512)total);
}

// Forward task: query tile i of head n in row b, over key tiles 0..i (Algorithm 1).
template <typename E>
void forward_tile(const Problem<E>& p, int64_t task) {
  const Shape& sh = p.sh;
  const int64_t H = sh.H, tiles = sh.tiles();
  // Largest tiles (most key tiles) first, so the threads finish together.
  const int64_t i = tiles - 1 - task / (sh.B * sh.N), n = task % sh.N, b = task / sh.N % sh.B;
  const int64_t kv = n / sh.G();
  alignas(64) float scores[kTile * kTile];
  alignas(64) E probs[kTile * kTile];
  std::vector<float> acc(kTile * H, 0.0f);
  float row_max[kTile], row_sum[kTile];
  std::fill(row_max, row_max + kTile, kNegInf);
  std::fill(row_sum, row_sum + kTile, 0.0f);
  const E* q = p.q + ((b * sh.T + i * kTile) * sh.N + n) * H;
  for (int64_t j = 0; j <= i; ++j) {
    const Seen seen = p.mask->seen(sh, b, i, j);
    if (seen == Seen::kNone) continue;
    gemm(q, sh.N * H, kTile, p.kv_block(p.keys_by_dim, b, kv, j), H, kTile, scores, kTile, false);
    if (seen == Seen::kSome) p.mask->apply(sh, b, i, j, scores);
    for (int64_t r = 0; r < kTile; ++r) {
      float* row = scores + r * kTile;
      const float m = std::max(row_max[r], max_of_row(row));
      if (m == kNegInf) {  // nothing seen yet: the row stays empty
        std::fill(row, row + kTile, 0.0f);
        continue;
      }
      const float scale = m == row_max[r] ? 1.0f : std::exp(row_max[r] - m);
      row_sum[r] = row_sum[r] * scale + exp_row(row, m);
      row_max[r] = m;
      if (scale != 1.0f)
        for (int64_t h = 0; h < H; ++h) acc[r * H + h] *= scale;
    }
    store_tile(scores, probs);
    gemm(probs, kTile, kTile, p.kv_block(p.values_by_row, b, kv, j), kTile, H, acc.data(), H, true);
  }
  for (int64_t r = 0; r < kTile; ++r) {
    const int64_t t = i * kTile + r;
    float* out = p.out + ((b * sh.T + t) * sh.N + n) * H;
    for (int64_t h = 0; h < H; ++h) out[h] = acc[r * H + h] / row_sum[r];
    p.lse_out[(b * sh.N + n) * sh.T + t] = row_max[r] + std::log(row_sum[r]);
  }
}

// Backward task: key tile j of KV head kv in row b, over the query tiles that see it, for each of the
// G query heads on kv (Algorithm 2). dK and dV of the tile are its own; dQ goes to the thread's slot.
template <typename E>
void backward_tile(const Problem<E>& p, int64_t task, int64_t slot) {
  const Shape& sh = p.sh;
  const int64_t H = sh.H, tiles = sh.tiles();
  // Key tile 0 (seen by every query tile) first, so the threads finish together.
  const int64_t j = task / (sh.B * sh.K), kv = task % sh.K, b = task / sh.K % sh.B;
  alignas(64) float probs[kTile * kTile], dscores[kTile * kTile];
  alignas(64) E probs_packed[kTile * kTile], dscores_packed[kTile * kTile], dscores_rows[kTile * kTile];
  std::vector<float> dk_t(H * kTile, 0.0f), dv_t(H * kTile, 0.0f);  // [H, kTile]: dK^T, dV^T
  float* dq = slot == 0 ? p.dq : p.dq_scratch + (slot - 1) * p.dq_size;
  for (int64_t g = 0; g < sh.G(); ++g) {
    const int64_t n = kv * sh.G() + g;
    for (int64_t i = j; i < tiles; ++i) {
      const Seen seen = p.mask->seen(sh, b, i, j);
      if (seen == Seen::kNone) continue;
      const int64_t row0 = (b * sh.T + i * kTile) * sh.N + n;
      gemm(p.q + row0 * H, sh.N * H, kTile, p.kv_block(p.keys_by_dim, b, kv, j), H, kTile, probs, kTile, false);
      if (seen == Seen::kSome) p.mask->apply(sh, b, i, j, probs);
      gemm(p.dout + row0 * H, sh.N * H, kTile, p.kv_block(p.values_by_dim, b, kv, j), H, kTile, dscores, kTile,
           false);
      const float* lse = p.lse + (b * sh.N + n) * sh.T + i * kTile;
      const float* delta = p.delta + (b * sh.N + n) * sh.T + i * kTile;
      for (int64_t r = 0; r < kTile; ++r) {  // P = exp(S - lse); dS = P * (dP - rowsum(dO * O))
        float* prow = probs + r * kTile;
        float* drow = dscores + r * kTile;
        exp_row(prow, lse[r]);
        for (int64_t c = 0; c < kTile; ++c) drow[c] = prow[c] * (drow[c] - delta[r]);
      }
      pack_tile_rows(probs, probs_packed);
      pack_tile_rows(dscores, dscores_packed);
      store_tile(dscores, dscores_rows);
      const int64_t first = i * kTile;
      gemm(p.head_rows(p.dout_transposed, b, n) + first, sh.T, H, probs_packed, kTile, kTile, dv_t.data(), kTile,
           true);
      gemm(p.head_rows(p.q_transposed, b, n) + first, sh.T, H, dscores_packed, kTile, kTile, dk_t.data(), kTile,
           true);
      gemm(dscores_rows, kTile, kTile, p.kv_block(p.keys_by_row, b, kv, j), kTile, H, dq + row0 * H, sh.N * H,
           true);
    }
  }
  for (int64_t c = 0; c < kTile; ++c) {
    const int64_t at = ((b * sh.T + j * kTile + c) * sh.K + kv) * H;
    for (int64_t h = 0; h < H; ++h) {
      p.dk[at + h] = dk_t[h * kTile + c];
      p.dv[at + h] = dv_t[h * kTile + c];
    }
  }
}

bool dims_are(const ffi::AnyBuffer& a, std::initializer_list<int64_t> dims) {
  auto d = a.dimensions();
  return d.size() == dims.size() && std::equal(dims.begin(), dims.end(), d.begin());
}

// The shape from q [B, T, N, H] and the packed K/V operands (flash_attention_cpu.py's `_by_dim`
// [B, K, tiles, H / step, 64, step] and `_by_row` [B, K, tiles, 64 / step, H, step]), or an error naming
// what does not fit.
ffi::Error shape_of(const ffi::AnyBuffer& q, std::initializer_list<const ffi::AnyBuffer*> by_dim,
                    std::initializer_list<const ffi::AnyBuffer*> by_row, const ffi::Buffer<ffi::S32>& ids,
                    int64_t window, Shape& sh) {
  auto qd = q.dimensions(), kd = (*by_dim.begin())->dimensions();
  if (qd.size() != 4 || kd.size() != 6)
    return ffi::Error::InvalidArgument("flash_attention takes q [B, T, N, H] and packed K/V [B, K, ...] (6-D)");
  sh = Shape{qd[0], qd[1], qd[2], kd[1], qd[3], window};
  if (sh.K == 0 || sh.N % sh.K || sh.T % kTile || sh.H % 16 || sh.H > 256)
    return ffi::Error::InvalidArgument(
        "flash_attention needs K dividing N, T a multiple of 64 and H a multiple of 16 up to 256");
  const int64_t s = q.element_type() == ffi::DataType::BF16 ? 2 : 1;
  for (const ffi::AnyBuffer* a : by_dim)
    if (a->element_type() != q.element_type() || !dims_are(*a, {sh.B, sh.K, sh.tiles(), sh.H / s, kTile, s}))
      return ffi::Error::InvalidArgument("flash_attention: a K/V operand by dim is not [B, K, T/64, H/step, 64, step]");
  for (const ffi::AnyBuffer* a : by_row)
    if (a->element_type() != q.element_type() || !dims_are(*a, {sh.B, sh.K, sh.tiles(), kTile / s, sh.H, s}))
      return ffi::Error::InvalidArgument("flash_attention: a K/V operand by row is not [B, K, T/64, 64/step, H, step]");
  if (ids.element_count() != sh.B * sh.T)
    return ffi::Error::InvalidArgument("flash_attention: segment_ids must be [B, T]");
  return ffi::Error::Success();
}

template <typename E>
const E* data(const ffi::AnyBuffer& buffer) {
  return static_cast<const E*>(buffer.untyped_data());
}

template <typename E>
ffi::Error forward(ffi::ThreadPool& pool, const Shape& sh, const ffi::AnyBuffer& q, const ffi::AnyBuffer& keys_by_dim,
                   const ffi::AnyBuffer& values_by_row, const int32_t* ids, float* out, float* lse) {
  const Mask mask(ids, sh);
  Parallel<Problem<E>> attend;
  Problem<E>& p = attend.problem;
  p = Problem<E>{};
  p.sh = sh;
  p.q = data<E>(q);
  p.keys_by_dim = data<E>(keys_by_dim);
  p.values_by_row = data<E>(values_by_row);
  p.mask = &mask;
  p.out = out;
  p.lse_out = lse;
  attend.run = [](const Problem<E>& p, int64_t task, int64_t) { forward_tile(p, task); };
  attend.chunks = sh.B * sh.N * sh.tiles();
  return attend.launch(pool, true);
}

template <typename E>
ffi::Error backward(ffi::ThreadPool& pool, const Shape& sh, const ffi::AnyBuffer& q, const ffi::AnyBuffer& dout,
                    const ffi::AnyBuffer& q_transposed, const ffi::AnyBuffer& dout_transposed,
                    const ffi::AnyBuffer& keys_by_dim, const ffi::AnyBuffer& values_by_dim,
                    const ffi::AnyBuffer& keys_by_row, const int32_t* ids, const float* lse, const float* delta,
                    float* dq, float* dk, float* dv) {
  const Mask mask(ids, sh);
  const int64_t heads = sh.B * sh.N * sh.T * sh.H;
  // dQ sums over key tiles, which run on different threads: one buffer per thread, slot 0 the result,
  // at most kDqSlots threads (on a many-core host the buffers would outgrow the attention's inputs).
  const int64_t slots = std::min<int64_t>(kDqSlots, Helpers::get(pool.num_threads()).count() + 1);
  std::vector<float> scratch((slots - 1) * heads, 0.0f);
  std::fill(dq, dq + heads, 0.0f);
  Parallel<Problem<E>> attend;
  Problem<E>& p = attend.problem;
  p = Problem<E>{};
  p.sh = sh;
  p.q = data<E>(q);
  p.dout = data<E>(dout);
  p.q_transposed = data<E>(q_transposed);
  p.dout_transposed = data<E>(dout_transposed);
  p.keys_by_dim = data<E>(keys_by_dim);
  p.values_by_dim = data<E>(values_by_dim);
  p.keys_by_row = data<E>(keys_by_row);
  p.lse = lse;
  p.delta = delta;
  p.mask = &mask;
  p.dq = dq;
  p.dk = dk;
  p.dv = dv;
  p.dq_scratch = scratch.data();
  p.dq_size = heads;
  attend.run = [](const Problem<E>& p, int64_t task, int64_t slot) { backward_tile(p, task, slot); };
  attend.chunks = sh.B * sh.K * sh.tiles();
  attend.max_slots = slots;
  ffi::Error error = attend.launch(pool, true);
  for (int64_t s = 1; s < slots; ++s)
    for (int64_t e = 0; e < heads; ++e) dq[e] += scratch[(s - 1) * heads + e];
  return error;
}

}  // namespace
}  // namespace lmjax
#endif  // __AVX512F__

namespace lmjax {
namespace {

// The error for an operand dtype this build cannot take (the wrapper asks LmjaxFlashAttentionDtypes first).
ffi::Error unsupported_dtype() {
  return ffi::Error::InvalidArgument(
      "flash_attention: this build takes only the operand dtypes LmjaxFlashAttentionDtypes names (fp32 needs "
      "AVX-512, bf16 AVX-512 BF16)");
}

#if defined(__AVX512F__)
// Runs `body` with E the operand type of q, or returns unsupported_dtype().
template <typename Body>
ffi::Error with_operand_type(ffi::DataType dtype, Body body) {
  if (dtype == ffi::DataType::F32) return body(float{});
#if defined(__AVX512BF16__)
  if (dtype == ffi::DataType::BF16) return body(bf16{});
#endif
  return unsupported_dtype();
}
#endif

ffi::Error FlashForward(ffi::ThreadPool pool, ffi::AnyBuffer q, ffi::AnyBuffer keys_by_dim,
                        ffi::AnyBuffer values_by_row, ffi::Buffer<ffi::S32> ids,
                        ffi::Result<ffi::Buffer<ffi::F32>> out, ffi::Result<ffi::Buffer<ffi::F32>> lse,
                        int64_t window) {
#if defined(__AVX512F__)
  Shape sh;
  if (ffi::Error error = shape_of(q, {&keys_by_dim}, {&values_by_row}, ids, window, sh); error.failure()) return error;
  return with_operand_type(q.element_type(), [&](auto e) {
    return forward<decltype(e)>(pool, sh, q, keys_by_dim, values_by_row, ids.typed_data(), out->typed_data(),
                                lse->typed_data());
  });
#else
  return unsupported_dtype();
#endif
}

ffi::Error FlashBackward(ffi::ThreadPool pool, ffi::AnyBuffer q, ffi::AnyBuffer dout, ffi::AnyBuffer q_transposed,
                         ffi::AnyBuffer dout_transposed, ffi::AnyBuffer keys_by_dim, ffi::AnyBuffer values_by_dim,
                         ffi::AnyBuffer keys_by_row, ffi::Buffer<ffi::S32> ids, ffi::Buffer<ffi::F32> lse,
                         ffi::Buffer<ffi::F32> delta, ffi::Result<ffi::Buffer<ffi::F32>> dq,
                         ffi::Result<ffi::Buffer<ffi::F32>> dk, ffi::Result<ffi::Buffer<ffi::F32>> dv,
                         int64_t window) {
#if defined(__AVX512F__)
  Shape sh;
  if (ffi::Error error = shape_of(q, {&keys_by_dim, &values_by_dim}, {&keys_by_row}, ids, window, sh); error.failure())
    return error;
  if (dout.element_type() != q.element_type() || !dims_are(dout, {sh.B, sh.T, sh.N, sh.H}))
    return ffi::Error::InvalidArgument("flash_attention backward: dO must be q's shape and dtype");
  for (const ffi::AnyBuffer* a : {&q_transposed, &dout_transposed})
    if (a->element_type() != q.element_type() || !dims_are(*a, {sh.B, sh.N, sh.H, sh.T}))
      return ffi::Error::InvalidArgument("flash_attention backward: q and dO transposed must be [B, N, H, T]");
  if (lse.element_count() != sh.B * sh.N * sh.T || delta.element_count() != sh.B * sh.N * sh.T)
    return ffi::Error::InvalidArgument("flash_attention backward: lse and delta must be [B, N, T]");
  return with_operand_type(q.element_type(), [&](auto e) {
    return backward<decltype(e)>(pool, sh, q, dout, q_transposed, dout_transposed, keys_by_dim, values_by_dim,
                                 keys_by_row, ids.typed_data(), lse.typed_data(), delta.typed_data(),
                                 dq->typed_data(), dk->typed_data(), dv->typed_data());
  });
#else
  return unsupported_dtype();
#endif
}

}  // namespace
}  // namespace lmjax

XLA_FFI_DEFINE_HANDLER_SYMBOL(LmjaxFlashForward, lmjax::FlashForward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("window"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(LmjaxFlashBackward, lmjax::FlashBackward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("window"));

// Which operand dtypes this build's flash attention takes: bit 0 fp32 (AVX-512), bit 1 bf16 (AVX-512
// BF16). Python asks before routing a call here.
extern "C" int LmjaxFlashAttentionDtypes() {
#if defined(__AVX512BF16__)
  return 3;
#elif defined(__AVX512F__)
  return 1;
#else
  return 0;
#endif
}
