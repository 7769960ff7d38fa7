// Selection of a rule's compile-time variant from an op's runtime flags,
// shared by the CPU and CUDA drivers so both instantiate the same variants.
// Each with_* calls fn(Rule{}) for the rule the flags select.
#pragma once

#include "adagrad.h"
#include "adam.h"
#include "rmsprop.h"
#include "roofline.h"
#include "sgd.h"

namespace fastopt::rules {

template <class Fn>
void with_adam(bool decoupled_weight_decay, bool amsgrad, Fn&& fn) {
  if (decoupled_weight_decay) {
    amsgrad ? fn(Adam<WeightDecay::kDecoupled, true>{}) : fn(Adam<WeightDecay::kDecoupled, false>{});
  } else {
    amsgrad ? fn(Adam<WeightDecay::kL2, true>{}) : fn(Adam<WeightDecay::kL2, false>{});
  }
}

// nesterov without momentum is rejected by the ops before they get here.
template <class Fn>
void with_sgd(bool has_momentum, bool nesterov, Fn&& fn) {
  if (!has_momentum) {
    fn(Sgd<false, false>{});
  } else {
    nesterov ? fn(Sgd<true, true>{}) : fn(Sgd<true, false>{});
  }
}

template <class Fn>
void with_rmsprop(bool centered, bool has_momentum, Fn&& fn) {
  if (centered) {
    has_momentum ? fn(Rmsprop<true, true>{}) : fn(Rmsprop<true, false>{});
  } else {
    has_momentum ? fn(Rmsprop<false, true>{}) : fn(Rmsprop<false, false>{});
  }
}

template <class Fn>
void with_adagrad(Fn&& fn) {
  fn(Adagrad{});
}

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
