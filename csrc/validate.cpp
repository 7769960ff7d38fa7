// Note [Validate before mutate]
// torch.optim's for-loop implementation updates params one by one and can
// fail half-way (a param replaced by model surgery, a grad of the wrong
// shape), leaving a half-applied step.  fastopt checks every tensor of a
// call first and only then increments steps and runs the kernel.
#include "validate.h"

#include "rules/common.h"
#include "rules/quantization.h"

#include <tuple>
#include <utility>

#include <c10/util/Exception.h>

namespace fastopt {
namespace {

bool supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

void check_like_param(const char* op, const char* list, size_t i, const at::Tensor& t,
                      const at::Tensor& param, at::ScalarType dtype) {
  TORCH_CHECK(t.defined(), op, ": ", list, "[", i, "] is undefined");
  TORCH_CHECK(t.layout() == at::kStrided, op, ": ", list, "[", i, "] has layout ", t.layout(),
              "; fastopt supports dense (strided) tensors only");
  TORCH_CHECK(t.device() == param.device(), op, ": ", list, "[", i, "] is on ", t.device(),
              " but params[", i, "] is on ", param.device());
  if (t.scalar_type() != dtype) {
    TORCH_CHECK(dtype != param.scalar_type(), op, ": ", list, "[", i, "] has dtype ",
                t.scalar_type(), " but params[", i, "] has dtype ", param.scalar_type());
    TORCH_CHECK(false, op, ": ", list, "[", i, "] has dtype ", t.scalar_type(), " but ", dtype,
                " was expected (params[", i, "] has dtype ", param.scalar_type(), ")");
  }
  TORCH_CHECK(t.sizes() == param.sizes(), op, ": ", list, "[", i, "] has shape ", t.sizes(),
              " but params[", i, "] has shape ", param.sizes());
}

}  // namespace

void check_list_lengths(const char* op, at::TensorList params, at::TensorList grads,
                        const std::vector<NamedTensorList>& slots,
                        const std::vector<NamedTensorList>& scalar_states,
                        at::TensorList master_params) {
  const size_t n = params.size();
  TORCH_CHECK(grads.size() == n, op, ": got ", n, " params but ", grads.size(), " grads");
  TORCH_CHECK(master_params.empty() || master_params.size() == n, op, ": got ", n,
              " params but ", master_params.size(), " master_params");
  for (const auto* lists : {&slots, &scalar_states}) {
    for (const auto& list : *lists) {
      TORCH_CHECK(list.tensors.size() == n, op, ": got ", n, " params but ", list.tensors.size(), " ",
                  list.name);
    }
  }
}

void check_tensors_at(const char* op, size_t i, at::TensorList params, at::TensorList grads,
                      const std::vector<NamedTensorList>& slots,
                      const std::vector<NamedTensorList>& scalar_states, c10::DeviceType device_type,
                      at::ScalarType state_dtype, at::TensorList master_params) {
  const at::Tensor& p = params[i];
  TORCH_CHECK(p.defined(), op, ": params[", i, "] is undefined");
  TORCH_CHECK(p.device().type() == device_type, op, ": params[", i, "] is on ", p.device(),
              ", expected a ", device_type, " tensor");
  TORCH_CHECK(p.layout() == at::kStrided, op, ": params[", i, "] has layout ", p.layout(),
              "; fastopt supports dense (strided) tensors only");
  TORCH_CHECK(supported_dtype(p.scalar_type()), op, ": params[", i, "] has dtype ",
              p.scalar_type(), "; supported: float32, float64, float16, bfloat16");
  TORCH_CHECK(p.scalar_type() == params[0].scalar_type(), op, ": params[", i, "] has dtype ",
              p.scalar_type(), " but params[0] has dtype ", params[0].scalar_type(),
              "; one call takes tensors of one dtype");
  check_like_param(op, "grads", i, grads[i], p, p.scalar_type());
  for (const auto& slot : slots) check_like_param(op, slot.name, i, slot.tensors[i], p, state_dtype);
  if (!master_params.empty()) check_like_param(op, "master_params", i, master_params[i], p, at::kFloat);
  for (const auto& list : scalar_states) {
    const at::Tensor& state = list.tensors[i];
    TORCH_CHECK(state.defined() && state.numel() == 1 &&
                    (state.scalar_type() == at::kFloat || state.scalar_type() == at::kDouble),
                op, ": ", list.name, "[", i, "] must be a one-element float32 or float64 tensor");
    TORCH_CHECK(state.device().is_cpu() || state.device() == p.device(), op, ": ", list.name, "[", i,
                "] is on ", state.device(), " but params[", i, "] is on ", p.device());
  }
}

std::vector<NamedTensorList> roofline_slot_lists(at::TensorList params, at::TensorList slots) {
  const size_t n = params.size();
  TORCH_CHECK(n == 0 || slots.size() % n == 0, "fastopt::roofline_: slots must hold a whole "
              "number of lists of ", n, " tensors, got ", slots.size());
  const size_t num_slots = n == 0 ? 0 : slots.size() / n;
  TORCH_CHECK(num_slots <= size_t(kMaxSlots), "fastopt::roofline_: at most ", kMaxSlots,
              " state slots, got ", num_slots);
  std::vector<NamedTensorList> slot_lists;
  for (size_t k = 0; k < num_slots; ++k) slot_lists.push_back({"slots", slots.slice(k * n, n)});
  return slot_lists;
}

at::ScalarType state_dtype_of(at::TensorList params, const std::vector<NamedTensorList>& slots,
                              bool master_copies) {
  if (slots.empty()) return master_copies ? at::kFloat : params[0].scalar_type();
  const at::Tensor& first = slots[0].tensors.empty() ? at::Tensor() : slots[0].tensors[0];
  return first.defined() ? first.scalar_type() : params[0].scalar_type();
}

void check_storage(const char* op, at::ScalarType param_dtype, at::ScalarType state_dtype,
                   bool master_copies, bool stochastic_rounding) {
  const bool low_precision = param_dtype == at::kHalf || param_dtype == at::kBFloat16;
  TORCH_CHECK(state_dtype == param_dtype || state_dtype == at::kFloat || state_dtype == at::kBFloat16 ||
                  state_dtype == at::kByte,
              op, ": state of dtype ", state_dtype, " for params of dtype ", param_dtype,
              "; supported: the params' dtype, float32, bfloat16 or uint8 (8-bit)");
  TORCH_CHECK(state_dtype != at::kByte || param_dtype != at::kDouble, op,
              ": uint8 (8-bit) state is for float32, float16 and bfloat16 params, got params of dtype ",
              param_dtype);
  TORCH_CHECK(!master_copies || low_precision, op, ": master_params are for float16 / bfloat16 "
              "params, got params of dtype ", param_dtype);
  TORCH_CHECK(!master_copies || state_dtype == at::kFloat || state_dtype == at::kBFloat16 ||
                  state_dtype == at::kByte,
              op, ": with master_params the state must be float32, bfloat16 or uint8, got ", state_dtype);
  TORCH_CHECK(!stochastic_rounding || (param_dtype == at::kBFloat16 && !master_copies), op,
              ": rounding_seed (stochastic rounding) is for bfloat16 params without "
              "master_params, got params of dtype ", param_dtype,
              master_copies ? " with master_params" : "");
}

void check_state_scales(const char* op, at::TensorList params, size_t num_slots,
                        at::TensorList state_scales, bool quantized) {
  if (!quantized) {
    TORCH_CHECK(state_scales.empty(), op, ": state_scales are for uint8 (8-bit) state slots only");
    return;
  }
  const size_t n = params.size();
  TORCH_CHECK(state_scales.size() == num_slots * n, op, ": got ", n, " params and ", num_slots,
              " uint8 state slot lists but ", state_scales.size(), " state_scales (expected ",
              num_slots * n, ", slot-major)");
  for (size_t index = 0; index < state_scales.size(); ++index) {
    const size_t i = index % n;
    const at::Tensor& scale = state_scales[index];
    const int64_t expected = quantization::num_blocks(params[i].numel());
    TORCH_CHECK(scale.defined() && scale.scalar_type() == at::kFloat &&
                    scale.device() == params[i].device() && scale.numel() == expected &&
                    scale.is_contiguous(),
                op, ": state_scales[", index, "] must be a contiguous float32 tensor of ", expected,
                " elements on ", params[i].device(), " (the block scales of params[", i, "]'s slot ",
                index / n, "), got a ", scale.defined() ? c10::toString(scale.scalar_type()) : "undefined",
                " tensor of ", scale.defined() ? scale.numel() : 0, " elements on ",
                scale.defined() ? scale.device() : at::Device(at::kCPU));
  }
}

void check_step_args(const char* op, const StepArgs& args) {
  const std::pair<const char*, const std::optional<at::Tensor>*> named[] = {
      {"lr_tensor", &args.lr_tensor}, {"grad_scale", &args.grad_scale}, {"found_inf", &args.found_inf}};
  for (const auto& [name, tensor] : named) {
    if (!tensor->has_value()) continue;
    const at::Tensor& t = **tensor;
    TORCH_CHECK(t.defined() && t.numel() == 1 && at::isFloatingType(t.scalar_type()), op, ": ",
                name, " must be a one-element floating-point tensor");
  }
}

void check_norm_grads(const char* op, at::TensorList grads, c10::DeviceType device_type) {
  for (size_t i = 0; i < grads.size(); ++i) {
    const at::Tensor& g = grads[i];
    TORCH_CHECK(g.defined(), op, ": grads[", i, "] is undefined");
    TORCH_CHECK(g.device().type() == device_type && g.device() == grads[0].device(), op,
                ": grads[", i, "] is on ", g.device(), " but grads[0] is on ", grads[0].device(),
                "; one call takes tensors of one device");
    TORCH_CHECK(g.layout() == at::kStrided, op, ": grads[", i, "] has layout ", g.layout(),
                "; fastopt supports dense (strided) tensors only");
    const at::ScalarType real = g.is_complex() ? c10::toRealValueType(g.scalar_type()) : g.scalar_type();
    TORCH_CHECK(supported_dtype(real), op, ": grads[", i, "] has dtype ", g.scalar_type(),
                "; supported: float32, float64, float16, bfloat16 and their complex types");
  }
}

std::vector<int64_t> factor_shape(const at::Tensor& grad, bool row) {
  std::vector<int64_t> shape(grad.sizes().begin(), grad.sizes().end());
  shape[shape.size() - (row ? 1 : 2)] = 1;
  return shape;
}

int64_t matrix_batches(const at::Tensor& tensor) {
  int64_t batches = 1;
  for (int64_t d = 0; d + 2 < tensor.dim(); ++d) batches *= tensor.size(d);
  return batches;
}

void check_row_col_means(const char* op, at::TensorList grads, at::TensorList row_means,
                         at::TensorList col_means, const std::optional<at::Tensor>& grad_scale,
                         c10::DeviceType device_type) {
  TORCH_CHECK(row_means.size() == grads.size() && col_means.size() == grads.size(), op, ": got ",
              grads.size(), " grads, ", row_means.size(), " row_means and ", col_means.size(),
              " col_means; one of each per grad");
  for (size_t i = 0; i < grads.size(); ++i) {
    const at::Tensor& g = grads[i];
    TORCH_CHECK(g.defined() && g.layout() == at::kStrided && g.device().type() == device_type &&
                    g.device() == grads[0].device(),
                op, ": grads[", i, "] must be a dense tensor on ", grads[0].device(),
                " (one call takes tensors of one device)");
    TORCH_CHECK(supported_dtype(g.scalar_type()) && g.dim() >= 2, op, ": grads[", i,
                "] must have two or more dims and dtype float32, float64, float16 or bfloat16, got a ",
                g.scalar_type(), " tensor of shape ", g.sizes());
    const at::ScalarType opmath = g.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    for (const auto& [name, means, row] : {std::tuple{"row_means", &row_means, true},
                                           std::tuple{"col_means", &col_means, false}}) {
      const at::Tensor& m = (*means)[i];
      const std::vector<int64_t> shape = factor_shape(g, row);
      TORCH_CHECK(m.defined() && m.scalar_type() == opmath && m.device() == g.device() &&
                      m.sizes() == at::IntArrayRef(shape) && m.is_contiguous(),
                  op, ": ", name, "[", i, "] must be a contiguous ", opmath, " tensor of shape ",
                  at::IntArrayRef(shape), " on ", g.device(), ", got ",
                  m.defined() ? c10::str("a ", m.scalar_type(), " tensor of shape ", m.sizes(), " on ", m.device())
                              : std::string("an undefined tensor"));
    }
  }
  if (grad_scale.has_value()) {
    const at::Tensor& s = *grad_scale;
    TORCH_CHECK(s.defined() && s.numel() == 1 && at::isFloatingType(s.scalar_type()) &&
                    (grads.empty() || s.device() == grads[0].device()),
                op, ": grad_scale must be a one-element floating-point tensor on the grads' device");
  }
}

}  // namespace fastopt
