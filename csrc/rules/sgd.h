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
  bool nesterov;
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
  static constexpr int kNumScalarStates = 0;
  using Hyper = SgdHyper;
  template <typename T>
  using Scalars = SgdScalars<T>;

  FASTOPT_HOST_DEVICE static void advance(const Hyper&, const double*, double*) {}

  template <typename T>
  FASTOPT_HOST_DEVICE static Scalars<T> scalars(const Hyper& h, const double*, const double*) {
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

struct SgdOptimizer {
  static constexpr const char* kName = "sgd";
  using Hyper = SgdHyper;
  static constexpr std::array<const char*, 1> kSlots{"momentum_buffers"};
  static constexpr std::array<const char*, 0> kScalarStates{};
  static constexpr std::array<Field<Hyper>, 6> kFields{{
      {"lr", &Hyper::lr}, {"momentum", &Hyper::momentum}, {"dampening", &Hyper::dampening},
      {"weight_decay", &Hyper::weight_decay}, {"nesterov", &Hyper::nesterov},
      {"first_momentum_step", &Hyper::first_momentum_step}}};

  static constexpr std::array<bool, 1> slots_used(const Hyper& h) { return {h.momentum != 0}; }
  static const char* problem(const Hyper& h) {
    return h.nesterov && !(h.momentum > 0) ? "nesterov needs momentum > 0" : nullptr;
  }

  template <class Fn>
  static void with_rule(const Hyper& h, Fn&& fn) {
    if (h.momentum == 0) {
      fn(Sgd<false, false>{});
    } else {
      h.nesterov ? fn(Sgd<true, true>{}) : fn(Sgd<true, false>{});
    }
  }
};

}  // namespace fastopt::rules
