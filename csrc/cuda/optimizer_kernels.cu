// The CUDA kernels of every optimizer: the rules of csrc/rules/ on the CUDA
// driver (multi_tensor_apply.cuh), one entry point per op.  No torch headers.
#include "../rules/variants.h"
#include "multi_tensor_apply.cuh"

namespace fastopt::cuda {

int64_t max_tensors_per_launch() { return kMaxTensorsPerLaunch; }

void adam_step(const StepLaunch& launch, const rules::AdamHyper& hyper,
               bool decoupled_weight_decay, bool amsgrad) {
  rules::with_adam(decoupled_weight_decay, amsgrad,
                   [&](auto rule) { launch_rule<decltype(rule)>(launch, hyper); });
}

void sgd_step(const StepLaunch& launch, const rules::SgdHyper& hyper, bool has_momentum,
              bool nesterov) {
  rules::with_sgd(has_momentum, nesterov,
                  [&](auto rule) { launch_rule<decltype(rule)>(launch, hyper); });
}

void rmsprop_step(const StepLaunch& launch, const rules::RmspropHyper& hyper, bool centered,
                  bool has_momentum) {
  rules::with_rmsprop(centered, has_momentum,
                      [&](auto rule) { launch_rule<decltype(rule)>(launch, hyper); });
}

void adagrad_step(const StepLaunch& launch, const rules::AdagradHyper& hyper) {
  rules::with_adagrad([&](auto rule) { launch_rule<decltype(rule)>(launch, hyper); });
}

void roofline_step(const StepLaunch& launch, int num_slots) {
  rules::with_roofline(num_slots, [&](auto rule) {
    launch_rule<decltype(rule), false>(launch, typename decltype(rule)::Hyper{});
  });
}

}  // namespace fastopt::cuda
