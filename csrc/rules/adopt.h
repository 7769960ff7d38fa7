// ADOPT for one element (Taniguchi et al. 2024, "ADOPT: Modified Adam Can
// Converge with Any beta2 with the Optimal Rate"; the authors' reference
// implementation, github.com/iShohei220/adopt, with its clipping).
//
//   g = g + wd * p  (L2)   or   p = p * (1 - lr * wd)  (decoupled)
//   t = 1:  v = v + g * g                  (the first step only initializes v)
//   t > 1:  n = g / max(sqrt(v), eps)      (normalized by the previous v)
//           n = min(max(n, -t^(1/4)), t^(1/4))      (clipping, if enabled)
//           m = m + (1 - beta1) * (n - m)
//           p = p - lr * m
//           v = beta2 * v + (1 - beta2) * g * g
//
// t is the tensor's step count after this step, as in the reference: the
// first update (t = 2) clips at 2^(1/4).  The paper's Algorithm counts the
// initializing gradient as g_0 and clips the update t = 1, 2, ... at t^(1/4),
// one step less; the reference's (and pytorch-optimizer's) count is kept so
// that state and results match them.
#pragma once

#include <cmath>

#include "adam.h"  // WeightDecay
#include "common.h"

namespace fastopt::rules {

// The op's hyperparameters (AdoptOptimizer::kFields).
struct AdoptHyper {
  double lr, beta1, beta2, eps, weight_decay;
  bool decoupled_weight_decay, clip_normalized_grad;
};

// Per-tensor scalars, from the hyperparameters and the tensor's step count.
template <typename T>
struct AdoptScalars {
  T weight_decay;
  T decay_factor;  // 1 - lr * wd, decoupled weight decay only
  T neg_lr, one_minus_beta1, beta2, one_minus_beta2, eps;
  T clip;           // t^(1/4), clipping only
  bool first_step;  // t == 1: only v is initialized
};

template <WeightDecay kWeightDecay, bool kClip>
struct Adopt {
  enum Slot { kExpAvg, kExpAvgSq };
  static constexpr int kNumSlots = 2;
  static constexpr int kNumScalarStates = 1;  // step
  using Hyper = AdoptHyper;
  template <typename T>
  using Scalars = AdoptScalars<T>;

  FASTOPT_HOST_DEVICE static void advance(const Hyper&, const double* before, double* after) {
    count_step(before, after);
  }

  template <typename T>
  FASTOPT_HOST_DEVICE static Scalars<T> scalars(const Hyper& h, const double*, const double* after) {
    const double step = after[0];
    Scalars<T> s;
    s.weight_decay = T(h.weight_decay);
    s.decay_factor = T(1.0 - h.lr * h.weight_decay);
    s.neg_lr = T(-h.lr);
    s.one_minus_beta1 = T(1.0 - h.beta1);
    s.beta2 = T(h.beta2);
    s.one_minus_beta2 = T(1.0 - h.beta2);
    s.eps = T(h.eps);
    s.clip = T(std::pow(step, 0.25));
    s.first_step = step == 1.0;
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
    if (s.first_step) {
      exp_avg_sq = exp_avg_sq + grad * grad;
      return;
    }
    // torch.clamp(x, min): a NaN stays NaN (the comparison is false).
    const T root = std::sqrt(exp_avg_sq);
    T normed_grad = grad / (root < s.eps ? s.eps : root);
    if (kClip) {
      normed_grad = normed_grad < -s.clip ? -s.clip : normed_grad;
      normed_grad = normed_grad > s.clip ? s.clip : normed_grad;
    }
    exp_avg = exp_avg + s.one_minus_beta1 * (normed_grad - exp_avg);
    param = param + s.neg_lr * exp_avg;
    exp_avg_sq = s.beta2 * exp_avg_sq + s.one_minus_beta2 * (grad * grad);
  }
};

struct AdoptOptimizer {
  static constexpr const char* kName = "adopt";
  using Hyper = AdoptHyper;
  static constexpr std::array<const char*, 2> kSlots{"exp_avgs", "exp_avg_sqs"};
  static constexpr std::array<const char*, 1> kScalarStates{"state_steps"};
  static constexpr std::array<Field<Hyper>, 7> kFields{{
      {"lr", &Hyper::lr}, {"beta1", &Hyper::beta1}, {"beta2", &Hyper::beta2}, {"eps", &Hyper::eps},
      {"weight_decay", &Hyper::weight_decay}, {"decoupled_weight_decay", &Hyper::decoupled_weight_decay},
      {"clip_normalized_grad", &Hyper::clip_normalized_grad}}};

  static constexpr std::array<bool, 2> slots_used(const Hyper&) { return {true, true}; }
  static const char* problem(const Hyper&) { return nullptr; }

  template <class Fn>
  static void with_rule(const Hyper& h, Fn&& fn) {
    if (h.decoupled_weight_decay) {
      h.clip_normalized_grad ? fn(Adopt<WeightDecay::kDecoupled, true>{})
                             : fn(Adopt<WeightDecay::kDecoupled, false>{});
    } else {
      h.clip_normalized_grad ? fn(Adopt<WeightDecay::kL2, true>{}) : fn(Adopt<WeightDecay::kL2, false>{});
    }
  }
};

}  // namespace fastopt::rules
