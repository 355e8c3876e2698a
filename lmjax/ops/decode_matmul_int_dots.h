// decode_matmul.cc's int8 and int4 path on CPUs with integer dot products: AVX-512 VNNI (vpdpbusd, 64
// byte products an instruction) or AVX2 (vpmaddubsw then vpmaddwd, 32 byte products in two), instead of
// converting every weight to fp32, which bounds the fp32 path at ~10 GB/s of int8 a core on AVX-512 (on
// an AVX2 EPYC, before this path and the fused path's AVX2 conversions, GCC converted int8 lane by lane:
// SmolLM2 int8 decode 12 tok/s, BUILD_NOTES). As llama.cpp does for its Q8_0/Q4 dot products, x is quantized for the
// product: per row, in blocks of 32 inputs, xq = rint(x / sx), sx = max|x| / 127 (fp32 sums of x feed the
// offsets). Exact for every int8 weight, -128 included, on both:
//   - vpdpbusd multiplies unsigned by signed bytes, so it takes the weights as w + 128 (an XOR of the
//     sign bit) times xq, which adds 128 * (sum of xq) to each dot; that sum depends on x only, so it is
//     computed once per block of x and taken as the dot's starting value, negated.
//   - vpmaddubsw adds two unsigned-by-signed products into a saturating int16, which w + 128 would
//     overflow (2 * 255 * 127); it takes |w| (<= 128) times xq with w's sign (|xq| <= 127), at most
//     2 * 128 * 127 = 32512, as llama.cpp's AVX2 path does with the roles of x and w swapped.
//
// int4 (two per byte, element 2i in the low nibble) takes the same dots: 32 weight bytes give 64 nibbles,
// the low ones (the even inputs of a 64-input chunk) in bytes 0-31 and the high ones (odd inputs) in
// 32-63, each as q + 8 in [0, 15] (the nibble XOR 8), against x's quantized bytes laid out the same way
// per chunk (`x_q4`: 32 even inputs, then 32 odd); the starting value is -8 * (sum of xq).
// Included by decode_matmul.cc after Problem and Prepared.

#pragma once

#include <limits>

#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && defined(__AVX512VL__) && \
    defined(__F16C__)
#define LMJAX_INT_DOTS 512
#include <immintrin.h>
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define LMJAX_INT_DOTS 256
#include <immintrin.h>
#endif

namespace lmjax {
namespace {

constexpr int64_t kXBlock = 32;  // inputs of x that share one scale

// The integer path takes int8 and int4 weights in groups of a multiple of 32 over rows of a multiple of
// 64 inputs, whatever the number of rows of x: each row's result is the same at 1 row or 16 (the
// server's batch and generate() agree), and the rounding of x does not depend on the batch.
inline bool int_dots_take(const Problem& p) {
#ifdef LMJAX_INT_DOTS
  return (p.w.bits == 8 || p.w.bits == 4) && p.w.group_size % kXBlock == 0 && p.K % 64 == 0;
#else
  return false;
#endif
}

#ifdef LMJAX_INT_DOTS
// 127 / top, or 0 where that is not finite: top 0, NaN, or below ~3.7e-37 (such a block's inputs count as 0).
inline float inverse_scale(float top) {
  const float inverse = 127.0f / top;
  return top > 0.0f && inverse <= std::numeric_limits<float>::max() ? inverse : 0.0f;
}

// 32 inputs of x quantized into out; returns max |x| (sx = that / 127), NaN if an input is NaN, so that
// the products come out NaN as the fp32 path's do (the integer max would drop it). cvtps rounds to
// nearest even, as nearbyint; |xq| <= 127, so the narrowing is exact. Vectorised: a scalar loop
// (nearbyint per input) cost ~0.5 ms of a ~6 ms int8 token over 211 calls.
inline float quantize_block(const float* x, int8_t* out) {
#if LMJAX_INT_DOTS == 512
  const __m512 lo = _mm512_loadu_ps(x), hi = _mm512_loadu_ps(x + 16);
  const bool nan = _mm512_cmp_ps_mask(lo, lo, _CMP_UNORD_Q) | _mm512_cmp_ps_mask(hi, hi, _CMP_UNORD_Q);
  const float top = nan ? std::numeric_limits<float>::quiet_NaN()
                        : _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(lo), _mm512_abs_ps(hi)));
  const __m512 inverse = _mm512_set1_ps(inverse_scale(top));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(out), _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(lo, inverse))));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 16),
                   _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(hi, inverse))));
  return top;
