// The CPU driver's step of every optimizer: validate, lay out the streams
// for the element loop (multi_tensor_apply.h), advance the per-tensor
// scalar states (step counts, ...), derive per-tensor scalars and run one
// rule.  Included by the generated translation unit of each optimizer
// (Note [The optimizer table]), which includes that optimizer's rule header
// only and instantiates cpu::step for it.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <array>
#include <utility>
#include <vector>

#include "../step_ops.h"
#include "../validate.h"
#include "multi_tensor_apply.h"

namespace fastopt::cpu {

// Tensors the driver cannot walk linearly are updated through contiguous
// copies that are written back after the kernel.
struct WriteBack {
  at::Tensor original, staged;
};

// A per-tensor scalar state (a one-element float32 or float64 CPU tensor).
inline double read_scalar_state(const at::Tensor& state) {
  if (state.scalar_type() == at::kDouble) return *state.const_data_ptr<double>();
  return *state.const_data_ptr<float>();
}

inline void write_scalar_state(const at::Tensor& state, double value) {
  if (state.scalar_type() == at::kDouble) {
    *state.data_ptr<double>() = value;
  } else {
    *state.data_ptr<float>() = float(value);
  }
}

// Calls fn(Storage<...>{}) for the storage of a call (Note [Storage of a
// step]), which check_storage has accepted.  kStorageOptions = false
// instantiates the plain storages only (the roofline); kQuantized = false
// leaves out 8-bit state (rules without slots).
template <bool kStorageOptions, bool kQuantized, class Fn>
void with_storage(at::ScalarType param, at::ScalarType state, bool master, bool stochastic,
                  Fn&& fn) {
  using BF16 = c10::BFloat16;
  using F16 = c10::Half;
  if (!master && !stochastic && state == param) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, param, "fastopt_cpu_step",
                                    [&] { fn(Storage<scalar_t, scalar_t, false, false>{}); });
    return;
  }
  TORCH_CHECK(kStorageOptions, "fastopt: this op takes state of the params' dtype only, got ", state,
              " state for ", param, " params", master ? " with master_params" : "",
              stochastic ? " with rounding_seed" : "");
  if constexpr (kStorageOptions) {
    if constexpr (kQuantized) {
      if (state == at::kByte) {
        if (master) {
          param == at::kBFloat16 ? fn(Storage<BF16, uint8_t, true, false>{})
                                 : fn(Storage<F16, uint8_t, true, false>{});
        } else if (stochastic) {
          fn(Storage<BF16, uint8_t, false, true>{});
        } else {
          switch (param) {
            case at::kHalf: fn(Storage<F16, uint8_t, false, false>{}); break;
            case at::kBFloat16: fn(Storage<BF16, uint8_t, false, false>{}); break;
            default: fn(Storage<float, uint8_t, false, false>{}); break;
          }
        }
        return;
      }
    }
    TORCH_CHECK(state != at::kByte, "fastopt: uint8 state for a rule without state slots");
    const bool float_state = state == at::kFloat;
    if (master) {
      if (param == at::kBFloat16) {
        float_state ? fn(Storage<BF16, float, true, false>{}) : fn(Storage<BF16, BF16, true, false>{});
      } else {
        float_state ? fn(Storage<F16, float, true, false>{}) : fn(Storage<F16, BF16, true, false>{});
      }
    } else if (stochastic) {
      float_state ? fn(Storage<BF16, float, false, true>{}) : fn(Storage<BF16, BF16, false, true>{});
    } else if (float_state) {  // params of another dtype
      switch (param) {
        case at::kDouble: fn(Storage<double, float, false, false>{}); break;
        case at::kHalf: fn(Storage<F16, float, false, false>{}); break;
        default: fn(Storage<BF16, float, false, false>{}); break;
      }
    } else {  // bfloat16 state, params of another dtype
      switch (param) {
        case at::kDouble: fn(Storage<double, BF16, false, false>{}); break;
        case at::kHalf: fn(Storage<F16, BF16, false, false>{}); break;
        default: fn(Storage<float, BF16, false, false>{}); break;
      }
    }
  }
}

// Where each tensor's streams are, whatever the storage: the part of a step
// that depends on the slot count only, so that it is compiled once per slot
// count rather than once per storage (22 of them) and rule variant.
template <int kSlots>
struct Layout {
  struct Tensor {
    void* param;
    const void* grad;
    void* slot[kSlots > 0 ? kSlots : 1];
    float* master;
    float* scale[kSlots > 0 ? kSlots : 1];  // 8-bit state only
    int64_t numel;
  };
  std::vector<Tensor> tensors;
  // offsets[t] = elements (8-bit state: blocks) before tensor t; size tensors + 1
  std::vector<int64_t> offsets;
  std::vector<at::Tensor> staged;  // keeps the copies alive through the kernel
  std::vector<WriteBack> write_backs;
};

