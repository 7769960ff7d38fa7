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

template <class Rule>
void apply_rule(const char* op, at::TensorList params, at::TensorList grads,
                const std::vector<NamedTensorList>& slots, at::TensorList state_steps,
                typename Rule::Hyper hyper, bool maximize, const StepArgs& step_args) {
  constexpr int kSlots = Rule::kNumSlots;
  TORCH_CHECK(slots.size() == size_t(kSlots), op, ": internal error, expected ", kSlots,
              " state lists");
  check_list_lengths(op, params, grads, slots, state_steps, Rule::kCountsSteps);
  check_step_args(op, step_args);
  const size_t n = params.size();
  if (n == 0) return;
  // params[0] picks the dtype to dispatch on: check it before dispatching.
  check_tensors_at(op, 0, params, grads, slots, state_steps, Rule::kCountsSteps, c10::kCPU);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "fastopt_cpu_step", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    Task<Rule, scalar_t> task;
    task.maximize = maximize;
    if (step_args.grad_scale) task.grad_scale = step_args.grad_scale->item<opmath_t>();
    if (step_args.lr_tensor) hyper.lr = step_args.lr_tensor->item<double>();
    task.tensors.resize(n);
    task.offsets.resize(n + 1);
    task.offsets[0] = 0;

    // Check every tensor and lay out the streams, in parallel over params.
    // The tensors of one param are walked in place when they share the
    // param's strides and the param is dense; the others are staged below.
    std::vector<char> staged_param(n, 0);
    at::parallel_for(0, int64_t(n), kCpuParamsPerTask, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        check_tensors_at(op, i, params, grads, slots, state_steps, Rule::kCountsSteps, c10::kCPU);
        const at::Tensor& p = params[i];
        bool direct = p.is_non_overlapping_and_dense() && grads[i].strides() == p.strides();
        for (int k = 0; k < kSlots; ++k) direct = direct && slots[k].tensors[i].strides() == p.strides();
        auto& t = task.tensors[i];
        t.numel = p.numel();
        if (!direct) {
          staged_param[i] = 1;
          continue;
        }
        t.param = static_cast<scalar_t*>(p.data_ptr());
        t.grad = static_cast<const scalar_t*>(grads[i].const_data_ptr());
        for (int k = 0; k < kSlots; ++k) t.slot[k] = static_cast<scalar_t*>(slots[k].tensors[i].data_ptr());
      }
    });

    // The rest go through contiguous copies, written back after the kernel.
    std::vector<at::Tensor> staged;  // keeps the copies alive through the kernel
    std::vector<WriteBack> write_backs;
    auto staged_ptr = [&](const at::Tensor& t, bool written) -> scalar_t* {
      at::Tensor copy = t.contiguous();
      if (written && !copy.is_same(t)) write_backs.push_back({t, copy});
      staged.push_back(copy);
      return static_cast<scalar_t*>(copy.data_ptr());
    };
    for (size_t i = 0; i < n; ++i) {
      if (staged_param[i]) {
        auto& t = task.tensors[i];
        t.param = staged_ptr(params[i], true);
        t.grad = staged_ptr(grads[i], false);
        for (int k = 0; k < kSlots; ++k) t.slot[k] = staged_ptr(slots[k].tensors[i], true);
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
              const std::optional<at::Tensor>& lr_tensor, const std::optional<at::Tensor>& grad_scale,
              const std::optional<at::Tensor>& found_inf) {
  const rules::AdamHyper hyper{lr, beta1, beta2, eps, weight_decay};
  std::vector<NamedTensorList> slots{{"exp_avgs", exp_avgs}, {"exp_avg_sqs", exp_avg_sqs}};
  if (amsgrad) slots.push_back({"max_exp_avg_sqs", max_exp_avg_sqs});
  rules::with_adam(decoupled_weight_decay, amsgrad, [&](auto rule) {
    apply_rule<decltype(rule)>("fastopt::adam_", params, grads, slots, state_steps, hyper,
                               maximize, {lr_tensor, grad_scale, found_inf});
  });
}

void sgd_cpu(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
             double lr, double momentum, double dampening, double weight_decay, bool nesterov,
             bool maximize, bool first_momentum_step, const std::optional<at::Tensor>& lr_tensor,
             const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf) {
  TORCH_CHECK(!nesterov || momentum > 0, "fastopt::sgd_: nesterov needs momentum > 0");
  const rules::SgdHyper hyper{lr, momentum, dampening, weight_decay, first_momentum_step};
  std::vector<NamedTensorList> slots;
  if (momentum != 0) slots.push_back({"momentum_buffers", momentum_buffers});
  rules::with_sgd(momentum != 0, nesterov, [&](auto rule) {
    apply_rule<decltype(rule)>("fastopt::sgd_", params, grads, slots, {}, hyper, maximize,
                               {lr_tensor, grad_scale, found_inf});
  });
}

void rmsprop_cpu(at::TensorList params, at::TensorList grads, at::TensorList square_avgs,
                 at::TensorList grad_avgs, at::TensorList momentum_buffers,
                 at::TensorList state_steps, double lr, double alpha, double eps,
                 double weight_decay, double momentum, bool centered, bool maximize,
                 const std::optional<at::Tensor>& lr_tensor, const std::optional<at::Tensor>& grad_scale,
                 const std::optional<at::Tensor>& found_inf) {
  const rules::RmspropHyper hyper{lr, alpha, eps, weight_decay, momentum};
  std::vector<NamedTensorList> slots{{"square_avgs", square_avgs}};
  if (centered) slots.push_back({"grad_avgs", grad_avgs});
  if (momentum > 0) slots.push_back({"momentum_buffers", momentum_buffers});
  rules::with_rmsprop(centered, momentum > 0, [&](auto rule) {
    apply_rule<decltype(rule)>("fastopt::rmsprop_", params, grads, slots, state_steps, hyper,
                               maximize, {lr_tensor, grad_scale, found_inf});
  });
}

void adagrad_cpu(at::TensorList params, at::TensorList grads, at::TensorList state_sums,
                 at::TensorList state_steps, double lr, double lr_decay, double weight_decay,
                 double eps, bool maximize, const std::optional<at::Tensor>& lr_tensor,
                 const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf) {
  const rules::AdagradHyper hyper{lr, lr_decay, weight_decay, eps};
  rules::with_adagrad([&](auto rule) {
    apply_rule<decltype(rule)>("fastopt::adagrad_", params, grads, {{"state_sums", state_sums}},
                               state_steps, hyper, maximize, {lr_tensor, grad_scale, found_inf});
  });
}

void roofline_cpu(at::TensorList params, at::TensorList grads, at::TensorList slots) {
  const size_t n = params.size();
  TORCH_CHECK(n == 0 || slots.size() % n == 0, "fastopt::roofline_: slots must hold a whole "
              "number of lists of ", n, " tensors, got ", slots.size());
  const size_t num_slots = n == 0 ? 0 : slots.size() / n;
  TORCH_CHECK(num_slots <= size_t(kMaxSlots), "fastopt::roofline_: at most ", kMaxSlots,
              " state slots, got ", num_slots);
  std::vector<NamedTensorList> slot_lists;
  for (size_t k = 0; k < num_slots; ++k) slot_lists.push_back({"slots", slots.slice(k * n, n)});
  rules::with_roofline(int(num_slots), [&](auto rule) {
    apply_rule<decltype(rule)>("fastopt::roofline_", params, grads, slot_lists, {}, {}, false, {});
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
