// Adadelta for one element (torch.optim.Adadelta semantics; Zeiler, "ADADELTA:
// An Adaptive Learning Rate Method", 2012, with torch's lr factor).
//
//   g = g + wd * p
//   s = rho * s + (1 - rho) * g * g
//   d = sqrt(a + eps) / sqrt(s + eps) * g
//   a = rho * a + (1 - rho) * d * d
//   p = p - lr * d
//
// The step count is kept (torch.optim's state has it) but does not enter the rule.
#pragma once

#include <array>
#include <cmath>

#include "common.h"

namespace fastopt::rules {

struct AdadeltaHyper {
  double lr, rho, eps, weight_decay;
};

template <typename T>
struct AdadeltaScalars {
  T neg_lr, rho, one_minus_rho, eps, weight_decay;
};

struct Adadelta {
  enum Slot { kSquareAvg, kAccDelta };
  static constexpr int kNumSlots = 2;
  static constexpr int kNumScalarStates = 1;  // step
  using Hyper = AdadeltaHyper;
  template <typename T>
  using Scalars = AdadeltaScalars<T>;

  FASTOPT_HOST_DEVICE static void advance(const Hyper&, const double* before, double* after) {
    count_step(before, after);
  }

  template <typename T>
  FASTOPT_HOST_DEVICE static Scalars<T> scalars(const Hyper& h, const double* /*before*/, const double* /*after*/) {
    return {T(-h.lr), T(h.rho), T(1.0 - h.rho), T(h.eps), T(h.weight_decay)};
  }

  template <typename T>
  FASTOPT_HOST_DEVICE static void update(T& param, T grad, T* slot, const Scalars<T>& s) {
    grad = s.weight_decay != T(0) ? grad + s.weight_decay * param : grad;
    T& square_avg = slot[kSquareAvg];
    T& acc_delta = slot[kAccDelta];
    square_avg = s.rho * square_avg + s.one_minus_rho * (grad * grad);
    const T std_dev = std::sqrt(square_avg + s.eps);
    const T delta = std::sqrt(acc_delta + s.eps) / std_dev * grad;
    acc_delta = s.rho * acc_delta + s.one_minus_rho * (delta * delta);
    param = param + s.neg_lr * delta;
  }
};

struct AdadeltaOptimizer {
  static constexpr const char* kName = "adadelta";
  using Hyper = AdadeltaHyper;
  static constexpr std::array<const char*, 2> kSlots{"square_avgs", "acc_deltas"};
  static constexpr std::array<const char*, 1> kScalarStates{"state_steps"};
  static constexpr std::array<Field<Hyper>, 4> kFields{{{"lr", &Hyper::lr},
                                                        {"rho", &Hyper::rho},
                                                        {"eps", &Hyper::eps},
                                                        {"weight_decay", &Hyper::weight_decay}}};
  static constexpr std::array<bool, 2> slots_used(const Hyper&) { return {true, true}; }
  static const char* problem(const Hyper&) { return nullptr; }
  template <class Fn>
  static void with_rule(const Hyper&, Fn&& fn) { fn(Adadelta{}); }
};

}  // namespace fastopt::rules
