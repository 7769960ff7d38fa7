// SGD with optional momentum / Nesterov for one element (torch.optim.SGD semantics).
//
//   g = g + wd * p
//   b = g                                   (first step with momentum)
//   b = momentum * b + (1 - dampening) * g  (later steps)
//   d = nesterov ? g + momentum * b : b     (d = g without momentum)
//   p = p - lr * d
#pragma once

#include "common.h"

namespace fastopt::rules {

struct SgdHyper {
  double lr, momentum, dampening, weight_decay;
  // torch.optim starts a momentum buffer as a copy of the first gradient, so
  // the first step of a buffer differs from the recurrence.
  bool first_momentum_step;
};

template <typename T>
struct SgdScalars {
  T neg_lr, momentum, one_minus_dampening, weight_decay;
  bool first_momentum_step;
};

template <bool kMomentum, bool kNesterov>
struct Sgd {
  static_assert(kMomentum || !kNesterov, "Nesterov needs momentum");
  enum Slot { kMomentumBuffer };
  static constexpr int kNumSlots = kMomentum ? 1 : 0;
  static constexpr bool kCountsSteps = false;
  using Hyper = SgdHyper;
  template <typename T>
  using Scalars = SgdScalars<T>;

  template <typename T>
  FASTOPT_HOST_DEVICE static Scalars<T> scalars(const Hyper& h, double /*step*/) {
    return {T(-h.lr), T(h.momentum), T(1.0 - h.dampening), T(h.weight_decay),
            h.first_momentum_step};
  }

  template <typename T>
  FASTOPT_HOST_DEVICE static void update(T& param, T grad, T* slot, const Scalars<T>& s) {
    grad = s.weight_decay != T(0) ? grad + s.weight_decay * param : grad;
    T direction = grad;
    if (kMomentum) {
      T& buf = slot[kMomentumBuffer];
      buf = s.first_momentum_step ? grad : s.momentum * buf + s.one_minus_dampening * grad;
      direction = kNesterov ? grad + s.momentum * buf : buf;
    }
    param = param + s.neg_lr * direction;
  }
};

}  // namespace fastopt::rules
