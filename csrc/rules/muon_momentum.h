// Muon's momentum for one element (torch.optim.Muon; Jordan et al. 2024,
// "Muon: An optimizer for hidden layers in neural networks"), the pass
// before the Newton–Schulz orthogonalization of fastopt.Muon:
//
//   b = lerp(b, g, 1 - momentum)                       (b: momentum_buffer)
//   u = nesterov ? lerp(g, b, momentum) : b
//
// with torch.lerp's formula.  The op's params are the buffers that receive
// u (fastopt.Muon's orthogonalization input, shaped and typed like the
// grads): the rule writes its param and never reads it.  Note [Muon's
// passes] in fastopt/muon.py has the whole step.
#pragma once

#include <array>

#include "common.h"

namespace fastopt::rules {

// The op's hyperparameters (MuonMomentumOptimizer::kFields).  lr is unused
// (every Hyper has one, which drivers may replace by a device value).
struct MuonMomentumHyper {
  double lr, momentum;
  bool nesterov;
};

template <typename T>
struct MuonMomentumScalars {
  LerpWeight<T> to_grad;    // 1 - momentum: the buffer's step towards g
  LerpWeight<T> to_buffer;  // momentum: Nesterov's step from g towards the buffer
};

template <bool kNesterov>
struct MuonMomentum {
  enum Slot { kMomentumBuffer };
  static constexpr int kNumSlots = 1;
  static constexpr int kNumScalarStates = 0;
  using Hyper = MuonMomentumHyper;
  template <typename T>
  using Scalars = MuonMomentumScalars<T>;

  FASTOPT_HOST_DEVICE static void advance(const Hyper&, const double*, double*) {}

  template <typename T>
  FASTOPT_HOST_DEVICE static Scalars<T> scalars(const Hyper& h, const double*, const double*) {
    return {LerpWeight<T>::of(1.0 - h.momentum), LerpWeight<T>::of(h.momentum)};
  }

  template <typename T>
  FASTOPT_HOST_DEVICE static void update(T& update, T grad, T* slot, const Scalars<T>& s) {
    T& buf = slot[kMomentumBuffer];
    buf = lerp(buf, grad, s.to_grad);
    update = kNesterov ? lerp(grad, buf, s.to_buffer) : buf;
  }
};

struct MuonMomentumOptimizer {
  static constexpr const char* kName = "muon_momentum";
  using Hyper = MuonMomentumHyper;
  static constexpr std::array<const char*, 1> kSlots{"momentum_buffers"};
  static constexpr std::array<const char*, 0> kScalarStates{};
  static constexpr std::array<Field<Hyper>, 3> kFields{{
      {"lr", &Hyper::lr}, {"momentum", &Hyper::momentum}, {"nesterov", &Hyper::nesterov}}};

  static constexpr std::array<bool, 1> slots_used(const Hyper&) { return {true}; }
  static const char* problem(const Hyper&) { return nullptr; }

  template <class Fn>
  static void with_rule(const Hyper& h, Fn&& fn) {
    h.nesterov ? fn(MuonMomentum<true>{}) : fn(MuonMomentum<false>{});
  }
};

}  // namespace fastopt::rules
