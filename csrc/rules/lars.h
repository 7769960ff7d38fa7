// LARS for one element (You et al. 2017, "Large Batch Training of
// Convolutional Networks", Algorithm 1), in the common form of torchlars,
// NVIDIA's LARC and pytorch-optimizer: the trust ratio scales the gradient,
// then SGD momentum (a buffer that starts at zero) applies lr:
//
//   ratio = tc * ||p|| / (||g|| + wd * ||p|| + eps)   if ||p|| > 0 and the
//           denominator > 0, else 1;  1 (and wd = 0) for a param left out of
//           adaptation (fastopt.LARS's exclude_1d)
//   d = (g + wd * p) * ratio
//   b = momentum * b + (1 - dampening) * d                      (momentum > 0)
//   d = nesterov ? d + momentum * b : b
//   p = p - lr * d
//
// ||p|| and ||g|| are the tensor's norms before the step: its reduction
// phase (Note [Reduction phase]).
#pragma once

#include <cmath>

#include "common.h"
#include "reduction.h"

namespace fastopt::rules {

// The op's hyperparameters (LarsOptimizer::kFields).
struct LarsHyper {
  double lr, momentum, dampening, weight_decay, trust_coefficient, eps;
  bool nesterov;
  bool adapt;  // false: the params of the call take plain SGD (no ratio, no weight decay)
};

template <typename T>
struct LarsScalars {
  T neg_lr, momentum, one_minus_dampening, weight_decay;
  double trust_coefficient, eps, ratio_weight_decay;  // the ratio's, in double
  bool adapt;
  T ratio;  // finish
};

template <bool kMomentum, bool kNesterov>
struct Lars {
  static_assert(kMomentum || !kNesterov, "Nesterov needs momentum");
  enum Slot { kMomentumBuffer };
  enum Sum { kParamSq, kGradSq };
  static constexpr int kNumSlots = kMomentum ? 1 : 0;
  static constexpr int kNumScalarStates = 0;
  static constexpr int kNumSums = 2;
  using Hyper = LarsHyper;
  template <typename T>
  using Scalars = LarsScalars<T>;

  FASTOPT_HOST_DEVICE static void advance(const Hyper&, const double*, double*) {}

  template <typename T>
  FASTOPT_HOST_DEVICE static Scalars<T> scalars(const Hyper& h, const double*, const double*) {
    const double weight_decay = h.adapt ? h.weight_decay : 0.0;
    return {T(-h.lr), T(h.momentum), T(1.0 - h.dampening), T(weight_decay), h.trust_coefficient, h.eps,
            weight_decay, h.adapt, T(1)};
  }

  template <typename T>
  FASTOPT_HOST_DEVICE static void reduce(T param, T grad, const T*, const Scalars<T>&, double* terms) {
    terms[kParamSq] = double(param) * double(param);
    terms[kGradSq] = double(grad) * double(grad);
  }

  template <typename T>
  FASTOPT_HOST_DEVICE static void finish(Scalars<T>& s, const double* sums) {
    const double param_norm = std::sqrt(sums[kParamSq]);
    const double denominator = std::sqrt(sums[kGradSq]) + s.ratio_weight_decay * param_norm + s.eps;
    const bool scaled = s.adapt && param_norm > 0.0 && denominator > 0.0;
    s.ratio = T(scaled ? s.trust_coefficient * param_norm / denominator : 1.0);
  }

  template <typename T>
  FASTOPT_HOST_DEVICE static void update(T& param, T grad, T* slot, const Scalars<T>& s) {
    T direction = (s.weight_decay != T(0) ? grad + s.weight_decay * param : grad) * s.ratio;
    if (kMomentum) {
      T& buf = slot[kMomentumBuffer];
      buf = s.momentum * buf + s.one_minus_dampening * direction;
      direction = kNesterov ? direction + s.momentum * buf : buf;
    }
    param = param + s.neg_lr * direction;
  }
};

struct LarsOptimizer {
  static constexpr const char* kName = "lars";
  using Hyper = LarsHyper;
  static constexpr std::array<const char*, 1> kSlots{"momentum_buffers"};
  static constexpr std::array<const char*, 0> kScalarStates{};
  static constexpr std::array<Field<Hyper>, 8> kFields{{
      {"lr", &Hyper::lr}, {"momentum", &Hyper::momentum}, {"dampening", &Hyper::dampening},
      {"weight_decay", &Hyper::weight_decay}, {"trust_coefficient", &Hyper::trust_coefficient},
      {"eps", &Hyper::eps}, {"nesterov", &Hyper::nesterov}, {"adapt", &Hyper::adapt}}};

  static constexpr std::array<bool, 1> slots_used(const Hyper& h) { return {h.momentum != 0}; }
  static const char* problem(const Hyper& h) {
    return h.nesterov && !(h.momentum > 0) ? "nesterov needs momentum > 0" : nullptr;
  }

  template <class Fn>
  static void with_rule(const Hyper& h, Fn&& fn) {
    if (h.momentum == 0) {
      fn(Lars<false, false>{});
    } else {
      h.nesterov ? fn(Lars<true, true>{}) : fn(Lars<true, false>{});
    }
  }
};

}  // namespace fastopt::rules
