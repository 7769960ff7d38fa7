// RMSprop for one element (torch.optim.RMSprop semantics).
//
//   g = g + wd * p
//   s = alpha * s + (1 - alpha) * g * g
//   a = a + (1 - alpha) * (g - a)                     (centered)
//   avg = sqrt(centered ? s - a * a : s) + eps
//   b = momentum * b + g / avg;  p = p - lr * b       (momentum > 0)
//   p = p - lr * g / avg                              (otherwise)
#pragma once

#include <cmath>

#include "common.h"

namespace fastopt::rules {

struct RmspropHyper {
  double lr, alpha, eps, weight_decay, momentum;
};

template <typename T>
struct RmspropScalars {
  T neg_lr, alpha, one_minus_alpha, eps, weight_decay, momentum;
};

template <bool kCentered, bool kMomentum>
struct Rmsprop {
  // Slots present in this variant, in the order the optimizer passes them.
  static constexpr int kSquareAvg = 0;
  static constexpr int kGradAvg = 1;                       // centered only
  static constexpr int kMomentumBuffer = kCentered ? 2 : 1;  // momentum only
  static constexpr int kNumSlots = 1 + int(kCentered) + int(kMomentum);
  static constexpr bool kCountsSteps = true;
  using Hyper = RmspropHyper;
  template <typename T>
  using Scalars = RmspropScalars<T>;

  template <typename T>
  FASTOPT_HOST_DEVICE static Scalars<T> scalars(const Hyper& h, double /*step*/) {
    return {T(-h.lr), T(h.alpha), T(1.0 - h.alpha), T(h.eps), T(h.weight_decay), T(h.momentum)};
  }

  template <typename T>
  FASTOPT_HOST_DEVICE static void update(T& param, T grad, T* slot, const Scalars<T>& s) {
    grad = s.weight_decay != T(0) ? grad + s.weight_decay * param : grad;
    T& square_avg = slot[kSquareAvg];
    square_avg = s.alpha * square_avg + s.one_minus_alpha * (grad * grad);
    T variance = square_avg;
    if (kCentered) {
      T& grad_avg = slot[kGradAvg];
      grad_avg = grad_avg + s.one_minus_alpha * (grad - grad_avg);
      variance = square_avg - grad_avg * grad_avg;
    }
    const T avg = std::sqrt(variance) + s.eps;
    if (kMomentum) {
      T& buf = slot[kMomentumBuffer];
      buf = s.momentum * buf + grad / avg;
      param = param + s.neg_lr * buf;
    } else {
      param = param + s.neg_lr * (grad / avg);
    }
  }
};

}  // namespace fastopt::rules
