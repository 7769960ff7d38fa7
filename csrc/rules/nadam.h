// NAdam for one element (torch.optim.NAdam semantics; Dozat, "Incorporating
// Nesterov Momentum into Adam", ICLR 2016 workshop, with torch's momentum schedule).
//
//   mu_t = beta1 * (1 - 0.5 * 0.96^(t * momentum_decay))       (per tensor, from its step t)
//   mu_product_t = mu_product_{t-1} * mu_t                     (scalar state, starts at 1)
//   m = m + (1 - beta1) * (g - m)
//   v = beta2 * v + (1 - beta2) * g * g
//   denom = sqrt(v / (1 - beta2^t)) + eps
//   p = p - lr * (1 - mu_t) / (1 - mu_product_t) * g / denom
//         - lr * mu_{t+1} / (1 - mu_product_t * mu_{t+1}) * m / denom
//
// Weight decay is either L2 (g += wd * p) or decoupled (p *= 1 - lr * wd,
// NAdamW), chosen at compile time as for Adam.
#pragma once

#include <array>
#include <cmath>

#include "adam_moments.h"
#include "common.h"

namespace fastopt::rules {

struct NadamHyper {
  double lr, beta1, beta2, eps, weight_decay, momentum_decay;
  bool decoupled_weight_decay;
};

template <typename T>
struct NadamScalars {
  AdamMomentScalars<T> moments;
  T eps;
  T bias_correction2;     // 1 - beta2^t
  T grad_coefficient;     // -lr * (1 - mu_t) / (1 - mu_product_t)
  T exp_avg_coefficient;  // -lr * mu_{t+1} / (1 - mu_product_t * mu_{t+1})
};

// Base of the momentum schedule mu_t (Dozat's 0.96, as torch.optim.NAdam).
constexpr double kNadamMomentumScheduleBase = 0.96;

// mu_t of the momentum schedule for step t.
FASTOPT_HOST_DEVICE inline double nadam_mu(const NadamHyper& h, double step) {
  return h.beta1 * (1.0 - 0.5 * std::pow(kNadamMomentumScheduleBase, step * h.momentum_decay));
}

template <WeightDecay kWeightDecay>
struct Nadam {
  enum Slot { kExpAvg, kExpAvgSq };
  enum ScalarState { kStep, kMuProduct };
  static constexpr int kNumSlots = 2;
  static constexpr int kNumScalarStates = 2;
  using Hyper = NadamHyper;
  template <typename T>
  using Scalars = NadamScalars<T>;

  FASTOPT_HOST_DEVICE static void advance(const Hyper& h, const double* before, double* after) {
    count_step(before, after);
    // torch.optim keeps mu_product in a float32 tensor and multiplies it in
    // place by the Python float mu_t, which the float32 kernel rounds to float32
    // first: the product of two floats, rounded to float once.  (Under a float64
    // default dtype torch.optim keeps a float64 mu_product and multiplies in
    // double; fastopt rounds as for float32 there too.)
    after[kMuProduct] =
        static_cast<double>(static_cast<float>(before[kMuProduct]) * static_cast<float>(nadam_mu(h, after[kStep])));
  }

  template <typename T>
  FASTOPT_HOST_DEVICE static Scalars<T> scalars(const Hyper& h, const double* /*before*/, const double* after) {
    const double step = after[kStep];
    const double mu = nadam_mu(h, step);
    const double mu_next = nadam_mu(h, step + 1.0);
    // torch.optim uses the mu_product as stored (advance already rounded it),
    // and mu_product_{t+1} unrounded, in double.
    const double mu_product = after[kMuProduct];
    const double mu_product_next = mu_product * mu_next;
    Scalars<T> s;
    s.moments = adam_moment_scalars<T>(h);
    s.eps = T(h.eps);
    s.bias_correction2 = T(1.0 - std::pow(h.beta2, step));
    s.grad_coefficient = T(-h.lr * (1.0 - mu) / (1.0 - mu_product));
    s.exp_avg_coefficient = T(-h.lr * mu_next / (1.0 - mu_product_next));
    return s;
  }

  template <typename T>
  FASTOPT_HOST_DEVICE static void update(T& param, T grad, T* slot, const Scalars<T>& s) {
    apply_weight_decay<kWeightDecay>(param, grad, s.moments);
    T& exp_avg = slot[kExpAvg];
    T& exp_avg_sq = slot[kExpAvgSq];
    update_moments(exp_avg, exp_avg_sq, grad, s.moments);
    const T denom = std::sqrt(exp_avg_sq / s.bias_correction2) + s.eps;
    // Two roundings of the param, as torch.optim's two addcdiv_, each
    // (value * t1) / t2 in that order.
    param = param + s.grad_coefficient * grad / denom;
    param = param + s.exp_avg_coefficient * exp_avg / denom;
  }
};

struct NadamOptimizer {
  static constexpr const char* kName = "nadam";
  using Hyper = NadamHyper;
  static constexpr std::array<const char*, 2> kSlots{"exp_avgs", "exp_avg_sqs"};
  static constexpr std::array<const char*, 2> kScalarStates{"state_steps", "mu_products"};
  static constexpr std::array<Field<Hyper>, 7> kFields{{{"lr", &Hyper::lr},
                                                        {"beta1", &Hyper::beta1},
                                                        {"beta2", &Hyper::beta2},
                                                        {"eps", &Hyper::eps},
                                                        {"weight_decay", &Hyper::weight_decay},
                                                        {"momentum_decay", &Hyper::momentum_decay},
                                                        {"decoupled_weight_decay", &Hyper::decoupled_weight_decay}}};
  static constexpr std::array<bool, 2> slots_used(const Hyper&) { return {true, true}; }
  static const char* problem(const Hyper&) { return nullptr; }
  template <class Fn>
  static void with_rule(const Hyper& h, Fn&& fn) {
    h.decoupled_weight_decay ? fn(Nadam<WeightDecay::kDecoupled>{}) : fn(Nadam<WeightDecay::kL2>{});
  }
};

}  // namespace fastopt::rules
