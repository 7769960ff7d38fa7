// The sign of an opmath value as torch.sign computes it, for the sign-based
// rules (Rprop, Lion).
#pragma once

#include "common.h"

namespace fastopt::rules {

// 1, -1 or 0; 0 for +-0 and, as torch.sign on CPU and CUDA, for NaN (both
// comparisons are false), so a NaN does not move a param through a sign.
// Written as a difference of comparisons, not nested selects: the same
// values (+0 for +-0 and NaN), but GCC vectorizes it (the nested selects kept
// the CPU loops of Rprop and Lion scalar, at ~15% of the roofline).
template <typename T>
FASTOPT_HOST_DEVICE inline T sign(T x) {
  return T(x > T(0)) - T(x < T(0));
}

}  // namespace fastopt::rules
