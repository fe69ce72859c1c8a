// CPU kernel of one pruned-KV-cache step (csrc/cpu/decode_step.cpp).
#pragma once

#include "decode_params.h"

namespace selattn::cpu {

// Writes p.out (every element) and updates the cache state in place: k_cache, v_cache, f,
// pos, seq_len. Throws if a sequence has fewer free slots than new tokens (only possible when
// the cache tensors were edited by hand: after every step at most `budget` slots are used).
void decode_step(const DecodeParams& p);

}  // namespace selattn::cpu
