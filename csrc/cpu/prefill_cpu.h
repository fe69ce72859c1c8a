// CPU prefill kernels (csrc/cpu/prefill_fwd.cpp, prefill_bwd.cpp). They may use ATen's
// parallel_for / vec / cpublas, and allocate their own thread scratch; never N x N per head.
#pragma once

#include "prefill_params.h"

namespace selattn::cpu {

// Writes p.out and p.lse.
void prefill_fwd(const PrefillParams& p);

// Writes p.dq, p.dk, p.dv, p.dq_sel, p.dk_sel (every element).
void prefill_bwd(const PrefillParams& p);

}  // namespace selattn::cpu
