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
#include <limits>
#include <vector>

#include "decode_kernels.h"

#if defined(__AVX512F__)
#include "flash_attention_tiles.h"

namespace lmjax {
namespace {

constexpr int64_t kDqSlots = 8;  // threads of a backward call, each with its own dQ buffer

struct Shape {
  int64_t B, T, N, K, H, window;
  int64_t tiles() const { return T / kTile; }
  int64_t G() const { return N / K; }
};

// Which keys of tile j the queries of tile i see: none, all, or some (then `visible` per pair).
enum class Seen { kNone, kAll, kSome };

struct Mask {
  const int32_t* segment_ids;   // [B, T]
  std::vector<int64_t> uniform;  // [B, tiles]: a tile's one segment id, or INT64_MIN when it has several

  Mask(const int32_t* ids, const Shape& sh) : segment_ids(ids), uniform(sh.B * sh.tiles()) {
    for (int64_t b = 0; b < sh.B; ++b)
      for (int64_t i = 0; i < sh.tiles(); ++i) {
        const int32_t* tile = ids + b * sh.T + i * kTile;
        const bool one = std::all_of(tile, tile + kTile, [&](int32_t id) { return id == tile[0]; });
        uniform[b * sh.tiles() + i] = one ? tile[0] : std::numeric_limits<int64_t>::min();
      }
  }

  Seen seen(const Shape& sh, int64_t b, int64_t i, int64_t j) const {
    if (j > i) return Seen::kNone;
    if (sh.window > 0 && (i - j) * kTile - (kTile - 1) >= sh.window) return Seen::kNone;
    const int64_t qi = uniform[b * sh.tiles() + i], kj = uniform[b * sh.tiles() + j];
    const bool one_segment = qi == kj && qi != std::numeric_limits<int64_t>::min();
    if (!one_segment && qi != std::numeric_limits<int64_t>::min() && kj != std::numeric_limits<int64_t>::min())
      return Seen::kNone;
    const bool cut_by_window = sh.window > 0 && (i - j) * kTile + (kTile - 1) >= sh.window;
    return j == i || cut_by_window || !one_segment ? Seen::kSome : Seen::kAll;
  }

  // Scores of pairs tile i's queries do not see -> -inf.
  void apply(const Shape& sh, int64_t b, int64_t i, int64_t j, float* scores) const {
    const int32_t* ids = segment_ids + b * sh.T;
    for (int64_t r = 0; r < kTile; ++r) {
      const int64_t t = i * kTile + r;
      for (int64_t c = 0; c < kTile; ++c) {
        const int64_t key = j * kTile + c;
        const bool visible = key <= t && ids[key] == ids[t] && (sh.window <= 0 || t - key < sh.window);
        if (!visible) scores[r * kTile + c] = kNegInf;
      }
    }
  }
};

// K and V (and for the backward Q and dO) rearranged once per call into the operand layouts of the
// tiles' matmuls; [B, K or N, tiles] blocks of kTile * H elements each.
template <typename E>
struct Packed {
  std::vector<E> keys_by_dim, keys_by_row, values_by_dim, values_by_row, q_transposed, dout_transposed;
};

template <typename E>
struct Problem {
  Shape sh;
  const E *q, *k, *v, *dout;
  const float *lse, *delta;  // backward: [B, N, T]
  const Mask* mask;
  Packed<E>* packed;
  float *out, *lse_out;        // forward: [B, T, N, H], [B, N, T]
  float *dq, *dk, *dv;         // backward: [B, T, N, H] (thread slot 0's sums), [B, T, K, H] x 2
  float* dq_scratch;           // backward: [slots - 1][B, T, N, H], the other threads' sums of dQ
  int64_t dq_size;

