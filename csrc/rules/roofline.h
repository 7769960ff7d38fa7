// The roofline "rule": moves exactly the streams of an optimizer with
// kSlots state tensors (reads param, grad and every slot; writes param and
// every slot) with one add per stream, so its time through the same driver
// is the memory floor that optimizer's step is measured against.
#pragma once

#include "common.h"

namespace fastopt::rules {

// Unused lr: every Hyper has one, which drivers may replace by a device value.
struct RooflineHyper {
  double lr = 0;
};

template <typename T>
struct RooflineScalars {};

template <int kSlots>
struct Roofline {
  static constexpr int kNumSlots = kSlots;
  static constexpr int kNumScalarStates = 0;
  using Hyper = RooflineHyper;
  template <typename T>
  using Scalars = RooflineScalars<T>;

  FASTOPT_HOST_DEVICE static void advance(const Hyper&, const double*, double*) {}

  template <typename T>
  FASTOPT_HOST_DEVICE static Scalars<T> scalars(const Hyper&, const double*, const double*) {
    return {};
  }

  template <typename T>
  FASTOPT_HOST_DEVICE static void update(T& param, T grad, T* slot, const Scalars<T>&) {
    param = param + grad;
    for (int k = 0; k < kSlots; ++k) slot[k] = slot[k] + grad;
  }
};

// num_slots in [0, kMaxSlots]; the ops check the range.
template <class Fn>
void with_roofline(int num_slots, Fn&& fn) {
  switch (num_slots) {
    case 0: fn(Roofline<0>{}); break;
    case 1: fn(Roofline<1>{}); break;
    case 2: fn(Roofline<2>{}); break;
    default: fn(Roofline<3>{}); break;
  }
}

}  // namespace fastopt::rules
