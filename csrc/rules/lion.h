// Lion for one element (Chen et al. 2023, "Symbolic Discovery of Optimization
// Algorithms", Program 1; the order of operations of the lion-pytorch package).
//
//   p = p * (1 - lr * wd)                          (decoupled weight decay)
//   p = p - lr * sign(beta1 * m + (1 - beta1) * g)
//   m = beta2 * m + (1 - beta2) * g
//
// No step count: nothing depends on it.
#pragma once

#include "common.h"
#include "sign.h"

namespace fastopt::rules {

// The op's hyperparameters (LionOptimizer::kFields).
struct LionHyper {
  double lr, beta1, beta2, weight_decay;
};

template <typename T>
struct LionScalars {
  T decay_factor;  // 1 - lr * wd; 1 (exact) without weight decay
  T neg_lr, beta1, one_minus_beta1, beta2, one_minus_beta2;
};

struct Lion {
  enum Slot { kExpAvg };
  static constexpr int kNumSlots = 1;
  static constexpr int kNumScalarStates = 0;
  using Hyper = LionHyper;
  template <typename T>
  using Scalars = LionScalars<T>;

  FASTOPT_HOST_DEVICE static void advance(const Hyper&, const double*, double*) {}

  template <typename T>
  FASTOPT_HOST_DEVICE static Scalars<T> scalars(const Hyper& h, const double*, const double*) {
    return {T(1.0 - h.lr * h.weight_decay), T(-h.lr), T(h.beta1), T(1.0 - h.beta1), T(h.beta2),
            T(1.0 - h.beta2)};
  }

  template <typename T>
  FASTOPT_HOST_DEVICE static void update(T& param, T grad, T* slot, const Scalars<T>& s) {
    T& exp_avg = slot[kExpAvg];
    param = param * s.decay_factor;
    param = param + s.neg_lr * sign(s.beta1 * exp_avg + s.one_minus_beta1 * grad);
    exp_avg = s.beta2 * exp_avg + s.one_minus_beta2 * grad;
  }
};

struct LionOptimizer {
  static constexpr const char* kName = "lion";
  using Hyper = LionHyper;
  static constexpr std::array<const char*, 1> kSlots{"exp_avgs"};
  static constexpr std::array<const char*, 0> kScalarStates{};
  static constexpr std::array<Field<Hyper>, 4> kFields{{
      {"lr", &Hyper::lr}, {"beta1", &Hyper::beta1}, {"beta2", &Hyper::beta2},
      {"weight_decay", &Hyper::weight_decay}}};

  static constexpr std::array<bool, 1> slots_used(const Hyper&) { return {true}; }
  static const char* problem(const Hyper&) { return nullptr; }

  template <class Fn>
  static void with_rule(const Hyper&, Fn&& fn) {
    fn(Lion{});
  }
};

}  // namespace fastopt::rules
