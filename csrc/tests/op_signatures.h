// The C++ signatures of the fastopt list ops (Note [fastopt op schemas]),
// for typed calls through the dispatcher from the C++ tests.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include "../step_args.h"

namespace fastopt::test {

using TL = at::TensorList;
using AdamOp = void(TL, TL, TL, TL, TL, TL, double, double, double, double, double, bool, bool,
                    bool, FASTOPT_STEP_TYPES);
// lr, momentum, dampening, weight_decay, nesterov, first_momentum_step, maximize
using SgdOp = void(TL, TL, TL, double, double, double, double, bool, bool, bool, FASTOPT_STEP_TYPES);
using RmspropOp = void(TL, TL, TL, TL, TL, TL, double, double, double, double, double, bool, bool,
                       FASTOPT_STEP_TYPES);
using AdagradOp = void(TL, TL, TL, TL, double, double, double, double, bool, FASTOPT_STEP_TYPES);
using RooflineOp = void(TL, TL, TL);

template <class Signature>
c10::TypedOperatorHandle<Signature> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

}  // namespace fastopt::test
