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

// Checks that grads, every slot list, every scalar-state list and
// master_params (unless empty) hold one tensor per param; throws naming the
// list.
void check_list_lengths(const char* op, at::TensorList params, at::TensorList grads,
                        const std::vector<NamedTensorList>& slots,
                        const std::vector<NamedTensorList>& scalar_states,
                        at::TensorList master_params = {});

// The dtype of a call's state slots (Note [Storage of a step] in
// cpu/multi_tensor_apply.h): the first slot tensor's; when the rule keeps
// none, float32 with master copies, else the params'.  Call with at least
// one param.
at::ScalarType state_dtype_of(at::TensorList params, const std::vector<NamedTensorList>& slots,
                              bool master_copies);

// The roofline op's slots (slot-major: slot k of param i at k * n + i) as one
// list per slot; checks that they are whole lists of params.size() tensors,
// at most kMaxSlots of them.
std::vector<NamedTensorList> roofline_slot_lists(at::TensorList params, at::TensorList slots);

// Checks that the drivers support the storage of a call: state of the
// params' dtype, float32, bfloat16 or uint8 (8-bit, for float32 / float16 /
// bfloat16 params); master copies for float16 / bfloat16 params only, with
// float32, bfloat16 or uint8 state; stochastic rounding for bfloat16 params
// without master copies.
void check_storage(const char* op, at::ScalarType param_dtype, at::ScalarType state_dtype,
                   bool master_copies, bool stochastic_rounding);

// Checks the tensors at index i: the param is a supported dense tensor of
// params[0]'s dtype on device_type; its grad has its device, dtype and
// shape, its slot tensors its device and shape and dtype state_dtype, its
// master copy (when given) its device and shape and dtype float32, each
// scalar state (the step count, ...) is one float32 or float64 element on
// the CPU or the param's device; throws naming the list and index.
// Independent per index, so callers may check in parallel.
void check_tensors_at(const char* op, size_t i, at::TensorList params, at::TensorList grads,
                      const std::vector<NamedTensorList>& slots,
                      const std::vector<NamedTensorList>& scalar_states, c10::DeviceType device_type,
                      at::ScalarType state_dtype, at::TensorList master_params = {});

// Checks the block scales of a call's state slots (StepArgs::state_scales):
// with uint8 state, one contiguous float32 tensor of num_blocks(numel)
// elements on the param's device per used slot and param, slot-major; none
// otherwise.  Throws naming the index.
void check_state_scales(const char* op, at::TensorList params, size_t num_slots,
                        at::TensorList state_scales, bool quantized);

// Checks the grads of fastopt::grad_sq_norm: each a dense tensor of a
// supported dtype (complex ones of a supported real dtype) on grads[0]'s
// device, of device_type; throws naming the index.
void check_norm_grads(const char* op, at::TensorList grads, c10::DeviceType device_type);

// The shape of the row means (row = true: the last dim 1) or the column
// means (the second-to-last dim 1) of a grad of two or more dims.
std::vector<int64_t> factor_shape(const at::Tensor& grad, bool row);

// The matrices of a tensor of two or more dims: the product of its sizes
// but the last two.
int64_t matrix_batches(const at::Tensor& tensor);

// Checks the lists of fastopt::row_col_sq_means_ (Note [Row and column sums]
// in rules/row_col_sums.h): one row-means and one column-means tensor per
// grad; each grad a dense real tensor of two or more dims and a supported
// dtype on grads[0]'s device, of device_type; its means contiguous, of its
// opmath dtype (float64 for float64 grads, else float32) and factor_shape,
// on its device; grad_scale (when given) one floating-point element on that
// device.  Throws naming the list and index.
void check_row_col_means(const char* op, at::TensorList grads, at::TensorList row_means,
                         at::TensorList col_means, const std::optional<at::Tensor>& grad_scale,
                         c10::DeviceType device_type);

}  // namespace fastopt
