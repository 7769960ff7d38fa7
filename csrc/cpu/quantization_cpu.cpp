// The 8-bit codec's block loops (Note [8-bit state] in rules/quantization.h)
// for the CPU driver, compiled once per ISA here rather than inlined into the
// block walk of every rule and storage: they depend on neither, and a call
// per 256-element block costs nothing next to the block's work.
#include "multi_tensor_apply.h"

namespace fastopt::cpu {
namespace {

void decode_baseline(const uint8_t* codes, float stored_scale, int64_t count, float* values) {
  quantization::decode_block(codes, stored_scale, count, values);
}
void encode_baseline(const float* values, int64_t count, uint8_t* codes, float* stored_scale) {
  quantization::encode_block_narrowed(values, count, codes, stored_scale);
}

#if FASTOPT_X86_MULTIVERSION
FASTOPT_TARGET_AVX2 void decode_avx2(const uint8_t* codes, float stored_scale, int64_t count,
                                     float* values) {
  quantization::decode_block(codes, stored_scale, count, values);
}
FASTOPT_TARGET_AVX2 void encode_avx2(const float* values, int64_t count, uint8_t* codes,
                                     float* stored_scale) {
  quantization::encode_block_narrowed(values, count, codes, stored_scale);
}
FASTOPT_TARGET_AVX512 void decode_avx512(const uint8_t* codes, float stored_scale, int64_t count,
                                         float* values) {
  quantization::decode_block(codes, stored_scale, count, values);
}
FASTOPT_TARGET_AVX512 void encode_avx512(const float* values, int64_t count, uint8_t* codes,
                                         float* stored_scale) {
  quantization::encode_block_narrowed(values, count, codes, stored_scale);
}
#endif

}  // namespace

BlockCodec block_codec(Isa isa) {
#if FASTOPT_X86_MULTIVERSION
  switch (isa) {
    case Isa::kAvx512: return {&decode_avx512, &encode_avx512};
    case Isa::kAvx2: return {&decode_avx2, &encode_avx2};
    case Isa::kBaseline: break;
  }
#endif
  (void)isa;
  return {&decode_baseline, &encode_baseline};
}

}  // namespace fastopt::cpu
