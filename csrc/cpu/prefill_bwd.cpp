// PLACEHOLDER (being written): fused CPU prefill bwd.
#include <c10/util/Exception.h>
#include "cpu/prefill_cpu.h"
namespace selattn::cpu {
void prefill_bwd(const PrefillParams&) { TORCH_CHECK(false, "selattn: CPU prefill_bwd not built yet"); }
}
