// Which keys a tile of queries sees in flash_attention.cc: causal order, packed segment ids and a
// sliding window, decided per 64 x 64 tile pair (skip, whole, or element by element).

#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#include "flash_attention_tiles.h"

namespace lmjax {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

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

}  // namespace
}  // namespace lmjax