// Checks every tensor of the call and lays out its streams.  The tensors of
// one param are walked in place when they share the param's strides and the
// param is dense (8-bit state: contiguous, as its blocks run in row-major
// order); the others are staged through contiguous copies, written back
// after the kernel.  Modifies nothing.
template <int kSlots>
Layout<kSlots> lay_out(const char* op, const StepLists& lists, const StepArgs& step_args,
                       at::ScalarType state_dtype) {
  const at::TensorList params = lists.params;
  const at::TensorList grads = lists.grads;
  const at::TensorList masters = step_args.master_params;
  const bool has_master = !masters.empty();
  const bool quantized = state_dtype == at::kByte;
  const size_t n = params.size();
  Layout<kSlots> layout;
  layout.tensors.resize(n);
  layout.offsets.resize(n + 1);
  layout.offsets[0] = 0;
  std::vector<char> staged_param(n, 0);
  at::parallel_for(0, int64_t(n), kCpuParamsPerTask, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      check_tensors_at(op, i, params, grads, lists.slots, lists.scalar_states, c10::kCPU, state_dtype,
                       masters);
      const at::Tensor& p = params[i];
      bool direct = p.is_non_overlapping_and_dense() && grads[i].strides() == p.strides();
      for (int k = 0; k < kSlots; ++k) direct = direct && lists.slots[k].tensors[i].strides() == p.strides();
      if (has_master) direct = direct && masters[i].strides() == p.strides();
      if (quantized) direct = direct && p.is_contiguous();
      auto& t = layout.tensors[i];
      t.numel = p.numel();
      t.master = nullptr;
      if (quantized) {
        for (int k = 0; k < kSlots; ++k) t.scale[k] = step_args.state_scales[k * n + i].data_ptr<float>();
      }
      if (!direct) {
        staged_param[i] = 1;
        continue;
      }
      t.param = p.data_ptr();
      t.grad = grads[i].const_data_ptr();
      for (int k = 0; k < kSlots; ++k) t.slot[k] = lists.slots[k].tensors[i].data_ptr();
      if (has_master) t.master = static_cast<float*>(masters[i].data_ptr());
    }
  });
  auto staged_ptr = [&](const at::Tensor& t, bool written) -> void* {
    at::Tensor copy = t.contiguous();
    if (written && !copy.is_same(t)) layout.write_backs.push_back({t, copy});
    layout.staged.push_back(copy);
    return copy.data_ptr();
  };
  for (size_t i = 0; i < n; ++i) {
    auto& t = layout.tensors[i];
    if (staged_param[i]) {
      t.param = staged_ptr(params[i], true);
      t.grad = staged_ptr(grads[i], false);
      for (int k = 0; k < kSlots; ++k) t.slot[k] = staged_ptr(lists.slots[k].tensors[i], true);
      if (has_master) t.master = static_cast<float*>(staged_ptr(masters[i], true));
    }
    layout.offsets[i + 1] = layout.offsets[i] + (quantized ? quantization::num_blocks(t.numel) : t.numel);
  }
  return layout;
}

