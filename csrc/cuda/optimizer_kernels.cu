// The CUDA kernels that are not an optimizer of the table: the roofline, the
// launch size and the row and column sums (row_col_sums.cuh).  The optimizers' kernels are instantiated one
// translation unit per optimizer (Note [The optimizer table]).  No torch
// headers.
#include "../rules/roofline.h"
#include "multi_tensor_apply.cuh"
#include "row_col_sums.cuh"

namespace fastopt::cuda {

int64_t max_tensors_per_launch(bool quantized_state) {
  return quantized_state ? kMaxQuantizedTensorsPerLaunch : kMaxTensorsPerLaunch;
}

void roofline_step(const StepLaunch& launch, int num_slots) {
  rules::with_roofline(num_slots, [&](auto rule) {
    launch_rule<decltype(rule), false>(launch, typename decltype(rule)::Hyper{});
  });
}

}  // namespace fastopt::cuda
