// Note [Bound tensors]
// Handing a list of tensors from Python to a torch op costs about 75 ns per
// tensor (each is unpacked, boxed into an IValue list and unboxed again).  A
// step of 4000 params passes five such lists and would spend more time there
// than in the kernel.  So the optimizers bind each bucket's params, state
// slots and step counts once, into a BoundTensors object kept with the step
// plan (fastopt/optimizer.py, Note [Step plans]), and each step calls a
// *_bound_ op with it.  The op reads every param's .grad in C++, leaves out
// params without one (as torch.optim does), and calls the list op (e.g.
// fastopt::adam_) through the dispatcher, so the math, the checks and the
// device dispatch stay in one place.  fastopt/reference.py mirrors this.
// The call goes below the autograd keys: the boxed autograd fallback would
// box and unbox every tensor again (the cost this file exists to avoid);
// the params' version counters are bumped here instead, as torch's in-place
// ops do.
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <utility>
#include <vector>

#include "rules/common.h"
#include "step_args.h"
#include "validate.h"

namespace fastopt {
namespace {

struct BoundTensors : torch::CustomClassHolder {
  std::vector<at::Tensor> params;
  std::vector<at::Tensor> slots;  // slot-major: slot k of param i at k * params.size() + i
  std::vector<at::Tensor> steps;    // empty for rules that count no steps
  std::vector<at::Tensor> masters;  // float32 master copies of the params, or empty

  BoundTensors(std::vector<at::Tensor> params_, std::vector<at::Tensor> slots_,
               std::vector<at::Tensor> steps_, std::vector<at::Tensor> masters_)
      : params(std::move(params_)),
        slots(std::move(slots_)),
        steps(std::move(steps_)),
        masters(std::move(masters_)) {
    const size_t n = params.size();
    TORCH_CHECK(n == 0 ? slots.empty() : slots.size() % n == 0,
                "fastopt.BoundTensors: slots must hold whole lists of ", n, " tensors, got ",
                slots.size());
    TORCH_CHECK(steps.empty() || steps.size() == n, "fastopt.BoundTensors: got ", n,
                " params but ", steps.size(), " steps");
    TORCH_CHECK(masters.empty() || masters.size() == n, "fastopt.BoundTensors: got ", n,
                " params but ", masters.size(), " master copies");
  }
};

using Bound = c10::intrusive_ptr<BoundTensors>;


// The tensors of one step: the bound lists restricted to params that have a
// grad.  When every param has one (the usual case) the lists are the bound
// ones, not copies.
class StepTensors {
 public:
  explicit StepTensors(const BoundTensors& bound) {
    const size_t n = bound.params.size();
    // Reading .grad touches every param's metadata (a cache miss each for
    // many small params), so threads share it.
    grads_.resize(n);
    at::parallel_for(0, int64_t(n), kCpuParamsPerTask, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) grads_[i] = bound.params[i].grad();
    });
    num_slots_ = n == 0 ? 0 : bound.slots.size() / n;
    std::vector<size_t> with_grad;
    for (size_t i = 0; i < n; ++i) {
      if (grads_[i].defined()) with_grad.push_back(i);
    }
    if (with_grad.size() == n) {
      params_ = bound.params;
      slots_ = bound.slots;
      steps_ = bound.steps;
      masters_ = bound.masters;
      return;
    }
    std::vector<at::Tensor> grads;
    for (size_t i : with_grad) grads.push_back(std::move(grads_[i]));
    grads_ = std::move(grads);
    // Copies of the handles (not the data) of the params that have a grad.
    std::vector<at::Tensor> params, slots, steps, masters;
    for (size_t i : with_grad) {
      params.push_back(bound.params[i]);
      if (!bound.steps.empty()) steps.push_back(bound.steps[i]);
      if (!bound.masters.empty()) masters.push_back(bound.masters[i]);
    }
    for (size_t k = 0; k < num_slots_; ++k) {
      for (size_t i : with_grad) slots.push_back(bound.slots[k * n + i]);
    }
    owned_params_ = std::move(params);
    owned_slots_ = std::move(slots);
    owned_steps_ = std::move(steps);
    owned_masters_ = std::move(masters);
    params_ = owned_params_;
    slots_ = owned_slots_;
    steps_ = owned_steps_;
    masters_ = owned_masters_;
  }

  bool empty() const { return params_.empty(); }

