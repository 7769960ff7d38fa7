// Adam / AdamW for one element (torch.optim.Adam semantics).
//
//   m = m + (1 - beta1) * (g - m)
//   v = beta2 * v + (1 - beta2) * g * g
//   v_max = max(v_max, v)                                 (amsgrad)
//   p = p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
//
// Weight decay is either L2 (g += wd * p, Adam) or decoupled
// (p *= 1 - lr * wd, AdamW), chosen at compile time.
#pragma once

#include <cmath>

#include "common.h"

namespace fastopt::rules {

enum class WeightDecay { kL2, kDecoupled };

// The op's hyperparameters (AdamOptimizer::kFields).
struct AdamHyper {
  double lr, beta1, beta2, eps, weight_decay;
  bool decoupled_weight_decay, amsgrad;
};

// Per-tensor scalars, derived once per tensor and step from AdamHyper and the
// tensor's step count.
template <typename T>
struct AdamScalars {
  T one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay;
  T decay_factor;                // 1 - lr * wd, decoupled weight decay only
  T neg_step_size;               // -lr / (1 - beta1^t)
  T bias_correction2_sqrt;       // sqrt(1 - beta2^t)
};

template <WeightDecay kWeightDecay, bool kAmsgrad>
struct Adam {
  enum Slot { kExpAvg, kExpAvgSq, kMaxExpAvgSq };
  static constexpr int kNumSlots = kAmsgrad ? 3 : 2;
  static constexpr int kNumScalarStates = 1;  // step
  using Hyper = AdamHyper;
  template <typename T>
  using Scalars = AdamScalars<T>;

  FASTOPT_HOST_DEVICE static void advance(const Hyper&, const double* before, double* after) {
    count_step(before, after);
  }

  template <typename T>
  FASTOPT_HOST_DEVICE static Scalars<T> scalars(const Hyper& h, const double*, const double* after) {
    const double step = after[0];
    const double bias_correction1 = 1.0 - std::pow(h.beta1, step);
    const double bias_correction2 = 1.0 - std::pow(h.beta2, step);
    Scalars<T> s;
    s.one_minus_beta1 = T(1.0 - h.beta1);
    s.beta2 = T(h.beta2);
    s.one_minus_beta2 = T(1.0 - h.beta2);
    s.eps = T(h.eps);
    s.weight_decay = T(h.weight_decay);
    s.decay_factor = T(1.0 - h.lr * h.weight_decay);
    s.neg_step_size = T(-(h.lr / bias_correction1));
    s.bias_correction2_sqrt = T(std::sqrt(bias_correction2));
    return s;
  }

  template <typename T>
  FASTOPT_HOST_DEVICE static void update(T& param, T grad, T* slot, const Scalars<T>& s) {
    if (kWeightDecay == WeightDecay::kDecoupled) {
      param = s.weight_decay != T(0) ? param * s.decay_factor : param;
    } else {
      grad = s.weight_decay != T(0) ? grad + s.weight_decay * param : grad;
    }
    T& exp_avg = slot[kExpAvg];
    T& exp_avg_sq = slot[kExpAvgSq];
    exp_avg = exp_avg + s.one_minus_beta1 * (grad - exp_avg);
    exp_avg_sq = s.beta2 * exp_avg_sq + s.one_minus_beta2 * (grad * grad);
    T second_moment = exp_avg_sq;
    if (kAmsgrad) {
      T& max_exp_avg_sq = slot[kMaxExpAvgSq];
      // Written so that a NaN in exp_avg_sq propagates, as torch.maximum does.
      max_exp_avg_sq = (max_exp_avg_sq > exp_avg_sq) ? max_exp_avg_sq : exp_avg_sq;
      second_moment = max_exp_avg_sq;
    }
    const T denom = std::sqrt(second_moment) / s.bias_correction2_sqrt + s.eps;
    param = param + s.neg_step_size * (exp_avg / denom);
  }
};

struct AdamOptimizer {
  static constexpr const char* kName = "adam";
  using Hyper = AdamHyper;
  static constexpr std::array<const char*, 3> kSlots{"exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs"};
  static constexpr std::array<const char*, 1> kScalarStates{"state_steps"};
  static constexpr std::array<Field<Hyper>, 7> kFields{{
      {"lr", &Hyper::lr}, {"beta1", &Hyper::beta1}, {"beta2", &Hyper::beta2}, {"eps", &Hyper::eps},
      {"weight_decay", &Hyper::weight_decay}, {"decoupled_weight_decay", &Hyper::decoupled_weight_decay},
      {"amsgrad", &Hyper::amsgrad}}};

  static constexpr std::array<bool, 3> slots_used(const Hyper& h) { return {true, true, h.amsgrad}; }
  static const char* problem(const Hyper&) { return nullptr; }

  template <class Fn>
  static void with_rule(const Hyper& h, Fn&& fn) {
    if (h.decoupled_weight_decay) {
      h.amsgrad ? fn(Adam<WeightDecay::kDecoupled, true>{}) : fn(Adam<WeightDecay::kDecoupled, false>{});
    } else {
      h.amsgrad ? fn(Adam<WeightDecay::kL2, true>{}) : fn(Adam<WeightDecay::kL2, false>{});
    }
  }
};

}  // namespace fastopt::rules