#else
  const __m256 sign = _mm256_set1_ps(-0.0f);
  __m256 v[4], top8 = _mm256_setzero_ps(), unordered = _mm256_setzero_ps();
  for (int i = 0; i < 4; ++i) {
    v[i] = _mm256_loadu_ps(x + 8 * i);
    top8 = _mm256_max_ps(top8, _mm256_andnot_ps(sign, v[i]));
    unordered = _mm256_or_ps(unordered, _mm256_cmp_ps(v[i], v[i], _CMP_UNORD_Q));
  }
  __m128 top4 = _mm_max_ps(_mm256_castps256_ps128(top8), _mm256_extractf128_ps(top8, 1));
  top4 = _mm_max_ps(top4, _mm_movehl_ps(top4, top4));
  const float top = _mm256_movemask_ps(unordered) ? std::numeric_limits<float>::quiet_NaN()
                                                  : _mm_cvtss_f32(_mm_max_ss(top4, _mm_movehdup_ps(top4)));
  const __m256 inverse = _mm256_set1_ps(inverse_scale(top));
  __m256i q[4];
  for (int i = 0; i < 4; ++i) q[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], inverse));
  // The packs work within 128-bit lanes: 32-bit groups come out in the order 0 4 1 5 2 6 3 7.
  const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out),
                      _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
  return top;
#endif
}

// x's xq as bytes [M, K] and its scales [M, K / 32] (for int4 weights also `x_q4`, each 64-input chunk's
// even inputs then its odd ones).
inline void quantize_x(const Problem& p, Prepared& prep) {
  const int64_t K = p.K;
  prep.x_q.assign(p.M * K, 0);
  prep.x_scale.assign(p.M * K / kXBlock, 0.0f);
  for (int64_t b = 0; b < p.M * K / kXBlock; ++b)
    prep.x_scale[b] = quantize_block(p.x + b * kXBlock, prep.x_q.data() + b * kXBlock) / 127.0f;
  if (p.w.bits != 4) return;
  prep.x_q4.resize(p.M * K);
  for (int64_t i = 0; i < p.M * K; i += 64)
    for (int64_t k = 0; k < 32; ++k) {
      prep.x_q4[i + k] = prep.x_q[i + 2 * k];
      prep.x_q4[i + 32 + k] = prep.x_q[i + 2 * k + 1];
    }
}

// Elements i and i + 1 of a scale array (f32 or f16: the weights', or x's) in lanes 0 and 1.
__attribute__((always_inline)) inline __m128 two_groups(const void* values, bool f16, int64_t i) {
  if (f16) {
    uint32_t both;
    std::memcpy(&both, static_cast<const uint16_t*>(values) + i, sizeof(both));
    return _mm_cvtph_ps(_mm_cvtsi32_si128(static_cast<int>(both)));
  }
  return _mm_castsi128_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(static_cast<const float*>(values) + i)));
}

// The weight scales of a chunk's two halves (its inputs 0-31 and 32-63: groups `first` and `second` of
// the row whose groups start at group0) in lanes 0 and 1. Groups hold a multiple of 32 inputs, so
// second is first, or first + 1 where the chunk crosses a group boundary (always for groups of 32).
__attribute__((always_inline)) inline __m128 chunk_scales(const Weight& w, int64_t group0, int64_t first, int64_t second) {
  if (second != first) return two_groups(w.scale, w.scale_f16, group0 + first);
  return _mm_set1_ps(w.group_value(w.scale, w.scale_f16, group0 + first));
}

