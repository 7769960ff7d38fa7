// The per-step tensors every optimizer op takes besides its lists (see
// Note [fastopt op schemas]): a tensor lr and AMP's grad_scale / found_inf.
#pragma once

#include <ATen/ATen.h>

#include <optional>

// The schema text of those arguments, shared by the list and bound ops.
#define FASTOPT_STEP_ARGS "Tensor? lr_tensor=None, Tensor? grad_scale=None, Tensor? found_inf=None"

namespace fastopt {

struct StepArgs {
  std::optional<at::Tensor> lr_tensor, grad_scale, found_inf;
};

// Checks that each given tensor holds one floating-point element; throws
// naming it.  Runs with the other checks, before anything is written.
void check_step_args(const char* op, const StepArgs& args);

// Where a step's tensor argument lives: absent, readable on the host, or on
// a device (read by the kernels there).
inline bool on_host(const std::optional<at::Tensor>& t) { return t.has_value() && t->is_cpu(); }

}  // namespace fastopt
