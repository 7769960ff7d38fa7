// AdaBound / AMSBound for one element (Luo, Xiong, Liu & Sun, "Adaptive
// Gradient Methods with Dynamic Bound of Learning Rate", ICLR 2019; the
// arithmetic of the authors' `adabound` package, which the paper's
// experiments ran: bias-corrected step size, bounds from gamma and final_lr,
// no 1/sqrt(t) factor — that factor belongs to the convergence analysis of
// the paper's Algorithm 2, not to its experiments).
//
//   g = g + wd * p                                 (L2, as the package)
//   m = beta1 * m + (1 - beta1) * g
//   v = beta2 * v + (1 - beta2) * g * g
//   v_max = max(v_max, v)                          (amsbound; then v_max below)
//   eta = clamp(step_size / (sqrt(v) + eps), lower, upper)
//   p = p - eta * m
//
// with, per tensor, step_size = lr * sqrt(1 - beta2^t) / (1 - beta1^t) and
// final = final_lr * lr / base_lr (an LR schedule moves the bounds too),
// lower = final * (1 - 1 / (gamma * t + 1)), upper = final * (1 + 1 / (gamma * t)).
#pragma once

#include <array>
#include <cmath>

#include "common.h"

namespace fastopt::rules {

struct AdaboundHyper {
  double lr, beta1, beta2, final_lr, base_lr, gamma, eps, weight_decay;
  bool amsbound;
};

template <typename T>
struct AdaboundScalars {
  T beta1, one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay;
  T step_size, lower_bound, upper_bound;
};

template <bool kAmsbound>
struct Adabound {
  enum Slot { kExpAvg, kExpAvgSq, kMaxExpAvgSq };
  static constexpr int kNumSlots = kAmsbound ? 3 : 2;
  static constexpr int kNumScalarStates = 1;  // step
  using Hyper = AdaboundHyper;
  template <typename T>
  using Scalars = AdaboundScalars<T>;

  FASTOPT_HOST_DEVICE static void advance(const Hyper&, const double* before, double* after) {
    count_step(before, after);
  }

  template <typename T>
  FASTOPT_HOST_DEVICE static Scalars<T> scalars(const Hyper& h, const double*, const double* after) {
    const double step = after[0];
    const double bias_correction1 = 1.0 - std::pow(h.beta1, step);
    const double bias_correction2 = 1.0 - std::pow(h.beta2, step);
    const double final_lr = h.final_lr * h.lr / h.base_lr;
    Scalars<T> s;
    s.beta1 = T(h.beta1);
    s.one_minus_beta1 = T(1.0 - h.beta1);
    s.beta2 = T(h.beta2);
    s.one_minus_beta2 = T(1.0 - h.beta2);
    s.eps = T(h.eps);
    s.weight_decay = T(h.weight_decay);
    s.step_size = T(h.lr * std::sqrt(bias_correction2) / bias_correction1);
    s.lower_bound = T(final_lr * (1.0 - 1.0 / (h.gamma * step + 1.0)));
    s.upper_bound = T(final_lr * (1.0 + 1.0 / (h.gamma * step)));  // gamma = 0: no upper bound
    return s;
  }

  template <typename T>
  FASTOPT_HOST_DEVICE static void update(T& param, T grad, T* slot, const Scalars<T>& s) {
    grad = s.weight_decay != T(0) ? grad + s.weight_decay * param : grad;
    T& exp_avg = slot[kExpAvg];
    T& exp_avg_sq = slot[kExpAvgSq];
    exp_avg = s.beta1 * exp_avg + s.one_minus_beta1 * grad;
    exp_avg_sq = s.beta2 * exp_avg_sq + s.one_minus_beta2 * grad * grad;
    T second_moment = exp_avg_sq;
    if (kAmsbound) {
      T& max_exp_avg_sq = slot[kMaxExpAvgSq];
      // A NaN in exp_avg_sq propagates, as in torch.max.
      max_exp_avg_sq = (max_exp_avg_sq > exp_avg_sq) ? max_exp_avg_sq : exp_avg_sq;
      second_moment = max_exp_avg_sq;
    }
    const T rate = s.step_size / (std::sqrt(second_moment) + s.eps);
    // torch's clamp_(lower, upper) = min(max(x, lower), upper): a NaN stays NaN.
    const T at_least_lower = rate < s.lower_bound ? s.lower_bound : rate;
    const T bounded = at_least_lower > s.upper_bound ? s.upper_bound : at_least_lower;
    param = param - bounded * exp_avg;
  }
};

struct AdaboundOptimizer {
  static constexpr const char* kName = "adabound";
  using Hyper = AdaboundHyper;
  static constexpr std::array<const char*, 3> kSlots{"exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs"};
  static constexpr std::array<const char*, 1> kScalarStates{"state_steps"};
  static constexpr std::array<Field<Hyper>, 9> kFields{{
      {"lr", &Hyper::lr}, {"beta1", &Hyper::beta1}, {"beta2", &Hyper::beta2},
      {"final_lr", &Hyper::final_lr}, {"base_lr", &Hyper::base_lr}, {"gamma", &Hyper::gamma},
      {"eps", &Hyper::eps}, {"weight_decay", &Hyper::weight_decay}, {"amsbound", &Hyper::amsbound}}};

  static constexpr std::array<bool, 3> slots_used(const Hyper& h) { return {true, true, h.amsbound}; }
  static const char* problem(const Hyper& h) {
    return h.base_lr > 0 ? nullptr : "base_lr must be positive (final_lr is scaled by lr / base_lr)";
  }

  template <class Fn>
  static void with_rule(const Hyper& h, Fn&& fn) {
    h.amsbound ? fn(Adabound<true>{}) : fn(Adabound<false>{});
  }
};

}  // namespace fastopt::rules
