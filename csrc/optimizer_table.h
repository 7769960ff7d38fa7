// Note [The optimizer table]
// Every optimizer of fastopt is one row of FASTOPT_OPTIMIZERS below, naming
// the descriptor its rule header (csrc/rules/<name>.h) defines.  The
// descriptor holds the op's name, its state lists (slots shaped like the
// params, then per-tensor scalar states such as `step`), its keyword
// arguments (Field: schema name and Hyper member), which slots a variant
// uses, extra checks of the hyperparameters and the choice of the rule's
// compile-time variant.  From the row follow, with no other code:
//   - the op schemas fastopt::<name>_ and fastopt::<name>_bound_
//     (optimizer_ops.cpp, bound_ops.cpp);
//   - the CPU kernel and the CUDA launcher, registered per device
//     (cpu/optimizer_ops_cpu.cpp, cuda/optimizer_ops_cuda.cpp), which read
//     the op's arguments generically (step_ops.h);
//   - the driver instantiations, one generated translation unit per
//     optimizer and driver (setup.py and CMakeLists.txt write them from
//     this table into the build folder), so the build compiles optimizers
//     in parallel and a change to one rule recompiles that rule only.
// A row need not be an optimizer class: `lookahead` is fastopt.Lookahead's
// synchronization (a rule that reads no grad), run through the same drivers.
// The row's first name is the file stem of the rule header (rules/<name>.h)
// and of the generated sources, which include that header only.  The
// Python class, its reference function and its test and bench rows are the
// other places an optimizer lives (README, "Adding an optimizer").
#pragma once

#include "rules/adabound.h"
#include "rules/adafactor.h"
#include "rules/adadelta.h"
#include "rules/adagrad.h"
#include "rules/adam.h"
#include "rules/adamax.h"
#include "rules/adopt.h"
#include "rules/aggmo.h"
#include "rules/asgd.h"
#include "rules/lamb.h"
#include "rules/lars.h"
#include "rules/lion.h"
#include "rules/lookahead.h"
#include "rules/muon_momentum.h"
#include "rules/muon_update.h"
#include "rules/nadam.h"
#include "rules/qhadam.h"
#include "rules/radam.h"
#include "rules/rmsprop.h"
#include "rules/rprop.h"
#include "rules/sgd.h"
#include "rules/swats.h"

#define FASTOPT_OPTIMIZERS(X) \
  X(adam, AdamOptimizer)      \
  X(sgd, SgdOptimizer)        \
  X(rmsprop, RmspropOptimizer) \
  X(adagrad, AdagradOptimizer)   \
  X(nadam, NadamOptimizer)       \
  X(radam, RadamOptimizer)       \
  X(adamax, AdamaxOptimizer)     \
  X(adadelta, AdadeltaOptimizer) \
  X(asgd, AsgdOptimizer)         \
  X(rprop, RpropOptimizer)       \
  X(lion, LionOptimizer)         \
  X(adopt, AdoptOptimizer)       \
  X(adabound, AdaboundOptimizer) \
  X(qhadam, QhadamOptimizer)     \
  X(aggmo, AggmoOptimizer)       \
  X(lookahead, LookaheadOptimizer) \
  X(lamb, LambOptimizer)           \
  X(lars, LarsOptimizer)           \
  X(muon_momentum, MuonMomentumOptimizer) \
  X(muon_update, MuonUpdateOptimizer) \
  X(adafactor, AdafactorOptimizer) \
  X(swats, SwatsOptimizer)

namespace fastopt {

// Calls fn(Descriptor{}) for every row of the table.
template <class Fn>
void for_each_optimizer(Fn&& fn) {
#define FASTOPT_CALL_WITH_DESCRIPTOR(name, Descriptor) fn(rules::Descriptor{});
  FASTOPT_OPTIMIZERS(FASTOPT_CALL_WITH_DESCRIPTOR)
#undef FASTOPT_CALL_WITH_DESCRIPTOR
}

}  // namespace fastopt
