// The CUDA kernels run on the CPU (Note [CUDA emulation]) through the entry
// points the CUDA launcher calls (launch_step<Optimizer>, roofline_step),
// compared bit for bit with the CPU driver (the fastopt ops through the
// dispatcher, called boxed as Python calls them) on the same inputs: every
// optimizer of the table in each of its rule variants on every storage the CUDA driver
// instantiates (Note [Storage of a step]), over tensors of sizes 0, 1, the
// vector widths +- 1, the chunk size +- 1 and ~200k, with aligned streams
// (the vector path) next to unaligned ones (the scalar path) in one launch;
// maximize, weight decay, a grad_scale, an lr read through a device pointer,
// a step skipped by found_inf (nothing changes, scalar states included),
// stochastic rounding and 8-bit state (codes and block scales).  Then more tensors than one launch takes (the step
// splits into launches, each advancing its tensors' scalar states once), and the
// emulated half / bfloat16 conversions against c10's.
//
// Both sides are built without multiply-add contraction (-ffp-contract=off),
// as the real CUDA build is (--fmad=false), so every operation rounds alike.
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <optional>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include "../cuda/step_launch.h"
#include "../optimizer_table.h"
#include "../rules/quantization.h"
#include "../validate.h"
#include "check.h"
#include "cuda_emulation/float16.h"
#include "cuda_emulation/launch_count.h"
#include "op_signatures.h"

namespace fastopt::test {
namespace {

namespace cuda = fastopt::cuda;

// ---- storages: every combination the CUDA driver's with_storage takes ----

struct StorageSpec {
  at::ScalarType param, state;
  bool master, stochastic;
};

std::string storage_name(const StorageSpec& s) {
  return concat(c10::toString(s.param), " params, ", c10::toString(s.state), " state",
                s.master ? ", master copies" : "", s.stochastic ? ", stochastic rounding" : "");
}

const std::vector<StorageSpec>& plain_storages() {
  static const std::vector<StorageSpec> storages = {{at::kFloat, at::kFloat, false, false},
                                                    {at::kDouble, at::kDouble, false, false},
                                                    {at::kHalf, at::kHalf, false, false},
                                                    {at::kBFloat16, at::kBFloat16, false, false}};
  return storages;
}

const std::vector<StorageSpec>& all_storages() {
  static const std::vector<StorageSpec> storages = [] {
    std::vector<StorageSpec> all = plain_storages();
    for (at::ScalarType state : {at::kFloat, at::kBFloat16}) {
      all.push_back({at::kBFloat16, state, true, false});
      all.push_back({at::kHalf, state, true, false});
      all.push_back({at::kBFloat16, state, false, true});
    }
    for (at::ScalarType param : {at::kDouble, at::kHalf, at::kBFloat16}) {
      all.push_back({param, at::kFloat, false, false});
    }
    for (at::ScalarType param : {at::kDouble, at::kHalf, at::kFloat}) {
      all.push_back({param, at::kBFloat16, false, false});
    }
    for (at::ScalarType param : {at::kFloat, at::kHalf, at::kBFloat16}) {
      all.push_back({param, at::kByte, false, false});
    }
    all.push_back({at::kBFloat16, at::kByte, true, false});
    all.push_back({at::kHalf, at::kByte, true, false});
    all.push_back({at::kBFloat16, at::kByte, false, true});
    return all;
  }();
  return storages;
}

cuda::Dtype cuda_dtype(at::ScalarType type) {
  switch (type) {
    case at::kFloat: return cuda::Dtype::kFloat32;
    case at::kDouble: return cuda::Dtype::kFloat64;
    case at::kHalf: return cuda::Dtype::kFloat16;
    case at::kByte: return cuda::Dtype::kUInt8;
    default: return cuda::Dtype::kBFloat16;
  }
}

// ---- the tensors of a step ----

// Where a tensor's streams start: 0 elements past a 64-byte aligned
// allocation (every stream aligned: the vector path) or 1 (scalar path).
enum class Misaligned { kNone, kAll, kGrad, kLastSlot };

struct TensorSpec {
  int64_t numel;
  Misaligned misaligned;
};

// Vector widths are 2 (double), 4 (float) and 8 (16-bit) elements; chunks
// are 65536 elements (kChunkElements in multi_tensor_apply.cuh).
const std::vector<TensorSpec>& tensor_specs() {
  using M = Misaligned;
  static const std::vector<TensorSpec> specs = {
      {0, M::kNone},      {1, M::kNone},      {3, M::kAll},       {7, M::kNone},
      {9, M::kGrad},      {4, M::kLastSlot},  {5, M::kAll},       {8, M::kNone},
      {2, M::kNone},      {17, M::kAll},      {65535, M::kNone},  {65536, M::kGrad},
      {65537, M::kNone},  {200003, M::kNone}, {65537, M::kAll},   {1000, M::kLastSlot}};
  return specs;
}

at::Tensor allocate(int64_t numel, bool misaligned, at::ScalarType dtype) {
  const int64_t offset = misaligned ? 1 : 0;
  return at::empty({numel + offset}, at::TensorOptions().dtype(dtype)).narrow(0, offset, numel);
}

// A copy of t in memory of the same alignment.
at::Tensor twin(const at::Tensor& t) {
  const bool misaligned = reinterpret_cast<uintptr_t>(t.data_ptr()) % 64 != 0;
  at::Tensor copy = allocate(t.numel(), misaligned, t.scalar_type());
  copy.copy_(t);
  return copy;
}

// One driver's copy of everything a step writes.
struct Streams {
  std::vector<at::Tensor> params, masters;
  std::vector<std::vector<at::Tensor>> slots;          // [slot][tensor], the variant's slots
  std::vector<std::vector<at::Tensor>> scalar_states;  // [state][tensor], 0-dim float32
  std::vector<std::vector<at::Tensor>> scales;  // [slot][tensor], 8-bit slots' block scales

