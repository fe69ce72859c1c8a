// PLACEHOLDER (being written): fused CPU prefill fwd.
#include <c10/util/Exception.h>
#include "cpu/prefill_cpu.h"
namespace selattn::cpu {
void prefill_fwd(const PrefillParams&) { TORCH_CHECK(false, "selattn: CPU prefill_fwd not built yet"); }
}
