// Note [fastopt op schemas]
// Every optimizer is one in-place torch op on lists of tensors (one entry per
// param, all of one device and dtype), registered as fastopt::<name>_ so it
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
#include <torch/library.h>

#include "step_args.h"
#include "validate.h"

TORCH_LIBRARY(fastopt, m) {
  m.def(
      "adam_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
      "Tensor(d!)[] max_exp_avg_sqs, Tensor(e!)[] state_steps, *, float lr, float beta1, "
      "float beta2, float eps, float weight_decay, bool decoupled_weight_decay, bool amsgrad, "
      "bool maximize, " FASTOPT_STEP_ARGS ") -> ()");
  m.def(
      "sgd_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, *, float lr, "
      "float momentum, float dampening, float weight_decay, bool nesterov, bool maximize, "
      "bool first_momentum_step, " FASTOPT_STEP_ARGS ") -> ()");
  m.def(
      "rmsprop_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] square_avgs, "
      "Tensor(c!)[] grad_avgs, Tensor(d!)[] momentum_buffers, Tensor(e!)[] state_steps, *, "
      "float lr, float alpha, float eps, float weight_decay, float momentum, bool centered, "
      "bool maximize, " FASTOPT_STEP_ARGS ") -> ()");
  m.def(
      "adagrad_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] state_sums, "
      "Tensor(c!)[] state_steps, *, float lr, float lr_decay, float weight_decay, float eps, "
      "bool maximize, " FASTOPT_STEP_ARGS ") -> ()");
  // Moves the streams of an optimizer with len(slots) / len(params) state
  // tensors per param, with trivial arithmetic: the memory floor for bench/.
  m.def("grad_sq_norm(Tensor[] grads) -> Tensor");
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

}  // namespace

TORCH_LIBRARY_IMPL(fastopt, CompositeExplicitAutograd, m) {
  m.impl("grad_sq_norm", &grad_sq_norm_of_empty);
}
