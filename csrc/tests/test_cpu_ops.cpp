// The fastopt CPU ops through the dispatcher, as Python and torch.compile
// call them: every optimizer op and variant (maximize and weight decay
// included), in float32, float64, float16 and bfloat16, on a list of tensors
// that covers the driver's cases (empty, one element, a tensor split between
// threads, SIMD tails, permuted-dense views walked in place, non-dense views
// and mismatched strides staged through copies), against the references of
// reference_rules.h element by element.  Then the error paths: a bad call
// throws c10::Error naming the offending list and index and leaves params,
// state and step counts bit-identical.
//
// The ISA the element loops use is chosen once per process; CMakeLists.txt
// runs this test once per FASTOPT_CPU_CAPABILITY.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>

#include "../step_args.h"

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <limits>
#include <string>
#include <vector>

#include "check.h"
#include "op_signatures.h"
#include "reference_rules.h"

namespace fastopt::test {
namespace {

// ---- the tensor list every op test runs on ----

enum class Layout {
  kContiguous,
  kTransposed,  // dense, permuted strides: the driver walks it in place
  kStrided,     // every other column of a wider tensor: not dense, staged
};

struct TensorSpec {
  std::vector<int64_t> shape;
  Layout param_layout, grad_layout, state_layout;
  double initial_step;  // 0: fresh state as torch.optim creates it
};

constexpr int kCalls = 3;  // optimizer steps per test

// 48464 elements in all, so with three threads the ranges start and end
// inside tensors (kCpuMinElementsPerThread is 16384).  Step counts differ
// between tensors of one call, as after a param was added to a group.
const std::vector<TensorSpec>& tensor_specs() {
  using L = Layout;
  static const std::vector<TensorSpec> specs = {
      {{0}, L::kContiguous, L::kContiguous, L::kContiguous, 0},
      {{1000}, L::kContiguous, L::kContiguous, L::kContiguous, 0},
      {{200, 200}, L::kContiguous, L::kContiguous, L::kContiguous, 0},
      {{37, 53}, L::kTransposed, L::kTransposed, L::kTransposed, 7},
      {{64, 65}, L::kStrided, L::kContiguous, L::kContiguous, 7},
      {{29, 31}, L::kTransposed, L::kContiguous, L::kTransposed, 0},
      {{23, 19}, L::kContiguous, L::kTransposed, L::kContiguous, 0},
      {{7}, L::kContiguous, L::kContiguous, L::kContiguous, 100},
  };
  return specs;
}

at::Tensor make_tensor(const std::vector<double>& values, const std::vector<int64_t>& shape,
                       Layout layout, at::ScalarType dtype) {
  const auto options = at::TensorOptions().dtype(dtype);
  at::Tensor t;
  switch (layout) {
    case Layout::kContiguous: t = at::empty(shape, options); break;
    case Layout::kTransposed: t = at::empty({shape[1], shape[0]}, options).t(); break;
    case Layout::kStrided: t = at::empty({shape[0], 2 * shape[1]}, options).slice(1, 0, 2 * shape[1], 2); break;
  }
  std::vector<double> copy = values;
  t.copy_(at::from_blob(copy.data(), {int64_t(copy.size())}, at::kDouble).reshape(shape));
  return t;
}

// Elements in logical (row-major) order, exactly (every dtype here widens
// exactly to double).
std::vector<double> values_of(const at::Tensor& t) {
  const at::Tensor c = t.to(at::kDouble).contiguous();
  return std::vector<double>(c.data_ptr<double>(), c.data_ptr<double>() + c.numel());
}

std::vector<Tracked> tracked(const std::vector<double>& values) {
  std::vector<Tracked> out;
  for (double v : values) out.push_back(C(v));
  return out;
}

// ---- one op variant ----

struct OpLists {
  std::vector<at::Tensor> params, grads, steps;
  std::vector<std::vector<at::Tensor>> slots;  // [slot][tensor]
};

struct OpCase {
  std::string name;
  int num_slots = 0;
  bool counts_steps = false;
  bool maximize = false;
  bool fresh_sgd = false;  // SGD only: the first call starts the momentum buffers
  // Runs the op for call number `call` (0-based).
  std::function<void(const OpLists&, int call)> call;
  // The reference for one element; `step` is the count after the increment.
  std::function<void(Tracked& p, Tracked g, Tracked* slots, double step, int call)> reference;
  // A valid random state (fresh: as torch.optim creates it).
  std::function<void(Rng&, double* slots, bool fresh, double grad_scale)> init;
};

// Storage tolerance: float32/64 compare trajectories against the tracked
// reference (as test_rules does); float16/bfloat16 store every result
// rounded, so they compare one step at a time from the stored state
// (lockstep) with half an ulp of the storage type on top.
struct Tolerance {
  double rtol, atol;
  bool lockstep;
};

Tolerance tolerance_for(at::ScalarType dtype) {
  switch (dtype) {
    case at::kDouble: return {2e-14, 0, false};
    case at::kFloat: return {4e-6, 0, false};
    // Half: unit roundoff 2^-11; subnormals (below 6.1e-5) round to 2^-24.
    case at::kHalf: return {0x1.0p-11 + 4e-6, 0x1.0p-25, true};
    default: return {0x1.0p-8 + 4e-6, 0, true};  // bfloat16: unit roundoff 2^-8
  }
}

void run_op_case(const OpCase& c, at::ScalarType dtype, uint64_t seed) {
  const Tolerance tol = tolerance_for(dtype);
  Rng rng(seed);
  // Reduced-precision types get moderate scales that neither overflow half
  // (g^2 of Adam) nor drown in its subnormals.
  const bool reduced = tol.lockstep;
  const double param_scale = reduced ? 1.0 : rng.log_uniform(1e-2, 1e1);
  const double grad_scale = reduced ? 0.1 : rng.log_uniform(1e-3, 1e1);
  const auto& specs = tensor_specs();
  const size_t n = specs.size();

  OpLists lists;
  lists.slots.resize(c.num_slots);
  std::vector<std::vector<Tracked>> ref_param(n);
  std::vector<std::vector<std::vector<Tracked>>> ref_slot(n);  // [tensor][slot][element]
  for (size_t i = 0; i < n; ++i) {
    const TensorSpec& spec = specs[i];
    int64_t numel = 1;
    for (int64_t d : spec.shape) numel *= d;
    std::vector<double> p(numel);
    for (double& v : p) v = rng.signed_value(param_scale);
    std::vector<std::vector<double>> s(c.num_slots, std::vector<double>(numel));
    const bool fresh = c.counts_steps ? spec.initial_step == 0 : c.fresh_sgd;
    for (int64_t e = 0; e < numel; ++e) {
      double slot_values[3] = {};
      c.init(rng, slot_values, fresh, grad_scale);
      for (int k = 0; k < c.num_slots; ++k) s[k][e] = slot_values[k];
    }
    lists.params.push_back(make_tensor(p, spec.shape, spec.param_layout, dtype));
    ref_param[i] = tracked(values_of(lists.params[i]));
    ref_slot[i].resize(c.num_slots);
    for (int k = 0; k < c.num_slots; ++k) {
      lists.slots[k].push_back(make_tensor(s[k], spec.shape, spec.state_layout, dtype));
      ref_slot[i][k] = tracked(values_of(lists.slots[k][i]));
    }
    if (c.counts_steps) lists.steps.push_back(at::full({}, spec.initial_step, at::kFloat));
  }

  const std::string what = concat(c.name, " ", c10::toString(dtype));
  long failures_before = counters().failed;
  for (int call = 0; call < kCalls; ++call) {
    lists.grads.clear();
    std::vector<std::vector<double>> g(n);
    for (size_t i = 0; i < n; ++i) {
      std::vector<double> values(lists.params[i].numel());
      for (double& v : values) v = rng.signed_value(grad_scale);
      lists.grads.push_back(make_tensor(values, specs[i].shape, specs[i].grad_layout, dtype));
      g[i] = values_of(lists.grads[i]);
    }
    if (tol.lockstep) {
      for (size_t i = 0; i < n; ++i) {
        ref_param[i] = tracked(values_of(lists.params[i]));
        for (int k = 0; k < c.num_slots; ++k) ref_slot[i][k] = tracked(values_of(lists.slots[k][i]));
      }
    }
    c.call(lists, call);

    for (size_t i = 0; i < n; ++i) {
      const double step = specs[i].initial_step + call + 1;
      const std::vector<double> got_param = values_of(lists.params[i]);
      std::vector<std::vector<double>> got_slot(c.num_slots);
      for (int k = 0; k < c.num_slots; ++k) got_slot[k] = values_of(lists.slots[k][i]);
      Tracked slot_values[3];
      for (size_t e = 0; e < got_param.size(); ++e) {
        for (int k = 0; k < c.num_slots; ++k) slot_values[k] = ref_slot[i][k][e];
        const Tracked grad = C(c.maximize ? -g[i][e] : g[i][e]);
        c.reference(ref_param[i][e], grad, slot_values, step, call);
        for (int k = 0; k < c.num_slots; ++k) ref_slot[i][k][e] = slot_values[k];

        auto compare = [&](double got, const Tracked& ref, const char* stream, int k) {
          const double limit = tol.rtol * ref.mag + tol.atol;
          const double err = std::fabs(got - ref.value);
          // In lockstep the reference starts from the stored state, so where
          // float16 rounding made a centered RMSprop's square_avg - grad_avg^2
          // negative both sides agree on NaN (as torch.optim would).
          const bool both_nan = tol.lockstep && std::isnan(got) && std::isnan(ref.value);
          if (err <= limit || both_nan) {
            record(true, "");
          } else {
            record(false, concat(what, " call ", call, " tensor ", i, " element ", e, " ", stream,
                                 k >= 0 ? concat("[", k, "]") : std::string(), ": got ", got,
                                 " expected ", ref.value, " (error ", err, " > tolerance ", limit,
                                 ")"));
          }
        };
        compare(got_param[e], ref_param[i][e], "param", -1);
        for (int k = 0; k < c.num_slots; ++k) compare(got_slot[k][e], ref_slot[i][k][e], "slot", k);
      }
      if (c.counts_steps) {
        const double got_step = lists.steps[i].item<double>();
        FASTOPT_CHECK(got_step == step, what, " call ", call, " state_steps[", i, "] = ", got_step,
                      ", expected ", step);
      }
    }
  }
  // The views the driver could not walk in place were updated through
  // copies; their strides must be the caller's, not the copies'.
  FASTOPT_CHECK(!lists.params[4].is_contiguous() && lists.params[4].stride(1) == 2, what,
                " params[4] lost its layout");
  if (counters().failed != failures_before) std::fprintf(stderr, "  (in %s)\n", what.c_str());
}

// ---- the op variants ----

std::vector<OpCase> adam_cases() {
  std::vector<OpCase> cases;
  for (bool decoupled : {false, true}) {
    for (bool amsgrad : {false, true}) {
      for (bool maximize : {false, true}) {
        for (bool weight_decay : {false, true}) {
          const rules::AdamHyper h{2e-2, 0.9, 0.99, 1e-6, weight_decay ? 0.05 : 0.0};
          OpCase c;
          c.name = concat("adam_ decoupled=", decoupled, " amsgrad=", amsgrad, " maximize=",
                          maximize, " weight_decay=", h.weight_decay);
          c.num_slots = amsgrad ? 3 : 2;
          c.counts_steps = true;
          c.maximize = maximize;
          c.call = [=](const OpLists& l, int) {
            const std::vector<at::Tensor> none;
            op<AdamOp>("fastopt::adam_")
                .call(l.params, l.grads, l.slots[0], l.slots[1], amsgrad ? TL(l.slots[2]) : TL(none),
                      l.steps, h.lr, h.beta1, h.beta2, h.eps, h.weight_decay, decoupled, amsgrad,
                      maximize, {}, {}, {}, {}, {}, {});
          };
          c.reference = [=](Tracked& p, Tracked g, Tracked* s, double step, int) {
            adam_reference(p, g, s, h, decoupled, amsgrad, step);
          };
          c.init = [=](Rng& rng, double* s, bool fresh, double g) {
            if (!fresh) random_adam_state(rng, s, amsgrad, g);
          };
          cases.push_back(c);
        }
      }
    }
  }
  return cases;
}

std::vector<OpCase> sgd_cases() {
  struct Variant {
    double momentum, dampening;
    bool nesterov, fresh;
  };
  const Variant variants[] = {{0.0, 0.0, false, false},
                              {0.9, 0.0, false, true},
                              {0.9, 0.0, false, false},
                              {0.8, 0.3, false, true},
                              {0.9, 0.0, true, true},
                              {0.9, 0.0, true, false}};
  std::vector<OpCase> cases;
  for (const Variant& v : variants) {
    for (bool maximize : {false, true}) {
      for (bool weight_decay : {false, true}) {
        const bool momentum = v.momentum != 0;
        const double wd = weight_decay ? 0.05 : 0.0;
        OpCase c;
        c.name = concat("sgd_ momentum=", v.momentum, " dampening=", v.dampening, " nesterov=",
                        v.nesterov, " fresh=", v.fresh, " maximize=", maximize, " weight_decay=", wd);
        c.num_slots = momentum ? 1 : 0;
        c.maximize = maximize;
        c.fresh_sgd = v.fresh;
        auto hyper = [=](int call) {
          return rules::SgdHyper{3e-2, v.momentum, v.dampening, wd, v.nesterov, v.fresh && call == 0};
        };
        c.call = [=](const OpLists& l, int call) {
          const rules::SgdHyper h = hyper(call);
          const std::vector<at::Tensor> none;
          op<SgdOp>("fastopt::sgd_")
              .call(l.params, l.grads, momentum ? TL(l.slots[0]) : TL(none), h.lr, h.momentum,
                    h.dampening, h.weight_decay, h.nesterov, h.first_momentum_step, maximize, {}, {},
                    {}, {}, {}, {});
        };
        c.reference = [=](Tracked& p, Tracked g, Tracked* s, double, int call) {
          sgd_reference(p, g, s, hyper(call), momentum, v.nesterov);
        };
        // Fresh buffers are torch.empty_like: garbage the first step ignores.
        c.init = [=](Rng& rng, double* s, bool, double g) {
          if (momentum) s[0] = rng.signed_value(g);
        };
        cases.push_back(c);
      }
    }
  }
  return cases;
}

std::vector<OpCase> rmsprop_cases() {
  std::vector<OpCase> cases;
  for (bool centered : {false, true}) {
    for (bool momentum : {false, true}) {
      for (bool maximize : {false, true}) {
        for (bool weight_decay : {false, true}) {
          const rules::RmspropHyper h{1e-2, 0.95, 1e-6, weight_decay ? 0.05 : 0.0,
                                      momentum ? 0.8 : 0.0};
          OpCase c;
          c.name = concat("rmsprop_ centered=", centered, " momentum=", h.momentum, " maximize=",
                          maximize, " weight_decay=", h.weight_decay);
          c.num_slots = 1 + centered + momentum;
          c.counts_steps = true;
          c.maximize = maximize;
          c.call = [=](const OpLists& l, int) {
            const std::vector<at::Tensor> none;
            TL grad_avgs = centered ? TL(l.slots[1]) : TL(none);
            TL buffers = momentum ? TL(l.slots[centered ? 2 : 1]) : TL(none);
            op<RmspropOp>("fastopt::rmsprop_")
                .call(l.params, l.grads, l.slots[0], grad_avgs, buffers, l.steps, h.lr, h.alpha,
                      h.eps, h.weight_decay, h.momentum, centered, maximize, {}, {}, {}, {}, {}, {});
          };
          c.reference = [=](Tracked& p, Tracked g, Tracked* s, double, int) {
            rmsprop_reference(p, g, s, h, centered, momentum);
          };
          c.init = [=](Rng& rng, double* s, bool fresh, double g) {
            if (!fresh) random_rmsprop_state(rng, s, centered, momentum, g);
          };
          cases.push_back(c);
        }
      }
    }
  }
  return cases;
}

std::vector<OpCase> adagrad_cases() {
  std::vector<OpCase> cases;
  for (bool maximize : {false, true}) {
    for (bool weight_decay : {false, true}) {
      const rules::AdagradHyper h{5e-2, weight_decay ? 0.0 : 0.01, weight_decay ? 0.05 : 0.0, 1e-10};
      OpCase c;
      c.name = concat("adagrad_ lr_decay=", h.lr_decay, " maximize=", maximize, " weight_decay=",
                      h.weight_decay);
      c.num_slots = 1;
      c.counts_steps = true;
      c.maximize = maximize;
      c.call = [=](const OpLists& l, int) {
        op<AdagradOp>("fastopt::adagrad_")
            .call(l.params, l.grads, l.slots[0], l.steps, h.lr, h.lr_decay, h.weight_decay, h.eps,
                  maximize, {}, {}, {}, {}, {}, {});
      };
      c.reference = [=](Tracked& p, Tracked g, Tracked* s, double step, int) {
        adagrad_reference(p, g, s, h, step);
      };
      c.init = [=](Rng& rng, double* s, bool fresh, double g) {
        s[0] = fresh ? 0.0 : rng.positive_value(g * g * 10);
      };
      cases.push_back(c);
    }
  }
  return cases;
}

std::vector<OpCase> roofline_cases() {
  std::vector<OpCase> cases;
  for (int num_slots = 0; num_slots <= 3; ++num_slots) {
    OpCase c;
    c.name = concat("roofline_ slots=", num_slots);
    c.num_slots = num_slots;
    c.call = [=](const OpLists& l, int) {
      std::vector<at::Tensor> slots;
      for (const auto& list : l.slots) slots.insert(slots.end(), list.begin(), list.end());
      op<RooflineOp>("fastopt::roofline_").call(l.params, l.grads, slots);
    };
    c.reference = [=](Tracked& p, Tracked g, Tracked* s, double, int) {
      roofline_reference(p, g, s, num_slots);
    };
    c.init = [=](Rng& rng, double* s, bool, double g) {
      for (int k = 0; k < num_slots; ++k) s[k] = rng.signed_value(g);
    };
    cases.push_back(c);
  }
  return cases;
}

void test_ops() {
  std::vector<std::vector<OpCase>> groups = {adam_cases(), sgd_cases(), rmsprop_cases(),
                                             adagrad_cases(), roofline_cases()};
  uint64_t seed = 1;
  for (const auto& group : groups) {
    const long before = counters().passed + counters().failed;
    const long failed_before = counters().failed;
    for (const OpCase& c : group) {
      for (at::ScalarType dtype : {at::kFloat, at::kDouble, at::kHalf, at::kBFloat16}) {
        run_op_case(c, dtype, seed++);
      }
    }
    std::printf("  %-10s %3zu variants x 4 dtypes: %9ld checks, %ld failed\n",
                group[0].name.substr(0, group[0].name.find(' ')).c_str(), group.size(),
                counters().passed + counters().failed - before, counters().failed - failed_before);
  }
}

// ---- error paths: throw, name the culprit, change nothing ----

struct Snapshot {
  std::vector<at::Tensor> originals, copies;
  explicit Snapshot(const std::vector<std::vector<at::Tensor>>& lists) {
    for (const auto& list : lists) {
      for (const auto& t : list) {
        originals.push_back(t);
        copies.push_back(t.clone());
      }
    }
  }
  bool unchanged() const {
    for (size_t i = 0; i < originals.size(); ++i) {
      if (!at::equal(originals[i], copies[i])) return false;
    }
    return true;
  }
};

// Calls `fn` and checks that it throws c10::Error whose message contains
// `expected`, and that no tensor of `lists` changed.
void expect_error(const std::string& what, const std::vector<std::vector<at::Tensor>>& lists,
                  const std::string& expected, const std::function<void()>& fn) {
  const Snapshot before(lists);
  std::string message;
  bool threw = false;
  try {
    fn();
  } catch (const c10::Error& e) {
    threw = true;
    message = e.what_without_backtrace();
  }
  FASTOPT_CHECK(threw, what, ": no c10::Error");
  FASTOPT_CHECK(!threw || message.find(expected) != std::string::npos, what, ": message \"",
                message, "\" does not contain \"", expected, "\"");
  FASTOPT_CHECK(before.unchanged(), what, ": tensors changed by a call that threw");
}

std::vector<at::Tensor> randn_list(const std::vector<int64_t>& sizes, at::ScalarType dtype = at::kFloat) {
  std::vector<at::Tensor> out;
  for (int64_t s : sizes) out.push_back(at::randn({s}, at::TensorOptions().dtype(dtype)));
  return out;
}

std::vector<at::Tensor> steps_list(size_t n, double value) {
  std::vector<at::Tensor> out;
  for (size_t i = 0; i < n; ++i) out.push_back(at::full({}, value, at::kFloat));
  return out;
}

void test_errors() {
  const long before = counters().passed + counters().failed;
  const long failed_before = counters().failed;
  // A bad tensor last, so a validation that ran interleaved with the update
  // would already have written the earlier ones.
  const std::vector<int64_t> sizes = {1000, 40000, 17};
  auto params = randn_list(sizes), grads = randn_list(sizes), m = randn_list(sizes);
  auto v = randn_list(sizes), vmax = randn_list(sizes), extra = randn_list(sizes);
  for (auto* list : {&v, &vmax}) {
    for (auto& t : *list) t.abs_();
  }
  auto steps = steps_list(sizes.size(), 4);
  const std::vector<at::Tensor> none;
  const std::vector<std::vector<at::Tensor>> all = {params, grads, m, v, vmax, extra, steps};

  auto bad_grads = grads;
  bad_grads[2] = at::randn({18});
  auto call_adam = [&](TL p, TL g, TL s0, TL s1, TL s2, TL st, bool amsgrad) {
    op<AdamOp>("fastopt::adam_").call(p, g, s0, s1, s2, st, 1e-3, 0.9, 0.999, 1e-8, 0.01, true,
                                      amsgrad, false, {}, {}, {}, {}, {}, {});
  };
  expect_error("adam_ grad of wrong shape", all, "grads[2] has shape [18]",
               [&] { call_adam(params, bad_grads, m, v, vmax, steps, true); });

  auto bad_vmax = vmax;
  bad_vmax[2] = vmax[2].to(at::kDouble);
  expect_error("adam_ state of wrong dtype", all, "max_exp_avg_sqs[2] has dtype Double",
               [&] { call_adam(params, grads, m, v, bad_vmax, steps, true); });

  const std::vector<at::Tensor> short_steps(steps.begin(), steps.begin() + 2);
  expect_error("adam_ too few state_steps", all, "but 2 state_steps",
               [&] { call_adam(params, grads, m, v, none, short_steps, false); });

  auto bad_steps = steps;
  bad_steps[2] = at::zeros({2});
  expect_error("adam_ step with two elements", all, "state_steps[2] must be a one-element",
               [&] { call_adam(params, grads, m, v, none, bad_steps, false); });

  auto mixed = params;
  mixed[2] = params[2].to(at::kDouble);
  expect_error("adam_ params of two dtypes", all, "params[2] has dtype Double but params[0]",
               [&] { call_adam(mixed, grads, m, v, none, steps, false); });

  auto ints = params;
  ints[2] = at::zeros({17}, at::kInt);
  expect_error("adam_ integer param", all, "params[2] has dtype Int",
               [&] { call_adam(ints, grads, m, v, none, steps, false); });

  expect_error("sgd_ grad of wrong shape", all, "grads[2] has shape [18]", [&] {
    op<SgdOp>("fastopt::sgd_").call(params, bad_grads, m, 0.1, 0.9, 0.0, 0.0, false, false, false, {}, {}, {}, {}, {}, {});
  });
  expect_error("sgd_ missing momentum buffers", all, "but 0 momentum_buffers", [&] {
    op<SgdOp>("fastopt::sgd_").call(params, grads, none, 0.1, 0.9, 0.0, 0.0, false, false, false, {}, {}, {}, {}, {}, {});
  });
  expect_error("sgd_ nesterov without momentum", all, "nesterov needs momentum", [&] {
    op<SgdOp>("fastopt::sgd_").call(params, grads, none, 0.1, 0.0, 0.0, 0.0, true, false, false, {}, {}, {}, {}, {}, {});
  });
  expect_error("rmsprop_ grad of wrong shape", all, "grads[2] has shape [18]", [&] {
    op<RmspropOp>("fastopt::rmsprop_")
        .call(params, bad_grads, v, m, extra, steps, 1e-2, 0.99, 1e-8, 0.0, 0.9, true, false, {}, {}, {}, {}, {}, {});
  });
  expect_error("adagrad_ grad of wrong shape", all, "grads[2] has shape [18]", [&] {
    op<AdagradOp>("fastopt::adagrad_").call(params, bad_grads, v, steps, 1e-2, 0.0, 0.0, 1e-10, false, {}, {}, {}, {}, {}, {});
  });
  std::vector<at::Tensor> roofline_slots = m;
  roofline_slots.insert(roofline_slots.end(), extra.begin(), extra.end());
  expect_error("roofline_ grad of wrong shape", all, "grads[2] has shape [18]",
               [&] { op<RooflineOp>("fastopt::roofline_").call(params, bad_grads, roofline_slots); });
  expect_error("roofline_ partial slot list", all, "whole number of lists", [&] {
    op<RooflineOp>("fastopt::roofline_").call(params, grads, TL(roofline_slots).slice(0, 4));
  });
  std::printf("  %-10s %27s %9ld checks, %ld failed\n", "errors", "",
              counters().passed + counters().failed - before, counters().failed - failed_before);
}

// The op reports the ISA its loops run with; FASTOPT_CPU_CAPABILITY lowers it.
void test_capability() {
  const std::string isa = c10::Dispatcher::singleton()
                              .findSchemaOrThrow("fastopt::cpu_capability", "")
                              .typed<std::string()>()
                              .call();
  std::printf("  cpu_capability: %s\n", isa.c_str());
  FASTOPT_CHECK(isa == "baseline" || isa == "avx2" || isa == "avx512", "isa ", isa);
  const char* requested = std::getenv("FASTOPT_CPU_CAPABILITY");
  if (requested != nullptr && std::string(requested) == "baseline") {
    FASTOPT_CHECK(isa == "baseline", "requested baseline, got ", isa);
  }
  if (requested != nullptr && std::string(requested) == "avx2") {
    FASTOPT_CHECK(isa != "avx512", "requested avx2, got ", isa);
  }
}

}  // namespace
}  // namespace fastopt::test

int main() {
  using namespace fastopt::test;
  // Three threads whatever the machine: the driver's ranges then split the
  // tensor list at three points inside tensors.
  at::set_num_threads(3);
  at::manual_seed(0);
  std::printf("test_cpu_ops: %d calls per variant, %d threads\n", kCalls, at::get_num_threads());
  test_capability();
  test_ops();
  test_errors();
  return summary("test_cpu_ops");
}
