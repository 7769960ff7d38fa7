// Note [Reduction phase]
// Some rules need per-tensor sums before they can update an element: LAMB
// scales its update by ||p|| / ||update||, LARS its gradient by a ratio of
// ||p|| and ||g||.  Such a rule declares kNumSums and two more functions:
//   reduce(param, grad, slots, scalars, terms)  what one element adds to each
//       sum (terms[r], double: the square of a float value is exact there);
//       it reads the element and writes nothing;
//   finish(scalars, sums)  folds the tensor's sums (double) into the
//       scalars its update then reads (per tensor, once per step).
// The drivers run a read-only pass over every element first (the same loads,
// unscaling and storage as the update: grad_scale, maximize, master copies,
// 8-bit slots decoded), then the update with each tensor's finished scalars.
// Two passes, so a rule that needs the sums of values the update computes
// (LAMB's update direction) computes them twice, in registers: the element
// is read twice and written once.
//
// The sums are the same bits for any thread count, on both drivers and in
// the emulated CUDA tests, because their order of addition is fixed by
// element position alone: element i of a tensor goes to lane i % kSumLanes
// of chunk i / kSumChunkElements; each lane adds its terms in element order
// (in double); a chunk's sum adds its lanes in lane order, and the tensor's
// sum its chunks' sums in chunk order.  The CUDA driver gives each lane of a
// chunk to one thread of one block (kSumLanes threads, coalesced loads),
// writes the lane sums to memory and adds them in two small kernels, so it
// needs neither shared memory nor a host synchronization; the CPU driver
// keeps kSumLanes accumulators per chunk in a vectorized loop.
// fastopt/reference.py (ordered_sum) adds in the same order, so the sums of
// the reference are the kernels' to the bit.
//
// Two optional declarations: `reduces(scalars)`, false where a tensor's
// sums are not wanted this step (its chunks are not read and its sums are
// 0: SWATS after its switch); and `kSumStates`, the first of kNumSums
// scalar states the drivers store each tensor's sums into (as float32,
// after the reduction phase, in sum order), for a rule whose sums are
// needed beyond the tensor (SWATS's per-group projection).  A rule's
// scalars must not read its sum states: the CPU driver derives the scalars
// once per run of tensors whose other scalar states agree.
#pragma once

#include <cstdint>

#include "common.h"

namespace fastopt::rules {

// Lanes per chunk: the CUDA driver's threads per reduction block.
constexpr int kSumLanes = 512;
// Elements per chunk: a CUDA block's work (256 KB of float32), and a CPU
// task's; a multiple of kSumLanes and of the 8-bit block size.
constexpr int64_t kSumChunkElements = 65536;

// Per-tensor sums the rule's reduction phase takes (0: it has none).
template <class Rule>
FASTOPT_HOST_DEVICE constexpr int num_sums() {
  if constexpr (requires { Rule::kNumSums; }) {
    return Rule::kNumSums;
  } else {
    return 0;
  }
}

// Whether a tensor with these scalars takes its reduction phase this step.
template <class Rule, class Scalars>
FASTOPT_HOST_DEVICE bool reduces(const Scalars& scalars) {
  if constexpr (requires { Rule::reduces(scalars); }) {
    return Rule::reduces(scalars);
  } else {
    return true;
  }
}

// The scalar state the rule stores its first sum into (-1: none).
template <class Rule>
FASTOPT_HOST_DEVICE constexpr int first_sum_state() {
  if constexpr (requires { Rule::kSumStates; }) {
    static_assert(Rule::kSumStates + num_sums<Rule>() <= Rule::kNumScalarStates);
    return Rule::kSumStates;
  } else {
    return -1;
  }
}

// Chunks of a tensor of `numel` elements in the reduction phase.
FASTOPT_HOST_DEVICE inline int64_t num_sum_chunks(int64_t numel) {
  return (numel + kSumChunkElements - 1) / kSumChunkElements;
}

// Lanes of a chunk that hold terms: all but in a tensor's short last chunk
// (the others stay 0, and adding +0 changes no sum that starts at +0).
FASTOPT_HOST_DEVICE inline int used_sum_lanes(int64_t chunk_elements) {
  return chunk_elements < kSumLanes ? int(chunk_elements) : kSumLanes;
}

}  // namespace fastopt::rules
