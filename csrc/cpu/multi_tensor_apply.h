// The CPU driver: walks every element of a list of tensors with one update
// rule (csrc/rules/*.h) in a single parallel region.
//
// Note [CPU driver layout]
// The total element count of all tensors is split into one range per thread
// by at::parallel_for (torch's pool, so torch.set_num_threads applies); a
// range may start and end inside any tensor.  Each tensor is walked linearly
// over its memory, so every stream of one tensor must share its strides and
// be dense (the op layer stages anything else through contiguous copies).
// The element loop is compiled once per ISA (AVX-512, AVX2, baseline) with
// GCC/Clang target attributes and the rule inlined into it; the ISA is chosen
// at run time.  Floating-point contraction is off in the build, so every ISA
// and the scalar tail round identically.  Storage (Note [Storage of a step])
// fixes the dtypes of the param and state streams and whether a float32
// master copy or stochastic rounding is involved; the rule sees opmath values
// only.  8-bit state (uint8 slots, Note [8-bit state]) is walked block by
// block instead: a range of the parallel region is a range of whole blocks,
// each decoded into float buffers, updated by the element loop of float32
// state (the same function, not a copy) and encoded with its new scale.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "../rules/common.h"
#include "../rules/quantization.h"
#include "../rules/rounding.h"

#if defined(__GNUC__) || defined(__clang__)
#define FASTOPT_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define FASTOPT_ALWAYS_INLINE inline
#endif

#if defined(__clang__)
#define FASTOPT_NO_ALIAS_LOOP _Pragma("clang loop vectorize(assume_safety)")
#elif defined(__GNUC__)
#define FASTOPT_NO_ALIAS_LOOP _Pragma("GCC ivdep")
#else
#define FASTOPT_NO_ALIAS_LOOP
#endif

// FASTOPT_BASELINE_ISA_ONLY (the sanitizer build of the C++ tests): the
// baseline loops only; the AVX2 / AVX-512 clones are the same source.
#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__)) && \
    !defined(FASTOPT_BASELINE_ISA_ONLY)
#define FASTOPT_X86_MULTIVERSION 1
#define FASTOPT_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c")))
#define FASTOPT_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
#else
#define FASTOPT_X86_MULTIVERSION 0
#endif

namespace fastopt::cpu {

enum class Isa { kBaseline, kAvx2, kAvx512 };

// The ISA the element loops run with: the best the CPU supports, lowered by
// the environment variable FASTOPT_CPU_CAPABILITY=baseline|avx2|avx512.
Isa active_isa();
const char* isa_name(Isa isa);

// Note [Storage of a step]
// The dtypes a step reads and writes: params (and grads) of param_t, state
// slots of state_t (the optimizer's state_dtype), and optionally
//   kMaster: a float32 master copy of each 16-bit param, which the rule
//            updates; the param receives its rounding to nearest;
//   kStochasticRounding: bfloat16 params stored with stochastic rounding
//            (Note [Stochastic rounding] in rules/rounding.h);
//   kQuantized: state_t is uint8_t, 8-bit codes with a float32 scale per
//            block (Note [8-bit state] in rules/quantization.h).
// Arithmetic is in opmath_t: float, or double for double params.
template <typename param_t, typename state_t, bool kMasterCopy, bool kStochastic>
struct Storage {
  using param_type = param_t;
  using state_type = state_t;
  using opmath_t = at::opmath_type<param_t>;
  static constexpr bool kMaster = kMasterCopy;
  static constexpr bool kStochasticRounding = kStochastic;
  static constexpr bool kQuantized = std::is_same_v<state_t, uint8_t>;
  static_assert(!kStochastic || (std::is_same_v<param_t, c10::BFloat16> && !kMasterCopy),
                "stochastic rounding is for bfloat16 params without a master copy");
  static_assert(!kQuantized || std::is_same_v<opmath_t, float>, "8-bit state is for float opmath");
};

// The storage the rule's element loop sees for 8-bit state: the same params,
// the slots as decoded float buffers.
template <class Store>
using DecodedStorage = Storage<typename Store::param_type, float, Store::kMaster, Store::kStochasticRounding>;

// One tensor's streams as raw pointers into its (dense) memory.
template <class Store, int kNumSlots>
struct TensorStreams {
  typename Store::param_type* param;
  const typename Store::param_type* grad;
  typename Store::state_type* slot[kNumSlots > 0 ? kNumSlots : 1];
  float* master;  // Store::kMaster only
  float* scale[kNumSlots > 0 ? kNumSlots : 1];  // Store::kQuantized only: block scales
  int64_t numel;
  int64_t scalars_index;  // into Task::scalars
  uint32_t index;         // within the call: part of the stochastic rounding hash
  int64_t first_element;  // the element index of param[0] in the tensor (ditto)
};

// What every element of a step shares besides the rule's scalars.
template <typename opmath_t>
struct ElementOptions {
  bool maximize = false;
  opmath_t grad_scale = 1;     // AMP: grads are divided by it
  uint32_t rounding_seed = 0;  // Store::kStochasticRounding only
};

template <class Rule, class Store>
struct Task {
  using opmath_t = typename Store::opmath_t;
  std::vector<TensorStreams<Store, Rule::kNumSlots>> tensors;
  // offsets[t] = elements (8-bit state: blocks) before tensor t; size tensors + 1
  std::vector<int64_t> offsets;
  std::vector<typename Rule::template Scalars<opmath_t>> scalars;
  ElementOptions<opmath_t> options;
};

inline c10::BFloat16 round_stochastically(float value, uint32_t seed, uint32_t tensor,
                                          int64_t index) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  if (!rounding::finite_float_bits(bits)) return c10::BFloat16(value);
  const uint32_t random = rounding::random16(seed, tensor, uint64_t(index));
  return c10::BFloat16(rounding::stochastic_bfloat16_bits(bits, random), c10::BFloat16::from_bits());
}