  Streams copy() const {
    Streams out;
    for (const auto& t : params) out.params.push_back(twin(t));
    for (const auto& t : masters) out.masters.push_back(twin(t));
    for (const auto* lists : {&slots, &scales}) {
      auto& copies = lists == &slots ? out.slots : out.scales;
      for (const auto& list : *lists) {
        copies.emplace_back();
        for (const auto& t : list) copies.back().push_back(twin(t));
      }
    }
    for (const auto& states : scalar_states) {
      out.scalar_states.emplace_back();
      for (const auto& t : states) out.scalar_states.back().push_back(t.clone());
    }
    return out;
  }
};

// Index of the first element whose bits differ, or -1.  NaNs compare equal
// whatever their bits: the device stores every NaN as 0x7FFF (half and
// bfloat16), c10 keeps its sign and payload (Note [CUDA emulation]).
int64_t first_difference(const at::Tensor& a, const at::Tensor& b) {
  if (a.numel() == 0) return -1;  // (its data pointer may be null)
  const size_t size = a.element_size();
  const char* x = static_cast<const char*>(a.const_data_ptr());
  const char* y = static_cast<const char*>(b.const_data_ptr());
  if (std::memcmp(x, y, size * a.numel()) == 0) return -1;
  for (int64_t i = 0; i < a.numel(); ++i) {
    if (std::memcmp(x + i * size, y + i * size, size) == 0) continue;
    if (!(std::isnan(a[i].item<double>()) && std::isnan(b[i].item<double>()))) return i;
  }
  return -1;
}

// Checks every stream of `got` against `expected` bit for bit.
void check_same_bits(const Streams& got, const Streams& expected, const std::string& what) {
  auto check = [&](const at::Tensor& a, const at::Tensor& b, const std::string& stream) {
    const int64_t i = first_difference(a, b);
    FASTOPT_CHECK(i < 0, what, ": ", stream, " differs first at element ", i, " of ", a.numel(), ": ",
                  i < 0 ? 0.0 : a[i].item<double>(), " vs ", i < 0 ? 0.0 : b[i].item<double>());
  };
  for (size_t t = 0; t < got.params.size(); ++t) {
    check(got.params[t], expected.params[t], concat("params[", t, "]"));
    if (!got.masters.empty()) check(got.masters[t], expected.masters[t], concat("masters[", t, "]"));
    for (size_t k = 0; k < got.slots.size(); ++k) {
      check(got.slots[k][t], expected.slots[k][t], concat("slot ", k, " [", t, "]"));
    }
    for (size_t c = 0; c < got.scalar_states.size(); ++c) {
      check(got.scalar_states[c][t], expected.scalar_states[c][t], concat("scalar state ", c, " [", t, "]"));
    }
    for (size_t k = 0; k < got.scales.size(); ++k) {
      check(got.scales[k][t], expected.scales[k][t], concat("scales of slot ", k, " [", t, "]"));
    }
  }
}

// ---- one call of a rule on both drivers ----

struct CallOptions {
  int call = 0;                        // 0-based
  bool maximize = false;
  std::optional<double> lr_override;   // a tensor lr (read through a pointer)
  std::optional<double> grad_scale;    // AMP / clipping
  bool found_inf = false;              // AMP: skip the step
  std::optional<int64_t> rounding_seed;
};

struct CpuStepArgs {
  std::optional<at::Tensor> lr_tensor, grad_scale, found_inf;
  std::optional<TL> masters;
  std::optional<int64_t> rounding_seed;
};

// A rule variant as the CPU op and the CUDA entry point take it.
struct Variant {
  std::string name;
  int num_slots = 0;
  // Each scalar state's value for tensor t before the first call: the step
  // count (the first state where the optimizer counts steps) differs between
  // tensors, as after add_param_group; other states start at `start`.
  std::vector<std::function<double(size_t t)>> initial_scalar_states;
  bool counts_steps = false;
  bool reduces = false;             // has a reduction phase (Note [Reduction phase])
  bool plain_storage_only = false;  // the roofline: plain storages,
  bool takes_step_args = true;      // and none of CallOptions but `call`
  std::function<void(const Streams&, TL grads, const CallOptions&, const CpuStepArgs&)> cpu;
  std::function<void(const cuda::StepLaunch&, const CallOptions&)> emulated;
};

// A variant of an optimizer of the table: `hyper` selects it; `at_call`, if
// given, adjusts it per call (SGD's first momentum step).  The CPU side calls
// the list op boxed, its arguments built from the descriptor.
template <class Optimizer>
Variant optimizer_variant(typename Optimizer::Hyper hyper,
                          std::vector<double> initial_states = {},
                          void (*at_call)(typename Optimizer::Hyper&, int call) = nullptr) {
  using Hyper = typename Optimizer::Hyper;
  Variant v;
  v.name = Optimizer::kName;
  for (const auto& field : Optimizer::kFields) {
    v.name += concat(" ", field.name, "=",
                     field.number != nullptr ? hyper.*field.number : double(hyper.*field.flag));
  }
  const auto used = Optimizer::slots_used(hyper);
  for (bool u : used) v.num_slots += int(u);
  Optimizer::with_rule(hyper, [&](auto rule) { v.reduces = rules::num_sums<decltype(rule)>() > 0; });
  for (size_t c = 0; c < Optimizer::kScalarStates.size(); ++c) {
    const bool step = std::string(Optimizer::kScalarStates[c]) == "state_steps";
    const double start = c < initial_states.size() ? initial_states[c] : 1.0;
    v.counts_steps = v.counts_steps || (c == 0 && step);
    v.initial_scalar_states.push_back([=](size_t t) { return step ? double(t % 4) * 3.0 : start; });
  }
  auto hyper_at = [=](int call) {
    Hyper h = hyper;
    if (at_call != nullptr) at_call(h, call);
    return h;
  };
  v.cpu = [=](const Streams& s, TL grads, const CallOptions& o, const CpuStepArgs& a) {
    const Hyper h = hyper_at(o.call);
    torch::jit::Stack stack{s.params, grads};
    size_t next = 0;
    for (bool u : used) stack.emplace_back(u ? s.slots[next++] : std::vector<at::Tensor>());
    for (const auto& states : s.scalar_states) stack.emplace_back(states);
    for (const auto& field : Optimizer::kFields) {
      if (field.number != nullptr) {
        stack.emplace_back(h.*field.number);
      } else {
        stack.emplace_back(h.*field.flag);
      }
    }
    stack.emplace_back(o.maximize);
    stack.emplace_back(a.lr_tensor);
    stack.emplace_back(a.grad_scale);
    stack.emplace_back(a.found_inf);
    stack.emplace_back(a.masters ? c10::IValue(a.masters->vec()) : c10::IValue());
    stack.emplace_back(a.rounding_seed);
    std::vector<at::Tensor> scales;  // slot-major
    for (const auto& slot : s.scales) scales.insert(scales.end(), slot.begin(), slot.end());
    stack.emplace_back(s.scales.empty() ? c10::IValue() : c10::IValue(scales));
    c10::Dispatcher::singleton()
        .findSchemaOrThrow((std::string("fastopt::") + Optimizer::kName + "_").c_str(), "")
        .callBoxed(stack);
  };
  v.emulated = [=](const cuda::StepLaunch& launch, const CallOptions& o) {
    // The reduction phase's workspace, as the launcher allocates it.
    const Hyper h = hyper_at(o.call);
    std::vector<double> workspace(cuda::reduction_workspace_doubles<Optimizer>(launch, h));
    cuda::StepLaunch with_workspace = launch;
    with_workspace.reduction_workspace = workspace.empty() ? nullptr : workspace.data();
    cuda::launch_step<Optimizer>(with_workspace, h);
  };
  return v;
}

// Every rule variant of every optimizer of the table, and the roofline.
std::vector<Variant> variants() {
  std::vector<Variant> out;
  const double lr = 1e-2;
  for (bool decoupled : {false, true}) {
    for (bool amsgrad : {false, true}) {
      out.push_back(optimizer_variant<rules::AdamOptimizer>({lr, 0.9, 0.999, 1e-8, 0.1, decoupled, amsgrad}));
    }
  }
  // The first call starts the momentum buffers (torch.optim copies the grad).
  auto first_call_starts_buffers = [](rules::SgdHyper& h, int call) { h.first_momentum_step = call == 0; };
  for (const auto& [momentum, dampening, nesterov] :
       {std::tuple{0.0, 0.0, false}, std::tuple{0.9, 0.1, false}, std::tuple{0.9, 0.0, true}}) {
    out.push_back(optimizer_variant<rules::SgdOptimizer>(
        {0.05, momentum, dampening, 0.01, nesterov, false}, {}, first_call_starts_buffers));
  }
  for (bool centered : {false, true}) {
    for (double momentum : {0.0, 0.9}) {
      out.push_back(optimizer_variant<rules::RmspropOptimizer>({lr, 0.99, 1e-8, 0.1, momentum, centered}));
    }
  }
  out.push_back(optimizer_variant<rules::AdagradOptimizer>({0.1, 0.01, 0.1, 1e-10}));
  for (bool decoupled : {false, true}) {
    out.push_back(optimizer_variant<rules::NadamOptimizer>({lr, 0.9, 0.999, 1e-8, 0.1, 4e-3, decoupled}));
    out.push_back(optimizer_variant<rules::RadamOptimizer>({lr, 0.9, 0.999, 1e-8, 0.1, decoupled}));
  }
  out.push_back(optimizer_variant<rules::AdamaxOptimizer>({lr, 0.9, 0.999, 1e-8, 0.1}));
  out.push_back(optimizer_variant<rules::AdadeltaOptimizer>({1.0, 0.9, 1e-6, 0.1}));
  // eta starts at lr and mu at 1; t0 = 2 makes mu fall below 1 within the calls.
  out.push_back(optimizer_variant<rules::AsgdOptimizer>({lr, 1e-2, 0.75, 2.0, 0.1}, {0.0, lr, 1.0}));
  out.push_back(optimizer_variant<rules::RpropOptimizer>({lr, 0.5, 1.2, 1e-6, 50.0}));
  out.push_back(optimizer_variant<rules::LionOptimizer>({1e-3, 0.9, 0.99, 0.1}));
  for (bool decoupled : {false, true}) {
    for (bool clip : {false, true}) {
      out.push_back(optimizer_variant<rules::AdoptOptimizer>({lr, 0.9, 0.9999, 1e-6, 0.1, decoupled, clip}));
    }
  }
  for (bool amsbound : {false, true}) {
    out.push_back(optimizer_variant<rules::AdaboundOptimizer>(
        {lr, 0.9, 0.999, 0.1, lr, 1e-3, 1e-8, 0.1, amsbound}));
  }
  for (bool decoupled : {false, true}) {
    out.push_back(optimizer_variant<rules::QhadamOptimizer>({lr, 0.9, 0.999, 0.7, 1.0, 1e-8, 0.1, decoupled}));
  }
  for (double num_betas : {1.0, 2.0, 3.0}) {
    out.push_back(optimizer_variant<rules::AggmoOptimizer>({lr, 0.0, 0.9, 0.99, num_betas, 0.1}));
  }
  out.push_back(optimizer_variant<rules::LookaheadOptimizer>({0.0, 0.5}));
  // The reduction phase (Note [Reduction phase]): LAMB's sums of a computed
  // update, LARS's of the params and grads.
  out.push_back(optimizer_variant<rules::LambOptimizer>({lr, 0.9, 0.999, 1e-6, 0.1, true, true, true, false}));
  out.push_back(optimizer_variant<rules::LambOptimizer>({lr, 0.9, 0.999, 1e-6, 0.1, false, false, false, false}));
  for (const auto& [momentum, nesterov, adapt] :
       {std::tuple{0.0, false, true}, std::tuple{0.9, false, true}, std::tuple{0.9, true, false}}) {
    out.push_back(optimizer_variant<rules::LarsOptimizer>({0.1, momentum, 0.1, 0.01, 0.02, 1e-8, nesterov, adapt}));
  }
  // Muon's passes around its orthogonalization (fastopt/muon.py): the
  // momentum writes its params, the update has no slot.
  for (bool nesterov : {false, true}) {
    out.push_back(optimizer_variant<rules::MuonMomentumOptimizer>({0.0, 0.95, nesterov}));
  }
  out.push_back(optimizer_variant<rules::MuonUpdateOptimizer>({lr, 0.1, 1.5}));
  // SWATS stores its sums in scalar states (rules::first_sum_state): in the
  // Adam phase, and after the switch (switched = 1: the tensor whose steps
  // start at 0 takes its first SGD step at call 0, the others' momentum goes on).
  for (double switched : {0.0, 1.0}) {
    out.push_back(optimizer_variant<rules::SwatsOptimizer>({lr, 0.9, 0.999, 1e-9, 0.1},
                                                           {0.0, switched, 2e-2, 3e-3, 5.0, -7.0}));
  }
  // Adafactor: a vector's variance, or a matrix's estimate (read only); the
  // sums of its reduction phase include the count of elements.
  for (bool factored : {false, true}) {
    out.push_back(optimizer_variant<rules::AdafactorOptimizer>({lr, -0.8, 1e-3, 1e-3, 1.0, 0.1, factored}));
  }
  for (int slots = 0; slots <= kMaxSlots; ++slots) {
    Variant v;
    v.name = concat("roofline slots=", slots);
    v.num_slots = slots;
    v.plain_storage_only = true;
    v.takes_step_args = false;
    v.cpu = [](const Streams& s, TL grads, const CallOptions&, const CpuStepArgs&) {
      std::vector<at::Tensor> flat;  // slot-major
      for (const auto& slot : s.slots) flat.insert(flat.end(), slot.begin(), slot.end());
      op<RooflineOp>("fastopt::roofline_").call(s.params, grads, flat);
    };
    v.emulated = [=](const cuda::StepLaunch& launch, const CallOptions&) {
      cuda::roofline_step(launch, slots);
    };
    out.push_back(v);
  }
  return out;
}

// The launch the CUDA launcher (optimizer_ops_cuda.cpp) builds, on host
// memory; `pointers` and the scalars must outlive it.
struct EmulatedCall {
  std::vector<cuda::TensorPointers> pointers;
  double lr = 0, grad_scale = 0;
  float found_inf = 0;
  cuda::StepLaunch launch{};

