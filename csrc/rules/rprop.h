// Rprop for one element (torch.optim.Rprop semantics, its single-tensor path).
//
//   x = g * prev
//   factor = etaplus if x > 0,  etaminus if x < 0,  1 otherwise (0, or NaN:
//            torch.sign(NaN) is 0)
//   step_size = min(max(step_size * factor, step_size_min), step_size_max)
//   g = 0 if x < 0                        (a sign change: no move, forget g)
//   p = p - sign(g) * step_size
//   prev = g
//
// step_size starts filled with lr and prev with zeros (the optimizer's
// slots); lr takes no other part.  `step` is counted but unused, as in torch.
#pragma once

#include "common.h"
#include "sign.h"

namespace fastopt::rules {

// The op's hyperparameters (RpropOptimizer::kFields).
struct RpropHyper {
  double lr, etaminus, etaplus, step_size_min, step_size_max;
};

template <typename T>
struct RpropScalars {
  T etaminus, etaplus, step_size_min, step_size_max;
};

struct Rprop {
  enum Slot { kPrev, kStepSize };
  static constexpr int kNumSlots = 2;
  static constexpr int kNumScalarStates = 1;  // step
  using Hyper = RpropHyper;
  template <typename T>
  using Scalars = RpropScalars<T>;

  FASTOPT_HOST_DEVICE static void advance(const Hyper&, const double* before, double* after) {
    count_step(before, after);
  }

  template <typename T>
  FASTOPT_HOST_DEVICE static Scalars<T> scalars(const Hyper& h, const double*, const double*) {
    return {T(h.etaminus), T(h.etaplus), T(h.step_size_min), T(h.step_size_max)};
  }

  template <typename T>
  FASTOPT_HOST_DEVICE static void update(T& param, T grad, T* slot, const Scalars<T>& s) {
    T& prev = slot[kPrev];
    T& step_size = slot[kStepSize];
    // The product, not the signs' product: torch decides on the rounded product
    // (one that underflows to 0 keeps the step size).
    const T agreement = grad * prev;
    const bool sign_change = agreement < T(0);
    // Two flat selects, not nested ones: the same values, but GCC if-converts
    // and vectorizes these (the nested form kept the CPU loop scalar).
    T factor = agreement > T(0) ? s.etaplus : T(1);
    factor = sign_change ? s.etaminus : factor;
    // torch's clamp_(min, max) = min(max(x, min), max): a NaN stays NaN, min > max gives max.
    const T scaled = step_size * factor;
    const T at_least_min = scaled < s.step_size_min ? s.step_size_min : scaled;
    step_size = at_least_min > s.step_size_max ? s.step_size_max : at_least_min;
    grad = sign_change ? T(0) : grad;
    param = param - sign(grad) * step_size;
    prev = grad;
  }
};

struct RpropOptimizer {
  static constexpr const char* kName = "rprop";
  using Hyper = RpropHyper;
  static constexpr std::array<const char*, 2> kSlots{"prevs", "step_sizes"};
  static constexpr std::array<const char*, 1> kScalarStates{"state_steps"};
  static constexpr std::array<Field<Hyper>, 5> kFields{{
      {"lr", &Hyper::lr}, {"etaminus", &Hyper::etaminus}, {"etaplus", &Hyper::etaplus},
      {"step_size_min", &Hyper::step_size_min}, {"step_size_max", &Hyper::step_size_max}}};

  static constexpr std::array<bool, 2> slots_used(const Hyper&) { return {true, true}; }
  static const char* problem(const Hyper&) { return nullptr; }

  template <class Fn>
  static void with_rule(const Hyper&, Fn&& fn) {
    fn(Rprop{});
  }
};

}  // namespace fastopt::rules
