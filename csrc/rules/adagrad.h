// Adagrad for one element (torch.optim.Adagrad semantics).
//
//   g = g + wd * p
//   s = s + g * g
//   p = p - lr / (1 + (t - 1) * lr_decay) * g / (sqrt(s) + eps)
#pragma once

#include <cmath>

#include "common.h"

namespace fastopt::rules {

struct AdagradHyper {
  double lr, lr_decay, weight_decay, eps;
};

template <typename T>
struct AdagradScalars {
  T neg_clr, weight_decay, eps;
};

struct Adagrad {
  enum Slot { kSum };
  static constexpr int kNumSlots = 1;
  static constexpr int kNumScalarStates = 1;  // step
  using Hyper = AdagradHyper;
  template <typename T>
  using Scalars = AdagradScalars<T>;

  FASTOPT_HOST_DEVICE static void advance(const Hyper&, const double* before, double* after) {
    count_step(before, after);
  }

  template <typename T>
  FASTOPT_HOST_DEVICE static Scalars<T> scalars(const Hyper& h, const double*, const double* after) {
    const double step = after[0];
    const double clr = h.lr / (1.0 + (step - 1.0) * h.lr_decay);
    return {T(-clr), T(h.weight_decay), T(h.eps)};
  }

  template <typename T>
  FASTOPT_HOST_DEVICE static void update(T& param, T grad, T* slot, const Scalars<T>& s) {
    grad = s.weight_decay != T(0) ? grad + s.weight_decay * param : grad;
    T& sum = slot[kSum];
    sum = sum + grad * grad;
    const T std_dev = std::sqrt(sum) + s.eps;
    param = param + s.neg_clr * (grad / std_dev);
  }
};

struct AdagradOptimizer {
  static constexpr const char* kName = "adagrad";
  using Hyper = AdagradHyper;
  static constexpr std::array<const char*, 1> kSlots{"state_sums"};
  static constexpr std::array<const char*, 1> kScalarStates{"state_steps"};
  static constexpr std::array<Field<Hyper>, 4> kFields{{
      {"lr", &Hyper::lr}, {"lr_decay", &Hyper::lr_decay}, {"weight_decay", &Hyper::weight_decay},
      {"eps", &Hyper::eps}}};

  static constexpr std::array<bool, 1> slots_used(const Hyper&) { return {true}; }
  static const char* problem(const Hyper&) { return nullptr; }

  template <class Fn>
  static void with_rule(const Hyper&, Fn&& fn) {
    fn(Adagrad{});
  }
};

}  // namespace fastopt::rules