template <class Rule, class Store>
FASTOPT_ALWAYS_INLINE void update_elements(
    const TensorStreams<Store, Rule::kNumSlots>& t, const ElementOptions<typename Store::opmath_t>& options,
    const typename Rule::template Scalars<typename Store::opmath_t>& scalars, int64_t begin,
    int64_t end) {
  using opmath_t = typename Store::opmath_t;
  using param_t = typename Store::param_type;
  using state_t = typename Store::state_type;
  constexpr int kSlots = Rule::kNumSlots;
  // Local copies: the compiler cannot prove that stores through the tensor
  // pointers leave the caller's structs alone, and reloading the scalars each
  // iteration blocks vectorization.
  const auto s = scalars;
  const auto streams = t;
  // maximize as a sign factor, not a select: GCC does not vectorize a select
  // on a loop-invariant bool in loops that mix 16-bit loads with float math.
  const opmath_t grad_sign = options.maximize ? opmath_t(-1) : opmath_t(1);
  const opmath_t grad_scale = options.grad_scale;
  const uint32_t seed = options.rounding_seed;
  const int64_t first_element = streams.first_element;
  param_t* param = streams.param;
  const param_t* grad = streams.grad;
  float* master = streams.master;
  FASTOPT_NO_ALIAS_LOOP
  for (int64_t i = begin; i < end; ++i) {
    const opmath_t g = static_cast<opmath_t>(grad[i]) / grad_scale * grad_sign;
    opmath_t p = Store::kMaster ? static_cast<opmath_t>(master[i]) : static_cast<opmath_t>(param[i]);
    opmath_t slot[kSlots > 0 ? kSlots : 1];
    for (int k = 0; k < kSlots; ++k) slot[k] = static_cast<opmath_t>(streams.slot[k][i]);
    Rule::update(p, g, slot, s);
    if constexpr (Store::kMaster) master[i] = static_cast<float>(p);
    if constexpr (Store::kStochasticRounding) {
      param[i] = round_stochastically(static_cast<float>(p), seed, streams.index, first_element + i);
    } else {
      param[i] = static_cast<param_t>(p);
    }
    for (int k = 0; k < kSlots; ++k) streams.slot[k][i] = static_cast<state_t>(slot[k]);
  }
}

// The element loop of one (Rule, Store), compiled once per ISA and called
// through a pointer, not inlined into its callers: the walk over a task's
// elements and the walk over 8-bit blocks call the same loops, so 8-bit state
// compiles no element loop of its own (its decoded storage's loop is the one
// of float32 state with the same params).
template <class Rule, class Store>
struct ElementLoop {
  using Streams = TensorStreams<Store, Rule::kNumSlots>;
  using Options = ElementOptions<typename Store::opmath_t>;
  using Scalars = typename Rule::template Scalars<typename Store::opmath_t>;
  using Fn = void (*)(const Streams&, const Options&, const Scalars&, int64_t, int64_t);

  static void baseline(const Streams& t, const Options& options, const Scalars& scalars, int64_t begin,
                       int64_t end) {
    update_elements<Rule, Store>(t, options, scalars, begin, end);
  }
#if FASTOPT_X86_MULTIVERSION
  FASTOPT_TARGET_AVX2 static void avx2(const Streams& t, const Options& options, const Scalars& scalars,
                                       int64_t begin, int64_t end) {
    update_elements<Rule, Store>(t, options, scalars, begin, end);
  }
  FASTOPT_TARGET_AVX512 static void avx512(const Streams& t, const Options& options,
                                           const Scalars& scalars, int64_t begin, int64_t end) {
    update_elements<Rule, Store>(t, options, scalars, begin, end);
  }
#endif

