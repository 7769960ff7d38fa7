// The CPU kernels of the fastopt ops: every optimizer of the table
// registered with its generic step (step_cpu.h, instantiated per optimizer
// in generated translation units), the roofline, and the choice of ISA.
#include <torch/library.h>

#include <cstdlib>
#include <cstring>

#include "../optimizer_table.h"
#include "../rules/roofline.h"
#include "step_cpu.h"

FASTOPT_OPTIMIZERS(FASTOPT_EXTERN_CPU_STEP)

namespace fastopt::cpu {

Isa active_isa() {
  static const Isa isa = [] {
    Isa best = Isa::kBaseline;
#if FASTOPT_X86_MULTIVERSION
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) best = Isa::kAvx2;
    if (best == Isa::kAvx2 && __builtin_cpu_supports("avx512f") &&
        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512dq")) {
      best = Isa::kAvx512;
    }
#endif
    const char* requested = std::getenv("FASTOPT_CPU_CAPABILITY");
    if (requested != nullptr) {
      if (std::strcmp(requested, "baseline") == 0) return Isa::kBaseline;
      if (std::strcmp(requested, "avx2") == 0 && best != Isa::kBaseline) return Isa::kAvx2;
    }
    return best;
  }();
  return isa;
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    case Isa::kBaseline: return "baseline";
  }
  return "unknown";
}

namespace {

void roofline_cpu(at::TensorList params, at::TensorList grads, at::TensorList slots) {
  const StepLists lists{params, grads, roofline_slot_lists(params, slots), {}};
  rules::with_roofline(int(lists.slots.size()), [&](auto rule) {
    apply_rule<decltype(rule), false>("fastopt::roofline_", lists, {}, false, {});
  });
}

std::string cpu_capability() { return isa_name(active_isa()); }

}  // namespace

TORCH_LIBRARY_IMPL(fastopt, CPU, m) {
  for_each_optimizer([&](auto descriptor) {
    using Optimizer = decltype(descriptor);
    register_step_kernel<Optimizer, &step<Optimizer>>(m, c10::DeviceType::CPU);
  });
  m.impl("roofline_", &roofline_cpu);
}

TORCH_LIBRARY_FRAGMENT(fastopt, m) {
  m.def("cpu_capability() -> str", &cpu_capability);
}

}  // namespace fastopt::cpu
