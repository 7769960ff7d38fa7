// Block-quantized 8-bit state, shared by the CPU and CUDA drivers (which own
// storage; rules never see it) and mirrored bit for bit by
// fastopt/reference.py (quantize_blocks, dequantize_blocks).
//
// Note [8-bit state]
// A state slot of dtype uint8 holds one 8-bit code per element and, in a
// float32 tensor of its own, one scale per block of kBlockElements elements
// taken in row-major order (the last block may be short).  A code is a tiny
// float relative to its block's absmax (block-wise absmax scaling, as in
// Dettmers et al., "8-bit Optimizers via Block-wise Quantization", 2022, with
// the dynamic code map replaced by a float format, as in OCP's MX formats):
//   - a block with a negative value (first moments, momentum) uses the
//     signed map: a sign bit and a 7-bit E4M3 magnitude (16 binades,
//     subnormals below 2^-14 of the block's absmax);
//   - a block without one (second moments, accumulators) uses the unsigned
//     map: an 8-bit E5M3 magnitude (32 binades).
// The map of a block is the sign bit of its stored scale; the scale's
// magnitude is absmax / kMax, so the block's largest value is the largest
// code.  Encoding is round to nearest even on the magnitude (saturating);
// decoding is exact up to the one multiplication by the scale.  Both are
// integer operations and float multiplications, the same in every driver,
// vectorizable, with one division per block (the scale's reciprocal).
//
// Why these maps: measured by a prototype of the reference on 768x3072 AdamW
// with per-row and per-column grad scales spread over 4 and 2 decades, 50
// steps, the update's error relative to float32 state's (tests/test_8bit.py
// measures the chosen maps the same way on its own grads: 0.051, and
// bitsandbytes' AdamW8bit 0.092):
//   signed E4M3 / unsigned E5M3, blocks of 256:    0.040
//   the same, blocks of 64 / 128 / 2048:           0.040 / 0.040 / 0.21
//   signed E3M4 / unsigned E5M3, blocks of 256:    0.032
//   signed E4M3 / unsigned E4M4, blocks of 256:    2.8 (diverges)
//   signed E4M3 / unsigned E6M2, blocks of 256:    0.059
//   bitsandbytes AdamW8bit (dynamic map, 256):     0.073
// A second moment needs range more than precision: when it underflows to
// zero where the first moment does not, Adam's step becomes m / eps (E4M4
// above).  E3M4 is more precise on first moments but spans 8 binades only;
// E4M3 keeps 16.  Blocks longer than 256 put grads of different scales in
// one block (2048: the error grows fivefold); shorter ones cost more scale
// bytes (256: 4 bytes per 256 codes, 1.6%) for no gain.
//
// Special values: a block whose absmax is below kMinAbsmax (or zero) is
// stored as zeros (scale 0), so the reciprocal of a scale is always finite;
// a NaN in a block makes its scale NaN, and the whole block decodes to NaN.
#pragma once

#include <cstdint>
#include <cstring>

#include "common.h"

// The block loops are inlined into the CUDA kernel, and compiled once per
// ISA for the CPU driver (cpu/quantization_cpu.cpp).
#if defined(__CUDACC__) || defined(__HIPCC__)
#define FASTOPT_BLOCK_INLINE __host__ __device__ __forceinline__
#elif defined(__GNUC__) || defined(__clang__)
#define FASTOPT_BLOCK_INLINE inline __attribute__((always_inline))
#else
#define FASTOPT_BLOCK_INLINE inline
#endif

namespace fastopt::quantization {

// Elements per scale (see the Note for why 256).
constexpr int64_t kBlockElements = 256;

// Blocks whose absmax is below this are stored as zeros: optimizer state that
// small is zero for every purpose, and the scale's reciprocal stays finite.
constexpr float kMinAbsmax = 0x1p-96f;

FASTOPT_BLOCK_INLINE uint32_t float_bits(float value) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(value);
#else
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  return bits;
#endif
}

FASTOPT_BLOCK_INLINE float bits_float(uint32_t bits) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(bits);
#else
  float value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
#endif
}

