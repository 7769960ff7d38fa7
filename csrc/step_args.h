// The per-step arguments every optimizer op takes besides its lists (see
// Note [fastopt op schemas]): a tensor lr, AMP's grad_scale / found_inf,
// float32 master copies of the params, the stochastic rounding seed and the
// block scales of 8-bit state slots (Note [8-bit state] in
// rules/quantization.h).
#pragma once

#include <ATen/ATen.h>

#include <optional>

// The schema text of those arguments, shared by the list and bound ops.
// rounding_seed is a SymInt so that a step compiled by torch.compile can pass
// the seed it draws at run time (Note [Compiled steps] in fastopt/optimizer.py);
// the kernels still take it as int64_t.
#define FASTOPT_STEP_ARGS                                                                   \
  "Tensor? lr_tensor=None, Tensor? grad_scale=None, Tensor? found_inf=None, "               \
  "Tensor(z!)[]? master_params=None, SymInt? rounding_seed=None, "                          \
  "Tensor(y!)[]? state_scales=None"

// The bound ops (bound_ops.cpp) take the same but master_params and
// state_scales, which are bound with the other tensors.
#define FASTOPT_BOUND_STEP_ARGS                                                             \
  "Tensor? lr_tensor=None, Tensor? grad_scale=None, Tensor? found_inf=None, "               \
  "int? rounding_seed=None"
#define FASTOPT_BOUND_STEP_PARAMS                                                           \
  const std::optional<at::Tensor>&lr_tensor, const std::optional<at::Tensor>&grad_scale,   \
      const std::optional<at::Tensor>&found_inf, std::optional<int64_t> rounding_seed

// The same as C++ parameters of an op implementation, and their names in order
// (to forward them or build a StepArgs).
#define FASTOPT_STEP_PARAMS                                                                 \
  const std::optional<at::Tensor>&lr_tensor, const std::optional<at::Tensor>&grad_scale,   \
      const std::optional<at::Tensor>&found_inf, std::optional<at::TensorList> master_params, \
      std::optional<int64_t> rounding_seed, std::optional<at::TensorList> state_scales
#define FASTOPT_STEP_VALUES                                                                \
  lr_tensor, grad_scale, found_inf, master_params.value_or(at::TensorList()), rounding_seed, \
      state_scales.value_or(at::TensorList())
// Their types, for typed operator handles.
#define FASTOPT_STEP_TYPES                                                                  \
  const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,                       \
      const std::optional<at::Tensor>&, std::optional<at::TensorList>, std::optional<int64_t>,    \
      std::optional<at::TensorList>

namespace fastopt {

struct StepArgs {
  std::optional<at::Tensor> lr_tensor, grad_scale, found_inf;
  at::TensorList master_params;          // empty: the params are updated directly
  std::optional<int64_t> rounding_seed;  // bfloat16 params: stochastic rounding
  // uint8 (8-bit) state slots: the float32 block scales of slot k of param i
  // at k * n + i (slot-major, over the slots the rule's variant uses); else empty.
  at::TensorList state_scales;
};

// Checks that each given tensor holds one floating-point element; throws
// naming it.  Runs with the other checks, before anything is written.
void check_step_args(const char* op, const StepArgs& args);

}  // namespace fastopt