// sum over groups g of offset[group0 + g] * sums[g]: a row's offsets against x's group sums.
inline float offsets_dot(const Weight& w, int64_t group0, const float* sums, int64_t groups) {
#if LMJAX_INT_DOTS == 512
  __m512 acc = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; g += 16) {
    const __mmask16 mask = groups - g >= 16 ? 0xffff : static_cast<__mmask16>((1u << (groups - g)) - 1);
    const __m512 offset =
        w.offset_f16
            ? _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, static_cast<const uint16_t*>(w.offset) + group0 + g))
            : _mm512_maskz_loadu_ps(mask, static_cast<const float*>(w.offset) + group0 + g);
    acc = _mm512_fmadd_ps(offset, _mm512_maskz_loadu_ps(mask, sums + g), acc);
  }
  return _mm512_reduce_add_ps(acc);
#else
  float total = 0.0f;
  for (int64_t g = 0; g < groups; ++g) total += w.group_value(w.offset, w.offset_f16, group0 + g) * sums[g];
  return total;
#endif
}

// Where a tile's bytes lie. Weights: rows as stored, or a tile (`int_dots_columns_of` gives tiles whole:
// NW == tile_rows, n0 a multiple of it), a chunk's rows side by side, one stream, so the prefetch runs
// kPrefetchBytes ahead of it; chunk c of row j starts at rows + j * row_step + c * chunk_step. x: row m's
// quantized bytes start at x_q + m * K (int4 tiles take them in the nibbles' order).
template <int BITS>
struct TileBytes {
  const int8_t* rows;
  int64_t row_step, chunk_step, ahead;
  const int8_t* x_q;
  TileBytes(const Weight& w, const Prepared& prep, int64_t K, int64_t n0, int NW)
      : x_q(BITS == 4 ? prep.x_q4.data() : prep.x_q.data()) {
    const int64_t row_bytes = BITS == 4 ? K / 2 : K, chunk_bytes = 64 * BITS / 8;
    const bool tiled = w.tile_rows > 1;
    rows = static_cast<const int8_t*>(w.values) + n0 * row_bytes;
    row_step = tiled ? chunk_bytes : row_bytes;
    chunk_step = tiled ? w.tile_rows * chunk_bytes : chunk_bytes;
    ahead = tiled ? kPrefetchBytes : prefetch_ahead(NW, row_bytes);
  }
};

// y[m, n]: the row's dots (already summed over lanes and chunks) plus its offsets.
inline void store_total(const Problem& p, const Prepared& prep, int64_t m, int64_t n, float dots) {
  const int64_t groups = p.K / p.w.group_size;
  if (p.w.offset) dots += offsets_dot(p.w, n * groups, prep.x_group_sums.data() + m * groups, groups);
  p.y[m * p.N + n] = dots;
}
#endif

#if LMJAX_INT_DOTS == 512
// Lane l of a chunk's dot products sums its bytes 4l..4l+3: for int8 inputs 4l..4l+3 of the chunk, so
// lanes 0-7 hold its first 32 inputs and 8-15 the second; for int4, lanes 0-3 and 8-11 the first 32
// (even and odd inputs), 4-7 and 12-15 the second.
template <int BITS>
__attribute__((always_inline)) inline __m512 per_lane(__m128 first_second) {
  const __m512i index = BITS == 8 ? _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1)
                                  : _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1);
  return _mm512_permutexvar_ps(index, _mm512_castps128_ps512(first_second));
}

// A chunk of 64 weights of a row as unsigned bytes w + 128 (int8) or q + 8 (int4, nibbles unpacked
// low ones first), in the order of x's bytes.
template <int BITS>
__attribute__((always_inline)) inline __m512i biased_weights(const int8_t* at) {
  if (BITS == 8) return _mm512_xor_si512(_mm512_loadu_si512(at), _mm512_set1_epi8(static_cast<char>(0x80)));
  const __m256i bytes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(at));
  const __m512i both = _mm512_inserti64x4(_mm512_castsi256_si512(bytes), _mm256_srli_epi16(bytes, 4), 1);
  return _mm512_xor_si512(_mm512_and_si512(both, _mm512_set1_epi8(0x0f)), _mm512_set1_epi8(0x08));
}

