// CPU implementations of the fastopt ops: validate, lay out the streams for
// the driver (multi_tensor_apply.h), count steps, derive per-tensor scalars
// and run one rule.  The rules themselves live in csrc/rules/.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>
#include <utility>

#include "../rules/variants.h"
#include "../validate.h"
#include "multi_tensor_apply.h"

namespace fastopt::cpu {

Isa active_isa() {
  static const Isa isa = [] {
    Isa best = Isa::kBaseline;
#if FASTOPT_X86_MULTIVERSION
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) best = Isa::kAvx2;
    if (best == Isa::kAvx2 && __builtin_cpu_supports("avx512f") &&
        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512dq")) {
      best = Isa::kAvx512;
    }
#endif
    const char* requested = std::getenv("FASTOPT_CPU_CAPABILITY");
    if (requested != nullptr) {
      if (std::strcmp(requested, "baseline") == 0) return Isa::kBaseline;
      if (std::strcmp(requested, "avx2") == 0 && best != Isa::kBaseline) return Isa::kAvx2;
    }
    return best;
  }();
  return isa;
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    case Isa::kBaseline: return "baseline";
  }
  return "unknown";
}

namespace {

// Tensors the driver cannot walk linearly are updated through contiguous
// copies that are written back after the kernel.
struct WriteBack {
  at::Tensor original, staged;
};

// Adds one to the step count and returns the new value.
double increment_step(const at::Tensor& step) {
  if (step.scalar_type() == at::kDouble) return *step.data_ptr<double>() += 1.0;
  return *step.data_ptr<float>() += 1.0f;
}

// Calls fn(Storage<...>{}) for the storage of a call (Note [Storage of a
// step]), which check_storage has accepted.  kStorageOptions = false
// instantiates the plain storages only (the roofline).
template <bool kStorageOptions, class Fn>
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

template <class Rule, bool kStorageOptions = true>
void apply_rule(const char* op, at::TensorList params, at::TensorList grads,
                const std::vector<NamedTensorList>& slots, at::TensorList state_steps,
                typename Rule::Hyper hyper, bool maximize, const StepArgs& step_args) {
  constexpr int kSlots = Rule::kNumSlots;
  TORCH_CHECK(slots.size() == size_t(kSlots), op, ": internal error, expected ", kSlots,
              " state lists");
  const at::TensorList masters = step_args.master_params;
  check_list_lengths(op, params, grads, slots, state_steps, Rule::kCountsSteps, masters);
  check_step_args(op, step_args);
  const size_t n = params.size();
  if (n == 0) return;
  // params[0] and its first slot pick the storage to dispatch on: check them
  // before dispatching.
  const at::ScalarType state_dtype = state_dtype_of(params, slots, !masters.empty());
  check_tensors_at(op, 0, params, grads, slots, state_steps, Rule::kCountsSteps, c10::kCPU,
                   state_dtype, masters);
  const bool stochastic = step_args.rounding_seed.has_value();
  check_storage(op, params[0].scalar_type(), state_dtype, !masters.empty(), stochastic);

  with_storage<kStorageOptions>(params[0].scalar_type(), state_dtype, !masters.empty(), stochastic,
                                [&](auto storage) {
    using Store = decltype(storage);
    using param_t = typename Store::param_type;
    using state_t = typename Store::state_type;
    using opmath_t = typename Store::opmath_t;
    Task<Rule, Store> task;
    task.maximize = maximize;
    if (step_args.grad_scale) task.grad_scale = step_args.grad_scale->item<opmath_t>();
    if (step_args.lr_tensor) hyper.lr = step_args.lr_tensor->item<double>();
    // The seed's low 32 bits feed the hash (Note [Stochastic rounding]).
    if (stochastic) task.rounding_seed = uint32_t(*step_args.rounding_seed);
    task.tensors.resize(n);
    task.offsets.resize(n + 1);
    task.offsets[0] = 0;

    // Check every tensor and lay out the streams, in parallel over params.
    // The tensors of one param are walked in place when they share the
    // param's strides and the param is dense; the others are staged below.
    std::vector<char> staged_param(n, 0);
    at::parallel_for(0, int64_t(n), kCpuParamsPerTask, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        check_tensors_at(op, i, params, grads, slots, state_steps, Rule::kCountsSteps, c10::kCPU,
                         state_dtype, masters);
        const at::Tensor& p = params[i];
        bool direct = p.is_non_overlapping_and_dense() && grads[i].strides() == p.strides();
        for (int k = 0; k < kSlots; ++k) direct = direct && slots[k].tensors[i].strides() == p.strides();
        if (Store::kMaster) direct = direct && masters[i].strides() == p.strides();
        auto& t = task.tensors[i];
        t.numel = p.numel();
        t.index = uint32_t(i);
        if (!direct) {
          staged_param[i] = 1;
          continue;
        }
        t.param = static_cast<param_t*>(p.data_ptr());
        t.grad = static_cast<const param_t*>(grads[i].const_data_ptr());
        for (int k = 0; k < kSlots; ++k) t.slot[k] = static_cast<state_t*>(slots[k].tensors[i].data_ptr());
        t.master = Store::kMaster ? static_cast<float*>(masters[i].data_ptr()) : nullptr;
      }
    });

    // The rest go through contiguous copies, written back after the kernel.
    std::vector<at::Tensor> staged;  // keeps the copies alive through the kernel
    std::vector<WriteBack> write_backs;
    auto staged_ptr = [&](const at::Tensor& t, bool written) -> void* {
      at::Tensor copy = t.contiguous();
      if (written && !copy.is_same(t)) write_backs.push_back({t, copy});
      staged.push_back(copy);
      return copy.data_ptr();
    };
    for (size_t i = 0; i < n; ++i) {
      if (staged_param[i]) {
        auto& t = task.tensors[i];
        t.param = static_cast<param_t*>(staged_ptr(params[i], true));
        t.grad = static_cast<const param_t*>(staged_ptr(grads[i], false));
        for (int k = 0; k < kSlots; ++k) {
          t.slot[k] = static_cast<state_t*>(staged_ptr(slots[k].tensors[i], true));
        }
        t.master = Store::kMaster ? static_cast<float*>(staged_ptr(masters[i], true)) : nullptr;
      }
      task.offsets[i + 1] = task.offsets[i] + task.tensors[i].numel;
    }

    // Nothing has been written so far; from here on the step happens,
    // unless AMP found an inf or NaN in the grads.
    if (step_args.found_inf && step_args.found_inf->item<double>() != 0) return;
    std::vector<double> steps(n, 0.0);
    if (Rule::kCountsSteps) {
      at::parallel_for(0, int64_t(n), kCpuParamsPerTask, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) steps[i] = increment_step(state_steps[i]);
      });
    }
    // Tensors of one group almost always share their step count, so the
    // scalars are derived once per distinct run of counts.
    for (size_t i = 0; i < n; ++i) {
      if (i == 0 || steps[i] != steps[i - 1]) {
        task.scalars.push_back(Rule::template scalars<opmath_t>(hyper, steps[i]));
      }
      task.tensors[i].scalars_index = int64_t(task.scalars.size()) - 1;
    }
    run(task);
    for (auto& wb : write_backs) wb.original.copy_(wb.staged);
  });
}

