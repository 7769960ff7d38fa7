// Checks of an optimizer op's tensor lists, shared by every backend.  They
// run before anything is written, so a failing step leaves params and state
// exactly as they were (see Note [Validate before mutate]).
#pragma once

#include <ATen/ATen.h>

#include <string>
#include <vector>

#include "step_args.h"

namespace fastopt {

// A named list of state tensors ("exp_avgs", ...), one per param.
struct NamedTensorList {
  const char* name;
  at::TensorList tensors;
};

// Checks that grads, every slot list and (when counting steps) state_steps
// hold one tensor per param; throws naming the list.
void check_list_lengths(const char* op, at::TensorList params, at::TensorList grads,
                        const std::vector<NamedTensorList>& slots, at::TensorList state_steps,
                        bool counts_steps);

// Checks the tensors at index i: the param is a supported dense tensor of
// params[0]'s dtype on device_type, and its grad and slot tensors have its
// device, dtype and shape (its step: one float element); throws naming the
// list and index.  Independent per index, so callers may check in parallel.
void check_tensors_at(const char* op, size_t i, at::TensorList params, at::TensorList grads,
                      const std::vector<NamedTensorList>& slots, at::TensorList state_steps,
                      bool counts_steps, c10::DeviceType device_type);

// Checks the grads of fastopt::grad_sq_norm: each a dense tensor of a
// supported dtype (complex ones of a supported real dtype) on grads[0]'s
// device, of device_type; throws naming the index.
void check_norm_grads(const char* op, at::TensorList grads, c10::DeviceType device_type);

}  // namespace fastopt
