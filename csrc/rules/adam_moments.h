// The steps NAdam and RAdam share with Adam (csrc/rules/adam.h) before their
// own param update: weight decay (L2 or decoupled), then the first and second
// moments.
//
//   g = g + wd * p  (L2)   or   p = p * (1 - lr * wd)  (decoupled)
//   m = m + (1 - beta1) * (g - m)
//   v = beta2 * v + (1 - beta2) * g * g
#pragma once

#include "adam.h"
#include "common.h"

namespace fastopt::rules {

template <typename T>
struct AdamMomentScalars {
  T one_minus_beta1, beta2, one_minus_beta2, weight_decay;
  T decay_factor;  // 1 - lr * wd, decoupled weight decay only
};

// From any Hyper with lr, beta1, beta2 and weight_decay.
template <typename T, class Hyper>
FASTOPT_HOST_DEVICE inline AdamMomentScalars<T> adam_moment_scalars(const Hyper& h) {
  return {T(1.0 - h.beta1), T(h.beta2), T(1.0 - h.beta2), T(h.weight_decay), T(1.0 - h.lr * h.weight_decay)};
}

template <WeightDecay kWeightDecay, typename T>
FASTOPT_HOST_DEVICE inline void apply_weight_decay(T& param, T& grad, const AdamMomentScalars<T>& s) {
  if (kWeightDecay == WeightDecay::kDecoupled) {
    param = s.weight_decay != T(0) ? param * s.decay_factor : param;
  } else {
    grad = s.weight_decay != T(0) ? grad + s.weight_decay * param : grad;
  }
}

template <typename T>
FASTOPT_HOST_DEVICE inline void update_moments(T& exp_avg, T& exp_avg_sq, T grad, const AdamMomentScalars<T>& s) {
  exp_avg = exp_avg + s.one_minus_beta1 * (grad - exp_avg);
  exp_avg_sq = s.beta2 * exp_avg_sq + s.one_minus_beta2 * (grad * grad);
}

}  // namespace fastopt::rules
