// Stochastic rounding of float to bfloat16, shared by the CPU and CUDA
// drivers (which own storage conversions; rules never see them) and mirrored
// bit for bit by fastopt/reference.py.
//
// Note [Stochastic rounding]
// A bfloat16 keeps the top 16 bits of a float.  Adding 16 uniformly random
// bits to the dropped half before truncating rounds up with probability
// (dropped bits) / 2^16, so the expected stored value is the float itself:
// updates smaller than half an ulp of the param still move it on average.
// The random bits are a hash of (seed, tensor index within the call, element
// index): reproducible for a seed, independent of threads and chunking.  The
// seed is drawn from torch's default generator once per step, so
// torch.manual_seed makes runs repeatable.  Non-finite values round to
// nearest (NaN stays NaN, inf stays inf).
#pragma once

#include <cstdint>

#include "common.h"

namespace fastopt::rounding {

// murmur3's 32-bit finalizer: every input bit affects every output bit.
FASTOPT_HOST_DEVICE inline uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x85EBCA6Bu;
  x ^= x >> 13;
  x *= 0xC2B2AE35u;
  x ^= x >> 16;
  return x;
}

// 16 random bits for element `index` of tensor `tensor` of a call.
FASTOPT_HOST_DEVICE inline uint32_t random16(uint32_t seed, uint32_t tensor, uint64_t index) {
  uint32_t h = mix32(seed ^ (tensor * 0x9E3779B1u));
  h = mix32(h ^ uint32_t(index));
  h = mix32(h ^ uint32_t(index >> 32));
  return h >> 16;
}

// The bfloat16 bits of `bits` (a float's bits) rounded with `random` (16
// bits); callers handle non-finite values (exponent all ones) themselves.
FASTOPT_HOST_DEVICE inline uint16_t stochastic_bfloat16_bits(uint32_t bits, uint32_t random) {
  return uint16_t((bits + random) >> 16);
}

FASTOPT_HOST_DEVICE inline bool finite_float_bits(uint32_t bits) {
  return (bits & 0x7F800000u) != 0x7F800000u;
}

}  // namespace fastopt::rounding