void adam_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
              at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
              at::TensorList state_steps, double lr, double beta1, double beta2, double eps,
              double weight_decay, bool decoupled_weight_decay, bool amsgrad, bool maximize,
              FASTOPT_STEP_PARAMS) {
  const rules::AdamHyper hyper{lr, beta1, beta2, eps, weight_decay};
  std::vector<NamedTensorList> slots{{"exp_avgs", exp_avgs}, {"exp_avg_sqs", exp_avg_sqs}};
  if (amsgrad) slots.push_back({"max_exp_avg_sqs", max_exp_avg_sqs});
  rules::with_adam(decoupled_weight_decay, amsgrad, [&](auto rule) {
    apply_rule<decltype(rule)>("fastopt::adam_", params, grads, slots, state_steps, hyper,
                               maximize, {FASTOPT_STEP_VALUES});
  });
}

void sgd_cpu(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
             double lr, double momentum, double dampening, double weight_decay, bool nesterov,
             bool maximize, bool first_momentum_step, FASTOPT_STEP_PARAMS) {
  TORCH_CHECK(!nesterov || momentum > 0, "fastopt::sgd_: nesterov needs momentum > 0");
  const rules::SgdHyper hyper{lr, momentum, dampening, weight_decay, first_momentum_step};
  std::vector<NamedTensorList> slots;
  if (momentum != 0) slots.push_back({"momentum_buffers", momentum_buffers});
  rules::with_sgd(momentum != 0, nesterov, [&](auto rule) {
    apply_rule<decltype(rule)>("fastopt::sgd_", params, grads, slots, {}, hyper, maximize,
                               {FASTOPT_STEP_VALUES});
  });
}

