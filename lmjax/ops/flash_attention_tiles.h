// The tile matmuls of flash_attention.cc: `gemm` with 4 rows x 64 columns of fp32 sums in registers,
// bf16 pairs through AVX-512 BF16's vdpbf16ps (fp32 sums of bf16 products, as XLA's bf16 dots), fp32
// through FMAs, and the packings of its B operand. Included only where __AVX512F__ is defined.

#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>

namespace lmjax {
namespace {

constexpr int64_t kTile = 64;  // query rows and key columns of a tile of scores
typedef uint16_t bf16;

// What a matmul of operand type E needs: `step` consecutive elements of the summed dimension are
// multiplied per lane (bf16 pairs: vdpbf16ps), so a packed operand holds them side by side.
template <typename E>
struct Operand;

template <>
struct Operand<float> {
  static constexpr int step = 1;
  static __m512 broadcast(const float* a) { return _mm512_set1_ps(*a); }
  static __m512 fma(__m512 acc, __m512 a, __m512 b) { return _mm512_fmadd_ps(a, b, acc); }
  // 16 values of `from` as E at `to`.
  static void store(const float* from, float* to) { _mm512_storeu_ps(to, _mm512_loadu_ps(from)); }
  // Rows r and r + 1 of fp32 P, 16 columns, into a packed operand: for fp32 just row r (the caller
  // steps one row at a time).
  static void pack_rows(const float* row, const float*, float* to) { store(row, to); }
};

#if defined(__AVX512BF16__)
template <>
struct Operand<bf16> {
  static constexpr int step = 2;
  static __m512 broadcast(const bf16* a) {
    uint32_t pair;
    std::memcpy(&pair, a, sizeof(pair));
    return (__m512)_mm512_set1_epi32(pair);
  }
  static __m512 fma(__m512 acc, __m512 a, __m512 b) { return _mm512_dpbf16_ps(acc, (__m512bh)a, (__m512bh)b); }
  static void store(const float* from, bf16* to) {  // rounded to nearest even, as XLA's converts
    _mm256_storeu_si256((__m256i*)to, (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(from)));
  }
  static void pack_rows(const float* row, const float* next, bf16* to) {
    const __m512i low = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(row)));
    const __m512i high = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(next)));
    _mm512_storeu_si512(to, _mm512_or_si512(low, _mm512_slli_epi32(high, 16)));
  }
};
#endif

// C[r, c] (+)= sum over d < depth of A[r * lda + d] * B[d, c], for r < rows (a multiple of 4) and c <
// cols (a multiple of 16). B is packed as [depth / step][cols][step] (K and V by flash_attention_cpu.py,
// P and dS by `pack_tile_rows`), so each step of d broadcasts `step` elements of a row of A against 16
// columns of B: 4 rows x NV vectors of C stay in registers while B streams from L1.
template <typename E, int NV>
void gemm_columns(const E* A, int64_t lda, int64_t rows, const E* B, int64_t depth, int64_t cols, float* C,
                  int64_t ldc, bool accumulate) {
  constexpr int s = Operand<E>::step;
  for (int64_t r0 = 0; r0 < rows; r0 += 4) {
    __m512 acc[4][NV];
    for (int r = 0; r < 4; ++r)
      for (int v = 0; v < NV; ++v)
        acc[r][v] = accumulate ? _mm512_loadu_ps(C + (r0 + r) * ldc + 16 * v) : _mm512_setzero_ps();
    for (int64_t d = 0; d < depth; d += s) {
      __m512 b[NV];
      for (int v = 0; v < NV; ++v) b[v] = _mm512_loadu_ps(B + d * cols + 16 * s * v);
      for (int r = 0; r < 4; ++r) {
        const __m512 a = Operand<E>::broadcast(A + (r0 + r) * lda + d);
        for (int v = 0; v < NV; ++v) acc[r][v] = Operand<E>::fma(acc[r][v], a, b[v]);
      }
    }
    for (int r = 0; r < 4; ++r)
      for (int v = 0; v < NV; ++v) _mm512_storeu_ps(C + (r0 + r) * ldc + 16 * v, acc[r][v]);
  }
}

template <typename E>
void gemm(const E* A, int64_t lda, int64_t rows, const E* B, int64_t depth, int64_t cols, float* C, int64_t ldc,
          bool accumulate) {
  constexpr int s = Operand<E>::step;
  for (int64_t c0 = 0; c0 < cols; c0 += 64) {
    const E* b = B + c0 * s;
    switch (std::min<int64_t>(4, (cols - c0) / 16)) {
      case 4: gemm_columns<E, 4>(A, lda, rows, b, depth, cols, C + c0, ldc, accumulate); break;
      case 3: gemm_columns<E, 3>(A, lda, rows, b, depth, cols, C + c0, ldc, accumulate); break;
      case 2: gemm_columns<E, 2>(A, lda, rows, b, depth, cols, C + c0, ldc, accumulate); break;
      default: gemm_columns<E, 1>(A, lda, rows, b, depth, cols, C + c0, ldc, accumulate); break;
    }
  }
}

// fp32 [kTile, kTile] tile -> the packed B of a product summed over its rows.
template <typename E>
void pack_tile_rows(const float* tile, E* to) {
  constexpr int s = Operand<E>::step;
  for (int64_t r = 0; r < kTile; r += s)
    for (int64_t c = 0; c < kTile; c += 16)
      Operand<E>::pack_rows(tile + r * kTile + c, tile + (r + s - 1) * kTile + c, to + r * kTile + c * s);
}

template <typename E>
void store_tile(const float* tile, E* to) {
  for (int64_t i = 0; i < kTile * kTile; i += 16) Operand<E>::store(tile + i, to + i);
}

}  // namespace
}  // namespace lmjax
