// Note [fastopt op schemas]
// Every optimizer is one in-place torch op on lists of tensors (one entry per
// param, all of one device and dtype; its schema follows from its row of the
// optimizer table, step_ops.h), registered as fastopt::<name>_ so it
// shows up in the profiler and under torch.compile.  fastopt/reference.py
// implements the same signatures in plain PyTorch; the Python optimizers call
// whichever backend is chosen with identical arguments.  Kernels register per
// device (csrc/cpu/optimizer_ops_cpu.cpp, csrc/cuda/optimizer_ops_cuda.cpp);
// their fake implementations, for torch.compile, are in fastopt/_fake.py.  The
// schemas mark every list an op writes (a!), as functionalization relies on.
//
// Every optimizer op also takes, keyword-only and optional:
//   lr_tensor   a one-element tensor that replaces lr; on the params' CUDA
//               device it is read by the kernels (capturable steps);
//   grad_scale  AMP: grads are divided by it in registers (never rewritten);
//   found_inf   AMP: when nonzero, the call checks its tensors and changes
//               nothing, step counts included.
// torch.amp.GradScaler hands the last two to optimizers that advertise
// _step_supports_amp_scaling (fastopt/optimizer.py).
//
// grad_sq_norm is not a step but the read-only pass of max_grad_norm
// (Note [Fused gradient clipping] in fastopt/clip.py): the sum of squares of
// every element of its grads (complex ones as real pairs, any mix of the
// four dtypes, one device) as a float64 0-dim tensor on their device.
//
// row_col_sq_means_ is not a step either but the first phase of a factored
// one (Note [Row and column sums] in rules/row_col_sums.h): the mean of
// (grad / grad_scale)^2 over each row and each column of every grad of two
// or more dims, into row_means and col_means.
#include <torch/library.h>

#include "optimizer_table.h"
#include "step_ops.h"
#include "validate.h"

TORCH_LIBRARY(fastopt, m) {
  // One list op per row of the optimizer table (Note [The optimizer table]),
  // e.g. adam_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs,
  // ..., Tensor(e!)[] state_steps, *, float lr, float beta1, ..., bool
  // amsgrad, bool maximize, <step args>) -> ().
  fastopt::for_each_optimizer([&](auto descriptor) {
    m.def(fastopt::step_op_schema<decltype(descriptor)>(/*bound=*/false).c_str());
  });
  m.def("grad_sq_norm(Tensor[] grads) -> Tensor");
  m.def("row_col_sq_means_(Tensor[] grads, Tensor(a!)[] row_means, Tensor(b!)[] col_means, *, "
        "Tensor? grad_scale=None) -> ()");
  // Moves the streams of an optimizer with len(slots) / len(params) state
  // tensors per param, with trivial arithmetic: the memory floor for bench/.
  m.def("roofline_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] slots) -> ()");
}

namespace {

// An empty list has no device to dispatch on: its sum is 0, on the CPU.
// Registered as the fallback of every dispatch key, it rejects other lists
// (sparse grads, devices without a kernel) naming why.
at::Tensor grad_sq_norm_of_empty(at::TensorList grads) {
  if (!grads.empty()) fastopt::check_norm_grads("fastopt::grad_sq_norm", grads, grads[0].device().type());
  TORCH_CHECK(grads.empty(), "fastopt::grad_sq_norm: fastopt has no kernel for ", grads[0].device(),
              " tensors");
  return at::zeros({}, at::TensorOptions().dtype(at::kDouble));
}

// The same for row_col_sq_means_: an empty call does nothing.
void row_col_sq_means_of_empty(at::TensorList grads, at::TensorList row_means, at::TensorList col_means,
                               const std::optional<at::Tensor>& grad_scale) {
  constexpr const char* kOp = "fastopt::row_col_sq_means_";
  if (!grads.empty()) {
    fastopt::check_row_col_means(kOp, grads, row_means, col_means, grad_scale, grads[0].device().type());
  }
  TORCH_CHECK(grads.empty() && row_means.empty() && col_means.empty(), kOp,
              grads.empty() ? ": got no grads but row_means or col_means"
                            : ": fastopt has no kernel for these tensors");
}

}  // namespace

TORCH_LIBRARY_IMPL(fastopt, CompositeExplicitAutograd, m) {
  m.impl("grad_sq_norm", &grad_sq_norm_of_empty);
  m.impl("row_col_sq_means_", &row_col_sq_means_of_empty);
}