  // Marks the params as modified in place (after a step), so autograd
  // rejects a backward through a graph that saved their old values.  State
  // tensors are never part of a graph; skipping them saves a cache miss per
  // tensor on the version counters.
  void bump_param_versions() const {
    for (const at::Tensor& p : params_) torch::autograd::impl::bump_version(p);
  }
  at::TensorList params() const { return params_; }
  at::TensorList grads() const { return grads_; }
  at::TensorList steps() const { return steps_; }
  at::TensorList masters() const { return masters_; }
  at::TensorList slots() const { return slots_; }  // slot-major, as bound
  // Slot k's list, or an empty list for a slot the rule does not have.
  at::TensorList slot(size_t k) const {
    return k < num_slots_ ? slots_.slice(k * params_.size(), params_.size()) : at::TensorList();
  }

 private:
  std::vector<at::Tensor> grads_, owned_params_, owned_slots_, owned_steps_, owned_masters_;
  at::TensorList params_, slots_, steps_, masters_;
  size_t num_slots_ = 0;
};

template <class Signature>
c10::TypedOperatorHandle<Signature> list_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

using TL = at::TensorList;

void adam_bound(const Bound& bound, double lr, double beta1, double beta2, double eps,
                double weight_decay, bool decoupled_weight_decay, bool amsgrad, bool maximize,
                FASTOPT_BOUND_STEP_PARAMS) {
  static auto op = list_op<void(TL, TL, TL, TL, TL, TL, double, double, double, double, double,
                                bool, bool, bool, FASTOPT_STEP_TYPES)>(
      "fastopt::adam_");
  const StepTensors t(*bound);
  if (t.empty()) return;
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  op.call(t.params(), t.grads(), t.slot(0), t.slot(1), t.slot(2), t.steps(), lr, beta1, beta2,
          eps, weight_decay, decoupled_weight_decay, amsgrad, maximize, lr_tensor, grad_scale,
          found_inf, t.masters(), rounding_seed);
  t.bump_param_versions();
}

void sgd_bound(const Bound& bound, double lr, double momentum, double dampening,
               double weight_decay, bool nesterov, bool maximize, bool first_momentum_step,
               FASTOPT_BOUND_STEP_PARAMS) {
  static auto op = list_op<void(TL, TL, TL, double, double, double, double, bool, bool, bool,
                                FASTOPT_STEP_TYPES)>("fastopt::sgd_");
  const StepTensors t(*bound);
  if (t.empty()) return;
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  op.call(t.params(), t.grads(), t.slot(0), lr, momentum, dampening, weight_decay, nesterov,
          maximize, first_momentum_step, lr_tensor, grad_scale, found_inf, t.masters(), rounding_seed);
  t.bump_param_versions();
}

void rmsprop_bound(const Bound& bound, double lr, double alpha, double eps, double weight_decay,
                   double momentum, bool centered, bool maximize, FASTOPT_BOUND_STEP_PARAMS) {
  static auto op = list_op<void(TL, TL, TL, TL, TL, TL, double, double, double, double, double,
                                bool, bool, FASTOPT_STEP_TYPES)>(
      "fastopt::rmsprop_");
  const StepTensors t(*bound);
  if (t.empty()) return;
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  // Slots are bound in the rule's order: square_avg, [grad_avg], [momentum_buffer].
  const size_t momentum_slot = centered ? 2 : 1;
  op.call(t.params(), t.grads(), t.slot(0), centered ? t.slot(1) : TL(), t.slot(momentum_slot),
          t.steps(), lr, alpha, eps, weight_decay, momentum, centered, maximize, lr_tensor,
          grad_scale, found_inf, t.masters(), rounding_seed);
  t.bump_param_versions();
}

void adagrad_bound(const Bound& bound, double lr, double lr_decay, double weight_decay,
                   double eps, bool maximize, FASTOPT_BOUND_STEP_PARAMS) {
  static auto op = list_op<void(TL, TL, TL, TL, double, double, double, double, bool,
                                FASTOPT_STEP_TYPES)>("fastopt::adagrad_");
  const StepTensors t(*bound);
  if (t.empty()) return;
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  op.call(t.params(), t.grads(), t.slot(0), t.steps(), lr, lr_decay, weight_decay, eps, maximize,
          lr_tensor, grad_scale, found_inf, t.masters(), rounding_seed);
  t.bump_param_versions();
}