void rmsprop_cpu(at::TensorList params, at::TensorList grads, at::TensorList square_avgs,
                 at::TensorList grad_avgs, at::TensorList momentum_buffers,
                 at::TensorList state_steps, double lr, double alpha, double eps,
                 double weight_decay, double momentum, bool centered, bool maximize,
                 FASTOPT_STEP_PARAMS) {
  const rules::RmspropHyper hyper{lr, alpha, eps, weight_decay, momentum};
  std::vector<NamedTensorList> slots{{"square_avgs", square_avgs}};
  if (centered) slots.push_back({"grad_avgs", grad_avgs});
  if (momentum > 0) slots.push_back({"momentum_buffers", momentum_buffers});
  rules::with_rmsprop(centered, momentum > 0, [&](auto rule) {
    apply_rule<decltype(rule)>("fastopt::rmsprop_", params, grads, slots, state_steps, hyper,
                               maximize, {FASTOPT_STEP_VALUES});
  });
}

void adagrad_cpu(at::TensorList params, at::TensorList grads, at::TensorList state_sums,
                 at::TensorList state_steps, double lr, double lr_decay, double weight_decay,
                 double eps, bool maximize, FASTOPT_STEP_PARAMS) {
  const rules::AdagradHyper hyper{lr, lr_decay, weight_decay, eps};
  rules::with_adagrad([&](auto rule) {
    apply_rule<decltype(rule)>("fastopt::adagrad_", params, grads, {{"state_sums", state_sums}},
                               state_steps, hyper, maximize, {FASTOPT_STEP_VALUES});
  });
}

void roofline_cpu(at::TensorList params, at::TensorList grads, at::TensorList slots) {
  const std::vector<NamedTensorList> slot_lists = roofline_slot_lists(params, slots);
  const size_t num_slots = slot_lists.size();
  rules::with_roofline(int(num_slots), [&](auto rule) {
    apply_rule<decltype(rule), false>("fastopt::roofline_", params, grads, slot_lists, {}, {}, false,
                                      {});
  });
}

std::string cpu_capability() { return isa_name(active_isa()); }

}  // namespace

TORCH_LIBRARY_IMPL(fastopt, CPU, m) {
  m.impl("adam_", &adam_cpu);
  m.impl("sgd_", &sgd_cpu);
  m.impl("rmsprop_", &rmsprop_cpu);
  m.impl("adagrad_", &adagrad_cpu);
  m.impl("roofline_", &roofline_cpu);
}

TORCH_LIBRARY_FRAGMENT(fastopt, m) {
  m.def("cpu_capability() -> str", &cpu_capability);
}

}  // namespace fastopt::cpu
