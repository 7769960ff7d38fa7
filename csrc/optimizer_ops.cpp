// Note [fastopt op schemas]
// Every optimizer is one in-place torch op on lists of tensors (one entry per
// param, all of one device and dtype), registered as fastopt::<name>_ so it
// shows up in the profiler and under torch.compile.  fastopt/reference.py
// implements the same signatures in plain PyTorch; the Python optimizers call
// whichever backend is chosen with identical arguments.  Kernels register per
// device (csrc/cpu/optimizer_ops_cpu.cpp, csrc/cuda/optimizer_ops_cuda.cpp).
//
// Every optimizer op also takes, keyword-only and optional:
//   lr_tensor   a one-element tensor that replaces lr; on the params' CUDA
//               device it is read by the kernels (capturable steps);
//   grad_scale  AMP: grads are divided by it in registers (never rewritten);
//   found_inf   AMP: when nonzero, the call checks its tensors and changes
//               nothing, step counts included.
// torch.amp.GradScaler hands the last two to optimizers that advertise
// _step_supports_amp_scaling (fastopt/optimizer.py).
#include <torch/library.h>

#include "step_args.h"

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
  m.def("roofline_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] slots) -> ()");
}
