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
  bool centered;
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
  static constexpr int kNumScalarStates = 1;  // step (counted, as torch does; unused)
  using Hyper = RmspropHyper;
  template <typename T>
  using Scalars = RmspropScalars<T>;

  FASTOPT_HOST_DEVICE static void advance(const Hyper&, const double* before, double* after) {
    count_step(before, after);
  }

  template <typename T>
  FASTOPT_HOST_DEVICE static Scalars<T> scalars(const Hyper& h, const double*, const double*) {
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

struct RmspropOptimizer {
  static constexpr const char* kName = "rmsprop";
  using Hyper = RmspropHyper;
  static constexpr std::array<const char*, 3> kSlots{"square_avgs", "grad_avgs", "momentum_buffers"};
  static constexpr std::array<const char*, 1> kScalarStates{"state_steps"};
  static constexpr std::array<Field<Hyper>, 6> kFields{{
      {"lr", &Hyper::lr}, {"alpha", &Hyper::alpha}, {"eps", &Hyper::eps},
      {"weight_decay", &Hyper::weight_decay}, {"momentum", &Hyper::momentum},
      {"centered", &Hyper::centered}}};

  static constexpr std::array<bool, 3> slots_used(const Hyper& h) {
    return {true, h.centered, h.momentum > 0};
  }
  static const char* problem(const Hyper&) { return nullptr; }

  template <class Fn>
  static void with_rule(const Hyper& h, Fn&& fn) {
    if (h.centered) {
      h.momentum > 0 ? fn(Rmsprop<true, true>{}) : fn(Rmsprop<true, false>{});
    } else {
      h.momentum > 0 ? fn(Rmsprop<false, true>{}) : fn(Rmsprop<false, false>{});
    }
  }
};

}  // namespace fastopt::rules
