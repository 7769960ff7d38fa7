// The half and bfloat16 types and conversions of the emulated CUDA runtime
// (Note [CUDA emulation]): storage-only types, as under torch's
// __CUDA_NO_HALF_CONVERSIONS__ / __CUDA_NO_BFLOAT16_CONVERSIONS__, and the
// device's conversions (round to nearest even, canonical NaN 0x7FFF).  Free of
// the CUDA keyword macros, so tests that include torch headers include it.
#pragma once

#include <cstdint>
#include <cstring>

namespace fastopt::emulation {

inline uint32_t bits_of(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  return bits;
}

inline float float_of(uint32_t bits) {
  float value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
}

// Rounds `value >> shift` to nearest, ties to even (shift >= 1).
inline uint32_t shift_round_even(uint32_t value, unsigned shift) {
  const uint32_t kept = value >> shift;
  const uint32_t dropped = value & ((1u << shift) - 1u);
  const uint32_t half = 1u << (shift - 1u);
  return kept + ((dropped > half || (dropped == half && (kept & 1u))) ? 1u : 0u);
}

}  // namespace fastopt::emulation

struct __half_raw {
  unsigned short x;
};

struct __half {
  unsigned short x;
  __half() = default;
  constexpr __half(__half_raw raw) : x(raw.x) {}
};

struct __nv_bfloat16_raw {
  unsigned short x;
};

struct __nv_bfloat16 {
  unsigned short x;
  __nv_bfloat16() = default;
  constexpr __nv_bfloat16(__nv_bfloat16_raw raw) : x(raw.x) {}
};

inline unsigned int __float_as_uint(float value) { return fastopt::emulation::bits_of(value); }

inline float __bfloat162float(__nv_bfloat16 value) {
  return fastopt::emulation::float_of(uint32_t(value.x) << 16);
}

inline __nv_bfloat16 __float2bfloat16_rn(float value) {
  const uint32_t bits = fastopt::emulation::bits_of(value);
  if ((bits & 0x7FFFFFFFu) > 0x7F800000u) return __nv_bfloat16_raw{0x7FFF};  // NaN
  // Infinity stays infinity; the largest floats carry into it.
  return __nv_bfloat16_raw{uint16_t(fastopt::emulation::shift_round_even(bits, 16))};
}

inline float __half2float(__half value) {
  using fastopt::emulation::float_of;
  const uint32_t sign = uint32_t(value.x & 0x8000u) << 16;
  const uint32_t exponent = (value.x >> 10) & 0x1Fu;
  const uint32_t mantissa = value.x & 0x3FFu;
  if (exponent == 0x1F) return float_of(sign | 0x7F800000u | (mantissa << 13));
  if (exponent != 0) return float_of(sign | ((exponent + 112u) << 23) | (mantissa << 13));
  // Zero or subnormal: mantissa * 2^-24, exact in float.
  const float magnitude = float(mantissa) * float_of(0x33800000u);  // 2^-24
  return sign != 0 ? -magnitude : magnitude;
}

inline __half __float2half_rn(float value) {
  using fastopt::emulation::shift_round_even;
  const uint32_t bits = fastopt::emulation::bits_of(value);
  const uint16_t sign = uint16_t((bits >> 16) & 0x8000u);
  const uint32_t magnitude = bits & 0x7FFFFFFFu;
  if (magnitude > 0x7F800000u) return __half_raw{0x7FFF};                   // NaN
  if (magnitude >= 0x477FF000u) return __half_raw{uint16_t(sign | 0x7C00u)};  // >= 65520: infinity
  if (magnitude >= 0x38800000u) {  // a normal half: rebias the exponent from 127 to 15
    return __half_raw{uint16_t(sign | shift_round_even(magnitude - 0x38000000u, 13))};
  }
  if (magnitude < 0x33000000u) return __half_raw{sign};  // below 2^-25: rounds to zero
  // A subnormal half: the float's significand in units of 2^-24.
  const uint32_t exponent = magnitude >> 23;
  const uint32_t significand = (magnitude & 0x7FFFFFu) | 0x800000u;
  return __half_raw{uint16_t(sign | shift_round_even(significand, 126u - exponent))};
}

