// decode_matmul.cc's path for quantized weights at one or two rows of x outside the integer-dot path
// (decode_matmul_int_dots.h: groups not a multiple of 32, rows not of a multiple of 64 inputs, no AVX2):
// each int8 (or pair of int4) is converted to fp32 in registers and used at once, one pass over the
// weight bytes, as a decode step needs. Included by decode_matmul.cc after Problem and Prepared.

#pragma once

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace lmjax {
namespace {

// Rows of x that the fused kernel below takes; more rows share a dequantized buffer (`columns`).
constexpr int kFusedRowsX = 2;

// kLanes int8 at p as floats; and kLanes bytes' low and high nibbles (signed int4) as floats. GCC lowers vector
// conversions from int8 lane by lane, so AVX-512 and AVX2 get intrinsics; other targets a loop.
#ifdef __AVX512F__
inline vfloat widen(const int8_t* p) {
  return (vfloat)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p)));
}
inline vfloat low_nibbles(const int8_t* p) {
  const __m512i bytes = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p));
  return (vfloat)_mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_slli_epi32(bytes, 28), 28));
}
inline vfloat high_nibbles(const int8_t* p) {
  return (vfloat)_mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p)), 4));
}
#elif defined(__AVX2__)  // 8 lanes
inline vfloat widen(const int8_t* p) {
  return (vfloat)_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
inline vfloat low_nibbles(const int8_t* p) {
  const __m256i bytes = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  return (vfloat)_mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_slli_epi32(bytes, 28), 28));
}
inline vfloat high_nibbles(const int8_t* p) {
  const __m256i bytes = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  return (vfloat)_mm256_cvtepi32_ps(_mm256_srai_epi32(bytes, 4));
}
#else
inline vfloat widen(const int8_t* p) {
  vfloat v;
  for (int l = 0; l < kLanes; ++l) v[l] = p[l];
  return v;
}
inline vfloat low_nibbles(const int8_t* p) {
  vfloat v;
  for (int l = 0; l < kLanes; ++l) v[l] = static_cast<int8_t>(p[l] << 4) >> 4;
  return v;
}
inline vfloat high_nibbles(const int8_t* p) {
  vfloat v;
  for (int l = 0; l < kLanes; ++l) v[l] = p[l] >> 4;
  return v;
}
#endif

// y[0:MX, n0:n0+NW] for quantized weights with groups of a multiple of 2 * kLanes inputs, converting each
// int8 (or pair of int4) in registers: one pass over the weight bytes, as a decode step needs.
template <int MX, int NW, int BITS>
void fused_tile(const Problem& p, const Prepared& prep, int64_t n0) {
  const Weight& w = p.w;
  const int64_t K = p.K, G = w.group_size, groups = K / G, row_bytes = BITS == 4 ? K / 2 : K;
  vfloat acc[MX][NW];
  float offsets[MX][NW] = {};
  for (int i = 0; i < MX; ++i)
    for (int j = 0; j < NW; ++j) acc[i][j] = vfloat{};
  const int8_t* rows = static_cast<const int8_t*>(w.values) + n0 * row_bytes;
  const int64_t ahead = prefetch_ahead(NW, row_bytes);
  for (int64_t g = 0; g < groups; ++g) {
    vfloat group_acc[MX][NW];
    for (int i = 0; i < MX; ++i)
      for (int j = 0; j < NW; ++j) group_acc[i][j] = vfloat{};
    if (BITS == 8) {
      for (int64_t k = g * G; k < (g + 1) * G; k += kLanes) {
        vfloat wv[NW];
        for (int j = 0; j < NW; ++j) {
          __builtin_prefetch(rows + ahead + j * row_bytes + k, 0, 2);
          wv[j] = widen(rows + j * row_bytes + k);
        }
        for (int i = 0; i < MX; ++i) {
          const vfloat xv = load(p.x + i * K + k);
          for (int j = 0; j < NW; ++j) group_acc[i][j] += xv * wv[j];
        }
      }
    } else {
      for (int64_t b = g * G / 2; b < (g + 1) * G / 2; b += kLanes) {
        vfloat low[NW], high[NW];
        for (int j = 0; j < NW; ++j) {
          __builtin_prefetch(rows + ahead + j * row_bytes + b, 0, 2);
          low[j] = low_nibbles(rows + j * row_bytes + b);
          high[j] = high_nibbles(rows + j * row_bytes + b);
        }
        for (int i = 0; i < MX; ++i) {
          const vfloat even = load(prep.x_even.data() + i * K / 2 + b);
          const vfloat odd = load(prep.x_odd.data() + i * K / 2 + b);
          for (int j = 0; j < NW; ++j) group_acc[i][j] += even * low[j] + odd * high[j];
        }
      }
    }
    for (int j = 0; j < NW; ++j) {
      const float s = w.group_value(w.scale, w.scale_f16, (n0 + j) * groups + g);
      const float o = w.offset ? w.group_value(w.offset, w.offset_f16, (n0 + j) * groups + g) : 0.0f;
      for (int i = 0; i < MX; ++i) {
        acc[i][j] += group_acc[i][j] * s;
        if (w.offset) offsets[i][j] += o * prep.x_group_sums[i * groups + g];
      }
    }
  }
  for (int i = 0; i < MX; ++i)
    for (int j = 0; j < NW; ++j) p.y[i * p.N + n0 + j] = sum_lanes(acc[i][j]) + offsets[i][j];
}

template <int BITS>
void fused_columns(const Problem& p, const Prepared& prep, int64_t n_begin, int64_t n_end) {
  int64_t n = n_begin;
  for (; n + 4 <= n_end; n += 4) {
    if (p.M == 1) fused_tile<1, 4, BITS>(p, prep, n);
    else fused_tile<2, 4, BITS>(p, prep, n);
  }
  for (; n < n_end; ++n) {
    if (p.M == 1) fused_tile<1, 1, BITS>(p, prep, n);
    else fused_tile<2, 1, BITS>(p, prep, n);
  }
}

bool fusable(const Problem& p) {
  return p.w.bits != 32 && p.M <= kFusedRowsX && p.w.group_size % (2 * kLanes) == 0;
}

}  // namespace
}  // namespace lmjax
