// QHAdam for one element (Ma & Yarats, "Quasi-hyperbolic momentum and Adam
// for deep learning", ICLR 2019, Algorithm "QHAdam"): Adam's moments, each
// mixed with the plain gradient by its nu at use.
//
//   g = g + wd * p   or   p = p * (1 - lr * wd)   (decouple_weight_decay)
//   m = m + (1 - beta1) * (g - m)                  (Adam's moments, adam_moments.h)
//   v = beta2 * v + (1 - beta2) * g * g
//   p = p - lr * ((1 - nu1) * g + nu1 * m / (1 - beta1^t))
//             / (sqrt((1 - nu2) * g * g + nu2 * v / (1 - beta2^t)) + eps)
//
// nus = (1, 1) is Adam; state as torch.optim.Adam's (step, exp_avg,
// exp_avg_sq), so an Adam checkpoint loads into QHAdam and back.
#pragma once

#include <array>
#include <cmath>

#include "adam_moments.h"
#include "common.h"

namespace fastopt::rules {

struct QhadamHyper {
  double lr, beta1, beta2, nu1, nu2, eps, weight_decay;
  bool decouple_weight_decay;
};

template <typename T>
struct QhadamScalars {
  AdamMomentScalars<T> moments;
  T neg_lr, nu1_over_bias_correction1, one_minus_nu1, nu2_over_bias_correction2, one_minus_nu2, eps;
};

template <WeightDecay kWeightDecay>
struct Qhadam {
  enum Slot { kExpAvg, kExpAvgSq };
  static constexpr int kNumSlots = 2;
  static constexpr int kNumScalarStates = 1;  // step
  using Hyper = QhadamHyper;
  template <typename T>
  using Scalars = QhadamScalars<T>;

  FASTOPT_HOST_DEVICE static void advance(const Hyper&, const double* before, double* after) {
    count_step(before, after);
  }

  template <typename T>
  FASTOPT_HOST_DEVICE static Scalars<T> scalars(const Hyper& h, const double*, const double* after) {
    const double step = after[0];
    return {adam_moment_scalars<T>(h),
            T(-h.lr),
            T(h.nu1 / (1.0 - std::pow(h.beta1, step))),
            T(1.0 - h.nu1),
            T(h.nu2 / (1.0 - std::pow(h.beta2, step))),
            T(1.0 - h.nu2),
            T(h.eps)};
  }

  template <typename T>
  FASTOPT_HOST_DEVICE static void update(T& param, T grad, T* slot, const Scalars<T>& s) {
    apply_weight_decay<kWeightDecay>(param, grad, s.moments);
    T& exp_avg = slot[kExpAvg];
    T& exp_avg_sq = slot[kExpAvgSq];
    update_moments(exp_avg, exp_avg_sq, grad, s.moments);
    const T grad_sq = grad * grad;
    const T numerator = s.one_minus_nu1 * grad + s.nu1_over_bias_correction1 * exp_avg;
    const T denom = std::sqrt(s.one_minus_nu2 * grad_sq + s.nu2_over_bias_correction2 * exp_avg_sq) + s.eps;
    param = param + s.neg_lr * (numerator / denom);
  }
};

struct QhadamOptimizer {
  static constexpr const char* kName = "qhadam";
  using Hyper = QhadamHyper;
  static constexpr std::array<const char*, 2> kSlots{"exp_avgs", "exp_avg_sqs"};
  static constexpr std::array<const char*, 1> kScalarStates{"state_steps"};
  static constexpr std::array<Field<Hyper>, 8> kFields{{
      {"lr", &Hyper::lr}, {"beta1", &Hyper::beta1}, {"beta2", &Hyper::beta2}, {"nu1", &Hyper::nu1},
      {"nu2", &Hyper::nu2}, {"eps", &Hyper::eps}, {"weight_decay", &Hyper::weight_decay},
      {"decouple_weight_decay", &Hyper::decouple_weight_decay}}};

  static constexpr std::array<bool, 2> slots_used(const Hyper&) { return {true, true}; }
  static const char* problem(const Hyper&) { return nullptr; }

  template <class Fn>
  static void with_rule(const Hyper& h, Fn&& fn) {
    h.decouple_weight_decay ? fn(Qhadam<WeightDecay::kDecoupled>{}) : fn(Qhadam<WeightDecay::kL2>{});
  }
};

}  // namespace fastopt::rules
