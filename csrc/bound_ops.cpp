// Note [Bound tensors]
// Handing a list of tensors from Python to a torch op costs about 75 ns per
// tensor (each is unpacked, boxed into an IValue list and unboxed again).  A
// step of 4000 params passes five such lists and would spend more time there
// than in the kernel.  So the optimizers bind each bucket's params, state
// slots and step counts once, into a BoundTensors object kept with the step
// plan (fastopt/optimizer.py, Note [Step plans]), and each step calls a
// *_bound_ op with it, whose schema and kernel follow from the optimizer's
// row of the table (Note [The optimizer table]).  The op reads every param's
// .grad in C++, leaves out params without one (as torch.optim does), and
// calls the step function the list op's kernel for the params' device
// calls (step_ops.h), so the math and the checks stay in one place.  It
// calls it directly, not through the dispatcher: a call through the
// dispatcher to the boxed list kernel would box every tensor again (the
// cost this file exists to avoid).  The params' version counters are bumped
// here, as torch's in-place ops do.  fastopt/reference.py mirrors this.
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <array>
#include <utility>
#include <vector>

#include "optimizer_table.h"
#include "rules/common.h"
#include "step_ops.h"
#include "validate.h"

namespace fastopt {
namespace {

using TensorLists = std::vector<std::vector<at::Tensor>>;

struct BoundTensors : torch::CustomClassHolder {
  std::vector<at::Tensor> params;
  TensorLists slots;          // one list per slot of the op, in op order; empty: unused
  TensorLists scalar_states;  // one list per scalar state of the op (steps, ...)
  std::vector<at::Tensor> masters;  // float32 master copies of the params, or empty
  // uint8 (8-bit) slots: their block scales, one list per slot as `slots`
  // (empty for a slot that is unused or not 8-bit), or no lists at all.
  TensorLists scales;

