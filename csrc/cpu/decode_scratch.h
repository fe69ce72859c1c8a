// Tile sizes of the CPU decode step and the scratch they need, in one place so that the
// kernel's allocations and decode_workspace_bytes (what SelectiveKVCache.memory_bytes reports)
// are the same formulas.
#pragma once

#include <algorithm>
#include <cstdint>

namespace selattn::cpu::decode {

// Attention rows of one tile: the query heads of one kv group times the chunk tokens, so K/V
// tiles are read once per group (GQA). Same shape as the prefill forward's tiles.
constexpr int64_t kBr = 128;
// Cache slots per attention tile.
constexpr int64_t kBc = 256;
// Cache slots per selection work item (the selection GEMM and the F offsets of those slots).
constexpr int64_t kSc = 256;
// Groups with fewer rows (decode with few q heads per kv head) take the row-at-a-time path:
// a GEMM of a handful of rows is all overhead, the row path streams K and V once with dot4.
constexpr int64_t kMinTiledRows = 8;

// Tile widths actually used for a cache of `slots` slots (small caches get small tiles).
inline int64_t attend_cols(int64_t slots) { return std::min(kBc, slots); }
inline int64_t select_cols(int64_t slots) { return std::min(kSc, slots); }

// Per-sequence F offsets of every chunk query against every slot (acc elements).
inline int64_t offsets_elems(int64_t batch, int64_t chunk, int64_t slots) {
  return batch * chunk * slots;
}

// Selection phase, per thread (acc elements): q_sel rows, one k_sel tile, the logits tile and
// the running column sums.
inline int64_t select_elems(int64_t chunk, int64_t head_dim, int64_t slots) {
  const int64_t sc = select_cols(slots);
  return chunk * head_dim + sc * head_dim + chunk * sc + sc;
}
// ... plus two int32 thresholds per slot of the tile.
inline int64_t select_int32(int64_t slots) { return 2 * select_cols(slots); }

// Tiled attention, per thread (acc elements): q rows, logits, output accumulator, row max and
// sum, one K and one V tile.
inline int64_t tiled_elems(int64_t head_dim, int64_t slots) {
  const int64_t bc = attend_cols(slots);
  return kBr * head_dim + kBr * bc + kBr * head_dim + 2 * kBr + 2 * bc * head_dim;
}

// Row path, per thread (acc elements), for up to kMinTiledRows - 1 rows: q rows, logits over all
// slots, accumulators, four converted K rows, one V row, the row sums.
inline int64_t row_elems(int64_t head_dim, int64_t slots) {
  constexpr int64_t R = kMinTiledRows - 1;
  return R * head_dim + R * slots + R * head_dim + 4 * head_dim + head_dim + R;
}

// Eviction, per thread: candidate slot indices.
inline int64_t evict_int64(int64_t slots) { return slots; }

}  // namespace selattn::cpu::decode
