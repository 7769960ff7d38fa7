// CUDA implementations of the fastopt ops: the thin launcher, the only file
// that includes ATen/c10 CUDA headers.  It checks every tensor (shared with
// the CPU ops, Note [Validate before mutate]), stages tensors the driver
// cannot walk linearly, and hands raw pointers to the kernels of
// optimizer_kernels.cu (Note [CUDA driver layout]).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <map>
#include <vector>

#include "../optimizer_table.h"
#include "../rules/roofline.h"
#include "../step_ops.h"
#include "../validate.h"
#include "step_launch.h"

namespace fastopt::cuda {
namespace {

Dtype dtype_of(at::ScalarType type) {
  switch (type) {
    case at::kFloat: return Dtype::kFloat32;
    case at::kDouble: return Dtype::kFloat64;
    case at::kHalf: return Dtype::kFloat16;
    case at::kBFloat16: return Dtype::kBFloat16;
    case at::kByte: return Dtype::kUInt8;
    default: TORCH_CHECK(false, "fastopt: unsupported dtype ", type);
  }
}

// Everything a launch needs alive until its kernels are queued.
struct PreparedStep {
  std::vector<TensorPointers> tensors;
  std::vector<at::Tensor> keep_alive;  // staged copies, float32 copies of scalars
  std::vector<std::pair<at::Tensor, at::Tensor>> write_backs;  // (original, staged)
  StepLaunch launch{};
  bool skip_on_host = false;  // found_inf given on the host and nonzero
};

// A one-element per-step tensor for the kernels to read on the params'
// device, as T (double for lr and grad_scale, which the CPU ops read in
// double too), or null when absent.
template <typename T>
const T* device_scalar(const char* op, const char* name, const std::optional<at::Tensor>& t,
                       const at::Device& device, PreparedStep& step) {
  if (!t.has_value()) return nullptr;
  TORCH_CHECK(t->device() == device, op, ": ", name, " is on ", t->device(),
              " but the params are on ", device);
  constexpr at::ScalarType kType = c10::CppTypeToScalarType<T>::value;
  at::Tensor converted = t->scalar_type() == kType ? *t : t->to(kType);
  step.keep_alive.push_back(converted);
  return converted.const_data_ptr<T>();
}

// Checks the call and lays out its pointers; writes nothing.
template <typename HyperT>
void prepare(const char* op, const StepLists& lists, HyperT& hyper, bool maximize,
             const StepArgs& step_args, PreparedStep& step) {
  const at::TensorList params = lists.params;
  const at::TensorList grads = lists.grads;
  const std::vector<NamedTensorList>& slots = lists.slots;
  const std::vector<NamedTensorList>& scalar_states = lists.scalar_states;
  const at::TensorList masters = step_args.master_params;
  check_list_lengths(op, params, grads, slots, scalar_states, masters);
  check_step_args(op, step_args);
  const size_t n = params.size();
  if (n == 0) return;
  const at::ScalarType state_dtype = state_dtype_of(params, slots, !masters.empty());
  for (size_t i = 0; i < n; ++i) {
    check_tensors_at(op, i, params, grads, slots, scalar_states, c10::kCUDA, state_dtype, masters);
    TORCH_CHECK(params[i].device() == params[0].device(), op, ": params[", i, "] is on ",
                params[i].device(), " but params[0] is on ", params[0].device(),
                "; one call takes tensors of one device");
    for (const auto& list : scalar_states) {
      const at::Tensor& state = list.tensors[i];
      TORCH_CHECK(state.device() == params[i].device() && state.scalar_type() == at::kFloat, op, ": ",
                  list.name, "[", i, "] must be a float32 tensor on ", params[i].device(),
                  " (the kernels advance scalar states on the device), got a ", state.scalar_type(),
                  " tensor on ", state.device());
    }
  }
  const bool stochastic = step_args.rounding_seed.has_value();
  check_storage(op, params[0].scalar_type(), state_dtype, !masters.empty(), stochastic);
  const bool quantized = state_dtype == at::kByte;
  check_state_scales(op, params, slots.size(), step_args.state_scales, quantized);
  const at::Device device = params[0].device();
  if (step_args.lr_tensor.has_value() && step_args.lr_tensor->is_cpu()) {
    hyper.lr = step_args.lr_tensor->item<double>();
  } else {
    step.launch.lr = device_scalar<double>(op, "lr_tensor", step_args.lr_tensor, device, step);
  }
  if (step_args.found_inf.has_value() && step_args.found_inf->is_cpu()) {
    step.skip_on_host = step_args.found_inf->item<double>() != 0;
  } else {
    step.launch.found_inf = device_scalar<float>(op, "found_inf", step_args.found_inf, device, step);
  }
  step.launch.grad_scale =
      device_scalar<double>(op, "grad_scale", step_args.grad_scale, device, step);

  auto staged = [&](const at::Tensor& t, bool written) -> void* {
    at::Tensor copy = t.contiguous();
    if (written && !copy.is_same(t)) step.write_backs.emplace_back(t, copy);
    step.keep_alive.push_back(copy);
    return copy.data_ptr();
  };
  step.tensors.resize(n);
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    bool direct = p.is_non_overlapping_and_dense() && grads[i].strides() == p.strides();
    for (const auto& slot : slots) direct = direct && slot.tensors[i].strides() == p.strides();
    if (!masters.empty()) direct = direct && masters[i].strides() == p.strides();
    // 8-bit state: blocks run in row-major order (Note [8-bit state]).
    if (quantized) direct = direct && p.is_contiguous();
    TensorPointers& t = step.tensors[i];
    t.numel = p.numel();
    for (size_t c = 0; c < scalar_states.size(); ++c) {
      t.scalar_state[c] = scalar_states[c].tensors[i].data_ptr<float>();
    }
    t.param = direct ? p.data_ptr() : staged(p, true);
    t.grad = direct ? grads[i].const_data_ptr() : staged(grads[i], false);
    for (size_t k = 0; k < slots.size(); ++k) {
      t.slot[k] = direct ? slots[k].tensors[i].data_ptr() : staged(slots[k].tensors[i], true);
      if (quantized) t.scale[k] = step_args.state_scales[k * n + i].data_ptr<float>();
    }
    if (!masters.empty()) {
      t.master = static_cast<float*>(direct ? masters[i].data_ptr() : staged(masters[i], true));
    }
  }
  step.launch.tensors = step.tensors.data();
  step.launch.num_tensors = int64_t(n);
  step.launch.dtype = dtype_of(params[0].scalar_type());
  step.launch.state_dtype = dtype_of(state_dtype);
  step.launch.master = !masters.empty();
  step.launch.stochastic_rounding = stochastic;
  // The seed's low 32 bits feed the hash (Note [Stochastic rounding]).
  step.launch.rounding_seed = stochastic ? uint32_t(*step_args.rounding_seed) : 0;
  step.launch.maximize = maximize;
}

// Checks, launches `run(launch, hyper)` on the current stream of the params'
// device and writes staged tensors back (queued on the same stream).
template <typename HyperT, class Run>
void run_launch(const char* op, const StepLists& lists, HyperT hyper, bool maximize,
                const StepArgs& step_args, Run&& run) {
  PreparedStep step;
  prepare(op, lists, hyper, maximize, step_args, step);
  if (lists.params.empty() || step.skip_on_host) return;
  const c10::cuda::CUDAGuard device_guard(lists.params[0].device());
  step.launch.stream = at::cuda::getCurrentCUDAStream().stream();
  run(step.launch, hyper);
  for (auto& [original, copy] : step.write_backs) original.copy_(copy);
}

// The CUDA step of an optimizer of the table (its kernels: launch_step).
// A rule with a reduction phase gets its workspace here, from the caching
// allocator on the step's stream (Note [Reduction phase]).
template <class Optimizer>
void step(const char* op, const StepLists& lists, const typename Optimizer::Hyper& hyper,
          bool maximize, const StepArgs& step_args) {
  run_launch(op, lists, hyper, maximize, step_args, [&](const StepLaunch& launch, const auto& h) {
    StepLaunch with_workspace = launch;
    const int64_t workspace_doubles = reduction_workspace_doubles<Optimizer>(launch, h);
    at::Tensor workspace;
    if (workspace_doubles > 0) {
      workspace = at::empty({workspace_doubles}, lists.params[0].options().dtype(at::kDouble));
      with_workspace.reduction_workspace = workspace.data_ptr<double>();
    }
    launch_step<Optimizer>(with_workspace, h);
  });
}

void roofline_cuda(at::TensorList params, at::TensorList grads, at::TensorList slots) {
  const StepLists lists{params, grads, roofline_slot_lists(params, slots), {}};
  run_launch("fastopt::roofline_", lists, rules::RooflineHyper{}, false, {},
             [&](const StepLaunch& launch, const auto&) { roofline_step(launch, int(lists.slots.size())); });
}

// fastopt::grad_sq_norm on the device: per-tensor norms by at::_foreach_norm
// (in float32, float64 for float64 grads), their squares summed in float64.
// No host sync; not bit-identical to the CPU kernel, but deterministic.
at::Tensor grad_sq_norm_cuda(at::TensorList grads) {
  check_norm_grads("fastopt::grad_sq_norm", grads, c10::kCUDA);
  const c10::cuda::CUDAGuard device_guard(grads[0].device());
  // One _foreach_norm per dtype: its multi-tensor path takes one dtype.
  std::map<at::ScalarType, std::vector<at::Tensor>> by_dtype;
  for (const at::Tensor& g : grads) {
    const at::Tensor real = g.is_complex() ? at::view_as_real(g) : g;
    by_dtype[real.scalar_type()].push_back(real);
  }
  at::Tensor sum = at::zeros({}, grads[0].options().dtype(at::kDouble));
  for (const auto& [dtype, tensors] : by_dtype) {
    const auto norms = at::_foreach_norm(tensors, 2, dtype == at::kDouble ? at::kDouble : at::kFloat);
    sum.add_(at::stack(norms).to(at::kDouble).square().sum());
  }
  return sum;
}

// fastopt::row_col_sq_means_ on the device (row_col_sums.cuh): kernels per
// grad over one workspace, no host sync.
void row_col_sq_means_cuda(at::TensorList grads, at::TensorList row_means, at::TensorList col_means,
                           const std::optional<at::Tensor>& grad_scale) {
  constexpr const char* kOp = "fastopt::row_col_sq_means_";
  check_row_col_means(kOp, grads, row_means, col_means, grad_scale, c10::kCUDA);
  if (grads.empty()) return;
  const c10::cuda::CUDAGuard device_guard(grads[0].device());
  const at::Tensor scale = grad_scale.has_value() ? grad_scale->to(at::kDouble) : at::Tensor();
  std::vector<RowColLaunch> launches(grads.size());
  std::vector<at::Tensor> dense(grads.size());
  int64_t workspace_doubles = 0;
  for (size_t i = 0; i < grads.size(); ++i) {
    dense[i] = grads[i].contiguous();
    RowColLaunch& launch = launches[i];
    launch.dtype = dtype_of(grads[i].scalar_type());
    launch.rows = grads[i].size(-2);
    launch.cols = grads[i].size(-1);
    launch.batches = matrix_batches(grads[i]);
    workspace_doubles += row_col_workspace_doubles(launch.batches, launch.rows, launch.cols);
  }
  const at::Tensor workspace = at::empty({workspace_doubles}, grads[0].options().dtype(at::kDouble));
  int64_t offset = 0;
  for (size_t i = 0; i < grads.size(); ++i) {
    RowColLaunch& launch = launches[i];
    launch.grad = dense[i].const_data_ptr();
    launch.row_means = row_means[i].data_ptr();
    launch.col_means = col_means[i].data_ptr();
    launch.grad_scale = scale.defined() ? scale.const_data_ptr<double>() : nullptr;
    launch.workspace = workspace.data_ptr<double>() + offset;
    launch.stream = at::cuda::getCurrentCUDAStream().stream();
    offset += row_col_workspace_doubles(launch.batches, launch.rows, launch.cols);
    launch_row_col_sq_means(launch);
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(fastopt, CUDA, m) {
  m.impl("grad_sq_norm", &grad_sq_norm_cuda);
  m.impl("row_col_sq_means_", &row_col_sq_means_cuda);
  for_each_optimizer([&](auto descriptor) {
    using Optimizer = decltype(descriptor);
    register_step_kernel<Optimizer, &step<Optimizer>>(m, c10::DeviceType::CUDA);
  });
  m.impl("roofline_", &roofline_cuda);
}

}  // namespace fastopt::cuda
