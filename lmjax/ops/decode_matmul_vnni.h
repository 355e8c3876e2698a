// decode_matmul.cc's int8 path on CPUs with AVX-512 VNNI: integer dot products (vpdpbusd, 64 byte
// products an instruction) instead of converting every weight to fp32, which bounds the fp32 path at
// ~10 GB/s of int8 a core. As llama.cpp does for its Q8_0/Q4 dot products, x is quantized for the
// product: per row, in blocks of 32 inputs, xq = rint(x / sx), sx = max|x| / 127 (fp32 sums of x feed
// the offsets). vpdpbusd multiplies unsigned by signed bytes, so it takes the weights as w + 128 (an
// XOR of the sign bit) times xq, which adds 128 * (sum of xq) to each dot; that sum depends on x only,
// so it is computed once per block of x and taken as the dot's starting value, negated. Exact for every
// int8 weight, -128 included.
// Included by decode_matmul.cc after Problem and Prepared.

#pragma once

#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512DQ__)
#define LMJAX_VNNI 1
#include <immintrin.h>
#endif

namespace lmjax {
namespace {

constexpr int64_t kXBlock = 32;  // inputs of x that share one scale

// The VNNI path takes int8 weights in groups of a multiple of 32 over rows of a multiple of 64 inputs,
// whatever the number of rows of x: each row's result is the same at 1 row or 16 (the server's batch
// and generate() agree), and the rounding of x does not depend on the batch.
inline bool vnni_takes(const Problem& p) {
#ifdef LMJAX_VNNI
  return p.w.bits == 8 && p.w.group_size % kXBlock == 0 && p.K % 64 == 0;
#else
  return false;
#endif
}

// x's xq as bytes [M, K] and its scales [M, K / 32]. Vectorised where the path runs: a
// scalar loop (nearbyint per input) cost ~0.5 ms of a ~6 ms int8 token over 211 calls.
inline void quantize_x(const Problem& p, Prepared& prep) {
  const int64_t K = p.K;
  prep.x_q.assign(p.M * K, 0);
  prep.x_scale.assign(p.M * K / kXBlock, 0.0f);
  for (int64_t m = 0; m < p.M; ++m)
    for (int64_t b = 0; b < K / kXBlock; ++b) {
      const float* x = p.x + m * K + b * kXBlock;
      int8_t* out = prep.x_q.data() + m * K + b * kXBlock;
#ifdef LMJAX_VNNI
      const __m512 lo = _mm512_loadu_ps(x), hi = _mm512_loadu_ps(x + 16);
      const float top = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(lo), _mm512_abs_ps(hi)));
      const __m512 inverse = _mm512_set1_ps(top > 0.0f ? 127.0f / top : 0.0f);
      // cvtps rounds to nearest even, as nearbyint; |xq| <= 127, so the narrowing is exact.
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out), _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(lo, inverse))));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 16),
                       _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(hi, inverse))));
#else
      float top = 0.0f;
      for (int64_t k = 0; k < kXBlock; ++k) top = std::max(top, std::fabs(x[k]));
      const float inverse = top > 0.0f ? 127.0f / top : 0.0f;
      for (int64_t k = 0; k < kXBlock; ++k) out[k] = static_cast<int8_t>(std::nearbyint(x[k] * inverse));
#endif
      prep.x_scale[m * K / kXBlock + b] = top / 127.0f;
    }
}

#ifdef LMJAX_VNNI
// The weight scales of inputs [64c, 64c + 64) of row n (its groups from row_group0), lanes 0-7 for the
// first 32 and 8-15 for the second (vpdpbusd's lane l sums inputs 4l..4l+3).
inline __m512 scale_pair(const Weight& w, int64_t row_group0, int64_t c) {
  const float s0 = w.group_value(w.scale, w.scale_f16, row_group0 + c * 64 / w.group_size),
              s1 = w.group_value(w.scale, w.scale_f16, row_group0 + (c * 64 + 32) / w.group_size);
  return _mm512_insertf32x8(_mm512_set1_ps(s0), _mm256_set1_ps(s1), 1);
}

// y[0:MX, n0:n0+NW], 64 inputs a step: for each 32-input half, (sum of xq * w) * sx * scale.
template <int MX, int NW>
void vnni_tile(const Problem& p, const Prepared& prep, int64_t m0, int64_t n0) {
  const Weight& w = p.w;
  const int64_t K = p.K, G = w.group_size, groups = K / G;
  const int8_t* rows = static_cast<const int8_t*>(w.values) + n0 * K;
  const __m512i sign = _mm512_set1_epi8(static_cast<char>(0x80));
  __m512 acc[MX][NW];
  for (int i = 0; i < MX; ++i)
    for (int j = 0; j < NW; ++j) acc[i][j] = _mm512_setzero_ps();
  for (int64_t c = 0; c < K / 64; ++c) {
    __m512i x_q[MX], start[MX];
    __m512 x_scale[MX];
    for (int i = 0; i < MX; ++i) {
      x_q[i] = _mm512_loadu_si512(prep.x_q.data() + (m0 + i) * K + c * 64);
      // -128 * (sum of xq over each lane's 4 inputs): the dots' starting value.
      start[i] = _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_dpbusd_epi32(_mm512_setzero_si512(), sign, x_q[i]));
      const float* sx = prep.x_scale.data() + (m0 + i) * K / kXBlock + 2 * c;
      x_scale[i] = _mm512_insertf32x8(_mm512_set1_ps(sx[0]), _mm256_set1_ps(sx[1]), 1);
    }
    for (int j = 0; j < NW; ++j) {
      _mm_prefetch(reinterpret_cast<const char*>(rows + (kPrefetchRows + j) * K + c * 64), _MM_HINT_T0);
      const __m512i w_biased = _mm512_xor_si512(_mm512_loadu_si512(rows + j * K + c * 64), sign);
      const __m512 w_scale = scale_pair(w, (n0 + j) * groups, c);
      for (int i = 0; i < MX; ++i) {
        const __m512i dots = _mm512_dpbusd_epi32(start[i], w_biased, x_q[i]);
        acc[i][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dots), _mm512_mul_ps(x_scale[i], w_scale), acc[i][j]);
      }
    }
  }
  for (int i = 0; i < MX; ++i)
    for (int j = 0; j < NW; ++j) {
      float total = _mm512_reduce_add_ps(acc[i][j]);
      if (w.offset)
        for (int64_t g = 0; g < groups; ++g)
          total += w.group_value(w.offset, w.offset_f16, (n0 + j) * groups + g) * prep.x_group_sums[(m0 + i) * groups + g];
      p.y[(m0 + i) * p.N + n0 + j] = total;
    }
}

template <int NW>
void vnni_rows(const Problem& p, const Prepared& prep, int64_t n) {
  int64_t m = 0;
  for (; m + 4 <= p.M; m += 4) vnni_tile<4, NW>(p, prep, m, n);
  switch (p.M - m) {
    case 3: vnni_tile<3, NW>(p, prep, m, n); break;
    case 2: vnni_tile<2, NW>(p, prep, m, n); break;
    case 1: vnni_tile<1, NW>(p, prep, m, n); break;
    default: break;
  }
}

inline void vnni_columns(const Problem& p, const Prepared& prep, int64_t n_begin, int64_t n_end) {
  int64_t n = n_begin;
  for (; n + 4 <= n_end; n += 4) vnni_rows<4>(p, prep, n);
  for (; n < n_end; ++n) vnni_rows<1>(p, prep, n);
}
#else
inline void vnni_columns(const Problem&, const Prepared&, int64_t, int64_t) {}
#endif

}  // namespace
}  // namespace lmjax
