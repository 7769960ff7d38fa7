// Adamax for one element (torch.optim.Adamax semantics; Kingma & Ba, "Adam:
// A Method for Stochastic Optimization", ICLR 2015, section 7.1).
//
//   g = g + wd * p
//   m = m + (1 - beta1) * (g - m)
//   u = max(beta2 * u, |g| + eps)
//   p = p - lr / (1 - beta1^t) * m / u
#pragma once

#include <array>
#include <cmath>

#include "common.h"

namespace fastopt::rules {

struct AdamaxHyper {
  double lr, beta1, beta2, eps, weight_decay;
};

template <typename T>
struct AdamaxScalars {
  T one_minus_beta1, beta2, eps, weight_decay;
  T neg_clr;  // -lr / (1 - beta1^t)
};

struct Adamax {
  enum Slot { kExpAvg, kExpInf };
  static constexpr int kNumSlots = 2;
  static constexpr int kNumScalarStates = 1;  // step
  using Hyper = AdamaxHyper;
  template <typename T>
  using Scalars = AdamaxScalars<T>;

  FASTOPT_HOST_DEVICE static void advance(const Hyper&, const double* before, double* after) {
    count_step(before, after);
  }

  template <typename T>
  FASTOPT_HOST_DEVICE static Scalars<T> scalars(const Hyper& h, const double* /*before*/, const double* after) {
    const double bias_correction = 1.0 - std::pow(h.beta1, after[0]);
    return {T(1.0 - h.beta1), T(h.beta2), T(h.eps), T(h.weight_decay), T(-(h.lr / bias_correction))};
  }

  template <typename T>
  FASTOPT_HOST_DEVICE static void update(T& param, T grad, T* slot, const Scalars<T>& s) {
    grad = s.weight_decay != T(0) ? grad + s.weight_decay * param : grad;
    T& exp_avg = slot[kExpAvg];
    T& exp_inf = slot[kExpInf];
    exp_avg = exp_avg + s.one_minus_beta1 * (grad - exp_avg);
    const T decayed = s.beta2 * exp_inf;
    const T grad_bound = std::abs(grad) + s.eps;
    // A NaN on either side wins, as in torch.maximum.
    exp_inf = (decayed > grad_bound || std::isnan(decayed)) ? decayed : grad_bound;
    // (value * m) / u, the order of torch.optim's addcdiv_.
    param = param + s.neg_clr * exp_avg / exp_inf;
  }
};

struct AdamaxOptimizer {
  static constexpr const char* kName = "adamax";
  using Hyper = AdamaxHyper;
  static constexpr std::array<const char*, 2> kSlots{"exp_avgs", "exp_infs"};
  static constexpr std::array<const char*, 1> kScalarStates{"state_steps"};
  static constexpr std::array<Field<Hyper>, 5> kFields{{{"lr", &Hyper::lr},
                                                        {"beta1", &Hyper::beta1},
                                                        {"beta2", &Hyper::beta2},
                                                        {"eps", &Hyper::eps},
                                                        {"weight_decay", &Hyper::weight_decay}}};
  static constexpr std::array<bool, 2> slots_used(const Hyper&) { return {true, true}; }
  static const char* problem(const Hyper&) { return nullptr; }
  template <class Fn>
  static void with_rule(const Hyper&, Fn&& fn) { fn(Adamax{}); }
};

}  // namespace fastopt::rules