// y[m0:m0+MX, n0:n0+NW], 64 inputs a step: for each 32-input half, (sum of xq * w) * sx * scale.
template <int MX, int NW, int BITS>
void int_dots_tile(const Problem& p, const Prepared& prep, int64_t m0, int64_t n0) {
  const Weight& w = p.w;
  const int64_t K = p.K, G = w.group_size, groups = K / G;
  const TileBytes<BITS> at(w, prep, K, n0, NW);
  const __m512i bias = _mm512_set1_epi8(BITS == 4 ? 8 : static_cast<char>(0x80));
  __m512 acc[MX][NW];
  for (int i = 0; i < MX; ++i)
    for (int j = 0; j < NW; ++j) acc[i][j] = _mm512_setzero_ps();
  for (int64_t c = 0; c < K / 64; ++c) {
    __m512i x_q[MX], start[MX];
    __m512 x_scale[MX];
    for (int i = 0; i < MX; ++i) {
      x_q[i] = _mm512_loadu_si512(at.x_q + (m0 + i) * K + c * 64);
      // -bias * (sum of xq over each lane's 4 inputs): the dots' starting value.
      start[i] = _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_dpbusd_epi32(_mm512_setzero_si512(), bias, x_q[i]));
      const float* sx = prep.x_scale.data() + (m0 + i) * K / kXBlock + 2 * c;
      x_scale[i] = per_lane<BITS>(two_groups(sx, false, 0));
    }
    const int64_t first = c * 64 / G, second = (c * 64 + 32) / G;  // the halves' groups
    for (int j = 0; j < NW; ++j) {
      const int8_t* chunk = at.rows + j * at.row_step + c * at.chunk_step;
      _mm_prefetch(reinterpret_cast<const char*>(chunk + at.ahead), _MM_HINT_T1);
      const __m512i weights = biased_weights<BITS>(chunk);
      const __m512 w_scale = per_lane<BITS>(chunk_scales(w, (n0 + j) * groups, first, second));
      for (int i = 0; i < MX; ++i) {
        const __m512i dots = _mm512_dpbusd_epi32(start[i], weights, x_q[i]);
        acc[i][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dots), _mm512_mul_ps(x_scale[i], w_scale), acc[i][j]);
      }
    }
  }
  for (int i = 0; i < MX; ++i)
    for (int j = 0; j < NW; ++j) store_total(p, prep, m0 + i, n0 + j, _mm512_reduce_add_ps(acc[i][j]));
}
#elif LMJAX_INT_DOTS == 256
// The AVX2 tile sums each row's dots over a chunk's half in integers and scales the sums, 8 at a time,
// in one vector whose lane 2j + h holds weight row j's half h: scaling every 8-lane dot vector on its own
// (a broadcast of sx * scale, a conversion and an FMA each) made the loop compute-bound below the
// memory's rate (a chain of SmolLM2's int8 matrices from cache: 25 GB/s on the AVX2 EPYC).

// Lane 2j + h: the sum of dots[j][h]'s 8 lanes (int8: a register per half).
__attribute__((always_inline)) inline __m256i half_sums(const __m256i (&dots)[4][2]) {
  __m256i pairs[4];
  for (int j = 0; j < 4; ++j) pairs[j] = _mm256_hadd_epi32(dots[j][0], dots[j][1]);
  const __m256i first = _mm256_hadd_epi32(pairs[0], pairs[1]), second = _mm256_hadd_epi32(pairs[2], pairs[3]);
  return _mm256_add_epi32(_mm256_permute2x128_si256(first, second, 0x20),
                          _mm256_permute2x128_si256(first, second, 0x31));
}