// One step of Rule over the call's tensors (Note [CPU driver layout]).
template <class Rule, bool kStorageOptions = true>
void apply_rule(const char* op, const StepLists& lists, typename Rule::Hyper hyper, bool maximize,
                const StepArgs& step_args) {
  constexpr int kSlots = Rule::kNumSlots;
  constexpr int kStates = Rule::kNumScalarStates;
  const at::TensorList params = lists.params;
  const std::vector<NamedTensorList>& slots = lists.slots;
  const std::vector<NamedTensorList>& scalar_states = lists.scalar_states;
  TORCH_CHECK(slots.size() == size_t(kSlots) && scalar_states.size() == size_t(kStates), op,
              ": internal error, expected ", kSlots, " slot and ", kStates, " scalar-state lists");
  const at::TensorList masters = step_args.master_params;
  check_list_lengths(op, params, lists.grads, slots, scalar_states, masters);
  check_step_args(op, step_args);
  const size_t n = params.size();
  if (n == 0) return;
  // params[0] and its first slot pick the storage to dispatch on: check them
  // before dispatching.
  const at::ScalarType state_dtype = state_dtype_of(params, slots, !masters.empty());
  check_tensors_at(op, 0, params, lists.grads, slots, scalar_states, c10::kCPU, state_dtype, masters);
  const bool stochastic = step_args.rounding_seed.has_value();
  check_storage(op, params[0].scalar_type(), state_dtype, !masters.empty(), stochastic);
  check_state_scales(op, params, slots.size(), step_args.state_scales, state_dtype == at::kByte);
  Layout<kSlots> layout = lay_out<kSlots>(op, lists, step_args, state_dtype);

  // Nothing has been written so far; from here on the step happens,
  // unless AMP found an inf or NaN in the grads.
  if (step_args.found_inf && step_args.found_inf->item<double>() != 0) return;
  if (step_args.lr_tensor) hyper.lr = step_args.lr_tensor->item<double>();
  // Each tensor's scalar states before and after this step (step counts, ...).
  using States = std::array<double, kStates>;
  std::vector<States> before(n), after(n);
  if constexpr (kStates > 0) {
    at::parallel_for(0, int64_t(n), kCpuParamsPerTask, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        for (int c = 0; c < kStates; ++c) before[i][c] = read_scalar_state(scalar_states[c].tensors[i]);
        Rule::advance(hyper, before[i].data(), after[i].data());
        for (int c = 0; c < kStates; ++c) write_scalar_state(scalar_states[c].tensors[i], after[i][c]);
      }
    });
  }
  // Tensors of one group almost always share their scalar states, so the
  // scalars are derived once per distinct run of them: run_starts[r] is the
  // first tensor of run r, scalars_index[i] the run of tensor i.  The sum
  // states (Note [Reduction phase]) differ per tensor but feed no scalars,
  // so they do not split runs.
  constexpr int kFirstSum = rules::first_sum_state<Rule>();
  const auto same_scalars = [&](size_t i, size_t j) {
    for (int c = 0; c < kStates; ++c) {
      const bool sum_state = kFirstSum >= 0 && c >= kFirstSum && c < kFirstSum + rules::num_sums<Rule>();
      if (!sum_state && (before[i][c] != before[j][c] || after[i][c] != after[j][c])) return false;
    }
    return true;
  };
  std::vector<size_t> run_starts;
  std::vector<int64_t> scalars_index(n);
  for (size_t i = 0; i < n; ++i) {
    if (i == 0 || !same_scalars(i, i - 1)) run_starts.push_back(i);
    scalars_index[i] = int64_t(run_starts.size()) - 1;
  }

  with_storage<kStorageOptions, (kSlots > 0)>(params[0].scalar_type(), state_dtype, !masters.empty(),
                                              stochastic, [&](auto storage) {
    using Store = decltype(storage);
    using param_t = typename Store::param_type;
    using state_t = typename Store::state_type;
    using opmath_t = typename Store::opmath_t;
    Task<Rule, Store> task;
    task.options.maximize = maximize;
    if (step_args.grad_scale) task.options.grad_scale = step_args.grad_scale->item<opmath_t>();
    // The seed's low 32 bits feed the hash (Note [Stochastic rounding]).
    if (stochastic) task.options.rounding_seed = uint32_t(*step_args.rounding_seed);
    task.tensors.resize(n);
    for (size_t i = 0; i < n; ++i) {
      const auto& from = layout.tensors[i];
      auto& t = task.tensors[i];
      t.param = static_cast<param_t*>(from.param);
      t.grad = static_cast<const param_t*>(from.grad);
      for (int k = 0; k < kSlots; ++k) {
        t.slot[k] = static_cast<state_t*>(from.slot[k]);
        t.scale[k] = from.scale[k];
      }
      t.master = from.master;
      t.numel = from.numel;
      t.scalars_index = scalars_index[i];
      t.index = uint32_t(i);
      t.first_element = 0;
    }
    task.offsets = std::move(layout.offsets);  // the lambda runs once per step
    for (size_t start : run_starts) {
      task.scalars.push_back(Rule::template scalars<opmath_t>(hyper, before[start].data(), after[start].data()));
    }
    run(task);
    if constexpr (rules::first_sum_state<Rule>() >= 0) {
      // Tensors without elements have no reduction phase: their sums are 0.
      for (size_t i = 0; i < n; ++i) {
        for (int r = 0; r < rules::num_sums<Rule>(); ++r) {
          write_scalar_state(scalar_states[rules::first_sum_state<Rule>() + r].tensors[i],
                             task.sums.empty() ? 0.0 : task.sums[i][r]);
        }
      }
    }
  });
  for (auto& wb : layout.write_backs) wb.original.copy_(wb.staged);
}

template <class Optimizer>
void step(const char* op, const StepLists& lists, const typename Optimizer::Hyper& hyper,
          bool maximize, const StepArgs& step_args) {
  Optimizer::with_rule(hyper, [&](auto rule) {
    apply_rule<decltype(rule)>(op, lists, hyper, maximize, step_args);
  });
}

}  // namespace fastopt::cpu

// The explicit instantiation of cpu::step for one row of the optimizer table
// (the generated translation unit of that optimizer), and its declaration
// everywhere else, so that only that unit compiles the optimizer's kernels.
#define FASTOPT_CPU_STEP_SIGNATURE(Descriptor)                                                  \
  void fastopt::cpu::step<fastopt::rules::Descriptor>(                                          \
      const char*, const fastopt::StepLists&, const fastopt::rules::Descriptor::Hyper&, bool,   \
      const fastopt::StepArgs&)
#define FASTOPT_INSTANTIATE_CPU_STEP(name, Descriptor) template FASTOPT_CPU_STEP_SIGNATURE(Descriptor);
#define FASTOPT_EXTERN_CPU_STEP(name, Descriptor) extern template FASTOPT_CPU_STEP_SIGNATURE(Descriptor);
