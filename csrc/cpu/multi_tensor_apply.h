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
// A rule with a reduction phase (Note [Reduction phase] in rules/reduction.h)
// gets a parallel region over fixed chunks of its tensors first, whose sums
// finish each tensor's scalars.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "../rules/common.h"
#include "../rules/quantization.h"
#include "../rules/reduction.h"
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
  // Each tensor's sums after the reduction phase (empty before it).
  std::vector<std::array<double, rules::num_sums<Rule>()>> sums;
};

inline c10::BFloat16 round_stochastically(float value, uint32_t seed, uint32_t tensor,
                                          int64_t index) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  if (!rounding::finite_float_bits(bits)) return c10::BFloat16(value);
  const uint32_t random = rounding::random16(seed, tensor, uint64_t(index));
  return c10::BFloat16(rounding::stochastic_bfloat16_bits(bits, random), c10::BFloat16::from_bits());
}

// Element i of a tensor's streams as the rule sees it (opmath): the param
// (or its master copy), the grad unscaled and signed, the slots.
template <class Store, int kSlots>
FASTOPT_ALWAYS_INLINE void load_element(const TensorStreams<Store, kSlots>& streams, int64_t i,
                                        typename Store::opmath_t grad_scale,
                                        typename Store::opmath_t grad_sign, typename Store::opmath_t& p,
                                        typename Store::opmath_t& g, typename Store::opmath_t* slot) {
  using opmath_t = typename Store::opmath_t;
  g = static_cast<opmath_t>(streams.grad[i]) / grad_scale * grad_sign;
  p = Store::kMaster ? static_cast<opmath_t>(streams.master[i]) : static_cast<opmath_t>(streams.param[i]);
  for (int k = 0; k < kSlots; ++k) slot[k] = static_cast<opmath_t>(streams.slot[k][i]);
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
  float* master = streams.master;
  FASTOPT_NO_ALIAS_LOOP
  for (int64_t i = begin; i < end; ++i) {
    opmath_t p, g, slot[kSlots > 0 ? kSlots : 1];
    load_element(streams, i, grad_scale, grad_sign, p, g, slot);
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

// The lane accumulators of one chunk of the reduction phase: lanes[r][l]
// sums the terms r of the chunk's elements in lane l (Note [Reduction phase]).
using SumLanes = double (*)[rules::kSumLanes];

// The reduction phase over elements [begin, end): each element's terms
// added to the lane of its position in the tensor (first_element + i).
// Reads the streams, writes only the lanes.
template <class Rule, class Store>
FASTOPT_ALWAYS_INLINE void reduce_elements(
    const TensorStreams<Store, Rule::kNumSlots>& t, const ElementOptions<typename Store::opmath_t>& options,
    const typename Rule::template Scalars<typename Store::opmath_t>& scalars, int64_t begin, int64_t end,
    SumLanes lanes) {
  using opmath_t = typename Store::opmath_t;
  constexpr int kSlots = Rule::kNumSlots;
  constexpr int kSums = rules::num_sums<Rule>();
  const auto s = scalars;
  const auto streams = t;
  const opmath_t grad_sign = options.maximize ? opmath_t(-1) : opmath_t(1);
  const opmath_t grad_scale = options.grad_scale;
  // Spans of consecutive lanes, so that the inner loop vectorizes.
  for (int64_t span = begin; span < end;) {
    const int64_t lane = (streams.first_element + span) % rules::kSumLanes;
    const int64_t stop = std::min(end, span + (rules::kSumLanes - lane));
    const int64_t lane_of_first = lane - span;
    FASTOPT_NO_ALIAS_LOOP
    for (int64_t i = span; i < stop; ++i) {
      opmath_t p, g, slot[kSlots > 0 ? kSlots : 1];
      double terms[kSums];
      load_element(streams, i, grad_scale, grad_sign, p, g, slot);
      Rule::reduce(p, g, slot, s, terms);
      for (int r = 0; r < kSums; ++r) lanes[r][lane_of_first + i] += terms[r];
    }
    span = stop;
  }
}

// Body::run compiled once per ISA and called through a pointer, not inlined
// into its callers: the walk over a task's elements and the walk over 8-bit
// blocks call the same loops, so 8-bit state compiles no element loop of its
// own (its decoded storage's loop is the one of float32 state with the same
// params).
template <class Body, class... Args>
struct IsaClones {
  using Fn = void (*)(Args...);

  static void baseline(Args... args) { Body::run(args...); }
#if FASTOPT_X86_MULTIVERSION
  FASTOPT_TARGET_AVX2 static void avx2(Args... args) { Body::run(args...); }
  FASTOPT_TARGET_AVX512 static void avx512(Args... args) { Body::run(args...); }
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

template <class Rule, class Store>
struct UpdateBody {
  static FASTOPT_ALWAYS_INLINE void run(const TensorStreams<Store, Rule::kNumSlots>& t,
                                        const ElementOptions<typename Store::opmath_t>& options,
                                        const typename Rule::template Scalars<typename Store::opmath_t>& scalars,
                                        int64_t begin, int64_t end) {
    update_elements<Rule, Store>(t, options, scalars, begin, end);
  }
};

template <class Rule, class Store>
struct ReduceBody {
  static FASTOPT_ALWAYS_INLINE void run(const TensorStreams<Store, Rule::kNumSlots>& t,
                                        const ElementOptions<typename Store::opmath_t>& options,
                                        const typename Rule::template Scalars<typename Store::opmath_t>& scalars,
                                        int64_t begin, int64_t end, SumLanes lanes) {
    reduce_elements<Rule, Store>(t, options, scalars, begin, end, lanes);
  }
};

// The element loop of one (Rule, Store), per ISA.
template <class Rule, class Store>
using ElementLoop =
    IsaClones<UpdateBody<Rule, Store>, const TensorStreams<Store, Rule::kNumSlots>&,
              const ElementOptions<typename Store::opmath_t>&,
              const typename Rule::template Scalars<typename Store::opmath_t>&, int64_t, int64_t>;

// The reduction loop of one (Rule, Store), per ISA.
template <class Rule, class Store>
using ReduceLoop =
    IsaClones<ReduceBody<Rule, Store>, const TensorStreams<Store, Rule::kNumSlots>&,
              const ElementOptions<typename Store::opmath_t>&,
              const typename Rule::template Scalars<typename Store::opmath_t>&, int64_t, int64_t,
              SumLanes>;

// The block loops of the 8-bit codec (rules/quantization.h), compiled once
// per ISA for every rule and storage (quantization_cpu.cpp).
struct BlockCodec {
  void (*decode)(const uint8_t* codes, float stored_scale, int64_t count, float* values);
  void (*encode)(const float* values, int64_t count, uint8_t* codes, float* stored_scale);
};
BlockCodec block_codec(Isa isa);

// One block of a tensor with 8-bit state as the element loop of its decoded
// storage sees it: the same params and grads, the slots decoded into
// `values` (one read of each code).
template <class Rule, class Store>
TensorStreams<DecodedStorage<Store>, Rule::kNumSlots> decoded_block(
    const TensorStreams<Store, Rule::kNumSlots>& t, int64_t block, const BlockCodec& codec,
    float (*values)[quantization::kBlockElements]) {
  const int64_t begin = block * quantization::kBlockElements;
  const int64_t count = std::min(quantization::kBlockElements, t.numel - begin);
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
  return decoded;
}

// One block of a tensor with 8-bit state: decoded, updated by the element
// loop of the rule, and its new values encoded with the block's new scales
// (one write of each code).
template <class Rule, class Store>
void update_block(const TensorStreams<Store, Rule::kNumSlots>& t, const ElementOptions<float>& options,
                  const typename Rule::template Scalars<float>& scalars, int64_t block,
                  typename ElementLoop<Rule, DecodedStorage<Store>>::Fn loop, const BlockCodec& codec) {
  alignas(64) float values[Rule::kNumSlots > 0 ? Rule::kNumSlots : 1][quantization::kBlockElements];
  const auto decoded = decoded_block<Rule, Store>(t, block, codec, values);
  loop(decoded, options, scalars, 0, decoded.numel);
  for (int k = 0; k < Rule::kNumSlots; ++k) {
    codec.encode(values[k], decoded.numel, t.slot[k] + decoded.first_element, &t.scale[k][block]);
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

// The sums of elements [begin, end) of one tensor, a chunk of the reduction
// phase (Note [Reduction phase]): its lanes, then the lanes in order.
template <class Rule, class Store>
std::array<double, rules::num_sums<Rule>()> sum_chunk(const TensorStreams<Store, Rule::kNumSlots>& t,
                                                       const ElementOptions<typename Store::opmath_t>& options,
                                                       const typename Rule::template Scalars<typename Store::opmath_t>& scalars,
                                                       int64_t begin, int64_t end, Isa isa) {
  constexpr int kSums = rules::num_sums<Rule>();
  alignas(64) double lanes[kSums][rules::kSumLanes];
  const int used = rules::used_sum_lanes(end - begin);
  for (int r = 0; r < kSums; ++r) std::fill(lanes[r], lanes[r] + used, 0.0);
  if constexpr (Store::kQuantized) {
    const auto loop = ReduceLoop<Rule, DecodedStorage<Store>>::for_isa(isa);
    const BlockCodec codec = block_codec(isa);
    alignas(64) float values[Rule::kNumSlots][quantization::kBlockElements];
    for (int64_t block = begin / quantization::kBlockElements; block < quantization::num_blocks(end); ++block) {
      const auto decoded = decoded_block<Rule, Store>(t, block, codec, values);
      loop(decoded, options, scalars, 0, decoded.numel, lanes);
    }
  } else {
    ReduceLoop<Rule, Store>::for_isa(isa)(t, options, scalars, begin, end, lanes);
  }
  std::array<double, kSums> sums{};
  for (int r = 0; r < kSums; ++r) {
    for (int l = 0; l < used; ++l) sums[r] += lanes[r][l];
  }
  return sums;
}

// The reduction phase of a task (Note [Reduction phase]): every tensor's
// sums, one parallel region over all chunks of all tensors, and its scalars
// finished with them (one set of scalars per tensor from then on).
template <class Rule, class Store>
void reduce(Task<Rule, Store>& task, Isa isa) {
  using Sums = std::array<double, rules::num_sums<Rule>()>;
  const size_t n = task.tensors.size();
  // first_chunk[t]: chunks before tensor t.
  std::vector<int64_t> first_chunk(n + 1, 0);
  for (size_t t = 0; t < n; ++t) first_chunk[t + 1] = first_chunk[t] + rules::num_sum_chunks(task.tensors[t].numel);
  std::vector<Sums> chunk_sums(first_chunk[n]);
  at::parallel_for(0, first_chunk[n], 1, [&](int64_t chunk_begin, int64_t chunk_end) {
    for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
      const size_t t = std::upper_bound(first_chunk.begin(), first_chunk.end(), chunk) - first_chunk.begin() - 1;
      const auto& tensor = task.tensors[t];
      const int64_t begin = (chunk - first_chunk[t]) * rules::kSumChunkElements;
      const int64_t end = std::min(tensor.numel, begin + rules::kSumChunkElements);
      const auto& scalars = task.scalars[tensor.scalars_index];
      if (rules::reduces<Rule>(scalars)) {
        chunk_sums[chunk] = sum_chunk<Rule, Store>(tensor, task.options, scalars, begin, end, isa);
      }
    }
  });
  std::vector<typename Rule::template Scalars<typename Store::opmath_t>> scalars(n);
  task.sums.assign(n, Sums{});
  for (size_t t = 0; t < n; ++t) {
    Sums& sums = task.sums[t];
    for (int64_t chunk = first_chunk[t]; chunk < first_chunk[t + 1]; ++chunk) {
      for (size_t r = 0; r < sums.size(); ++r) sums[r] += chunk_sums[chunk][r];
    }
    auto& tensor = task.tensors[t];
    scalars[t] = task.scalars[tensor.scalars_index];
    Rule::finish(scalars[t], sums.data());
    tensor.scalars_index = int64_t(t);
  }
  task.scalars = std::move(scalars);
}

// Runs the task: its reduction phase if the rule has one, then one parallel
// region over all elements (blocks) of all tensors.
template <class Rule, class Store>
void run(Task<Rule, Store>& task) {
  const int64_t total = task.offsets.back();
  if (total == 0) return;
  const Isa isa = active_isa();
  if constexpr (rules::num_sums<Rule>() > 0) reduce(task, isa);
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
