// Muon's update for one element (torch.optim.Muon), the pass after the
// Newton–Schulz orthogonalization of fastopt.Muon: the op's grads are the
// orthogonalized updates O, and
//
//   p = p * (1 - lr * wd)                          (decoupled weight decay)
//   p = p - lr * lr_ratio * O
//
// lr_ratio is the shape's adjust_lr_fn factor (sqrt(max(1, rows / cols))
// for "original"), the same for every param of one call.  Note [Muon's
// passes] in fastopt/muon.py has the whole step.
#pragma once

#include <array>

#include "common.h"

namespace fastopt::rules {

// The op's hyperparameters (MuonUpdateOptimizer::kFields).
struct MuonUpdateHyper {
  double lr, weight_decay, lr_ratio;
};

template <typename T>
struct MuonUpdateScalars {
  T decay_factor;  // 1 - lr * wd; 1 (exact) without weight decay
  T neg_step;      // -lr * lr_ratio, rounded once as torch's alpha
};

struct MuonUpdate {
  static constexpr int kNumSlots = 0;
  static constexpr int kNumScalarStates = 0;
  using Hyper = MuonUpdateHyper;
  template <typename T>
  using Scalars = MuonUpdateScalars<T>;

  FASTOPT_HOST_DEVICE static void advance(const Hyper&, const double*, double*) {}

  template <typename T>
  FASTOPT_HOST_DEVICE static Scalars<T> scalars(const Hyper& h, const double*, const double*) {
    return {T(1.0 - h.lr * h.weight_decay), T(-(h.lr * h.lr_ratio))};
  }

  template <typename T>
  FASTOPT_HOST_DEVICE static void update(T& param, T orthogonalized, T*, const Scalars<T>& s) {
    param = param * s.decay_factor;
    param = param + s.neg_step * orthogonalized;
  }
};

struct MuonUpdateOptimizer {
  static constexpr const char* kName = "muon_update";
  using Hyper = MuonUpdateHyper;
  static constexpr std::array<const char*, 0> kSlots{};
  static constexpr std::array<const char*, 0> kScalarStates{};
  static constexpr std::array<Field<Hyper>, 3> kFields{{
      {"lr", &Hyper::lr}, {"weight_decay", &Hyper::weight_decay}, {"lr_ratio", &Hyper::lr_ratio}}};

  static constexpr std::array<bool, 0> slots_used(const Hyper&) { return {}; }
  static const char* problem(const Hyper&) { return nullptr; }

  template <class Fn>
  static void with_rule(const Hyper&, Fn&& fn) {
    fn(MuonUpdate{});
  }
};

}  // namespace fastopt::rules
