// ASGD for one element (torch.optim.ASGD semantics, its single-tensor path).
//
//   g  = g + wd * p
//   p  = p * (1 - lambd * eta) - eta * g
//   ax = p                      if mu == 1 (torch copies the param exactly)
//   ax = ax + (p - ax) * mu     otherwise
//
// eta and mu are per-tensor scalar states (0-dim float32, like `step`): the
// update uses the values the previous step stored (eta starts at lr, mu at 1),
// then the step stores the ones for the next step from the new count t:
//
//   t = t + 1;  eta = lr / (1 + lambd * lr * t)^alpha;  mu = 1 / max(1, t - t0)
#pragma once

#include <cmath>

#include "common.h"

namespace fastopt::rules {

// The op's hyperparameters (AsgdOptimizer::kFields).
struct AsgdHyper {
  double lr, lambd, alpha, t0, weight_decay;
};

// Per-tensor scalars, from the tensor's eta and mu before this step.
template <typename T>
struct AsgdScalars {
  T weight_decay;
  T decay_factor;  // 1 - lambd * eta
  T neg_eta;       // -eta
  T mu;
  bool average_is_param;  // mu == 1: ax becomes a copy of the param
};

struct Asgd {
  enum Slot { kAx };
  enum ScalarState { kStep, kEta, kMu };  // index into before / after, AsgdOptimizer::kScalarStates order
  static constexpr int kNumSlots = 1;
  static constexpr int kNumScalarStates = 3;
  using Hyper = AsgdHyper;
  template <typename T>
  using Scalars = AsgdScalars<T>;

  // In double and in torch's order of operations; stored as float32 like torch's.
  FASTOPT_HOST_DEVICE static void advance(const Hyper& h, const double* before, double* after) {
    count_step(before, after);
    const double step = after[kStep];
    after[kEta] = h.lr / std::pow(1.0 + h.lambd * h.lr * step, h.alpha);
    const double averaged_steps = step - h.t0;
    after[kMu] = 1.0 / (averaged_steps > 1.0 ? averaged_steps : 1.0);
  }

  template <typename T>
  FASTOPT_HOST_DEVICE static Scalars<T> scalars(const Hyper& h, const double* before, const double*) {
    const double eta = before[kEta];
    const double mu = before[kMu];
    return {T(h.weight_decay), T(1.0 - h.lambd * eta), T(-eta), T(mu), mu == 1.0};
  }

  template <typename T>
  FASTOPT_HOST_DEVICE static void update(T& param, T grad, T* slot, const Scalars<T>& s) {
    grad = s.weight_decay != T(0) ? grad + s.weight_decay * param : grad;
    param = param * s.decay_factor;
    param = param + s.neg_eta * grad;
    T& ax = slot[kAx];
    ax = s.average_is_param ? param : ax + (param - ax) * s.mu;
  }
};

struct AsgdOptimizer {
  static constexpr const char* kName = "asgd";
  using Hyper = AsgdHyper;
  static constexpr std::array<const char*, 1> kSlots{"axs"};
  static constexpr std::array<const char*, 3> kScalarStates{"state_steps", "etas", "mus"};
  static constexpr std::array<Field<Hyper>, 5> kFields{{
      {"lr", &Hyper::lr}, {"lambd", &Hyper::lambd}, {"alpha", &Hyper::alpha}, {"t0", &Hyper::t0},
      {"weight_decay", &Hyper::weight_decay}}};

  static constexpr std::array<bool, 1> slots_used(const Hyper&) { return {true}; }
  static const char* problem(const Hyper&) { return nullptr; }

  template <class Fn>
  static void with_rule(const Hyper&, Fn&& fn) {
    fn(Asgd{});
  }
};

}  // namespace fastopt::rules
