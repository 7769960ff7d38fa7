// RAdam for one element (torch.optim.RAdam semantics; Liu et al., "On the
// Variance of the Adaptive Learning Rate and Beyond", ICLR 2020).
//
//   m = m + (1 - beta1) * (g - m)
//   v = beta2 * v + (1 - beta2) * g * g
//   rho_inf = 2 / (1 - beta2) - 1,  rho_t = rho_inf - 2 t beta2^t / (1 - beta2^t)   (per tensor)
//   r_t = sqrt((rho_t - 4)(rho_t - 2) rho_inf / ((rho_inf - 4)(rho_inf - 2) rho_t))
//   p = p - m / (1 - beta1^t) * lr * sqrt(1 - beta2^t) / (sqrt(v) + eps) * r_t   (rho_t > 5)
//   p = p - m / (1 - beta1^t) * lr                                              (otherwise)
//
// Weight decay is either L2 (g += wd * p) or decoupled (p *= 1 - lr * wd),
// chosen at compile time as for Adam.
#pragma once

#include <array>
#include <cmath>

#include "adam_moments.h"
#include "common.h"

namespace fastopt::rules {

struct RadamHyper {
  double lr, beta1, beta2, eps, weight_decay;
  bool decoupled_weight_decay;
};

template <typename T>
struct RadamScalars {
  AdamMomentScalars<T> moments;
  T eps;
  T lr;
  T bias_correction1;       // 1 - beta1^t
  T bias_correction2_sqrt;  // sqrt(1 - beta2^t)
  T rectification;          // r_t, when rectified
  // rho_t > 5: the variance of the adaptive lr is tractable, so the step is
  // Adam's, rectified; before that it is SGD with momentum.
  bool rectified;
};

// rho_t must exceed this for the rectified (adaptive) step (the paper's and torch's threshold).
constexpr double kRadamRectificationThreshold = 5.0;

template <WeightDecay kWeightDecay>
struct Radam {
  enum Slot { kExpAvg, kExpAvgSq };
  static constexpr int kNumSlots = 2;
  static constexpr int kNumScalarStates = 1;  // step
  using Hyper = RadamHyper;
  template <typename T>
  using Scalars = RadamScalars<T>;

  FASTOPT_HOST_DEVICE static void advance(const Hyper&, const double* before, double* after) {
    count_step(before, after);
  }

  template <typename T>
  FASTOPT_HOST_DEVICE static Scalars<T> scalars(const Hyper& h, const double* /*before*/, const double* after) {
    const double step = after[0];
    const double bias_correction1 = 1.0 - std::pow(h.beta1, step);
    const double bias_correction2 = 1.0 - std::pow(h.beta2, step);
    const double rho_inf = 2.0 / (1.0 - h.beta2) - 1.0;
    const double rho_t = rho_inf - 2.0 * step * std::pow(h.beta2, step) / bias_correction2;
    Scalars<T> s;
    s.moments = adam_moment_scalars<T>(h);
    s.eps = T(h.eps);
    s.lr = T(h.lr);
    s.bias_correction1 = T(bias_correction1);
    s.bias_correction2_sqrt = T(std::sqrt(bias_correction2));
    s.rectified = rho_t > kRadamRectificationThreshold;
    // Only evaluated when rectified: for rho_t <= 4 the root is of a negative number.
    s.rectification = s.rectified ? T(std::sqrt((rho_t - 4.0) * (rho_t - 2.0) * rho_inf /
                                                ((rho_inf - 4.0) * (rho_inf - 2.0) * rho_t)))
                                  : T(0);
    return s;
  }

  template <typename T>
  FASTOPT_HOST_DEVICE static void update(T& param, T grad, T* slot, const Scalars<T>& s) {
    apply_weight_decay<kWeightDecay>(param, grad, s.moments);
    T& exp_avg = slot[kExpAvg];
    T& exp_avg_sq = slot[kExpAvgSq];
    update_moments(exp_avg, exp_avg_sq, grad, s.moments);
    // Products in torch.optim's order.
    const T step = exp_avg / s.bias_correction1 * s.lr;
    if (s.rectified) {
      const T adaptive_lr = s.bias_correction2_sqrt / (std::sqrt(exp_avg_sq) + s.eps);
      param = param - step * adaptive_lr * s.rectification;
    } else {
      param = param - step;
    }
  }
};

struct RadamOptimizer {
  static constexpr const char* kName = "radam";
  using Hyper = RadamHyper;
  static constexpr std::array<const char*, 2> kSlots{"exp_avgs", "exp_avg_sqs"};
  static constexpr std::array<const char*, 1> kScalarStates{"state_steps"};
  static constexpr std::array<Field<Hyper>, 6> kFields{{{"lr", &Hyper::lr},
                                                        {"beta1", &Hyper::beta1},
                                                        {"beta2", &Hyper::beta2},
                                                        {"eps", &Hyper::eps},
                                                        {"weight_decay", &Hyper::weight_decay},
                                                        {"decoupled_weight_decay", &Hyper::decoupled_weight_decay}}};
  static constexpr std::array<bool, 2> slots_used(const Hyper&) { return {true, true}; }
  static const char* problem(const Hyper&) { return nullptr; }
  template <class Fn>
  static void with_rule(const Hyper& h, Fn&& fn) {
    h.decoupled_weight_decay ? fn(Radam<WeightDecay::kDecoupled>{}) : fn(Radam<WeightDecay::kL2>{});
  }
};

}  // namespace fastopt::rules
