// Note [fastopt op schemas]
// Every optimizer is one in-place torch op on lists of tensors (one entry per
// param, all of one device and dtype), registered as fastopt::<name>_ so it
// shows up in the profiler and under torch.compile.  fastopt/reference.py
// implements the same signatures in plain PyTorch; the Python optimizers call
// whichever backend is chosen with identical arguments.  Kernels register per
// device (csrc/cpu/optimizer_ops_cpu.cpp).
#include <torch/library.h>


TORCH_LIBRARY(fastopt, m) {
  m.def(
      "adam_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
      "Tensor(d!)[] max_exp_avg_sqs, Tensor(e!)[] state_steps, *, float lr, float beta1, "
      "float beta2, float eps, float weight_decay, bool decoupled_weight_decay, bool amsgrad, "
      "bool maximize) -> ()");
  m.def(
      "sgd_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, *, float lr, "
      "float momentum, float dampening, float weight_decay, bool nesterov, bool maximize, "
      "bool first_momentum_step) -> ()");
  m.def(
      "rmsprop_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] square_avgs, "
      "Tensor(c!)[] grad_avgs, Tensor(d!)[] momentum_buffers, Tensor(e!)[] state_steps, *, "
      "float lr, float alpha, float eps, float weight_decay, float momentum, bool centered, "
      "bool maximize) -> ()");
  m.def(
      "adagrad_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] state_sums, "
      "Tensor(c!)[] state_steps, *, float lr, float lr_decay, float weight_decay, float eps, "
      "bool maximize) -> ()");
  // Moves the streams of an optimizer with len(slots) / len(params) state
  // tensors per param, with trivial arithmetic: the memory floor for bench/.
  m.def("roofline_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] slots) -> ()");
}