  BoundTensors(std::vector<at::Tensor> params_, TensorLists slots_, TensorLists scalar_states_,
               std::vector<at::Tensor> masters_, TensorLists scales_)
      : params(std::move(params_)),
        slots(std::move(slots_)),
        scalar_states(std::move(scalar_states_)),
        masters(std::move(masters_)),
        scales(std::move(scales_)) {
    const size_t n = params.size();
    for (const auto& slot : slots) {
      TORCH_CHECK(slot.empty() || slot.size() == n, "fastopt.BoundTensors: got ", n,
                  " params but a slot list of ", slot.size());
    }
    for (const auto& states : scalar_states) {
      TORCH_CHECK(states.size() == n, "fastopt.BoundTensors: got ", n,
                  " params but a scalar-state list of ", states.size());
    }
    TORCH_CHECK(masters.empty() || masters.size() == n, "fastopt.BoundTensors: got ", n,
                " params but ", masters.size(), " master copies");
    for (const auto& list : scales) {
      TORCH_CHECK(list.empty() || list.size() == n, "fastopt.BoundTensors: got ", n,
                  " params but a scale list of ", list.size());
    }
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
    std::vector<size_t> with_grad;
    for (size_t i = 0; i < n; ++i) {
      if (grads_[i].defined()) with_grad.push_back(i);
    }
    if (with_grad.size() == n) {
      params_ = bound.params;
      masters_ = bound.masters;
      for (const auto& slot : bound.slots) slots_.push_back(slot);
      for (const auto& states : bound.scalar_states) scalar_states_.push_back(states);
      join_scales(bound, nullptr);
      return;
    }
    std::vector<at::Tensor> grads;
    for (size_t i : with_grad) grads.push_back(std::move(grads_[i]));
    grads_ = std::move(grads);
    // Copies of the handles (not the data) of the params that have a grad.
    auto select = [&](const std::vector<at::Tensor>& list) -> at::TensorList {
      if (list.empty()) return {};
      std::vector<at::Tensor>& selected = owned_.emplace_back();
      for (size_t i : with_grad) selected.push_back(list[i]);
      return selected;
    };
    // Reserved so that the lists the TensorLists point into never move.
    owned_.reserve(2 + bound.slots.size() + bound.scalar_states.size());
    params_ = select(bound.params);
    masters_ = select(bound.masters);
    for (const auto& slot : bound.slots) slots_.push_back(select(slot));
    for (const auto& states : bound.scalar_states) scalar_states_.push_back(select(states));
    join_scales(bound, &with_grad);
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
  at::TensorList masters() const { return masters_; }
  // The block scales of the 8-bit slots as the list op takes them (slot-major).
  at::TensorList state_scales() const { return state_scales_; }
  // Slot k of the op (empty when unused), scalar state c.
  const std::vector<at::TensorList>& slots() const { return slots_; }
  const std::vector<at::TensorList>& scalar_states() const { return scalar_states_; }

 private:
  // state_scales_: the bound scale lists joined slot-major, restricted to the
  // params in `with_grad` (null: all params).
  void join_scales(const BoundTensors& bound, const std::vector<size_t>* with_grad) {
    for (const auto& list : bound.scales) {
      if (with_grad == nullptr) {
        state_scales_.insert(state_scales_.end(), list.begin(), list.end());
      } else if (!list.empty()) {
        for (size_t i : *with_grad) state_scales_.push_back(list[i]);
      }
    }
  }

  std::vector<at::Tensor> state_scales_;
  std::vector<at::Tensor> grads_;
  std::vector<std::vector<at::Tensor>> owned_;
  at::TensorList params_, masters_;
  std::vector<at::TensorList> slots_, scalar_states_;
};

// The bound op of an optimizer: its arguments off the stack, in schema order
// (tensors, keyword arguments, maximize, lr_tensor, grad_scale, found_inf,
// rounding_seed).
template <class Optimizer>
void bound_op_kernel(const c10::OperatorHandle&, c10::DispatchKeySet, torch::jit::Stack* stack) {
  constexpr size_t kFields = Optimizer::kFields.size();
  constexpr size_t kNumArgs = 1 + kFields + 1 + 4;
  const auto args = torch::jit::last(*stack, kNumArgs);
  const Bound bound = args[0].toCustomClass<BoundTensors>();
  const auto hyper = hyper_from<Optimizer>(args.slice(1, kFields));
  const bool maximize = args[1 + kFields].toBool();
  const auto step_values = args.slice(2 + kFields);
  const StepArgs step_args{step_values[0].toOptional<at::Tensor>(),
                           step_values[1].toOptional<at::Tensor>(),
                           step_values[2].toOptional<at::Tensor>(), {}, optional_int(step_values[3]),
                           {}};
  torch::jit::drop(*stack, kNumArgs);
  const StepTensors t(*bound);
  if (t.empty()) return;
  TORCH_CHECK(t.slots().size() == Optimizer::kSlots.size() &&
                  t.scalar_states().size() == Optimizer::kScalarStates.size(),
              list_op_name<Optimizer>(), ": the bound tensors have ", t.slots().size(),
              " slot lists and ", t.scalar_states().size(), " scalar-state lists, expected ",
              Optimizer::kSlots.size(), " and ", Optimizer::kScalarStates.size());
  const c10::Device device = t.params()[0].device();
  const auto step = StepFunctions<Optimizer>::by_device[static_cast<size_t>(device.type())];
  TORCH_CHECK(step != nullptr, list_op_name<Optimizer>(), ": fastopt has no kernel for ", device,
              " tensors");
  std::array<at::TensorList, Optimizer::kSlots.size()> slots;
  for (size_t k = 0; k < slots.size(); ++k) slots[k] = t.slots()[k];
  std::array<at::TensorList, Optimizer::kScalarStates.size()> scalar_states;
  for (size_t c = 0; c < scalar_states.size(); ++c) scalar_states[c] = t.scalar_states()[c];
  StepArgs with_bound = step_args;
  with_bound.master_params = t.masters();
  with_bound.state_scales = t.state_scales();
  run_step<Optimizer>(step, t.params(), t.grads(), slots, scalar_states, hyper, maximize, with_bound);
  t.bump_param_versions();
}

template <class Signature>
c10::TypedOperatorHandle<Signature> list_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

using TL = at::TensorList;

void roofline_bound(const Bound& bound) {
  static auto op = list_op<void(TL, TL, TL)>("fastopt::roofline_");
  const StepTensors t(*bound);
  if (t.empty()) return;
  std::vector<at::Tensor> slots;  // slot-major, as the roofline op takes them
  for (const at::TensorList slot : t.slots()) slots.insert(slots.end(), slot.begin(), slot.end());
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  op.call(t.params(), t.grads(), slots);
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
  std::vector<NamedTensorList> slots, scalar_states;
  for (const at::TensorList slot : t.slots()) {
    if (!slot.empty()) slots.push_back({"state_slots", slot});
  }
  for (const at::TensorList states : t.scalar_states()) scalar_states.push_back({"scalar_states", states});
  check_list_lengths(kWhat, t.params(), t.grads(), slots, scalar_states, t.masters());
  const c10::DeviceType device_type = t.params()[0].device().type();
  const at::ScalarType state_dtype = state_dtype_of(t.params(), slots, !t.masters().empty());
  check_state_scales(kWhat, t.params(), slots.size(), t.state_scales(), state_dtype == at::kByte);
  at::parallel_for(0, int64_t(t.params().size()), kCpuParamsPerTask, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      check_tensors_at(kWhat, i, t.params(), t.grads(), slots, scalar_states, device_type, state_dtype,
                       t.masters());
    }
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastopt, m) {
  m.class_<BoundTensors>("BoundTensors")
      .def(torch::init<std::vector<at::Tensor>, TensorLists, TensorLists, std::vector<at::Tensor>,
                       TensorLists>())
      .def("check", [](const Bound& self) { check_step_tensors(*self); });
  for_each_optimizer([&](auto descriptor) {
    using Optimizer = decltype(descriptor);
    m.def(step_op_schema<Optimizer>(/*bound=*/true).c_str(),
          torch::CppFunction::makeFromBoxedFunction<&bound_op_kernel<Optimizer>>());
  });
  m.def("grad_sq_norm_bound_(__torch__.torch.classes.fastopt.BoundTensors tensors) -> Tensor",
        &grad_sq_norm_bound);
  // The roofline through the same per-step path as the optimizers (bench/),
  // its slots bound as the op's one slot list per slot.
  m.def("roofline_bound_(__torch__.torch.classes.fastopt.BoundTensors tensors) -> ()",
        &roofline_bound);
}

}  // namespace fastopt
