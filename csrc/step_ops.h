// The torch ops of every optimizer of the table (Note [The optimizer table]),
// generated from its descriptor: the schemas, the boxed kernels that read
// an op's arguments off the dispatcher's stack, and the per-device step
// functions the drivers provide.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/stack.h>
#include <torch/library.h>

#include <array>
#include <string>
#include <vector>

#include "step_args.h"
#include "validate.h"

namespace fastopt {

// The tensors of one optimizer call as the drivers take them.
struct StepLists {
  at::TensorList params, grads;
  std::vector<NamedTensorList> slots;          // those the rule's variant uses, in op order
  std::vector<NamedTensorList> scalar_states;  // the optimizer's, in op order
};

// One driver's step of one optimizer: checks every tensor, then updates.
template <class Optimizer>
using StepFunction = void (*)(const char* op, const StepLists& lists,
                              const typename Optimizer::Hyper& hyper, bool maximize,
                              const StepArgs& step_args);

// The drivers' steps, defined (and instantiated per optimizer, in generated
// translation units) in cpu/step_cpu.h and cuda/optimizer_ops_cuda.cpp.
namespace cpu {
template <class Optimizer>
void step(const char* op, const StepLists& lists, const typename Optimizer::Hyper& hyper,
          bool maximize, const StepArgs& step_args);
}  // namespace cpu

// Each optimizer's step function per device type, filled in by the drivers'
// registrations (register_step_kernel); the bound ops call them directly
// (Note [Bound tensors]).
template <class Optimizer>
struct StepFunctions {
  static inline StepFunction<Optimizer>
      by_device[static_cast<size_t>(c10::DeviceType::COMPILE_TIME_MAX_DEVICE_TYPES)] = {};
};

// "fastopt::adam_": the list op's name, as errors name it.
template <class Optimizer>
const char* list_op_name() {
  static const std::string name = std::string("fastopt::") + Optimizer::kName + "_";
  return name.c_str();
}

// The schema of the list op (bound = false; Note [fastopt op schemas]) or of
// the bound op (Note [Bound tensors]): the state lists in op order, each
// written list with its own alias set, then the keyword arguments.
template <class Optimizer>
std::string step_op_schema(bool bound) {
  std::string schema = std::string(Optimizer::kName) + (bound ? "_bound_(" : "_(");
  if (bound) {
    schema += "__torch__.torch.classes.fastopt.BoundTensors tensors, *, ";
  } else {
    schema += "Tensor(a!)[] params, Tensor[] grads, ";
    char alias = 'b';
    for (const char* name : Optimizer::kSlots) {
      schema += std::string("Tensor(") + alias++ + "!)[] " + name + ", ";
    }
    for (const char* name : Optimizer::kScalarStates) {
      schema += std::string("Tensor(") + alias++ + "!)[] " + name + ", ";
    }
    schema += "*, ";
  }
  for (const auto& field : Optimizer::kFields) {
    schema += std::string(field.number != nullptr ? "float " : "bool ") + field.name + ", ";
  }
  schema += "bool maximize, ";
  schema += bound ? FASTOPT_BOUND_STEP_ARGS : FASTOPT_STEP_ARGS;
  return schema + ") -> ()";
}

// The Hyper struct from the op's keyword arguments, in kFields order.
template <class Optimizer>
typename Optimizer::Hyper hyper_from(c10::ArrayRef<c10::IValue> values) {
  typename Optimizer::Hyper hyper{};
  for (size_t k = 0; k < Optimizer::kFields.size(); ++k) {
    const auto& field = Optimizer::kFields[k];
    if (field.number != nullptr) {
      hyper.*field.number = values[k].toDouble();
    } else {
      hyper.*field.flag = values[k].toBool();
    }
  }
  return hyper;
}

inline std::optional<int64_t> optional_int(const c10::IValue& value) {
  if (value.isNone()) return std::nullopt;
  return value.isInt() ? value.toInt() : value.toSymInt().guard_int(__FILE__, __LINE__);
}

// Checks the hyperparameters, picks the slot lists the variant uses and runs
// `step` (one driver's).  `slots` and `scalar_states` hold every list of
// the op, in op order; unused slot lists are ignored.
template <class Optimizer>
void run_step(StepFunction<Optimizer> step, at::TensorList params, at::TensorList grads,
              const std::array<at::TensorList, Optimizer::kSlots.size()>& slots,
              const std::array<at::TensorList, Optimizer::kScalarStates.size()>& scalar_states,
              const typename Optimizer::Hyper& hyper, bool maximize, const StepArgs& step_args) {
  const char* op = list_op_name<Optimizer>();
  const char* problem = Optimizer::problem(hyper);
  TORCH_CHECK(problem == nullptr, op, ": ", problem);
  StepLists lists{params, grads, {}, {}};
  const auto used = Optimizer::slots_used(hyper);
  for (size_t k = 0; k < slots.size(); ++k) {
    if (used[k]) lists.slots.push_back({Optimizer::kSlots[k], slots[k]});
  }
  for (size_t c = 0; c < scalar_states.size(); ++c) {
    lists.scalar_states.push_back({Optimizer::kScalarStates[c], scalar_states[c]});
  }
  step(op, lists, hyper, maximize, step_args);
}

// The list op's kernel on one device: its arguments off the stack, in
// schema order (params, grads, state lists, keyword arguments, maximize,
// the step arguments).  Boxed, so one function serves every optimizer; the
// lists are unboxed once here.
template <class Optimizer, StepFunction<Optimizer> kStep>
void list_op_kernel(const c10::OperatorHandle&, c10::DispatchKeySet, torch::jit::Stack* stack) {
  constexpr size_t kSlots = Optimizer::kSlots.size();
  constexpr size_t kStates = Optimizer::kScalarStates.size();
  constexpr size_t kFields = Optimizer::kFields.size();
  constexpr size_t kNumArgs = 2 + kSlots + kStates + kFields + 1 + 6;
  const auto args = torch::jit::last(*stack, kNumArgs);
  const std::vector<at::Tensor> params = args[0].toTensorVector();
  const std::vector<at::Tensor> grads = args[1].toTensorVector();
  std::array<std::vector<at::Tensor>, kSlots + kStates> state;
  for (size_t k = 0; k < state.size(); ++k) state[k] = args[2 + k].toTensorVector();
  std::array<at::TensorList, kSlots> slots;
  for (size_t k = 0; k < kSlots; ++k) slots[k] = state[k];
  std::array<at::TensorList, kStates> scalar_states;
  for (size_t c = 0; c < kStates; ++c) scalar_states[c] = state[kSlots + c];
  const size_t next = 2 + kSlots + kStates;
  const auto hyper = hyper_from<Optimizer>(args.slice(next, kFields));
  const bool maximize = args[next + kFields].toBool();
  const auto step_values = args.slice(next + kFields + 1);
  const std::vector<at::Tensor> masters =
      step_values[3].isNone() ? std::vector<at::Tensor>() : step_values[3].toTensorVector();
  const std::vector<at::Tensor> scales =
      step_values[5].isNone() ? std::vector<at::Tensor>() : step_values[5].toTensorVector();
  const StepArgs step_args{step_values[0].toOptional<at::Tensor>(), step_values[1].toOptional<at::Tensor>(),
                           step_values[2].toOptional<at::Tensor>(), masters, optional_int(step_values[4]),
                           scales};
  run_step<Optimizer>(kStep, params, grads, slots, scalar_states, hyper, maximize, step_args);
  torch::jit::drop(*stack, kNumArgs);
}

// Registers a driver's step of one optimizer for `device`: as the list op's
// kernel and for the bound op.
template <class Optimizer, StepFunction<Optimizer> kStep>
void register_step_kernel(torch::Library& m, c10::DeviceType device) {
  m.impl((std::string(Optimizer::kName) + "_").c_str(),
         torch::CppFunction::makeFromBoxedFunction<&list_op_kernel<Optimizer, kStep>>());
  StepFunctions<Optimizer>::by_device[static_cast<size_t>(device)] = kStep;
}

}  // namespace fastopt
