// Every update rule of csrc/rules/, every variant, in float and double:
// Rule::scalars + Rule::update over 10-step trajectories of random inputs,
// against the independent references of reference_rules.h.
//
// A trajectory starts either from torch.optim's initial state at step 0 or
// from a random valid state at a later step count (bias corrections and
// learning-rate decay depend on it), with and without weight decay, and the
// rule's state and the reference's evolve separately, so errors that
// accumulate over steps are caught too.  Tolerances are relative to each
// value's error scale (Note [Tracked reference values]).
#include <array>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <string>
#include <vector>

#include "check.h"
#include "reference_rules.h"
#include "rules/adagrad.h"
#include "rules/adam.h"
#include "rules/rmsprop.h"
#include "rules/roofline.h"
#include "rules/sgd.h"

namespace fastopt::test {
namespace {

using rules::WeightDecay;

constexpr int kElements = 64;  // independent elements per trajectory
constexpr int kSteps = 10;     // steps per trajectory
// Step counts before the first step: 0 is a fresh optimizer (state as
// torch.optim creates it); the others resume from a random state.
constexpr double kStartSteps[] = {0, 1, 41, 9990};
constexpr int kSeedsPerSetting = 3;

// rtol against the error scale: 4e-6 is ~67 unit roundoffs of float
// (2^-24), 2e-14 ~180 of double (2^-53).  A correct rule uses under 15 over
// ten steps (the run prints the largest ratio seen); a wrong formula misses
// by a large fraction of the scale.
template <typename T>
constexpr double kRtol = 0;
template <>
constexpr double kRtol<float> = 4e-6;
template <>
constexpr double kRtol<double> = 2e-14;

template <typename T>
const char* type_name() {
  return sizeof(T) == 4 ? "float" : "double";
}

// Largest |got - ref| / (unit roundoff * mag) seen, per type: printed so a
// reader sees how much of the tolerance the implementation uses.
template <typename T>
double& worst_ratio() {
  static double worst = 0;
  return worst;
}

template <typename T, class Context>
void check_close(T got, const Tracked& ref, const Context& context) {
  const double err = std::fabs(double(got) - ref.value);
  const double tol = kRtol<T> * ref.mag;
  const bool ok = err <= tol;  // false for NaN
  if (ok && ref.mag > 0) {
    const double ratio = err / (std::numeric_limits<T>::epsilon() / 2 * ref.mag);
    if (ratio > worst_ratio<T>()) worst_ratio<T>() = ratio;
  }
  if (ok) {
    record(true, "");
  } else {
    record(false, concat(context(), ": got ", double(got), " expected ", ref.value, " (error ",
                         err, " > tolerance ", tol, ")"));
  }
}

// ---- one Case per rule variant: how to draw its inputs and its reference ----

template <WeightDecay kWd, bool kAmsgrad>
struct AdamCase {
  using Rule = rules::Adam<kWd, kAmsgrad>;
  static_assert(Rule::kNumSlots == (kAmsgrad ? 3 : 2) && Rule::kNumScalarStates == 1);
  static_assert(Rule::kExpAvg == 0 && Rule::kExpAvgSq == 1 && (!kAmsgrad || Rule::kMaxExpAvgSq == 2));
  static std::string name() {
    return concat("Adam<", kWd == WeightDecay::kL2 ? "kL2" : "kDecoupled", ", amsgrad=", kAmsgrad, ">");
  }
  static rules::AdamHyper hyper(Rng& rng, bool wd) { return random_adam_hyper(rng, wd); }
  static rules::AdamHyper at_step(rules::AdamHyper h, int, bool) { return h; }
  static void init(Rng& rng, double* slots, bool fresh, double g) {
    if (fresh) {
      for (int k = 0; k < Rule::kNumSlots; ++k) slots[k] = 0;
    } else {
      random_adam_state(rng, slots, kAmsgrad, g);
    }
  }
  static void reference(Tracked& p, Tracked g, Tracked* slots, const rules::AdamHyper& h, double t) {
    adam_reference(p, g, slots, h, kWd == WeightDecay::kDecoupled, kAmsgrad, t);
  }
};

template <bool kMomentum, bool kNesterov>
struct SgdCase {
  using Rule = rules::Sgd<kMomentum, kNesterov>;
  static_assert(Rule::kNumSlots == (kMomentum ? 1 : 0) && Rule::kNumScalarStates == 0);
  static std::string name() { return concat("Sgd<momentum=", kMomentum, ", nesterov=", kNesterov, ">"); }
  static rules::SgdHyper hyper(Rng& rng, bool wd) { return random_sgd_hyper(rng, wd); }
  // A fresh optimizer's first step starts the buffer (first_momentum_step);
  // every later step, and every step of a resumed one, runs the recurrence.
  static rules::SgdHyper at_step(rules::SgdHyper h, int step_index, bool fresh) {
    h.first_momentum_step = fresh && step_index == 0;
    return h;
  }
  // Fresh buffers hold garbage (not zeros): the first step must ignore it.
  static void init(Rng& rng, double* slots, bool, double g) {
    for (int k = 0; k < Rule::kNumSlots; ++k) slots[k] = rng.signed_value(g);
  }
  static void reference(Tracked& p, Tracked g, Tracked* slots, const rules::SgdHyper& h, double) {
    sgd_reference(p, g, slots, h, kMomentum, kNesterov);
  }
};

template <bool kCentered, bool kMomentum>
struct RmspropCase {
  using Rule = rules::Rmsprop<kCentered, kMomentum>;
  static_assert(Rule::kNumSlots == 1 + kCentered + kMomentum && Rule::kNumScalarStates == 1);
  static_assert(Rule::kSquareAvg == 0 && (!kCentered || Rule::kGradAvg == 1) &&
                (!kMomentum || Rule::kMomentumBuffer == (kCentered ? 2 : 1)));
  static std::string name() { return concat("Rmsprop<centered=", kCentered, ", momentum=", kMomentum, ">"); }
  static rules::RmspropHyper hyper(Rng& rng, bool wd) { return random_rmsprop_hyper(rng, wd); }
  static rules::RmspropHyper at_step(rules::RmspropHyper h, int, bool) { return h; }
  static void init(Rng& rng, double* slots, bool fresh, double g) {
    if (fresh) {
      for (int k = 0; k < Rule::kNumSlots; ++k) slots[k] = 0;
    } else {
      random_rmsprop_state(rng, slots, kCentered, kMomentum, g);
    }
  }
  static void reference(Tracked& p, Tracked g, Tracked* slots, const rules::RmspropHyper& h, double) {
    rmsprop_reference(p, g, slots, h, kCentered, kMomentum);
  }
};

struct AdagradCase {
  using Rule = rules::Adagrad;
  static_assert(Rule::kNumSlots == 1 && Rule::kNumScalarStates == 1);
  static std::string name() { return "Adagrad"; }
  static rules::AdagradHyper hyper(Rng& rng, bool wd) { return random_adagrad_hyper(rng, wd); }
  static rules::AdagradHyper at_step(rules::AdagradHyper h, int, bool) { return h; }
  static void init(Rng& rng, double* slots, bool fresh, double g) {
    slots[0] = fresh ? 0.0 : rng.positive_value(g * g * 10);
  }
  static void reference(Tracked& p, Tracked g, Tracked* slots, const rules::AdagradHyper& h, double t) {
    adagrad_reference(p, g, slots, h, t);
  }
};

template <int kSlots>
struct RooflineCase {
  using Rule = rules::Roofline<kSlots>;
  static_assert(Rule::kNumSlots == kSlots && Rule::kNumScalarStates == 0);
  static std::string name() { return concat("Roofline<", kSlots, ">"); }
  // The roofline has no hyperparameters, so weight decay does not apply.
  static rules::RooflineHyper hyper(Rng&, bool) { return {}; }
  static rules::RooflineHyper at_step(rules::RooflineHyper h, int, bool) { return h; }
  static void init(Rng& rng, double* slots, bool, double g) {
    for (int k = 0; k < kSlots; ++k) slots[k] = rng.signed_value(g);
  }
  static void reference(Tracked& p, Tracked g, Tracked* slots, const rules::RooflineHyper&, double) {
    roofline_reference(p, g, slots, kSlots);
  }
};

// ---- the trajectory runner ----

uint64_t seed_of(const std::string& name, double start_step, bool weight_decay, int seed) {
  uint64_t h = 1469598103934665603ull;  // FNV-1a over the setting
  for (char c : name) h = (h ^ uint8_t(c)) * 1099511628211ull;
  h = (h ^ uint64_t(start_step)) * 1099511628211ull;
  h = (h ^ uint64_t(weight_decay)) * 1099511628211ull;
  return (h ^ uint64_t(seed)) * 1099511628211ull;
}

template <class Case, typename T>
void run_trajectory(uint64_t seed, double start_step, bool weight_decay) {
  using Rule = typename Case::Rule;
  constexpr int kSlots = Rule::kNumSlots;
  constexpr int kSlotArray = kSlots > 0 ? kSlots : 1;
  Rng rng(seed);
  const auto hyper = Case::hyper(rng, weight_decay);
  const double param_scale = rng.log_uniform(1e-3, 1e2);
  const double grad_scale = rng.log_uniform(1e-4, 1e2);
  const bool fresh = start_step == 0;

  std::vector<T> param(kElements);
  std::vector<std::array<T, kSlotArray>> slot(kElements);
  std::vector<Tracked> ref_param(kElements);
  std::vector<std::array<Tracked, kSlotArray>> ref_slot(kElements);
  for (int e = 0; e < kElements; ++e) {
    const double p = rng.signed_value(param_scale);
    param[e] = T(p);
    ref_param[e] = C(p);
    double s[kSlotArray] = {};
    Case::init(rng, s, fresh, grad_scale);
    for (int k = 0; k < kSlots; ++k) {
      slot[e][k] = T(s[k]);
      ref_slot[e][k] = C(s[k]);
    }
  }

  for (int i = 0; i < kSteps; ++i) {
    const double t = start_step + i + 1;
    const auto h = Case::at_step(hyper, i, fresh);
    // The step count before and after this step (the only scalar state of these rules).
    const double steps_before[1] = {t - 1}, steps_after[1] = {t};
    const auto scalars = Rule::template scalars<T>(h, steps_before, steps_after);
    for (int e = 0; e < kElements; ++e) {
      const double g = rng.signed_value(grad_scale);
      Rule::template update<T>(param[e], T(g), slot[e].data(), scalars);
      Case::reference(ref_param[e], C(g), ref_slot[e].data(), h, t);
      auto where = [&](const char* what) {
        return [&, what] {
          return concat(Case::name(), "<", type_name<T>(), "> seed ", seed, " start_step ",
                        start_step, " weight_decay ", weight_decay, " step ", t, " element ", e,
                        " ", what);
        };
      };
      check_close(param[e], ref_param[e], where("param"));
      for (int k = 0; k < kSlots; ++k) {
        check_close(slot[e][k], ref_slot[e][k], [&] { return concat(where("slot")(), "[", k, "]"); });
      }
    }
  }
}

template <class Case>
void test_rule() {
  const long failed_before = counters().failed;
  const long passed_before = counters().passed;
  for (double start_step : kStartSteps) {
    for (bool weight_decay : {false, true}) {
      for (int s = 0; s < kSeedsPerSetting; ++s) {
        const uint64_t seed = seed_of(Case::name(), start_step, weight_decay, s);
        run_trajectory<Case, float>(seed, start_step, weight_decay);
        run_trajectory<Case, double>(seed, start_step, weight_decay);
      }
    }
  }
  std::printf("  %-40s %8ld checks, %ld failed\n", Case::name().c_str(),
              counters().passed + counters().failed - passed_before - failed_before,
              counters().failed - failed_before);
}

// The comment in adam.h promises that amsgrad propagates a NaN of
// exp_avg_sq into max_exp_avg_sq (as torch.maximum does) instead of keeping
// the old maximum.
template <typename T>
void test_amsgrad_propagates_nan() {
  using Rule = rules::Adam<WeightDecay::kL2, true>;
  const rules::AdamHyper h{1e-3, 0.9, 0.999, 1e-8, 0.0};
  const double steps_before[1] = {2}, steps_after[1] = {3};
  const auto s = Rule::scalars<T>(h, steps_before, steps_after);
  T param = T(1);
  T slot[3] = {T(0.1), T(0.01), T(0.5)};
  Rule::update<T>(param, std::numeric_limits<T>::quiet_NaN(), slot, s);
  FASTOPT_CHECK(std::isnan(slot[Rule::kMaxExpAvgSq]), type_name<T>(), " max_exp_avg_sq = ",
                slot[Rule::kMaxExpAvgSq]);
  FASTOPT_CHECK(std::isnan(param), type_name<T>(), " param = ", param);
}

}  // namespace
}  // namespace fastopt::test

