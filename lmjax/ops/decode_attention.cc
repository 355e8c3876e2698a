// Attention of one query token per row over its KV cache (a decode step), as an XLA FFI custom call
// (lmjax/ops/decode_kernels.py builds and registers it). GQA: q [B, N, H] already
// scaled by 1/sqrt(H), heads n = kv_head * G + g; keys [B, K, H, S], values [B, K, S, H] (the layouts
// model/layers.py keeps); k_pos [B, S] each slot's position (-1: empty), q_pos [B]. A slot is seen if
// 0 <= k_pos <= q_pos (and q_pos - k_pos < window when window > 0), as ops/masks.position_mask.
// Only slots up to a row's last filled one are read, so a short row costs what it holds, not the
// cache's length. A row that sees no slot gets zeros.

#include <cmath>
#include <limits>
#include <vector>

#include "decode_kernels.h"

namespace lmjax {
namespace {

struct AttentionProblem {
  const float *q, *k, *v;
  const int32_t *q_pos, *k_pos;
  int64_t B, K, G, H, S, window;
  float* out;
};

// scores[g, s] = q[g] . keys[:, s] for GB query heads at once, slots [0, L): each key vector loaded
// once for all GB heads, kLanes slots in registers. Keys are [H, S]; slots past L (up to S) may be read.
template <int GB>
void head_scores(const float* q, const float* keys, int64_t H, int64_t S, int64_t L, float* scores, int64_t stride) {
  int64_t s = 0;
  for (; s < L && s + kLanes <= S; s += kLanes) {
    vfloat acc[GB];
    for (int g = 0; g < GB; ++g) acc[g] = vfloat{};
    for (int64_t h = 0; h < H; ++h) {
      const vfloat key = load(keys + h * S + s);
      for (int g = 0; g < GB; ++g) acc[g] += q[g * H + h] * key;
    }
    const int64_t n = std::min<int64_t>(kLanes, L - s);
    for (int g = 0; g < GB; ++g) std::memcpy(scores + g * stride + s, &acc[g], n * sizeof(float));
  }
  for (; s < L; ++s)  // the last slots of a cache whose length is not a multiple of kLanes
    for (int g = 0; g < GB; ++g) {
      float total = 0.0f;
      for (int64_t h = 0; h < H; ++h) total += q[g * H + h] * keys[h * S + s];
      scores[g * stride + s] = total;
    }
}

// out[h] = sum over slots s < L of weights[s] * values[s, h] for the H (row stride) value columns, HV *
// kLanes of them at a time held in registers (H a multiple of that).
template <int HV>
void weighted_values(const float* weights, const float* values, int64_t L, int64_t H, float* out) {
  for (int64_t h0 = 0; h0 < H; h0 += HV * kLanes) {
    vfloat acc[HV];
    for (int v = 0; v < HV; ++v) acc[v] = vfloat{};
    for (int64_t s = 0; s < L; ++s) {
      const float weight = weights[s];
      if (weight == 0.0f) continue;
      for (int v = 0; v < HV; ++v) acc[v] += weight * load(values + s * H + h0 + v * kLanes);
    }
    std::memcpy(out + h0, acc, sizeof(acc));
  }
}

// A row's slots up to its last filled one (k_pos >= 0): what `attend` reads.
int64_t slots_read(const int32_t* k_pos, int64_t S) {
  int64_t L = S;
  while (L > 0 && k_pos[L - 1] < 0) --L;
  return L;
}

void attend(const AttentionProblem& p, int64_t b, int64_t kv_head) {
  const int64_t G = p.G, H = p.H, S = p.S;
  const int32_t* k_pos = p.k_pos + b * S;
  const int32_t q_pos = p.q_pos[b];
  float* out = p.out + (b * p.K * G + kv_head * G) * H;
  const int64_t L = slots_read(k_pos, S);
  thread_local std::vector<float> scores;
  scores.assign(G * L, 0.0f);
  const float* q = p.q + (b * p.K * G + kv_head * G) * H;
  const float* keys = p.k + (b * p.K + kv_head) * H * S;
  for (int64_t g = 0; g < G; g += 4) {
    float* rows = scores.data() + g * L;
    switch (std::min<int64_t>(4, G - g)) {
      case 4: head_scores<4>(q + g * H, keys, H, S, L, rows, L); break;
      case 3: head_scores<3>(q + g * H, keys, H, S, L, rows, L); break;
      case 2: head_scores<2>(q + g * H, keys, H, S, L, rows, L); break;
      default: head_scores<1>(q + g * H, keys, H, S, L, rows, L); break;
    }
  }
  const float* values = p.v + (b * p.K + kv_head) * S * H;
  for (int64_t g = 0; g < G; ++g) {
    float* row = scores.data() + g * L;
    float top = -std::numeric_limits<float>::infinity();
    for (int64_t s = 0; s < L; ++s) {
      const bool seen = k_pos[s] >= 0 && k_pos[s] <= q_pos && (p.window <= 0 || q_pos - k_pos[s] < p.window);
      row[s] = seen ? row[s] : -std::numeric_limits<float>::infinity();
      top = std::max(top, row[s]);
    }
    float* o = out + g * H;
    std::fill(o, o + H, 0.0f);
    if (top == -std::numeric_limits<float>::infinity()) continue;
    vfloat totals = vfloat{};
    int64_t s = 0;
    for (; s + kLanes <= L; s += kLanes) {
      const vfloat e = exp_nonpositive(load(row + s) - top);
      std::memcpy(row + s, &e, sizeof(e));
      totals += e;
    }
    float total = sum_lanes(totals);
    for (; s < L; ++s) total += row[s] = std::exp(row[s] - top);
    if (H % (8 * kLanes) == 0) {  // blocks of 8 or 4 registers: head sizes 64, 128 and their multiples
      weighted_values<8>(row, values, L, H, o);
    } else if (H % (4 * kLanes) == 0) {
      weighted_values<4>(row, values, L, H, o);
    } else {
      for (int64_t s = 0; s < L; ++s) {
        if (row[s] == 0.0f) continue;
        const float weight = row[s];
        const float* value = values + s * H;
        for (int64_t h = 0; h < H; ++h) o[h] += weight * value[h];
      }
    }
    for (int64_t h = 0; h < H; ++h) o[h] /= total;
  }
}

ffi::Error DecodeAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                           ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> q_pos, ffi::Buffer<ffi::S32> k_pos,
                           ffi::Result<ffi::Buffer<ffi::F32>> out, int64_t window) {
  auto q_dims = q.dimensions(), k_dims = k.dimensions(), v_dims = v.dimensions();
  if (q_dims.size() != 3 || k_dims.size() != 4 || v_dims.size() != 4)
    return ffi::Error::InvalidArgument("decode_attention takes q [B, N, H], keys [B, K, H, S], values [B, K, S, H]");
  const int64_t B = q_dims[0], N = q_dims[1], H = q_dims[2], K = k_dims[1], S = k_dims[3];
  if (K == 0 || k_dims[0] != B || k_dims[2] != H || N % K || v_dims[0] != B || v_dims[1] != K || v_dims[2] != S ||
      v_dims[3] != H || q_pos.element_count() != B || k_pos.element_count() != B * S)
    return ffi::Error::InvalidArgument("decode_attention: shapes of q, keys, values or positions disagree");
  Parallel<AttentionProblem> job;
  job.problem = AttentionProblem{q.typed_data(), k.typed_data(), v.typed_data(), q_pos.typed_data(),
                                 k_pos.typed_data(), B, K, N / K, H, S, window, out->typed_data()};
  job.run = [](const AttentionProblem& p, int64_t task, int64_t) { attend(p, task / p.K, task % p.K); };
  job.chunks = B * K;
  int64_t filled = 0;  // slots read
  for (int64_t b = 0; b < B; ++b) filled += slots_read(k_pos.typed_data() + b * S, S);
  return job.launch(pool, 2 * filled * K * H * static_cast<int64_t>(sizeof(float)) >= kParallelBytes);
}
}  // namespace
}  // namespace lmjax

XLA_FFI_DEFINE_HANDLER_SYMBOL(LmjaxDecodeAttention, lmjax::DecodeAttention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("window"));

