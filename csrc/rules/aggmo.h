// AggMo for one element (Lucas, Sun, Zemel & Grosse, "Aggregated Momentum:
// Stability Through Passive Damping", ICLR 2019, Algorithm 1; the order of
// operations of the authors' code and of pytorch-optimizer's AggMo): K
// heavy-ball buffers with their own betas, the param moved by their mean.
//
//   g = g + wd * p                        (L2)
//   for each k:  v_k = beta_k * v_k + g;  p = p - (lr / K) * v_k
//
// K in [1, kMaxSlots]: one state slot per beta.
#pragma once

#include <array>

#include "common.h"

namespace fastopt::rules {

struct AggmoHyper {
  double lr, beta1, beta2, beta3, num_betas, weight_decay;
};

template <typename T>
struct AggmoScalars {
  T betas[3];
  T neg_step_size;  // -lr / K
  T weight_decay;
};

template <int kBetas>
struct Aggmo {
  static constexpr int kNumSlots = kBetas;
  static constexpr int kNumScalarStates = 0;  // no step count: nothing depends on it
  using Hyper = AggmoHyper;
  template <typename T>
  using Scalars = AggmoScalars<T>;

  FASTOPT_HOST_DEVICE static void advance(const Hyper&, const double*, double*) {}

  template <typename T>
  FASTOPT_HOST_DEVICE static Scalars<T> scalars(const Hyper& h, const double*, const double*) {
    return {{T(h.beta1), T(h.beta2), T(h.beta3)}, T(-(h.lr / double(kBetas))), T(h.weight_decay)};
  }

  template <typename T>
  FASTOPT_HOST_DEVICE static void update(T& param, T grad, T* slot, const Scalars<T>& s) {
    grad = s.weight_decay != T(0) ? grad + s.weight_decay * param : grad;
    for (int k = 0; k < kBetas; ++k) {
      slot[k] = s.betas[k] * slot[k] + grad;
      param = param + s.neg_step_size * slot[k];
    }
  }
};

struct AggmoOptimizer {
  static constexpr const char* kName = "aggmo";
  using Hyper = AggmoHyper;
  static constexpr std::array<const char*, 3> kSlots{"momentum_buffers_0", "momentum_buffers_1",
                                                     "momentum_buffers_2"};
  static constexpr std::array<const char*, 0> kScalarStates{};
  static constexpr std::array<Field<Hyper>, 6> kFields{{
      {"lr", &Hyper::lr}, {"beta1", &Hyper::beta1}, {"beta2", &Hyper::beta2}, {"beta3", &Hyper::beta3},
      {"num_betas", &Hyper::num_betas}, {"weight_decay", &Hyper::weight_decay}}};

  static constexpr std::array<bool, 3> slots_used(const Hyper& h) {
    return {true, h.num_betas >= 2, h.num_betas >= 3};
  }
  static const char* problem(const Hyper& h) {
    const bool whole = h.num_betas == 1 || h.num_betas == 2 || h.num_betas == 3;
    return whole ? nullptr : "num_betas must be 1, 2 or 3 (one state slot per beta)";
  }

  template <class Fn>
  static void with_rule(const Hyper& h, Fn&& fn) {
    if (h.num_betas == 1) {
      fn(Aggmo<1>{});
    } else if (h.num_betas == 2) {
      fn(Aggmo<2>{});
    } else {
      fn(Aggmo<3>{});
    }
  }
};

}  // namespace fastopt::rules