// Lane 2j + h: the sum of dots[j]'s lanes 4h..4h+3 (int4: one register holds both halves).
__attribute__((always_inline)) inline __m256i half_sums(const __m256i (&dots)[4]) {
  const __m256i sums = _mm256_hadd_epi32(_mm256_hadd_epi32(dots[0], dots[1]), _mm256_hadd_epi32(dots[2], dots[3]));
  return _mm256_permutevar8x32_epi32(sums, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

// Lane 2j + h: the scale of weight row j (of the rows whose groups start at group0, `groups` apart) for
// the chunk's half h (groups `first` and `second`); rows past NW 0.
template <int NW>
__attribute__((always_inline)) inline __m256 tile_scales(const Weight& w, int64_t group0, int64_t groups,
                                                        int64_t first, int64_t second) {
  if (w.scale_f16 && second == first + 1) {  // GGUF's Q8_0 and Q4 blocks: each row's pair is 4 bytes
    int32_t pairs[4] = {};
    for (int j = 0; j < NW; ++j)
      std::memcpy(&pairs[j], static_cast<const uint16_t*>(w.scale) + group0 + j * groups + first, sizeof(int32_t));
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(pairs)));
  }
  float scales[8] = {};
  for (int j = 0; j < NW; ++j) {
    scales[2 * j] = w.group_value(w.scale, w.scale_f16, group0 + j * groups + first);
    scales[2 * j + 1] = w.group_value(w.scale, w.scale_f16, group0 + j * groups + second);
  }
  return _mm256_loadu_ps(scales);
}

// y[m0:m0+MX, n0:n0+NW], 64 inputs a step in two 32-byte registers. int8: register h holds half h (one
// block of x, one weight group). int4: a register of even inputs and one of odd ones, each with the first
// half in lanes 0-3 and the second in 4-7, so their dots add before the sums.
template <int MX, int NW, int BITS>
void int_dots_tile(const Problem& p, const Prepared& prep, int64_t m0, int64_t n0) {
  const Weight& w = p.w;
  const int64_t K = p.K, G = w.group_size, groups = K / G;
  const TileBytes<BITS> at(w, prep, K, n0, NW);
  const __m256i ones = _mm256_set1_epi16(1), low4 = _mm256_set1_epi8(0x0f), eight = _mm256_set1_epi8(8);
  __m256 acc[MX];  // lane 2j + h: row j's dots over the chunks' halves h, scaled
  for (int i = 0; i < MX; ++i) acc[i] = _mm256_setzero_ps();
  for (int64_t c = 0; c < K / 64; ++c) {
    __m256i x_q[MX][2], start[MX];
    __m256 x_scales[MX];  // lane 2j + h: sx of half h
    for (int i = 0; i < MX; ++i) {
      const int8_t* x_chunk = at.x_q + (m0 + i) * K + c * 64;
      for (int h = 0; h < 2; ++h) x_q[i][h] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x_chunk + 32 * h));
      x_scales[i] = _mm256_castpd_ps(
          _mm256_broadcast_sd(reinterpret_cast<const double*>(prep.x_scale.data() + (m0 + i) * K / kXBlock + 2 * c)));
      if (BITS == 4) {  // lane 2j + h: 8 * (sum of xq over half h), the biased nibbles' excess
        const __m256i eights = _mm256_madd_epi16(
            _mm256_add_epi16(_mm256_maddubs_epi16(eight, x_q[i][0]), _mm256_maddubs_epi16(eight, x_q[i][1])), ones);
        const __m256i pairs = _mm256_hadd_epi32(eights, eights), by_half = _mm256_hadd_epi32(pairs, pairs);
        start[i] = _mm256_permutevar8x32_epi32(by_half, _mm256_setr_epi32(0, 4, 0, 4, 0, 4, 0, 4));
      }
    }
    const int64_t first = c * 64 / G, second = (c * 64 + 32) / G;  // the halves' groups
    const __m256 w_scales = tile_scales<NW>(w, n0 * groups, groups, first, second);
    if (BITS == 8) {
      __m256i magnitude[4][2] = {}, weights[4][2] = {};
      for (int j = 0; j < NW; ++j) {
        const int8_t* chunk = at.rows + j * at.row_step + c * at.chunk_step;
        _mm_prefetch(reinterpret_cast<const char*>(chunk + at.ahead), _MM_HINT_T1);
        for (int h = 0; h < 2; ++h) {
          weights[j][h] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(chunk + 32 * h));
          magnitude[j][h] = _mm256_sign_epi8(weights[j][h], weights[j][h]);  // |w|; -128 reads 128 unsigned
        }
      }
      for (int i = 0; i < MX; ++i) {
        __m256i dots[4][2] = {};
        for (int j = 0; j < NW; ++j)
          for (int h = 0; h < 2; ++h)
            dots[j][h] = _mm256_madd_epi16(
                _mm256_maddubs_epi16(magnitude[j][h], _mm256_sign_epi8(x_q[i][h], weights[j][h])), ones);
        acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(half_sums(dots)), _mm256_mul_ps(w_scales, x_scales[i]), acc[i]);
      }
    } else {
      __m256i low[4] = {}, high[4] = {};
      for (int j = 0; j < NW; ++j) {
        const int8_t* chunk = at.rows + j * at.row_step + c * at.chunk_step;
        _mm_prefetch(reinterpret_cast<const char*>(chunk + at.ahead), _MM_HINT_T1);
        const __m256i bytes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(chunk));
        low[j] = _mm256_xor_si256(_mm256_and_si256(bytes, low4), eight);
        high[j] = _mm256_xor_si256(_mm256_and_si256(_mm256_srli_epi16(bytes, 4), low4), eight);
      }
      for (int i = 0; i < MX; ++i) {
        __m256i dots[4] = {};
        for (int j = 0; j < NW; ++j)
          dots[j] = _mm256_madd_epi16(
              _mm256_add_epi16(_mm256_maddubs_epi16(low[j], x_q[i][0]), _mm256_maddubs_epi16(high[j], x_q[i][1])), ones);
        const __m256i sums = _mm256_sub_epi32(half_sums(dots), start[i]);
        acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), _mm256_mul_ps(w_scales, x_scales[i]), acc[i]);
      }
    }
  }
  for (int i = 0; i < MX; ++i) {
    float lanes[8];
    _mm256_storeu_ps(lanes, acc[i]);
    for (int j = 0; j < NW; ++j) store_total(p, prep, m0 + i, n0 + j, lanes[2 * j] + lanes[2 * j + 1]);
  }
}
#endif