  EmulatedCall(const Streams& s, TL grads, const StorageSpec& storage, const CallOptions& o) {
    for (size_t t = 0; t < s.params.size(); ++t) {
      cuda::TensorPointers p{};
      p.param = s.params[t].data_ptr();
      p.grad = grads[t].const_data_ptr();
      for (size_t k = 0; k < s.slots.size(); ++k) p.slot[k] = s.slots[k][t].data_ptr();
      for (size_t k = 0; k < s.scales.size(); ++k) p.scale[k] = s.scales[k][t].data_ptr<float>();
      p.master = s.masters.empty() ? nullptr : s.masters[t].data_ptr<float>();
      for (size_t c = 0; c < s.scalar_states.size(); ++c) {
        p.scalar_state[c] = s.scalar_states[c][t].data_ptr<float>();
      }
      p.numel = s.params[t].numel();
      pointers.push_back(p);
    }
    launch.tensors = pointers.data();
    launch.num_tensors = int64_t(pointers.size());
    launch.dtype = cuda_dtype(storage.param);
    launch.state_dtype = cuda_dtype(storage.state);
    launch.master = storage.master;
    launch.stochastic_rounding = storage.stochastic;
    // The seed's low 32 bits, as the launcher passes them.
    launch.rounding_seed = o.rounding_seed ? uint32_t(*o.rounding_seed) : 0;
    if (o.lr_override) {
      lr = *o.lr_override;
      launch.lr = &lr;
    }
    if (o.grad_scale) {
      grad_scale = *o.grad_scale;
      launch.grad_scale = &grad_scale;
    }
    if (o.found_inf) {
      found_inf = 1.f;
      launch.found_inf = &found_inf;
    }
    launch.maximize = o.maximize;
    launch.stream = nullptr;
  }
};

// Runs kCalls calls of the variant on both drivers from the same random
// start over `specs`, checking after each call that both hold the same bits.
void run_case(const Variant& v, const StorageSpec& storage, const std::vector<TensorSpec>& specs,
              uint64_t seed, int case_index) {
  constexpr int kCalls = 3;
  const std::string what = concat(v.name, " on ", storage_name(storage));
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  auto random = [&](int64_t numel, bool misaligned, at::ScalarType dtype, double scale) {
    at::Tensor values = at::randn({numel}, gen, at::TensorOptions().dtype(at::kFloat)) * scale;
    at::Tensor t = allocate(numel, misaligned, dtype);
    t.copy_(values);
    return t;
  };
  const bool quantized = storage.state == at::kByte;
  Streams cpu;
  cpu.slots.resize(v.num_slots);
  if (quantized) cpu.scales.resize(v.num_slots);
  cpu.scalar_states.resize(v.initial_scalar_states.size());
  for (size_t t = 0; t < specs.size(); ++t) {
    const TensorSpec& spec = specs[t];
    const bool all = spec.misaligned == Misaligned::kAll;
    if (storage.master) {
      cpu.masters.push_back(random(spec.numel, all, at::kFloat, 1.0));
      cpu.params.push_back(allocate(spec.numel, all, storage.param));
      cpu.params.back().copy_(cpu.masters.back());
    } else {
      cpu.params.push_back(random(spec.numel, all, storage.param, 1.0));
    }
    // Fresh state, as torch.optim creates it; the calls fill it.
    for (int k = 0; k < v.num_slots; ++k) {
      const bool misaligned = all || (spec.misaligned == Misaligned::kLastSlot && k == v.num_slots - 1);
      cpu.slots[k].push_back(allocate(spec.numel, misaligned, storage.state).zero_());
      if (quantized) cpu.scales[k].push_back(at::zeros({quantization::num_blocks(spec.numel)}, at::kFloat));
    }
    for (size_t c = 0; c < v.initial_scalar_states.size(); ++c) {
      cpu.scalar_states[c].push_back(at::full({}, v.initial_scalar_states[c](t), at::kFloat));
    }
  }
  Streams emulated = cpu.copy();

  int applied = 0;
  const long failures_before = counters().failed;
  for (int call = 0; call < kCalls; ++call) {
    // Call 0 plain, call 1 skipped by found_inf, call 2 with a grad_scale
    // and an lr read through a pointer.
    CallOptions o;
    o.call = call;
    if (v.takes_step_args) {
      o.maximize = case_index % 2 == 1;
      o.found_inf = call == 1;
      if (call == 2) o.lr_override = 3e-3;
      if (call == 2) o.grad_scale = 1024.0;
    }
    if (storage.stochastic) o.rounding_seed = int64_t(0x9E3779B97F4A7C15ull >> 1) + call;
    // Grads of the params' dtype; scaled up where the call divides them.
    const double grad_scale = o.grad_scale.value_or(1.0) * 0.5;
    std::vector<at::Tensor> grads;
    for (const TensorSpec& spec : specs) {
      grads.push_back(random(spec.numel, spec.misaligned == Misaligned::kAll ||
                                             spec.misaligned == Misaligned::kGrad,
                             storage.param, grad_scale));
    }
    CpuStepArgs args;
    if (o.lr_override) args.lr_tensor = at::full({}, *o.lr_override, at::kDouble);
    if (o.grad_scale) args.grad_scale = at::full({}, *o.grad_scale, at::kFloat);
    if (o.found_inf) args.found_inf = at::ones({}, at::kFloat);
    if (storage.master) args.masters = TL(cpu.masters);
    args.rounding_seed = o.rounding_seed;

    const Streams before = o.found_inf ? cpu.copy() : Streams();
    v.cpu(cpu, grads, o, args);
    const EmulatedCall emulated_call(emulated, grads, storage, o);
    const int64_t launches_before = emulation::launch_count;
    v.emulated(emulated_call.launch, o);

    const std::string call_what = concat(what, ", call ", call, o.found_inf ? " (found_inf)" : "");
    check_same_bits(emulated, cpu, call_what + ", emulated CUDA vs CPU");
    if (o.found_inf) {
      check_same_bits(cpu, before, call_what + ", CPU vs before the call");
    } else {
      ++applied;
    }
    // One update launch per group of tensors, and one scalar-state launch
    // after it (launched, and skipped on the device, under found_inf too);
    // a reduction phase adds its three launches before the update.
    const int64_t per_launch = cuda::max_tensors_per_launch(quantized);
    const int64_t groups = (int64_t(specs.size()) + per_launch - 1) / per_launch;
    const int64_t launches = emulation::launch_count - launches_before;
    const int64_t per_group = (v.initial_scalar_states.empty() ? 1 : 2) + (v.reduces ? 3 : 0);
    FASTOPT_CHECK(launches == groups * per_group, call_what, ": ", launches, " launches for ",
                  specs.size(), " tensors (", per_launch, " per launch)");
  }
  for (size_t t = 0; v.counts_steps && t < specs.size(); ++t) {
    const double expected = v.initial_scalar_states[0](t) + applied;
    const double got = emulated.scalar_states[0][t].item<double>();
    FASTOPT_CHECK(got == expected, what, ": steps[", t, "] = ", got, ", expected ", expected);
  }
  if (counters().failed != failures_before) std::fprintf(stderr, "  (in %s)\n", what.c_str());
}

// Every variant on every storage over tensor_specs().
void test_variants_on_storages() {
  uint64_t seed = 1;
  int case_index = 0;
  for (const Variant& v : variants()) {
    for (const StorageSpec& storage : v.plain_storage_only ? plain_storages() : all_storages()) {
      if (storage.state == at::kByte && v.num_slots == 0) continue;  // no state to store in 8 bits
      run_case(v, storage, tensor_specs(), seed++, case_index++);
    }
  }
}

// More tensors than one launch takes, of mixed sizes, so the step splits.
void test_many_tensors() {
  std::mt19937_64 rng(7);
  const int64_t n = 2 * cuda::max_tensors_per_launch() + 37;
  std::vector<TensorSpec> specs;
  for (int64_t t = 0; t < n; ++t) {
    const int64_t numel = t % 97 == 0 ? 70000 : int64_t(rng() % 300);
    specs.push_back({numel, t % 3 == 0 ? Misaligned::kAll : Misaligned::kNone});
  }
  const StorageSpec storages[] = {{at::kFloat, at::kFloat, false, false},
                                  {at::kBFloat16, at::kFloat, true, false},
                                  {at::kBFloat16, at::kBFloat16, false, true},
                                  {at::kFloat, at::kByte, false, false}};
  int case_index = 0;
  for (const Variant& v : variants()) {
    for (const StorageSpec& storage : storages) {
      if (v.plain_storage_only && (storage.master || storage.stochastic || storage.state == at::kByte)) continue;
      if (storage.state == at::kByte && v.num_slots == 0) continue;
      run_case(v, storage, specs, 1000 + case_index, case_index);
      ++case_index;
    }
  }
}

uint16_t bits16(const void* value) {
  uint16_t bits;
  std::memcpy(&bits, value, sizeof(bits));
  return bits;
}

// The emulated device conversions round as c10's (which the CPU driver
// uses) for every value but NaN, where the device gives 0x7FFF.
void test_conversions() {
  std::mt19937 rng(11);
  std::vector<uint32_t> inputs = {0x00000000u, 0x80000000u, 0x7F800000u, 0xFF800000u, 0x7F7FFFFFu,
                                  0x477FEFFFu, 0x477FF000u, 0x38800000u, 0x387FFFFFu, 0x33000000u,
                                  0x33000001u, 0x33800000u, 0x00000001u, 0x3F808000u, 0x3F818000u};
  for (int i = 0; i < 1000000; ++i) inputs.push_back(rng());
  // Values near the half range, where its subnormals and overflow are.
  for (int i = 0; i < 200000; ++i) inputs.push_back(0x30000000u + rng() % 0x18000000u);
  for (uint32_t bits : inputs) {
    float value;
    std::memcpy(&value, &bits, sizeof(value));
    alignas(4) unsigned char half_storage[4], bf16_storage[4];
    const auto half_result = __float2half_rn(value);
    const auto bf16_result = __float2bfloat16_rn(value);
    std::memcpy(half_storage, &half_result, 2);
    std::memcpy(bf16_storage, &bf16_result, 2);
    const uint16_t half_bits = bits16(half_storage), bf16_bits = bits16(bf16_storage);
    if (std::isnan(value)) {
      FASTOPT_CHECK(half_bits == 0x7FFF && bf16_bits == 0x7FFF, "NaN ", bits);
      continue;
    }
    const uint16_t c10_half = c10::Half(value).x, c10_bf16 = c10::BFloat16(value).x;
    FASTOPT_CHECK(half_bits == c10_half, "float bits ", bits, " to half: ", half_bits, " vs c10 ",
                  c10_half);
    FASTOPT_CHECK(bf16_bits == c10_bf16, "float bits ", bits, " to bfloat16: ", bf16_bits, " vs c10 ",
                  c10_bf16);
  }
  // Widening is exact: every 16-bit pattern but NaNs.
  for (uint32_t b = 0; b < 0x10000; ++b) {
    const c10::Half h(uint16_t(b), c10::Half::from_bits());
    const c10::BFloat16 bf(uint16_t(b), c10::BFloat16::from_bits());
    if (std::isnan(float(h))) continue;
    __half emulated_half;
    __nv_bfloat16 emulated_bf16;
    std::memcpy(&emulated_half, &b, 2);  // little endian: the low 16 bits
    std::memcpy(&emulated_bf16, &b, 2);
    FASTOPT_CHECK(__half2float(emulated_half) == float(h), "half bits ", b);
    FASTOPT_CHECK(__bfloat162float(emulated_bf16) == float(bf) || std::isnan(float(bf)), "bfloat16 bits ", b);
  }
}

// fastopt::row_col_sq_means_ (Note [Row and column sums]): the emulated
// kernels against the CPU op, bit for bit, over every dtype, with and
// without a grad_scale, on shapes with several column chunks, a batch dim,
// rows shorter and longer than the lanes, and no elements.
void test_row_col_sums() {
  const std::vector<std::vector<int64_t>> shapes = {{1, 1},   {3, 5},     {7, 33},  {2, 3, 17},
                                                    {300, 70}, {40, 2000}, {0, 5},   {5, 0}};
  for (const at::ScalarType dtype : {at::kFloat, at::kDouble, at::kHalf, at::kBFloat16}) {
    const at::ScalarType opmath = dtype == at::kDouble ? at::kDouble : at::kFloat;
    for (const bool scaled : {false, true}) {
      for (const auto& shape : shapes) {
        const at::Tensor grad = (at::randn(shape, at::kDouble) * 3).to(dtype);
        const at::Tensor scale = at::full({}, 0.37, at::kDouble);
        const std::vector<at::Tensor> grads{grad};
        std::vector<at::Tensor> rows{at::full(factor_shape(grad, true), 7.0, opmath)};
        std::vector<at::Tensor> cols{at::full(factor_shape(grad, false), 7.0, opmath)};
        c10::Dispatcher::singleton()
            .findSchemaOrThrow("fastopt::row_col_sq_means_", "")
            .typed<void(at::TensorList, at::TensorList, at::TensorList, const std::optional<at::Tensor>&)>()
            .call(grads, rows, cols, scaled ? std::optional<at::Tensor>(scale) : std::nullopt);
        const at::Tensor row = at::full_like(rows[0], 7.0), col = at::full_like(cols[0], 7.0);
        cuda::RowColLaunch launch{};
        launch.grad = grad.const_data_ptr();
        launch.dtype = cuda_dtype(dtype);
        launch.row_means = row.data_ptr();
        launch.col_means = col.data_ptr();
        launch.batches = matrix_batches(grad);
        launch.rows = grad.size(-2);
        launch.cols = grad.size(-1);
        launch.grad_scale = scaled ? scale.const_data_ptr<double>() : nullptr;
        std::vector<double> workspace(cuda::row_col_workspace_doubles(launch.batches, launch.rows, launch.cols));
        launch.workspace = workspace.data();
        cuda::launch_row_col_sq_means(launch);
        const std::string what = concat(c10::toString(dtype), " ", at::IntArrayRef(shape), scaled ? " scaled" : "");
        FASTOPT_CHECK(first_difference(row.reshape(-1), rows[0].reshape(-1)) == -1, what, " row means");
        FASTOPT_CHECK(first_difference(col.reshape(-1), cols[0].reshape(-1)) == -1, what, " column means");
        FASTOPT_CHECK(grad.numel() == 0 || !at::equal(row, at::full_like(row, 7.0)), what, " rows written");
      }
    }
  }
}

}  // namespace
}  // namespace fastopt::test

int main() {
  // The emulated kernels run on this thread; idle OpenMP workers would spin
  // on the other cores between CPU ops.  (The CPU ops' threading is tested
  // by test_cpu_ops and tests/test_exactness.py.)
  at::set_num_threads(1);
  fastopt::test::test_conversions();
  fastopt::test::test_variants_on_storages();
  fastopt::test::test_many_tensors();
  fastopt::test::test_row_col_sums();
  return fastopt::test::summary("cuda_emulated");
}
