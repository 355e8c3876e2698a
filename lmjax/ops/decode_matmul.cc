// y[M, N] = x[M, K] @ w[N, K]^T for the few rows of a decode step, on a CPU, as an XLA FFI custom
// call (lmjax/ops/decode_kernels.py builds and registers it; its docstring says why it exists).
//
// w is one of ops/quantized.py's QuantizedWeight layouts:
//   fp32    values f32 [N, K]                       (no scale)
//   int8    values s8  [N, K],     scale [N, K / G] (f32 or f16), offset [N, K / G] or empty
//   int4    values s8  [N, K / 2]  two per byte: element 2i in the low nibble, 2i+1 in the high one
// w[n, k] = q[n, k] * scale[n, k / G] + offset[n, k / G]. With tile_rows 4 (int8 and int4 on the
// integer path only) the values' bytes come in tiles of 4 rows, each tile 64 inputs at a time: the 4 rows' bytes
// of inputs 0-63 side by side, then of 64-127, ... (ops/quantized.py `tile`).
//
// int8 and int4 on CPUs with AVX-512 VNNI or AVX2: integer dots at any row count (decode_matmul_int_dots.h).
// Other quantized weights at one or two rows of x with groups of a multiple of 2 * kLanes (32 with AVX-512, 16
// otherwise): each weight byte converted
// in registers and used at once, one pass over the weights (decode_matmul_fused.h). Otherwise (`block`):
// 16 weight rows at a time (dequantized into a buffer that stays in cache; fp32 rows read where they
// are) times every row of x in register tiles of dot products (4x4, 2x8 or 1x16 with AVX-512's 16 lanes,
// 2x4 or 1x4 with 8).
//
// One call takes several weights that share x (a layer's q, k and v): x is prepared once, and the
// output rows of all of them are split into spans shared with helper threads (`Parallel`,
// decode_kernels.h).

#include <cmath>
#include <string>
#include <vector>

#if defined(__AVX512F__) || defined(__F16C__)
#include <immintrin.h>
#endif

#include "decode_kernels.h"

namespace lmjax {
namespace {

constexpr int kRowsW = 16;  // weight rows dequantized and multiplied together
// Bytes of a quantized weight read ahead by software prefetch, past the rows a tile reads together
// (`prefetch_ahead`); the fp32 tile reads ahead kRowsW rows. The hardware prefetchers do not ramp up on the
// short rows the tiles read side by side (a chain of SmolLM2's 210 int8 matvecs: 11.5 -> 22-24 GB/s); with
// weights stored in tiles (one stream) they do, and this still adds to them (SmolLM2 int8 decode 179 tok/s at
// 6 KB, 165 without, 168 at 2 KB, 170 at 12 KB; session 18, same process). Into L2, not L1 (_MM_HINT_T1 /
// locality 2): L2 keeps more misses in flight than L1's fill buffers; on an AMD EPYC (Zen 4) a chain of
// SmolLM2's int8 matrices ran 7.0-8.2 -> 4.5-6.0 ms (no change on session 16's Intel host). 6 KB was the best
// distance in interleaved rounds there, clearly only with huge-page weights (3.7-4.5 ms against 4.5-5.3 at 12
// KB and 4.8-5.3 at 3 KB). A prefetch is a hint, so reading past the end of a weight never faults.
constexpr int64_t kPrefetchBytes = 6144;

// How far ahead of a tile of `rows` rows of `row_bytes` to prefetch: kPrefetchBytes, or past the tile
// when its rows span more (rows of over 1536 int8 inputs at 4 a tile).
inline int64_t prefetch_ahead(int64_t rows, int64_t row_bytes) {
  return std::max(kPrefetchBytes, rows * row_bytes);
}

// IEEE half -> float, for GGUF's f16 block scales (one instruction with F16C).
inline float half_to_float(uint16_t h) {
#ifdef __F16C__
  return _cvtsh_ss(h);
#else
  uint32_t sign = (h & 0x8000u) << 16, exponent = (h >> 10) & 0x1f, mantissa = h & 0x3ffu, bits;
  if (exponent == 0) {
    if (mantissa == 0) {
      bits = sign;
    } else {  // subnormal: normalise
      exponent = 127 - 15 + 1;
      while (!(mantissa & 0x400u)) {
        mantissa <<= 1;
        --exponent;
      }
      bits = sign | (exponent << 23) | ((mantissa & 0x3ffu) << 13);
    }
  } else if (exponent == 31) {
    bits = sign | 0x7f800000u | (mantissa << 13);
  } else {
    bits = sign | ((exponent + 127 - 15) << 23) | (mantissa << 13);
  }
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
#endif
}

struct Weight {
  const void* values;
  int bits;  // 32 (fp32), 8 or 4
  const void* scale;
  bool scale_f16;
  const void* offset;  // nullptr: none
  bool offset_f16;
  int64_t group_size;
  int tile_rows;  // 1: rows as stored; 4: tiles (top of file)