  const E* kv_block(const std::vector<E>& packed_kv, int64_t b, int64_t kv, int64_t j) const {
    return packed_kv.data() + ((b * sh.K + kv) * sh.tiles() + j) * kTile * sh.H;
  }
  // The [H, T] transposes of q and dO for head n: rows of A for products summed over query rows.
  const E* head_rows(const std::vector<E>& transposed, int64_t b, int64_t n) const {
    return transposed.data() + (b * sh.N + n) * sh.H * sh.T;
  }
};

// Task (b, kv, j) of the packing pass: keys and values of tile j in each layout the pass needs.
template <typename E>
void pack_keys_values(const Problem<E>& p, int64_t task, bool backward) {
  const Shape& sh = p.sh;
  const int64_t j = task % sh.tiles(), kv = task / sh.tiles() % sh.K, b = task / sh.tiles() / sh.K;
  const int64_t offset = ((b * sh.T + j * kTile) * sh.K + kv) * sh.H, stride = sh.K * sh.H;
  Packed<E>& packed = *p.packed;
  auto at = [&](std::vector<E>& v) { return const_cast<E*>(p.kv_block(v, b, kv, j)); };
  pack_transposed(p.k + offset, stride, kTile, sh.H, at(packed.keys_by_dim));
  if (!backward) {
    pack(p.v + offset, stride, kTile, sh.H, at(packed.values_by_row));
    return;
  }
  pack_transposed(p.v + offset, stride, kTile, sh.H, at(packed.values_by_dim));
  pack(p.k + offset, stride, kTile, sh.H, at(packed.keys_by_row));
  for (int64_t g = 0; g < sh.G(); ++g) {  // q and dO of the query heads on kv, tile j, as [H, T]
    const int64_t n = kv * sh.G() + g;
    E* qt = const_cast<E*>(p.head_rows(packed.q_transposed, b, n));
    E* dot = const_cast<E*>(p.head_rows(packed.dout_transposed, b, n));
    for (int64_t t = j * kTile; t < (j + 1) * kTile; ++t)
      for (int64_t h = 0; h < sh.H; ++h) {
        qt[h * sh.T + t] = p.q[((b * sh.T + t) * sh.N + n) * sh.H + h];
        dot[h * sh.T + t] = p.dout[((b * sh.T + t) * sh.N + n) * sh.H + h];
      }
  }
}

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
  return sum_lanes(total);
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
    gemm(q, sh.N * H, kTile, p.kv_block(p.packed->keys_by_dim, b, kv, j), H, kTile, scores, kTile, false);
    if (seen == Seen::kSome) p.mask->apply(sh, b, i, j, scores);
    for (int64_t r = 0; r < kTile; ++r) {
      float* row = scores + r * kTile;
      const float m = std::max(row_max[r], max_of_row(row));
      if (m == kNegInf) {  // nothing seen yet: the row stays empty
        std::fill(row, row + kTile, 0.0f);
        continue;
      }
      const float scale = std::exp(row_max[r] - m);
      row_sum[r] = row_sum[r] * scale + exp_row(row, m);
      row_max[r] = m;
      if (scale != 1.0f)
        for (int64_t h = 0; h < H; ++h) acc[r * H + h] *= scale;
    }
    store_tile(scores, probs);
    gemm(probs, kTile, kTile, p.kv_block(p.packed->values_by_row, b, kv, j), kTile, H, acc.data(), H, true);
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
  const Packed<E>& packed = *p.packed;
  for (int64_t g = 0; g < sh.G(); ++g) {
    const int64_t n = kv * sh.G() + g;
    for (int64_t i = j; i < tiles; ++i) {
      const Seen seen = p.mask->seen(sh, b, i, j);
      if (seen == Seen::kNone) continue;
      const int64_t row0 = (b * sh.T + i * kTile) * sh.N + n;
      gemm(p.q + row0 * H, sh.N * H, kTile, p.kv_block(packed.keys_by_dim, b, kv, j), H, kTile, probs, kTile, false);
      if (seen == Seen::kSome) p.mask->apply(sh, b, i, j, probs);
      gemm(p.dout + row0 * H, sh.N * H, kTile, p.kv_block(packed.values_by_dim, b, kv, j), H, kTile, dscores, kTile,
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
      gemm(p.head_rows(packed.dout_transposed, b, n) + first, sh.T, H, probs_packed, kTile, kTile, dv_t.data(), kTile,
           true);
      gemm(p.head_rows(packed.q_transposed, b, n) + first, sh.T, H, dscores_packed, kTile, kTile, dk_t.data(), kTile,
           true);
      gemm(dscores_rows, kTile, kTile, p.kv_block(packed.keys_by_row, b, kv, j), kTile, H, dq + row0 * H, sh.N * H,
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

// The shapes of q [B, T, N, H] and k, v [B, T, K, H], or an error naming what does not fit.
ffi::Error shape_of(const ffi::AnyBuffer& q, const ffi::AnyBuffer& k, const ffi::AnyBuffer& v,
                    const ffi::Buffer<ffi::S32>& ids, int64_t window, Shape& sh) {
  auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || vd.size() != 4)
    return ffi::Error::InvalidArgument("flash_attention takes q [B, T, N, H], k and v [B, T, K, H]");
  sh = Shape{qd[0], qd[1], qd[2], kd[2], qd[3], window};
  for (auto d : {kd, vd})
    if (d[0] != sh.B || d[1] != sh.T || d[3] != sh.H || d[2] != sh.K)
      return ffi::Error::InvalidArgument("flash_attention: k and v must be [B, T, K, H] with q's B, T and H");
  if (sh.K == 0 || sh.N % sh.K || sh.T % kTile || sh.H % 16 || sh.H > 256)
    return ffi::Error::InvalidArgument(
        "flash_attention needs K dividing N, T a multiple of 64 and H a multiple of 16 up to 256");
  if (q.element_type() != k.element_type() || q.element_type() != v.element_type())
    return ffi::Error::InvalidArgument("flash_attention: q, k and v must share a dtype");
  if (ids.element_count() != sh.B * sh.T)
    return ffi::Error::InvalidArgument("flash_attention: segment_ids must be [B, T]");
  return ffi::Error::Success();
}

template <typename E>
ffi::Error forward(ffi::ThreadPool& pool, const Shape& sh, const ffi::AnyBuffer& q, const ffi::AnyBuffer& k,
                   const ffi::AnyBuffer& v, const int32_t* ids, float* out, float* lse) {
  const Mask mask(ids, sh);
  Packed<E> packed;
  const int64_t blocks = sh.B * sh.K * sh.T * sh.H;
  packed.keys_by_dim.resize(blocks);
  packed.values_by_row.resize(blocks);
  Parallel<Problem<E>> pass, attend;
  Problem<E> problem{sh, (const E*)q.untyped_data(), (const E*)k.untyped_data(), (const E*)v.untyped_data(),
                     nullptr, nullptr, nullptr, &mask, &packed, out, lse, nullptr, nullptr, nullptr, nullptr, 0};
  pass.problem = attend.problem = problem;
  pass.run = [](const Problem<E>& p, int64_t task, int64_t) { pack_keys_values(p, task, false); };
  pass.chunks = sh.B * sh.K * sh.tiles();
  pass.launch(pool, true);
  attend.run = [](const Problem<E>& p, int64_t task, int64_t) { forward_tile(p, task); };
  attend.chunks = sh.B * sh.N * sh.tiles();
  return attend.launch(pool, true);
}

template <typename E>
ffi::Error backward(ffi::ThreadPool& pool, const Shape& sh, const ffi::AnyBuffer& q, const ffi::AnyBuffer& k,
                    const ffi::AnyBuffer& v, const ffi::AnyBuffer& dout, const int32_t* ids, const float* lse,
                    const float* delta, float* dq, float* dk, float* dv) {
  const Mask mask(ids, sh);
  Packed<E> packed;
  const int64_t blocks = sh.B * sh.K * sh.T * sh.H, heads = sh.B * sh.N * sh.T * sh.H;
  for (auto* v : {&packed.keys_by_dim, &packed.keys_by_row, &packed.values_by_dim}) v->resize(blocks);
  packed.q_transposed.resize(heads);
  packed.dout_transposed.resize(heads);
  // dQ sums over key tiles, which run on different threads: one buffer per thread, slot 0 the result,
  // at most kDqSlots threads (on a many-core host the buffers would outgrow the attention's inputs).
  const int64_t slots = std::min<int64_t>(kDqSlots, Helpers::get(pool.num_threads()).count() + 1);
  std::vector<float> scratch((slots - 1) * heads, 0.0f);
  std::fill(dq, dq + heads, 0.0f);
  Problem<E> problem{sh, (const E*)q.untyped_data(), (const E*)k.untyped_data(), (const E*)v.untyped_data(),
                     (const E*)dout.untyped_data(), lse, delta, &mask, &packed, nullptr, nullptr, dq, dk, dv,
                     scratch.data(), heads};
  Parallel<Problem<E>> pass, attend;
  pass.problem = attend.problem = problem;
  pass.run = [](const Problem<E>& p, int64_t task, int64_t) { pack_keys_values(p, task, true); };
  pass.chunks = sh.B * sh.K * sh.tiles();
  pass.launch(pool, true);
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

// Runs `body` with E the operand type of q, or returns an error for a dtype this build cannot take.
template <typename Body>
ffi::Error with_operand_type(ffi::DataType dtype, Body body) {
#if defined(__AVX512F__)
  if (dtype == ffi::DataType::F32) return body(float{});
#if defined(__AVX512BF16__)
  if (dtype == ffi::DataType::BF16) return body(bf16{});
#endif
#endif
  (void)dtype;
  (void)body;
  return ffi::Error::InvalidArgument(
      "flash_attention: this build takes only the operand dtypes LmjaxFlashAttentionDtypes names (fp32 needs "
      "AVX-512, bf16 AVX-512 BF16)");
}

ffi::Error FlashForward(ffi::ThreadPool pool, ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                        ffi::Buffer<ffi::S32> ids, ffi::Result<ffi::Buffer<ffi::F32>> out,
                        ffi::Result<ffi::Buffer<ffi::F32>> lse, int64_t window) {
#if defined(__AVX512F__)
  Shape sh;
  if (ffi::Error error = shape_of(q, k, v, ids, window, sh); error.failure()) return error;
  return with_operand_type(q.element_type(), [&](auto e) {
    return forward<decltype(e)>(pool, sh, q, k, v, ids.typed_data(), out->typed_data(), lse->typed_data());
  });
#else
  return with_operand_type(q.element_type(), [](auto) { return ffi::Error::Success(); });
#endif
}

ffi::Error FlashBackward(ffi::ThreadPool pool, ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                         ffi::AnyBuffer dout, ffi::Buffer<ffi::S32> ids, ffi::Buffer<ffi::F32> lse,
                         ffi::Buffer<ffi::F32> delta, ffi::Result<ffi::Buffer<ffi::F32>> dq,
                         ffi::Result<ffi::Buffer<ffi::F32>> dk, ffi::Result<ffi::Buffer<ffi::F32>> dv,
                         int64_t window) {
#if defined(__AVX512F__)
  Shape sh;
  if (ffi::Error error = shape_of(q, k, v, ids, window, sh); error.failure()) return error;
  if (dout.element_type() != q.element_type() || dout.element_count() != q.element_count() ||
      lse.element_count() != sh.B * sh.N * sh.T || delta.element_count() != sh.B * sh.N * sh.T)
    return ffi::Error::InvalidArgument("flash_attention backward: dout, lse or delta disagree with q");
  return with_operand_type(q.element_type(), [&](auto e) {
    return backward<decltype(e)>(pool, sh, q, k, v, dout, ids.typed_data(), lse.typed_data(), delta.typed_data(),
                                 dq->typed_data(), dk->typed_data(), dv->typed_data());
  });
#else
  return with_operand_type(q.element_type(), [](auto) { return ffi::Error::Success(); });
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