int main() {
  using namespace fastopt::test;
  using fastopt::rules::WeightDecay;
  std::printf("test_rules: %d elements x %d steps per trajectory, rtol float %g, double %g\n",
              kElements, kSteps, kRtol<float>, kRtol<double>);
  test_rule<AdamCase<WeightDecay::kL2, false>>();
  test_rule<AdamCase<WeightDecay::kL2, true>>();
  test_rule<AdamCase<WeightDecay::kDecoupled, false>>();
  test_rule<AdamCase<WeightDecay::kDecoupled, true>>();
  test_rule<SgdCase<false, false>>();
  test_rule<SgdCase<true, false>>();
  test_rule<SgdCase<true, true>>();
  test_rule<RmspropCase<false, false>>();
  test_rule<RmspropCase<false, true>>();
  test_rule<RmspropCase<true, false>>();
  test_rule<RmspropCase<true, true>>();
  test_rule<AdagradCase>();
  test_rule<RooflineCase<0>>();
  test_rule<RooflineCase<1>>();
  test_rule<RooflineCase<2>>();
  test_rule<RooflineCase<3>>();
  test_amsgrad_propagates_nan<float>();
  test_amsgrad_propagates_nan<double>();
  std::printf("largest error / (unit roundoff x error scale): float %.1f, double %.1f\n",
              worst_ratio<float>(), worst_ratio<double>());
  return summary("test_rules");
}