  float group_value(const void* p, bool f16, int64_t i) const {
    return f16 ? half_to_float(static_cast<const uint16_t*>(p)[i]) : static_cast<const float*>(p)[i];
  }

  // Row n as K floats into out.
  void dequantize_row(int64_t n, int64_t K, float* out) const {
    if (bits == 32) {
      std::memcpy(out, static_cast<const float*>(values) + n * K, K * sizeof(float));
      return;
    }
    const int64_t groups = K / group_size;
    const int8_t* row = static_cast<const int8_t*>(values) + n * (bits == 4 ? K / 2 : K);
    for (int64_t g = 0; g < groups; ++g) {
      const float s = group_value(scale, scale_f16, n * groups + g);
      const float o = offset ? group_value(offset, offset_f16, n * groups + g) : 0.0f;
      float* dst = out + g * group_size;
      if (bits == 8) {
        const int8_t* q = row + g * group_size;
        for (int64_t k = 0; k < group_size; ++k) dst[k] = static_cast<float>(q[k]) * s + o;
      } else {
        const int8_t* q = row + g * group_size / 2;
        for (int64_t k = 0; k < group_size / 2; ++k) {
          const int8_t byte = q[k];
          dst[2 * k] = static_cast<float>(static_cast<int8_t>(byte << 4) >> 4) * s + o;
          dst[2 * k + 1] = static_cast<float>(byte >> 4) * s + o;
        }
      }
    }
  }
};

struct Problem {
  const float* x;  // [M, K]
  int64_t M, K, N;
  Weight w;
  float* y;  // [M, N]
};

// Lane i of the result: the sum of v[i]'s lanes, for 16 lanes (AVX-512). Four rounds of halving, each adding
// two vectors' halves side by side (15 adds, 30 shuffles, against 240 scalar adds lane by lane).
#if (defined(__clang__) || __GNUC__ >= 12) && defined(__AVX512F__)
constexpr bool kHasShuffle = true;  // __builtin_shufflevector: GCC 12+, Clang
inline vfloat sum_lanes16(const vfloat* v) {
  vfloat c[8], e[4], g[2];
  for (int i = 0; i < 8; ++i)  // c[i]: lanes 0-7 partial sums of v[2i], 8-15 of v[2i+1]
    c[i] = __builtin_shufflevector(v[2 * i], v[2 * i + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
           __builtin_shufflevector(v[2 * i], v[2 * i + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  for (int i = 0; i < 4; ++i)  // e[i]: four lanes each of v[4i..4i+3]
    e[i] = __builtin_shufflevector(c[2 * i], c[2 * i + 1], 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
           __builtin_shufflevector(c[2 * i], c[2 * i + 1], 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
  for (int i = 0; i < 2; ++i)  // g[i]: two lanes each of v[8i..8i+7]
    g[i] = __builtin_shufflevector(e[2 * i], e[2 * i + 1], 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29) +
           __builtin_shufflevector(e[2 * i], e[2 * i + 1], 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31);
  return __builtin_shufflevector(g[0], g[1], 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30) +
         __builtin_shufflevector(g[0], g[1], 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
}
#else
constexpr bool kHasShuffle = false;  // older GCC, or 8 lanes: lane by lane (`tile`'s other branch)
inline vfloat sum_lanes16(const vfloat* v) { return v[0]; }
#endif

// Keeps v in a register: without it GCC 12 reloads each weight vector for every row of x and folds x into
// the FMAs as a memory operand, 28 loads per 16 FMAs where 8 are needed, and a tile of 16 rows ran at
// ~42% of the FMA peak, bound by loads (Zen 4 loads one 64-byte vector a cycle).
#ifdef __AVX512F__
inline void in_register(vfloat& v) { asm("" : "+v"(v)); }
#elif defined(__AVX__)
inline void in_register(vfloat& v) { asm("" : "+x"(v)); }  // 8 lanes: a ymm register
#else
inline void in_register(vfloat&) {}
#endif

// y[m0:m0+MX, n0:n0+NW] from x rows m0.. and weight rows w_rows[0..NW) (row stride K): dot products
// along K in kLanes lanes, MX * NW accumulators (16 make a full AVX-512 register tile).
template <int MX, int NW>
void tile(const Problem& p, int64_t m0, int64_t n0, const float* w_rows) {
  const int64_t K = p.K, body = K - K % kLanes;
  vfloat acc[MX * NW];
  for (int a = 0; a < MX * NW; ++a) acc[a] = vfloat{};
  for (int64_t k = 0; k < body; k += kLanes) {
    vfloat wv[NW];
    for (int j = 0; j < NW; ++j) {
      __builtin_prefetch(w_rows + (kRowsW + j) * K + k, 0, 2);  // the next kRowsW rows, into L2
      wv[j] = load(w_rows + j * K + k);
      in_register(wv[j]);
    }
    for (int i = 0; i < MX; ++i) {
      vfloat xv = load(p.x + (m0 + i) * K + k);
      in_register(xv);
      for (int j = 0; j < NW; ++j) acc[i * NW + j] += xv * wv[j];
    }
  }
  float sums[MX * NW];
  if constexpr (MX * NW == kLanes && kHasShuffle) {
    const vfloat v = sum_lanes16(acc);
    std::memcpy(sums, &v, sizeof(v));
  } else {
    for (int a = 0; a < MX * NW; ++a) sums[a] = sum_lanes(acc[a]);
  }
  for (int i = 0; i < MX; ++i)
    for (int j = 0; j < NW; ++j) {
      float total = sums[i * NW + j];
      for (int64_t k = body; k < K; ++k) total += p.x[(m0 + i) * K + k] * w_rows[j * K + k];
      p.y[(m0 + i) * p.N + n0 + j] = total;
    }
}

// Every row of x against a block of kRowsW weight rows (fewer at the end of N: one at a time).
void block(const Problem& p, int64_t n0, int64_t count, const float* w_rows) {
  if (count < kRowsW) {
    for (int64_t j = 0; j < count; ++j)
      for (int64_t m = 0; m < p.M; ++m) tile<1, 1>(p, m, n0 + j, w_rows + j * p.K);
    return;
  }
  int64_t m = 0;
  if constexpr (kLanes == 16) {  // AVX-512's 32 registers: tiles of 16 accumulators
    for (; m + 4 <= p.M; m += 4)
      for (int j = 0; j < kRowsW; j += 4) tile<4, 4>(p, m, n0 + j, w_rows + j * p.K);
    if (m + 2 <= p.M) {
      tile<2, 8>(p, m, n0, w_rows);
      tile<2, 8>(p, m, n0 + 8, w_rows + 8 * p.K);
      m += 2;
    }
    if (m < p.M) tile<1, 16>(p, m, n0, w_rows);
  } else {  // 8 lanes (AVX2's 16 registers): 8 accumulators, 4 weight vectors, x; 16 accumulators spill
    for (; m + 2 <= p.M; m += 2)
      for (int j = 0; j < kRowsW; j += 4) tile<2, 4>(p, m, n0 + j, w_rows + j * p.K);
    if (m < p.M)
      for (int j = 0; j < kRowsW; j += 4) tile<1, 4>(p, m, n0 + j, w_rows + j * p.K);
  }
}

// What the fused kernel needs besides the problem: int4 weights pair with x's even and odd inputs
// (x_even[m, i] = x[m, 2i], low nibbles; x_odd, high nibbles), so no nibble is shuffled back into
// order; offsets add offset[n, g] * (sum of x over group g), x_group_sums [M, K / G].
struct Prepared {
  std::vector<float> x_even, x_odd, x_group_sums;
  std::vector<int8_t> x_q, x_q4;  // the integer path's quantized x (decode_matmul_int_dots.h)
  std::vector<float> x_scale;
};

}  // namespace
}  // namespace lmjax

#include "decode_matmul_fused.h"
#include "decode_matmul_int_dots.h"

namespace lmjax {
namespace {

// Output columns [n_begin, n_end).
void columns(const Problem& p, const Prepared& prep, int64_t n_begin, int64_t n_end) {
  if (int_dots_take(p)) {
    int_dots_columns(p, prep, n_begin, n_end);
    return;
  }
  if (fusable(p)) {
    if (p.w.bits == 8) fused_columns<8>(p, prep, n_begin, n_end);
    else fused_columns<4>(p, prep, n_begin, n_end);
    return;
  }
  thread_local std::vector<float> buffer;
  if (p.w.bits != 32) buffer.resize(kRowsW * p.K);
  for (int64_t n = n_begin; n < n_end; n += kRowsW) {
    const int64_t count = std::min<int64_t>(kRowsW, n_end - n);
    const float* w_rows = static_cast<const float*>(p.w.values) + n * p.K;  // fp32: rows as stored
    if (p.w.bits != 32) {
      for (int64_t j = 0; j < count; ++j) p.w.dequantize_row(n + j, p.K, buffer.data() + j * p.K);
      w_rows = buffer.data();
    }
    block(p, n, count, w_rows);
  }
}

Prepared prepare(const Problem& p) {
  Prepared prep;
  if (!fusable(p) && !int_dots_take(p)) return prep;
  const int64_t K = p.K, G = p.w.group_size, groups = K / G;
  if (p.w.bits == 4 && !int_dots_take(p)) {  // the fused path's
    prep.x_even.resize(p.M * K / 2);
    prep.x_odd.resize(p.M * K / 2);
    for (int64_t i = 0; i < p.M * K / 2; ++i) {
      prep.x_even[i] = p.x[2 * i];
      prep.x_odd[i] = p.x[2 * i + 1];
    }
  }
  if (int_dots_take(p)) quantize_x(p, prep);
  if (p.w.offset) {
    prep.x_group_sums.assign(p.M * groups, 0.0f);
    for (int64_t m = 0; m < p.M; ++m)
      for (int64_t k = 0; k < K; ++k) prep.x_group_sums[m * groups + k / G] += p.x[m * K + k];
  }
  return prep;
}

// The weights of one call share x (and so its preparation); tasks are spans of one weight's rows.
struct MatmulTasks {
  std::vector<Problem> problems;
  Prepared prepared;
  struct Span {
    int32_t weight;
    int64_t begin, end;
  };
  std::vector<Span> spans;
};

// Weight i of a call is arguments 3i..3i+2 after x (values, scale, offset) and result i.
ffi::Error weight_problem(const ffi::RemainingArgs& args, const ffi::RemainingRets& rets, size_t i,
                          const float* x, int64_t M, int64_t K, int32_t bits, int64_t group_size,
                          int32_t tile_rows, Problem& out) {
  auto values = args.get<ffi::AnyBuffer>(3 * i), scale = args.get<ffi::AnyBuffer>(3 * i + 1),
       offset = args.get<ffi::AnyBuffer>(3 * i + 2);
  auto y = rets.get<ffi::Buffer<ffi::F32>>(i);
  if (!values.has_value() || !scale.has_value() || !offset.has_value() || !y.has_value())
    return ffi::Error::InvalidArgument("decode_matmul: each weight is values, scale, offset and an f32 result");
  auto v_dims = values->dimensions(), y_dims = (*y)->dimensions();
  if (v_dims.size() != 2) return ffi::Error::InvalidArgument("decode_matmul takes 2-D weights");
  const int64_t N = v_dims[0];
  const bool is_float = bits == 32;
  if (is_float ? values->element_type() != ffi::F32 : values->element_type() != ffi::S8)
    return ffi::Error::InvalidArgument("decode_matmul: values must be f32 (bits 32) or s8 (bits 8, 4)");
  const std::string which = "decode_matmul: weight " + std::to_string(i);
  if (v_dims[1] * (bits == 4 ? 2 : 1) != K)
    return ffi::Error::InvalidArgument(which + "'s inputs do not match x's");
  if (y_dims.size() != 2 || y_dims[0] != M || y_dims[1] != N)
    return ffi::Error::InvalidArgument(which + ": its result must be [M, N]");
  auto is_float_type = [](const ffi::AnyBuffer& b) {
    return b.element_type() == ffi::F32 || b.element_type() == ffi::F16 || b.element_count() == 0;
  };
  if (!is_float_type(*scale) || !is_float_type(*offset))
    return ffi::Error::InvalidArgument("decode_matmul: scale and offset must be f32 or f16");
  const int64_t groups = is_float ? 0 : K / group_size;
  if (!is_float && static_cast<int64_t>(scale->element_count()) != N * groups)
    return ffi::Error::InvalidArgument("decode_matmul: scale must be [N, K / group_size]");
  const bool has_offset = offset->element_count() > 0;
  if (has_offset && static_cast<int64_t>(offset->element_count()) != N * groups)
    return ffi::Error::InvalidArgument("decode_matmul: offset must be [N, K / group_size] or empty");
  auto is_f16 = [](const ffi::AnyBuffer& b) { return b.element_type() == ffi::F16; };
  out = Problem{x, M, K, N,
                Weight{values->untyped_data(), bits, scale->untyped_data(), is_f16(*scale),
                       has_offset ? offset->untyped_data() : nullptr, is_f16(*offset), group_size, tile_rows},
                (*y)->typed_data()};
  if (tile_rows != 1 && (tile_rows != 4 || N % 4 || !int_dots_take(out)))
    return ffi::Error::InvalidArgument(which + ": tile_rows 4 takes int8 or int4 weights with rows a "
                                       "multiple of 4 on the integer path (groups of a multiple of 32, inputs "
                                       "of 64, an AVX-512 VNNI or AVX2 build); tile_rows must be 1 otherwise");
  return ffi::Error::Success();
}

ffi::Error DecodeMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::RemainingArgs weights,
                        ffi::RemainingRets ys, int32_t bits, int64_t group_size, int32_t tile_rows) {
  auto x_dims = x.dimensions();
  if (x_dims.size() != 2) return ffi::Error::InvalidArgument("decode_matmul takes x [M, K]");
  const int64_t M = x_dims[0], K = x_dims[1];
  if (bits != 32 && bits != 8 && bits != 4)
    return ffi::Error::InvalidArgument("decode_matmul: bits must be 32, 8 or 4");
  if (bits != 32 && (group_size <= 0 || K % group_size || (bits == 4 && group_size % 2)))
    return ffi::Error::InvalidArgument("decode_matmul: group_size must divide x's inputs (and be even for int4)");
  if (weights.size() != 3 * ys.size() || ys.empty())
    return ffi::Error::InvalidArgument("decode_matmul: takes x, then values, scale, offset per result");

  Parallel<MatmulTasks> job;
  MatmulTasks& tasks = job.problem;
  tasks.problems.resize(ys.size());
  int64_t rows = 0;
  for (size_t i = 0; i < ys.size(); ++i) {
    ffi::Error error =
        weight_problem(weights, ys, i, x.typed_data(), M, K, bits, group_size, tile_rows, tasks.problems[i]);
    if (error.failure()) return error;
    rows += tasks.problems[i].N;
  }
  if (M == 0 || K == 0 || rows == 0) {
    for (const Problem& p : tasks.problems) std::fill(p.y, p.y + p.M * p.N, 0.0f);
    return ffi::Error::Success();
  }
  // Offsets need x's group sums: prepare for a weight that has them, if any does.
  auto with_offset = std::find_if(tasks.problems.begin(), tasks.problems.end(),
                                  [](const Problem& p) { return p.w.offset != nullptr; });
  tasks.prepared = prepare(with_offset != tasks.problems.end() ? *with_offset : tasks.problems[0]);
  const int64_t weight_bytes = rows * K * (bits == 32 ? 4 : 1) / (bits == 4 ? 2 : 1);
  const int64_t threads = weight_bytes < kParallelBytes ? 1 : std::max<int64_t>(1, pool.num_threads());
  // One or two rows of x (a memory-bound call): one span a thread, since each span starts its prefetch
  // stream cold (SmolLM2 batch-1 decode, same-process A/B on the EPYC host: int8 135 -> 142 tok/s,
  // int4 156 -> 172, fp32 unchanged). More rows (compute-bound): several spans a thread, so that a
  // thread that starts late still finds work (16 rows of int8: 19.1 ms a chain with 4, 20.4 with 1).
  const int64_t spans_per_thread = M <= 2 ? 1 : 4;
  const int64_t per_chunk = (rows + spans_per_thread * threads - 1) / (spans_per_thread * threads);
  const int64_t chunk = std::max<int64_t>(kRowsW, (per_chunk + kRowsW - 1) / kRowsW * kRowsW);
  for (size_t i = 0; i < tasks.problems.size(); ++i)
    for (int64_t n = 0; n < tasks.problems[i].N; n += chunk)
      tasks.spans.push_back({static_cast<int32_t>(i), n, std::min(tasks.problems[i].N, n + chunk)});
  job.chunks = tasks.spans.size();
  job.run = [](const MatmulTasks& t, int64_t i, int64_t) {
    const MatmulTasks::Span& span = t.spans[i];
    columns(t.problems[span.weight], t.prepared, span.begin, span.end);
  };
  return job.launch(pool, threads > 1);
}

}  // namespace
}  // namespace lmjax

XLA_FFI_DEFINE_HANDLER_SYMBOL(LmjaxDecodeMatmul, lmjax::DecodeMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .RemainingArgs()
                                  .RemainingRets()
                                  .Attr<int32_t>("bits")
                                  .Attr<int64_t>("group_size")
                                  .Attr<int32_t>("tile_rows"));


// Whether this build multiplies int8 and int4 through integer dots (AVX-512 VNNI or AVX2), and so rounds x
// to int8: decode_kernels.py asks.
extern "C" int LmjaxDecodeIntegerDots() {
#ifdef LMJAX_INT_DOTS
  return 1;
#else
  return 0;
#endif
}