// `if_true` where `condition`, else `if_false`: a select the compilers
// vectorize (a conditional expression on floats or through a function call
// may stay a branch).
FASTOPT_BLOCK_INLINE uint32_t select_bits(bool condition, uint32_t if_true, uint32_t if_false) {
  const uint32_t mask = 0u - uint32_t(condition);
  return (if_true & mask) | (if_false & ~mask);
}

FASTOPT_BLOCK_INLINE uint32_t min_bits(uint32_t a, uint32_t b) { return a < b ? a : b; }

// An unsigned float format of kExponentBits + kMantissaBits bits whose
// largest binade is [1, 2): values up to kMax = 2 - 2^-M, normals down to
// 2^(2 - 2^E), subnormals in steps of 2^(2 - 2^E - M).
template <int kExponentBits, int kMantissaBits>
struct Magnitude {
  static constexpr int kBias = (1 << kExponentBits) - 1;
  static constexpr uint32_t kMaxCode = (1u << (kExponentBits + kMantissaBits)) - 1u;
  static constexpr float kMax = 2.0f - 1.0f / float(1 << kMantissaBits);
  static constexpr int kDroppedBits = 23 - kMantissaBits;
  // float32's exponent field minus the format's.
  static constexpr uint32_t kRebias = uint32_t(127 - kBias) << 23;
  // The float32 bits of kMax, of the smallest normal and of the subnormal step.
  static constexpr uint32_t kMaxBits = (127u << 23) | (((1u << kMantissaBits) - 1u) << kDroppedBits);
  static constexpr uint32_t kMinNormalBits = uint32_t(128 - kBias) << 23;
  static constexpr uint32_t kSubnormalStepBits = uint32_t(128 - kBias - kMantissaBits) << 23;
  // A float whose last place is the subnormal step: adding a subnormal
  // value to it rounds that value to the step (to nearest even).
  static constexpr uint32_t kRounderBits = uint32_t(151 - kBias - kMantissaBits) << 23;

  // The code of z >= 0 (larger values than kMax and NaN saturate), rounded to
  // nearest even.
  FASTOPT_BLOCK_INLINE static uint32_t encode(float z) {
    const uint32_t bits = min_bits(float_bits(z) & 0x7FFFFFFFu, kMaxBits);
    const uint32_t subnormal = float_bits(bits_float(bits) + bits_float(kRounderBits)) - kRounderBits;
    const uint32_t odd = (bits >> kDroppedBits) & 1u;
    const uint32_t normal = (bits - kRebias + ((1u << (kDroppedBits - 1)) - 1u) + odd) >> kDroppedBits;
    return select_bits(bits < kMinNormalBits, subnormal, normal);
  }

  FASTOPT_BLOCK_INLINE static float decode(uint32_t code) {
    const uint32_t normal = (code << kDroppedBits) + kRebias;
    const uint32_t subnormal = float_bits(float(int32_t(code)) * bits_float(kSubnormalStepBits));
    return bits_float(select_bits((code >> kMantissaBits) == 0, subnormal, normal));
  }
};

using SignedMagnitude = Magnitude<4, 3>;    // after the sign bit
using UnsignedMagnitude = Magnitude<5, 3>;

constexpr uint32_t kSignBit = 0x80u;

// A block's stored scale, from the absmax of its values (NaN if any is NaN)
// and whether any is negative (the signed map).
FASTOPT_BLOCK_INLINE float block_scale(float absmax, bool has_negative) {
  if (absmax < kMinAbsmax) return 0.0f;  // NaN is not below: it stays NaN
  const float scale = absmax / (has_negative ? SignedMagnitude::kMax : UnsignedMagnitude::kMax);
  return has_negative ? -scale : scale;
}

FASTOPT_BLOCK_INLINE bool signed_map(float stored_scale) {
  return (float_bits(stored_scale) >> 31) != 0;
}

FASTOPT_BLOCK_INLINE float scale_magnitude(float stored_scale) {
  return bits_float(float_bits(stored_scale) & 0x7FFFFFFFu);
}