  static Fn for_isa(Isa isa) {
#if FASTOPT_X86_MULTIVERSION
    switch (isa) {
      case Isa::kAvx512: return &avx512;
      case Isa::kAvx2: return &avx2;
      case Isa::kBaseline: break;
    }
#endif
    (void)isa;
    return &baseline;
  }
};

// The block loops of the 8-bit codec (rules/quantization.h), compiled once
// per ISA for every rule and storage (quantization_cpu.cpp).
struct BlockCodec {
  void (*decode)(const uint8_t* codes, float stored_scale, int64_t count, float* values);
  void (*encode)(const float* values, int64_t count, uint8_t* codes, float* stored_scale);
};
BlockCodec block_codec(Isa isa);

// One block of a tensor with 8-bit state: its slots decoded into float
// buffers, the element loop of the rule over them, and the new values
// encoded with the block's new scales (one read and one write of each code).
template <class Rule, class Store>
void update_block(const TensorStreams<Store, Rule::kNumSlots>& t, const ElementOptions<float>& options,
                  const typename Rule::template Scalars<float>& scalars, int64_t block,
                  typename ElementLoop<Rule, DecodedStorage<Store>>::Fn loop, const BlockCodec& codec) {
  constexpr int kSlots = Rule::kNumSlots > 0 ? Rule::kNumSlots : 1;
  const int64_t begin = block * quantization::kBlockElements;
  const int64_t count = std::min(quantization::kBlockElements, t.numel - begin);
  alignas(64) float values[kSlots][quantization::kBlockElements];
  TensorStreams<DecodedStorage<Store>, Rule::kNumSlots> decoded{};
  decoded.param = t.param + begin;
  decoded.grad = t.grad + begin;
  decoded.master = Store::kMaster ? t.master + begin : nullptr;
  decoded.numel = count;
  decoded.index = t.index;
  decoded.first_element = begin;
  for (int k = 0; k < Rule::kNumSlots; ++k) {
    codec.decode(t.slot[k] + begin, t.scale[k][block], count, values[k]);
    decoded.slot[k] = values[k];
  }
  loop(decoded, options, scalars, 0, count);
  for (int k = 0; k < Rule::kNumSlots; ++k) {
    codec.encode(values[k], count, t.slot[k] + begin, &t.scale[k][block]);
  }
}

// Calls fn(tensor, its scalars, first, last) for each tensor's part
// [first, last) of the units (elements; 8-bit state: blocks) [begin, end) of
// the concatenation of all tensors of the task.
template <class Rule, class Store, class Fn>
void for_each_range(const Task<Rule, Store>& task, int64_t begin, int64_t end, Fn&& fn) {
  const auto& off = task.offsets;
  size_t t = std::upper_bound(off.begin(), off.end(), begin) - off.begin() - 1;
  for (; begin < end; ++t) {
    const int64_t stop = std::min(end, off[t + 1]);
    const auto& tensor = task.tensors[t];
    fn(tensor, task.scalars[tensor.scalars_index], begin - off[t], stop - off[t]);
    begin = stop;
  }
}

// Runs the task: one parallel region over all elements (blocks) of all tensors.
template <class Rule, class Store>
void run(const Task<Rule, Store>& task) {
  const int64_t total = task.offsets.back();
  if (total == 0) return;
  const Isa isa = active_isa();
  if constexpr (Store::kQuantized) {
    const auto loop = ElementLoop<Rule, DecodedStorage<Store>>::for_isa(isa);
    const BlockCodec codec = block_codec(isa);
    const int64_t grain = kCpuMinElementsPerThread / quantization::kBlockElements;
    at::parallel_for(0, total, grain, [&](int64_t begin, int64_t end) {
      for_each_range(task, begin, end, [&](const auto& tensor, const auto& scalars, int64_t first, int64_t last) {
        for (int64_t block = first; block < last; ++block) {
          update_block<Rule, Store>(tensor, task.options, scalars, block, loop, codec);
        }
      });
    });
  } else {
    const auto loop = ElementLoop<Rule, Store>::for_isa(isa);
    at::parallel_for(0, total, kCpuMinElementsPerThread, [&](int64_t begin, int64_t end) {
      for_each_range(task, begin, end, [&](const auto& tensor, const auto& scalars, int64_t first, int64_t last) {
        loop(tensor, task.options, scalars, first, last);
      });
    });
  }
}

}  // namespace fastopt::cpu
