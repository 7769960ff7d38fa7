// Checks of an optimizer op's tensor lists, shared by every backend.  They
// run before anything is written, so a failing step leaves params and state
// exactly as they were (see Note [Validate before mutate]).
#pragma once

#include <ATen/ATen.h>

#include <string>
#include <vector>

namespace fastopt {

// A named list of state tensors ("exp_avgs", ...), one per param.
struct NamedTensorList {
  const char* name;
  at::TensorList tensors;
};

// Checks that grads, every slot list and (when counting steps) state_steps
// hold one tensor per param, on the params' device, with the param's dtype
// and shape (steps: one float element); throws naming the list and index.
void check_optimizer_lists(const char* op, at::TensorList params, at::TensorList grads,
                           const std::vector<NamedTensorList>& slots, at::TensorList state_steps,
                           bool counts_steps, c10::DeviceType device_type);

}  // namespace fastopt
