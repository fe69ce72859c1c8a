// CPU kernel of one pruned-KV-cache step (csrc/cpu/decode_step.cpp).
#pragma once

#include <cstddef>
#include <cstdint>

#include "decode_params.h"

namespace selattn::cpu {

// Writes p.out (every element) and updates the cache state in place: k_cache, v_cache, f,
// pos, seq_len. Throws if a sequence has fewer free slots than new tokens (only possible when
// the cache tensors were edited by hand: after every step at most `budget` slots are used).
void decode_step(const DecodeParams& p);

// Peak bytes of scratch one decode_step with these sizes allocates on `threads` threads (the
// step allocates exactly this much, from the same formulas; nothing persists between steps).
// Independent of the number of query heads.
size_t decode_workspace_bytes(int64_t batch, int64_t heads_kv, int64_t chunk, int64_t head_dim,
                              int64_t slots, DType dtype, int64_t threads);

}  // namespace selattn::cpu
