// SWATS for one element (Keskar & Socher 2017, "Improving Generalization
// Performance by Switching from Adam to SGD", Algorithm 1), per param group:
//
//   g = g + wd * p                                    (L2; both phases)
//   Adam phase:
//     m = lerp(m, g, 1 - beta1);  a = beta2 * a + (1 - beta2) * g * g
//     u = m / (sqrt(a) + eps) * (-lr * sqrt(1 - beta2^t) / (1 - beta1^t))
//     p = p + u
//   SGD phase (after the switch; m holds the momentum v, from 0):
//     v = beta1 * v + g;  p = p - sgd_lr * ((1 - beta1) * v)
//
// The switch is the group's: from the sums of u*u and u*g over all of its
// params (the projection of the Adam step on the gradient), which the
// reduction phase (Note [Reduction phase]) takes per tensor and stores in
// two scalar states; fastopt/swats.py adds them up per group after the op
// and decides there, on the device, whether the group switches (Note
// [SWATS's switch]).  The other scalar states carry that decision to the
// kernels: `switched` (0 in the Adam phase, else the param's step count of
// its first SGD step, whose v starts from 0) and `sgd_lr` (the learned
// step).  `lr_avg` (the running average of the projections) is the
// group's too; the kernels only carry it.
#pragma once

#include <cmath>

#include "common.h"
#include "reduction.h"

namespace fastopt::rules {

// The op's hyperparameters (SwatsOptimizer::kFields).
struct SwatsHyper {
  double lr, beta1, beta2, eps, weight_decay;
};

template <typename T>
struct SwatsScalars {
  T beta1, one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay;
  LerpWeight<T> average;  // m's weight of g: 1 - beta1
  T neg_step_size;        // -lr * sqrt(1 - beta2^t) / (1 - beta1^t)
  T neg_sgd_lr;           // -sgd_lr
  bool sgd;               // the SGD phase
  bool fresh_momentum;    // its first step: v starts from 0
};

struct Swats {
  enum Slot { kExpAvg, kExpAvgSq };
  enum ScalarState { kStep, kSwitched, kSgdLr, kLrAvg, kUpdateSq, kUpdateDotGrad };
  enum Sum { kUpdateSqSum, kUpdateDotGradSum };
  static constexpr int kNumSlots = 2;
  static constexpr int kNumScalarStates = 6;
  static constexpr int kNumSums = 2;
  static constexpr int kSumStates = kUpdateSq;  // the sums are stored from here on
  using Hyper = SwatsHyper;
  template <typename T>
  using Scalars = SwatsScalars<T>;

  // The step count; the group's states change in fastopt/swats.py only.
  FASTOPT_HOST_DEVICE static void advance(const Hyper&, const double* before, double* after) {
    for (int c = 0; c < kNumScalarStates; ++c) after[c] = before[c];
    after[kStep] = before[kStep] + 1.0;
  }

  template <typename T>
  FASTOPT_HOST_DEVICE static Scalars<T> scalars(const Hyper& h, const double* before, const double* after) {
    const double step = after[kStep];
    Scalars<T> s;
    s.beta1 = T(h.beta1);
    s.one_minus_beta1 = T(1.0 - h.beta1);
    s.beta2 = T(h.beta2);
    s.one_minus_beta2 = T(1.0 - h.beta2);
    s.eps = T(h.eps);
    s.weight_decay = T(h.weight_decay);
    s.average = LerpWeight<T>::of(1.0 - h.beta1);
    s.neg_step_size = T(-(h.lr * std::sqrt(1.0 - std::pow(h.beta2, step)) / (1.0 - std::pow(h.beta1, step))));
    s.neg_sgd_lr = T(-before[kSgdLr]);
    s.sgd = before[kSwitched] != 0.0;
    s.fresh_momentum = s.sgd && step == before[kSwitched];
    return s;
  }

  template <typename T>
  FASTOPT_HOST_DEVICE static T decayed(T param, T grad, const Scalars<T>& s) {
    return s.weight_decay != T(0) ? grad + s.weight_decay * param : grad;
  }

  // The Adam step u of the Adam phase; advances m and a.
  template <typename T>
  FASTOPT_HOST_DEVICE static T adam_step(T grad, T& exp_avg, T& exp_avg_sq, const Scalars<T>& s) {
    exp_avg = lerp(exp_avg, grad, s.average);
    exp_avg_sq = s.beta2 * exp_avg_sq + s.one_minus_beta2 * (grad * grad);
    return exp_avg / (std::sqrt(exp_avg_sq) + s.eps) * s.neg_step_size;
  }

  // Only the Adam phase's projection feeds the switch.
  template <typename T>
  FASTOPT_HOST_DEVICE static bool reduces(const Scalars<T>& s) {
    return !s.sgd;
  }

  template <typename T>
  FASTOPT_HOST_DEVICE static void reduce(T param, T grad, const T* slot, const Scalars<T>& s, double* terms) {
    grad = decayed(param, grad, s);
    T exp_avg = slot[kExpAvg], exp_avg_sq = slot[kExpAvgSq];
    const double u = double(adam_step(grad, exp_avg, exp_avg_sq, s));
    terms[kUpdateSqSum] = u * u;
    terms[kUpdateDotGradSum] = u * double(grad);
  }

  template <typename T>
  FASTOPT_HOST_DEVICE static void finish(Scalars<T>&, const double*) {}

  template <typename T>
  FASTOPT_HOST_DEVICE static void update(T& param, T grad, T* slot, const Scalars<T>& s) {
    grad = decayed(param, grad, s);
    T& exp_avg = slot[kExpAvg];
    if (s.sgd) {
      exp_avg = s.fresh_momentum ? grad : s.beta1 * exp_avg + grad;
      param = param + s.neg_sgd_lr * (s.one_minus_beta1 * exp_avg);
    } else {
      param = param + adam_step(grad, exp_avg, slot[kExpAvgSq], s);
    }
  }
};

struct SwatsOptimizer {
  static constexpr const char* kName = "swats";
  using Hyper = SwatsHyper;
  static constexpr std::array<const char*, 2> kSlots{"exp_avgs", "exp_avg_sqs"};
  static constexpr std::array<const char*, 6> kScalarStates{
      "state_steps", "switched", "sgd_lrs", "lr_avgs", "update_sqs", "update_dot_grads"};
  static constexpr std::array<Field<Hyper>, 5> kFields{{
      {"lr", &Hyper::lr}, {"beta1", &Hyper::beta1}, {"beta2", &Hyper::beta2}, {"eps", &Hyper::eps},
      {"weight_decay", &Hyper::weight_decay}}};

  static constexpr std::array<bool, 2> slots_used(const Hyper&) { return {true, true}; }
  static const char* problem(const Hyper&) { return nullptr; }

  template <class Fn>
  static void with_rule(const Hyper&, Fn&& fn) {
    fn(Swats{});
  }
};

}  // namespace fastopt::rules