// What encode multiplies magnitudes by: 1 / |scale|, 0 for a zero block.
FASTOPT_BLOCK_INLINE float inverse_scale(float stored_scale) {
  const float magnitude = scale_magnitude(stored_scale);
  return magnitude > 0.0f ? 1.0f / magnitude : 0.0f;
}

// The code of `value` (in its low 8 bits), given 1 / |the block's scale|.
template <bool kSigned>
FASTOPT_BLOCK_INLINE uint32_t encode(float value, float inverse) {
  const float z = bits_float(float_bits(value) & 0x7FFFFFFFu) * inverse;
  if (kSigned) {
    return (uint32_t(value < 0.0f) << 7) | SignedMagnitude::encode(z);
  }
  return UnsignedMagnitude::encode(z);
}

template <bool kSigned>
FASTOPT_BLOCK_INLINE float decode(uint8_t code, float scale_abs) {
  if (kSigned) {
    const float magnitude = SignedMagnitude::decode(code & 0x7Fu) * scale_abs;
    return bits_float(float_bits(magnitude) ^ (uint32_t(code & kSignBit) << 24));
  }
  return UnsignedMagnitude::decode(code) * scale_abs;
}

// One value of a block, from its code and the block's stored scale (what
// decode_block gives for it).
FASTOPT_BLOCK_INLINE float decode_value(uint8_t code, float stored_scale) {
  const float magnitude = scale_magnitude(stored_scale);
  return signed_map(stored_scale) ? decode<true>(code, magnitude) : decode<false>(code, magnitude);
}

// Blocks of a tensor of `numel` elements (the length of its scale tensor).
FASTOPT_BLOCK_INLINE int64_t num_blocks(int64_t numel) {
  return (numel + kBlockElements - 1) / kBlockElements;
}

// The values of one block of 8-bit codes (Note [8-bit state]).
FASTOPT_BLOCK_INLINE void decode_block(const uint8_t* codes, float stored_scale, int64_t count,
                                       float* values) {
  const float magnitude = scale_magnitude(stored_scale);
  if (signed_map(stored_scale)) {
    for (int64_t i = 0; i < count; ++i) values[i] = decode<true>(codes[i], magnitude);
  } else {
    for (int64_t i = 0; i < count; ++i) values[i] = decode<false>(codes[i], magnitude);
  }
}

// The codes and the stored scale of one block of values, into Code: uint8_t,
// or uint32_t for encode_block_narrowed.  The absmax is taken on the magnitudes' bits,
// whose integer order is the order of the values (NaN above infinity, so a
// NaN makes the absmax NaN).
template <typename Code>
FASTOPT_BLOCK_INLINE void encode_block(const float* values, int64_t count, Code* codes,
                                       float* stored_scale) {
  uint32_t absmax_bits = 0, negative = 0;
  for (int64_t i = 0; i < count; ++i) {
    const uint32_t magnitude_bits = float_bits(values[i]) & 0x7FFFFFFFu;
    absmax_bits = absmax_bits > magnitude_bits ? absmax_bits : magnitude_bits;
    negative |= uint32_t(values[i] < 0.0f);
  }
  const float scale = block_scale(bits_float(absmax_bits), negative != 0);
  const float inverse = inverse_scale(scale);
  if (negative != 0) {
    for (int64_t i = 0; i < count; ++i) codes[i] = Code(encode<true>(values[i], inverse));
  } else {
    for (int64_t i = 0; i < count; ++i) codes[i] = Code(encode<false>(values[i], inverse));
  }
  *stored_scale = scale;
}

// encode_block into 8-bit codes through 32-bit ones (the CPU driver's
// encode): with an 8-bit destination GCC vectorizes the encode's arithmetic
// in 8-bit lanes, narrowing every intermediate, which made it about 1.2x
// slower (AVX2) than computing the codes in 32-bit lanes and narrowing them
// in a pass of their own.
FASTOPT_BLOCK_INLINE void encode_block_narrowed(const float* values, int64_t count, uint8_t* codes,
                                                float* stored_scale) {
  alignas(64) uint32_t wide[kBlockElements];
  encode_block(values, count, wide, stored_scale);
  for (int64_t i = 0; i < count; ++i) codes[i] = uint8_t(wide[i]);
}

}  // namespace fastopt::quantization