void roofline_bound(const Bound& bound) {
  static auto op = list_op<void(TL, TL, TL)>("fastopt::roofline_");
  const StepTensors t(*bound);
  if (t.empty()) return;
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  op.call(t.params(), t.grads(), t.slots());
  t.bump_param_versions();
}

// The sum of squares of the bound params' grads (fastopt::grad_sq_norm),
// zero on the params' device when none has a grad.  Bound with no slots.
at::Tensor grad_sq_norm_bound(const Bound& bound) {
  static auto op = list_op<at::Tensor(TL)>("fastopt::grad_sq_norm");
  const StepTensors t(*bound);
  if (t.empty()) {
    const at::Device device = bound->params.empty() ? at::Device(at::kCPU) : bound->params[0].device();
    return at::zeros({}, at::TensorOptions().dtype(at::kDouble).device(device));
  }
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return op.call(t.grads());
}

// Note [Atomic steps across buckets]
// Each op checks all its tensors before writing any (Note [Validate before
// mutate] in validate.cpp), but a step makes one op call per bucket (device,
// dtype, param group): if bucket 2 failed its checks, bucket 1 would already
// be updated.  So before a step with more than one bucket runs any, it calls
// BoundTensors.check() on every bucket after the first (fastopt/optimizer.py);
// their ops then repeat the checks, a second pass over the metadata paid only
// by such steps.  A method, not an op: calling an op with a custom-class
// argument from Python costs ~10 us more.
void check_step_tensors(const BoundTensors& bound) {
  static const char* const kWhat = "fastopt.BoundTensors.check";
  const StepTensors t(bound);
  if (t.empty()) return;
  std::vector<NamedTensorList> slots;
  const size_t num_slots = t.slots().size() / t.params().size();
  for (size_t k = 0; k < num_slots; ++k) slots.push_back({"state_slots", t.slot(k)});
  const bool counts_steps = !t.steps().empty();
  check_list_lengths(kWhat, t.params(), t.grads(), slots, t.steps(), counts_steps, t.masters());
  const c10::DeviceType device_type = t.params()[0].device().type();
  const at::ScalarType state_dtype = state_dtype_of(t.params(), slots, !t.masters().empty());
  at::parallel_for(0, int64_t(t.params().size()), kCpuParamsPerTask, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      check_tensors_at(kWhat, i, t.params(), t.grads(), slots, t.steps(), counts_steps, device_type,
                       state_dtype, t.masters());
    }
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastopt, m) {
  m.class_<BoundTensors>("BoundTensors")
      .def(torch::init<std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>,
                       std::vector<at::Tensor>>())
      .def("check", [](const Bound& self) { check_step_tensors(*self); });
  m.def(
      "adam_bound_(__torch__.torch.classes.fastopt.BoundTensors tensors, *, float lr, float beta1, "
      "float beta2, float eps, float weight_decay, bool decoupled_weight_decay, bool amsgrad, "
      "bool maximize, " FASTOPT_BOUND_STEP_ARGS ") -> ()",
      &adam_bound);
  m.def(
      "sgd_bound_(__torch__.torch.classes.fastopt.BoundTensors tensors, *, float lr, "
      "float momentum, float dampening, float weight_decay, bool nesterov, bool maximize, "
      "bool first_momentum_step, " FASTOPT_BOUND_STEP_ARGS ") -> ()",
      &sgd_bound);
  m.def(
      "rmsprop_bound_(__torch__.torch.classes.fastopt.BoundTensors tensors, *, float lr, "
      "float alpha, float eps, float weight_decay, float momentum, bool centered, "
      "bool maximize, " FASTOPT_BOUND_STEP_ARGS ") -> ()",
      &rmsprop_bound);
  m.def(
      "adagrad_bound_(__torch__.torch.classes.fastopt.BoundTensors tensors, *, float lr, "
      "float lr_decay, float weight_decay, float eps, bool maximize, " FASTOPT_BOUND_STEP_ARGS ") -> ()",
      &adagrad_bound);
  m.def("grad_sq_norm_bound_(__torch__.torch.classes.fastopt.BoundTensors tensors) -> Tensor",
        &grad_sq_norm_bound);
  // The roofline through the same per-step path as the optimizers (bench/).
  m.def("roofline_bound_(__torch__.torch.classes.fastopt.BoundTensors tensors) -> ()",
        &roofline_bound);
}

}  // namespace fastopt
