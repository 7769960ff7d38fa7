// LAMB for one element (You et al. 2019, "Large Batch Optimization for Deep
// Learning: Training BERT in 76 minutes", Algorithm 2), as NVIDIA Apex's
// FusedLAMB and DeepSpeed define it:
//
//   g = g + wd * p                                          (adam_w_mode off: L2)
//   m = beta1 * m + beta3 * g        beta3 = 1 - beta1 (grad_averaging) or 1
//   v = beta2 * v + (1 - beta2) * g * g
//   u = (m / bc1) / (sqrt(v / bc2) + eps)                   bc = 1 - beta^t, or 1
//   u = u + wd * p                                          (adam_w_mode: decoupled)
//   ratio = ||p|| / ||u|| if both are nonzero and (wd != 0 or use_nvlamb), else 1
//   p = p - lr * ratio * u
//
// ||p|| and ||u|| are per-tensor norms of the param before the step and of
// its whole update: the reduction phase (Note [Reduction phase]) computes
// the same m, v and u as the update does, without storing them.
#pragma once

#include <cmath>

#include "common.h"
#include "reduction.h"

namespace fastopt::rules {

// The op's hyperparameters (LambOptimizer::kFields).
struct LambHyper {
  double lr, beta1, beta2, eps, weight_decay;
  bool bias_correction, adam_w_mode, grad_averaging, use_nvlamb;
};

template <typename T>
struct LambScalars {
  T beta1, beta3, beta2, one_minus_beta2, eps, weight_decay;
  T bias_correction1, bias_correction2;  // 1 without bias correction
  double lr;
  bool adapt;   // the trust ratio applies: weight decay, or use_nvlamb
  T neg_step;   // -lr * ratio (finish)
};

template <bool kAdamWMode>
struct Lamb {
  enum Slot { kExpAvg, kExpAvgSq };
  enum Sum { kParamSq, kUpdateSq };
  static constexpr int kNumSlots = 2;
  static constexpr int kNumScalarStates = 1;  // step
  static constexpr int kNumSums = 2;
  using Hyper = LambHyper;
  template <typename T>
  using Scalars = LambScalars<T>;

  FASTOPT_HOST_DEVICE static void advance(const Hyper&, const double* before, double* after) {
    count_step(before, after);
  }

  template <typename T>
  FASTOPT_HOST_DEVICE static Scalars<T> scalars(const Hyper& h, const double*, const double* after) {
    const double step = after[0];
    Scalars<T> s;
    s.beta1 = T(h.beta1);
    s.beta3 = T(h.grad_averaging ? 1.0 - h.beta1 : 1.0);
    s.beta2 = T(h.beta2);
    s.one_minus_beta2 = T(1.0 - h.beta2);
    s.eps = T(h.eps);
    s.weight_decay = T(h.weight_decay);
    s.bias_correction1 = T(h.bias_correction ? 1.0 - std::pow(h.beta1, step) : 1.0);
    s.bias_correction2 = T(h.bias_correction ? 1.0 - std::pow(h.beta2, step) : 1.0);
    s.lr = h.lr;
    s.adapt = h.use_nvlamb || h.weight_decay != 0;
    s.neg_step = T(-h.lr);
    return s;
  }

  // The update direction u; advances m and v.
  template <typename T>
  FASTOPT_HOST_DEVICE static T direction(T param, T grad, T& exp_avg, T& exp_avg_sq, const Scalars<T>& s) {
    if (!kAdamWMode) grad = grad + s.weight_decay * param;
    exp_avg = s.beta1 * exp_avg + s.beta3 * grad;
    exp_avg_sq = s.beta2 * exp_avg_sq + s.one_minus_beta2 * (grad * grad);
    T u = (exp_avg / s.bias_correction1) / (std::sqrt(exp_avg_sq / s.bias_correction2) + s.eps);
    if (kAdamWMode) u = u + s.weight_decay * param;
    return u;
  }

  template <typename T>
  FASTOPT_HOST_DEVICE static void reduce(T param, T grad, const T* slot, const Scalars<T>& s, double* terms) {
    T exp_avg = slot[kExpAvg], exp_avg_sq = slot[kExpAvgSq];
    const double u = double(direction(param, grad, exp_avg, exp_avg_sq, s));
    terms[kParamSq] = double(param) * double(param);
    terms[kUpdateSq] = u * u;
  }

  template <typename T>
  FASTOPT_HOST_DEVICE static void finish(Scalars<T>& s, const double* sums) {
    const double param_norm = std::sqrt(sums[kParamSq]);
    const double update_norm = std::sqrt(sums[kUpdateSq]);
    const bool scaled = s.adapt && param_norm != 0.0 && update_norm != 0.0;
    s.neg_step = T(-(scaled ? s.lr * (param_norm / update_norm) : s.lr));
  }

  template <typename T>
  FASTOPT_HOST_DEVICE static void update(T& param, T grad, T* slot, const Scalars<T>& s) {
    const T u = direction(param, grad, slot[kExpAvg], slot[kExpAvgSq], s);
    param = param + s.neg_step * u;
  }
};

struct LambOptimizer {
  static constexpr const char* kName = "lamb";
  using Hyper = LambHyper;
  static constexpr std::array<const char*, 2> kSlots{"exp_avgs", "exp_avg_sqs"};
  static constexpr std::array<const char*, 1> kScalarStates{"state_steps"};
  static constexpr std::array<Field<Hyper>, 9> kFields{{
      {"lr", &Hyper::lr}, {"beta1", &Hyper::beta1}, {"beta2", &Hyper::beta2}, {"eps", &Hyper::eps},
      {"weight_decay", &Hyper::weight_decay}, {"bias_correction", &Hyper::bias_correction},
      {"adam_w_mode", &Hyper::adam_w_mode}, {"grad_averaging", &Hyper::grad_averaging},
      {"use_nvlamb", &Hyper::use_nvlamb}}};

  static constexpr std::array<bool, 2> slots_used(const Hyper&) { return {true, true}; }
  static const char* problem(const Hyper&) { return nullptr; }

  template <class Fn>
  static void with_rule(const Hyper& h, Fn&& fn) {
    h.adam_w_mode ? fn(Lamb<true>{}) : fn(Lamb<false>{});
  }
};

}  // namespace fastopt::rules
