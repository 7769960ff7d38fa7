// Lookahead's synchronization for one element (Zhang, Lucas, Hinton & Ba,
// "Lookahead Optimizer: k steps forward, 1 step back", NeurIPS 2019,
// Algorithm 1), run every k steps of the inner optimizer:
//
//   slow = slow + alpha * (fast - slow)
//   fast = slow
//
// The param is the fast weight (its master copy where it has one) and the
// one slot holds the slow weight.  It reads no grad: the op is called with
// the params as its grads, and the driver's grad loads are dead code here.
#pragma once

#include <array>

#include "common.h"

namespace fastopt::rules {

// lr is unused (every Hyper has one, which drivers may replace by a device value).
struct LookaheadHyper {
  double lr, alpha;
};

template <typename T>
struct LookaheadScalars {
  T alpha;
};

struct LookaheadSync {
  enum Slot { kSlowParam };
  static constexpr int kNumSlots = 1;
  static constexpr int kNumScalarStates = 0;
  using Hyper = LookaheadHyper;
  template <typename T>
  using Scalars = LookaheadScalars<T>;

  FASTOPT_HOST_DEVICE static void advance(const Hyper&, const double*, double*) {}

  template <typename T>
  FASTOPT_HOST_DEVICE static Scalars<T> scalars(const Hyper& h, const double*, const double*) {
    return {T(h.alpha)};
  }

  template <typename T>
  FASTOPT_HOST_DEVICE static void update(T& param, T /*grad*/, T* slot, const Scalars<T>& s) {
    T& slow = slot[kSlowParam];
    slow = slow + s.alpha * (param - slow);
    param = slow;
  }
};

struct LookaheadOptimizer {
  static constexpr const char* kName = "lookahead";
  using Hyper = LookaheadHyper;
  static constexpr std::array<const char*, 1> kSlots{"slow_params"};
  static constexpr std::array<const char*, 0> kScalarStates{};
  static constexpr std::array<Field<Hyper>, 2> kFields{{{"lr", &Hyper::lr}, {"alpha", &Hyper::alpha}}};

  static constexpr std::array<bool, 1> slots_used(const Hyper&) { return {true}; }
  static const char* problem(const Hyper&) { return nullptr; }

  template <class Fn>
  static void with_rule(const Hyper&, Fn&& fn) {
    fn(LookaheadSync{});
  }
};

}  // namespace fastopt::rules