#ifdef LMJAX_INT_DOTS
template <int NW, int BITS>
void int_dots_rows(const Problem& p, const Prepared& prep, int64_t n) {
  int64_t m = 0;
  for (; m + 4 <= p.M; m += 4) int_dots_tile<4, NW, BITS>(p, prep, m, n);
  switch (p.M - m) {
    case 3: int_dots_tile<3, NW, BITS>(p, prep, m, n); break;
    case 2: int_dots_tile<2, NW, BITS>(p, prep, m, n); break;
    case 1: int_dots_tile<1, NW, BITS>(p, prep, m, n); break;
    default: break;
  }
}

template <int BITS>
void int_dots_columns_of(const Problem& p, const Prepared& prep, int64_t n_begin, int64_t n_end) {
  int64_t n = n_begin;
  for (; n + 4 <= n_end; n += 4) int_dots_rows<4, BITS>(p, prep, n);
  if (p.w.tile_rows > 1) return;  // N and spans are multiples of 4 (DecodeMatmul checks N): no rows left
  for (; n < n_end; ++n) int_dots_rows<1, BITS>(p, prep, n);
}

inline void int_dots_columns(const Problem& p, const Prepared& prep, int64_t n_begin, int64_t n_end) {
  if (p.w.bits == 4) int_dots_columns_of<4>(p, prep, n_begin, n_end);
  else int_dots_columns_of<8>(p, prep, n_begin, n_end);
}
#else
inline void quantize_x(const Problem&, Prepared&) {}
inline void int_dots_columns(const Problem&, const Prepared&, int64_t, int64_t) {}
#endif

}  // namespace
}  // namespace lmjax
