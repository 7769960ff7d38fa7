// The CUDA driver: walks every element of a list of tensors with one update
// rule (csrc/rules/*.h), many tensors per kernel launch.
//
// Note [CUDA driver layout]
// The params of a step are packed into launches of up to kMaxTensorsPerLaunch
// tensors.  A launch's kernel arguments hold every tensor's pointers and the
// index of its first chunk of kChunkElements elements; block b updates chunk
// b, finding its tensor by binary search over those indices, so one launch
// covers tensors of any mix of sizes and element indices are 64-bit.  CUDA
// 12.1+ allows 32 KB of kernel arguments (the __grid_constant__ struct is
// read in place), older versions 4 KB, hence two launch sizes.  A block
// derives its tensor's per-step scalars itself from the tensor's scalar
// states on the device (step count, ...; Rule::advance gives their new
// values) and lr, so a step reads no device value on the host: it can be
// captured in a CUDA graph.  The new scalar states are written by a separate
// small kernel after the update kernel of the same launch, so every block
// reads the values from before the step.  Streams are read and written 16 bytes at a time when
// every pointer of a tensor is 16-byte aligned, one element at a time
// otherwise; arithmetic is in float for 16-bit dtypes (double for double).
// Storage (params, state, master copies, stochastic rounding) is that of
// Note [Storage of a step] in csrc/cpu/multi_tensor_apply.h.  With 8-bit
// state (Note [8-bit state] in rules/quantization.h) each thread walks whole
// blocks of 256 elements, so a block's scale needs no communication between
// threads (and the kernel runs unchanged in the emulation): its slots decoded
// into local buffers, the rule, and the codes encoded with the new scale.
// This file includes no torch header (see step_launch.h).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "../rules/quantization.h"
#include "../rules/reduction.h"
#include "../rules/rounding.h"
#include "step_launch.h"

namespace fastopt::cuda {

// Elements per block: large enough that a block's fixed cost (finding its
// tensor, deriving the scalars) is amortized over 64K elements, small enough
// that a 1M-element tensor still spreads over 16 SMs.  The chunks of the
// reduction phase too (Note [Reduction phase]), whose sums depend on it.
constexpr int64_t kChunkElements = rules::kSumChunkElements;
constexpr int kBlockThreads = 512;  // 16 warps: enough loads in flight per SM
constexpr int kVectorBytes = 16;    // the widest load a thread issues

#if CUDART_VERSION >= 12010
constexpr int kMaxKernelArgBytes = 32764;
#else
constexpr int kMaxKernelArgBytes = 4096;
#endif

// Per-tensor argument bytes (pointers, size, flags, chunk index): 108 with
// eight slots and scalar states together (SWATS: 2 + 6; Adam amsgrad: 3 + 1);
// launch_group's static_assert checks every rule fits.
constexpr int kBytesPerTensor = 108;
// Leaves room for the hyperparameters and flags of the largest rule.
constexpr int kMaxTensorsPerLaunch = (kMaxKernelArgBytes - 256) / kBytesPerTensor;
// With 8-bit state a tensor also passes its slots' scale pointers.
constexpr int kMaxQuantizedTensorsPerLaunch =
    (kMaxKernelArgBytes - 256) / (kBytesPerTensor + kMaxSlots * int(sizeof(float*)));

template <typename scalar_t> struct OpMath { using type = float; };
template <> struct OpMath<double> { using type = double; };

// Conversions between storage and opmath, 16-bit types through float (as
// c10::Half / c10::BFloat16 convert on the CPU).  Spelled out because
// torch's extension builds define __CUDA_NO_HALF_CONVERSIONS__ and
// __CUDA_NO_BFLOAT16_CONVERSIONS__, which remove the implicit conversions.
template <typename T>
constexpr bool kIsHalf = std::is_same_v<T, __half>;
template <typename T>
constexpr bool kIsBFloat16 = std::is_same_v<T, __nv_bfloat16>;

template <typename opmath_t, typename scalar_t>
__device__ __forceinline__ opmath_t load_as(scalar_t value) {
  if constexpr (kIsHalf<scalar_t>) {
    return opmath_t(__half2float(value));
  } else if constexpr (kIsBFloat16<scalar_t>) {
    return opmath_t(__bfloat162float(value));
  } else {
    return opmath_t(value);
  }
}

// Round to nearest even, as torch's Half and BFloat16 conversions do.
template <typename scalar_t, typename opmath_t>
__device__ __forceinline__ scalar_t store_as(opmath_t value) {
  if constexpr (kIsHalf<scalar_t>) {
    return __float2half_rn(float(value));
  } else if constexpr (kIsBFloat16<scalar_t>) {
    return __float2bfloat16_rn(float(value));
  } else {
    return scalar_t(value);
  }
}

template <typename param_t, typename state_t, bool kMasterCopy, bool kStochastic>
struct Storage {
  using param_type = param_t;
  using state_type = state_t;
  using opmath_t = typename OpMath<param_t>::type;
  static constexpr bool kMaster = kMasterCopy;
  static constexpr bool kStochasticRounding = kStochastic;
  static constexpr bool kQuantized = std::is_same_v<state_t, uint8_t>;
  static constexpr int kMaxTensors = kQuantized ? kMaxQuantizedTensorsPerLaunch : kMaxTensorsPerLaunch;
};

// The block scales of a tensor's 8-bit slots, a base of LaunchArgs::Tensor
// (empty for other storages, so their arguments stay as small).
template <bool kQuantized, int kSlots>
struct SlotScales {
  float* scale[kSlots];
};
template <int kSlots>
struct SlotScales<false, kSlots> {};

template <class Rule, class Store>
struct LaunchArgs {
  static constexpr int kSlots = Rule::kNumSlots > 0 ? Rule::kNumSlots : 1;
  static constexpr int kStates = Rule::kNumScalarStates > 0 ? Rule::kNumScalarStates : 1;
  static constexpr int kMaxTensors = Store::kMaxTensors;
  struct Tensor : SlotScales<Store::kQuantized, kSlots> {
    typename Store::param_type* param;
    const typename Store::param_type* grad;
    typename Store::state_type* slot[kSlots];
    float* master;
    const float* scalar_state[kStates];
    int64_t numel;
    uint32_t index;  // within the call: part of the stochastic rounding hash
    bool aligned;    // every stream aligned for vector loads and stores
  };
  Tensor tensors[kMaxTensors];
  int32_t first_chunk[kMaxTensors];  // chunks before tensor t in this launch
  int num_tensors;
  typename Rule::Hyper hyper;
  const double* lr;
  const double* grad_scale;
  const float* found_inf;
  bool maximize;
  uint32_t rounding_seed;
  // The reduction phase's memory (Note [Reduction phase]), rules with one
  // only: each chunk's lane sums, each chunk's sums, each tensor's sums.
  double* lane_sums;
  double* chunk_sums;
  double* sums;
  int32_t num_chunks;
};

// The scalar states of a launch's tensors, advanced one tensor per thread
// after its update kernel (Note [CUDA driver layout]).
template <class Rule>
struct ScalarStateArgs {
  float* states[kMaxTensorsPerLaunch][Rule::kNumScalarStates];
  int num_tensors;
  typename Rule::Hyper hyper;
  const double* lr;
  const float* found_inf;
  // A rule that stores its sums (rules::first_sum_state): each tensor's, or
  // null where the launch had no elements (its sums are 0).
  const double* sums;
};

// The tensor's scalar states before this step and after it.
template <class Rule>
__device__ __forceinline__ void advance_scalar_states(const typename Rule::Hyper& hyper,
                                                      const float* const* states, double* before,
                                                      double* after) {
#pragma unroll
  for (int c = 0; c < Rule::kNumScalarStates; ++c) before[c] = double(*states[c]);
  Rule::advance(hyper, before, after);
}

template <class Rule>
__global__ void advance_scalar_states_kernel(const ScalarStateArgs<Rule> __grid_constant__ args) {
  if (args.found_inf != nullptr && *args.found_inf != 0.f) return;
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= args.num_tensors) return;
  typename Rule::Hyper hyper = args.hyper;
  if (args.lr != nullptr) hyper.lr = *args.lr;
  double before[Rule::kNumScalarStates], after[Rule::kNumScalarStates];
  advance_scalar_states<Rule>(hyper, args.states[i], before, after);
  if constexpr (rules::first_sum_state<Rule>() >= 0) {
    for (int r = 0; r < rules::num_sums<Rule>(); ++r) {
      after[rules::first_sum_state<Rule>() + r] = args.sums != nullptr ? args.sums[i * rules::num_sums<Rule>() + r] : 0.0;
    }
  }
#pragma unroll
  for (int c = 0; c < Rule::kNumScalarStates; ++c) *args.states[i][c] = float(after[c]);
}

__device__ __forceinline__ __nv_bfloat16 round_stochastically(float value, uint32_t seed,
                                                               uint32_t tensor, int64_t index) {
  const uint32_t bits = __float_as_uint(value);
  if (!rounding::finite_float_bits(bits)) return __float2bfloat16_rn(value);
  __nv_bfloat16_raw raw;
  raw.x = rounding::stochastic_bfloat16_bits(bits, rounding::random16(seed, tensor, uint64_t(index)));
  return __nv_bfloat16(raw);
}

// Elements per thread and iteration of the vector path: 16 bytes of params.
template <class Store>
constexpr int kVectorWidth = kVectorBytes / int(sizeof(typename Store::param_type));

// The rule applied to one element: its param (or master copy) and grad as
// stored, its slots in opmath; the param stored back as the storage says.
template <class Rule, class Store>
__device__ __forceinline__ void update_element(
    typename Store::param_type& param, typename Store::param_type grad, float& master,
    typename Store::opmath_t* slot, const typename Rule::template Scalars<typename Store::opmath_t>& scalars,
    typename Store::opmath_t grad_scale, typename Store::opmath_t grad_sign, uint32_t rounding_seed,
    uint32_t tensor, int64_t index) {
  using opmath_t = typename Store::opmath_t;
  using param_t = typename Store::param_type;
  opmath_t p = Store::kMaster ? opmath_t(master) : load_as<opmath_t>(param);
  const opmath_t g = load_as<opmath_t>(grad) / grad_scale * grad_sign;
  Rule::update(p, g, slot, scalars);
  if constexpr (Store::kMaster) master = float(p);
  if constexpr (Store::kStochasticRounding) {
    param = round_stochastically(float(p), rounding_seed, tensor, index);
  } else {
    param = store_as<param_t>(p);
  }
}

// The rule applied to elements [begin, end) of one tensor, kWidth elements
// per thread and iteration (kWidth = 1: any alignment).
template <class Rule, class Store, int kWidth>
__device__ __forceinline__ void update_elements(
    const typename LaunchArgs<Rule, Store>::Tensor& t, const LaunchArgs<Rule, Store>& args,
    const typename Rule::template Scalars<typename Store::opmath_t>& scalars,
    typename Store::opmath_t grad_scale, typename Store::opmath_t grad_sign, int64_t begin,
    int64_t end) {
  using opmath_t = typename Store::opmath_t;
  using param_t = typename Store::param_type;
  using state_t = typename Store::state_type;
  constexpr int kSlots = Rule::kNumSlots;
  struct alignas(sizeof(param_t) * kWidth) ParamPack { param_t v[kWidth]; };
  struct alignas(sizeof(state_t) * kWidth) StatePack { state_t v[kWidth]; };
  struct alignas(sizeof(float) * kWidth) MasterPack { float v[kWidth]; };
  for (int64_t i = begin + int64_t(threadIdx.x) * kWidth; i < end; i += int64_t(blockDim.x) * kWidth) {
    ParamPack param = *reinterpret_cast<const ParamPack*>(t.param + i);
    const ParamPack grad = *reinterpret_cast<const ParamPack*>(t.grad + i);
    MasterPack master;
    if constexpr (Store::kMaster) master = *reinterpret_cast<const MasterPack*>(t.master + i);
    StatePack slot[kSlots > 0 ? kSlots : 1];
#pragma unroll
    for (int k = 0; k < kSlots; ++k) slot[k] = *reinterpret_cast<const StatePack*>(t.slot[k] + i);
#pragma unroll
    for (int e = 0; e < kWidth; ++e) {
      opmath_t s[kSlots > 0 ? kSlots : 1];
#pragma unroll
      for (int k = 0; k < kSlots; ++k) s[k] = load_as<opmath_t>(slot[k].v[e]);
      update_element<Rule, Store>(param.v[e], grad.v[e], master.v[e], s, scalars, grad_scale, grad_sign,
                                  args.rounding_seed, t.index, i + e);
#pragma unroll
      for (int k = 0; k < kSlots; ++k) slot[k].v[e] = store_as<state_t>(s[k]);
    }
    *reinterpret_cast<ParamPack*>(t.param + i) = param;
    if constexpr (Store::kMaster) *reinterpret_cast<MasterPack*>(t.master + i) = master;
#pragma unroll
    for (int k = 0; k < kSlots; ++k) *reinterpret_cast<StatePack*>(t.slot[k] + i) = slot[k];
  }
}

// One block of 8-bit state, walked by one thread (Note [CUDA driver layout]):
// the slots decoded into local buffers, the rule, the codes encoded anew.
template <class Rule, class Store>
__device__ __forceinline__ void update_block(
    const typename LaunchArgs<Rule, Store>::Tensor& t, const LaunchArgs<Rule, Store>& args,
    const typename Rule::template Scalars<float>& scalars, float grad_scale, float grad_sign,
    int64_t block) {
  constexpr int kSlots = LaunchArgs<Rule, Store>::kSlots;
  constexpr int64_t kBlock = quantization::kBlockElements;
  const int64_t begin = block * kBlock;
  const int64_t count = t.numel - begin < kBlock ? t.numel - begin : kBlock;
  float values[kSlots][kBlock];
  for (int k = 0; k < Rule::kNumSlots; ++k) {
    quantization::decode_block(t.slot[k] + begin, t.scale[k][block], count, values[k]);
  }
  float unused_master = 0.0f;
  for (int64_t i = 0; i < count; ++i) {
    float s[kSlots];
#pragma unroll
    for (int k = 0; k < Rule::kNumSlots; ++k) s[k] = values[k][i];
    update_element<Rule, Store>(t.param[begin + i], t.grad[begin + i],
                                Store::kMaster ? t.master[begin + i] : unused_master, s, scalars,
                                grad_scale, grad_sign, args.rounding_seed, t.index, begin + i);
#pragma unroll
    for (int k = 0; k < Rule::kNumSlots; ++k) values[k][i] = s[k];
  }
  for (int k = 0; k < Rule::kNumSlots; ++k) {
    quantization::encode_block(values[k], count, t.slot[k] + begin, &t.scale[k][block]);
  }
}

// The tensor of a chunk of the launch: the last one starting at or before
// it (empty tensors start where the next one does and are never chosen).
template <class Rule, class Store>
__device__ __forceinline__ int tensor_of_chunk(const LaunchArgs<Rule, Store>& args, int chunk) {
  int lo = 0, hi = args.num_tensors - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (args.first_chunk[mid] <= chunk) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

// Tensor `tensor`'s per-step scalars, from its scalar states and lr on the
// device (Note [CUDA driver layout]).
template <class Rule, class Store>
__device__ __forceinline__ typename Rule::template Scalars<typename Store::opmath_t> tensor_scalars(
    const LaunchArgs<Rule, Store>& args, int tensor) {
  typename Rule::Hyper hyper = args.hyper;
  if (args.lr != nullptr) hyper.lr = *args.lr;
  double before[LaunchArgs<Rule, Store>::kStates], after[LaunchArgs<Rule, Store>::kStates];
  advance_scalar_states<Rule>(hyper, args.tensors[tensor].scalar_state, before, after);
  return Rule::template scalars<typename Store::opmath_t>(hyper, before, after);
}

// The reduction phase, one block per chunk and one thread per lane (Note
// [Reduction phase]): each thread adds the terms of its lane's elements in
// order and writes its lane's sums.  Reads the streams only.
template <class Rule, class Store>
__global__ void __launch_bounds__(rules::kSumLanes)
    reduce_kernel(const LaunchArgs<Rule, Store> __grid_constant__ args) {
  using opmath_t = typename Store::opmath_t;
  constexpr int kSums = rules::num_sums<Rule>();
  constexpr int kSlots = LaunchArgs<Rule, Store>::kSlots;
  if (args.found_inf != nullptr && *args.found_inf != 0.f) return;
  const int chunk = blockIdx.x;
  const int tensor = tensor_of_chunk(args, chunk);
  const auto& t = args.tensors[tensor];
  const auto scalars = tensor_scalars(args, tensor);
  const opmath_t grad_scale = args.grad_scale != nullptr ? opmath_t(*args.grad_scale) : opmath_t(1);
  const opmath_t grad_sign = args.maximize ? opmath_t(-1) : opmath_t(1);
  const int64_t begin = int64_t(chunk - args.first_chunk[tensor]) * kChunkElements;
  const int64_t end = begin + kChunkElements < t.numel ? begin + kChunkElements : t.numel;
  double lane[kSums];
#pragma unroll
  for (int r = 0; r < kSums; ++r) lane[r] = 0.0;
  const int64_t reduced_end = rules::reduces<Rule>(scalars) ? end : begin;
  for (int64_t i = begin + threadIdx.x; i < reduced_end; i += rules::kSumLanes) {
    const opmath_t p = Store::kMaster ? opmath_t(t.master[i]) : load_as<opmath_t>(t.param[i]);
    const opmath_t g = load_as<opmath_t>(t.grad[i]) / grad_scale * grad_sign;
    opmath_t slot[kSlots];
#pragma unroll
    for (int k = 0; k < Rule::kNumSlots; ++k) {
      if constexpr (Store::kQuantized) {
        slot[k] = quantization::decode_value(t.slot[k][i], t.scale[k][i / quantization::kBlockElements]);
      } else {
        slot[k] = load_as<opmath_t>(t.slot[k][i]);
      }
    }
    double terms[kSums];
    Rule::reduce(p, g, slot, scalars, terms);
#pragma unroll
    for (int r = 0; r < kSums; ++r) lane[r] += terms[r];
  }
#pragma unroll
  for (int r = 0; r < kSums; ++r) args.lane_sums[(int64_t(chunk) * rules::kSumLanes + threadIdx.x) * kSums + r] = lane[r];
}

// Each chunk's sums: its lane sums in lane order, one thread per chunk.
template <class Rule, class Store>
__global__ void sum_lanes_kernel(const LaunchArgs<Rule, Store> __grid_constant__ args) {
  constexpr int kSums = rules::num_sums<Rule>();
  if (args.found_inf != nullptr && *args.found_inf != 0.f) return;
  const int64_t chunk = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (chunk >= args.num_chunks) return;
  for (int r = 0; r < kSums; ++r) {
    double sum = 0.0;
    for (int lane = 0; lane < rules::kSumLanes; ++lane) {
      sum += args.lane_sums[(chunk * rules::kSumLanes + lane) * kSums + r];
    }
    args.chunk_sums[chunk * kSums + r] = sum;
  }
}

// Each tensor's sums: its chunks' sums in chunk order, one thread per tensor.
template <class Rule, class Store>
__global__ void sum_chunks_kernel(const LaunchArgs<Rule, Store> __grid_constant__ args) {
  constexpr int kSums = rules::num_sums<Rule>();
  if (args.found_inf != nullptr && *args.found_inf != 0.f) return;
  const int tensor = int(blockIdx.x * blockDim.x + threadIdx.x);
  if (tensor >= args.num_tensors) return;
  const int end = tensor + 1 < args.num_tensors ? args.first_chunk[tensor + 1] : args.num_chunks;
  for (int r = 0; r < kSums; ++r) {
    double sum = 0.0;
    for (int chunk = args.first_chunk[tensor]; chunk < end; ++chunk) sum += args.chunk_sums[chunk * kSums + r];
    args.sums[tensor * kSums + r] = sum;
  }
}

template <class Rule, class Store>
__global__ void __launch_bounds__(kBlockThreads)
    update_kernel(const LaunchArgs<Rule, Store> __grid_constant__ args) {
  using opmath_t = typename Store::opmath_t;
  if (args.found_inf != nullptr && *args.found_inf != 0.f) return;
  const int chunk = blockIdx.x;
  const int lo = tensor_of_chunk(args, chunk);
  const auto& t = args.tensors[lo];
  auto scalars = tensor_scalars(args, lo);
  if constexpr (rules::num_sums<Rule>() > 0) Rule::finish(scalars, args.sums + lo * rules::num_sums<Rule>());
  const opmath_t grad_scale = args.grad_scale != nullptr ? opmath_t(*args.grad_scale) : opmath_t(1);
  const opmath_t grad_sign = args.maximize ? opmath_t(-1) : opmath_t(1);
  const int64_t begin = int64_t(chunk - args.first_chunk[lo]) * kChunkElements;
  const int64_t end = begin + kChunkElements < t.numel ? begin + kChunkElements : t.numel;
  if constexpr (Store::kQuantized) {
    // Chunks are whole blocks (kChunkElements is a multiple of kBlockElements).
    const int64_t end_block = quantization::num_blocks(end);
    for (int64_t block = begin / quantization::kBlockElements + threadIdx.x; block < end_block;
         block += blockDim.x) {
      update_block<Rule, Store>(t, args, scalars, grad_scale, grad_sign, block);
    }
    return;
  }
  constexpr int kWidth = kVectorWidth<Store>;
  if (t.aligned) {
    // Chunks start at multiples of kWidth, so only the tensor's last chunk
    // can end with a partial vector.
    const int64_t vector_end = begin + (end - begin) / kWidth * kWidth;
    update_elements<Rule, Store, kWidth>(t, args, scalars, grad_scale, grad_sign, begin, vector_end);
    update_elements<Rule, Store, 1>(t, args, scalars, grad_scale, grad_sign, vector_end, end);
  } else {
    update_elements<Rule, Store, 1>(t, args, scalars, grad_scale, grad_sign, begin, end);
  }
}

// Note [One launch point]
// Every kernel of the driver is launched here, through the runtime's
// cudaLaunchKernel rather than <<<...>>>: that is plain C++, so this file and
// the kernels compile unchanged as host code against the emulated runtime of
// csrc/tests/cuda_emulation/, which runs every block and thread of the grid
// on the CPU (Note [CUDA emulation]).  Each kernel takes one argument struct,
// declared `const Args __grid_constant__ args` (read in place, not copied per
// thread; the emulation spells __grid_constant__ as a const reference, so its
// Param is `const Args&` where nvcc's is `Args`).
template <class Param>
void launch_kernel(void (*kernel)(Param), unsigned blocks, unsigned threads, cudaStream_t stream,
                   const std::remove_cv_t<std::remove_reference_t<Param>>& args, const char* what) {
  using Args = std::remove_cv_t<std::remove_reference_t<Param>>;
  void* kernel_args[] = {const_cast<Args*>(&args)};
  cudaError_t error = cudaLaunchKernel(kernel, dim3(blocks), dim3(threads), kernel_args, 0, stream);
  if (error == cudaSuccess) error = cudaGetLastError();
  if (error != cudaSuccess) {
    throw std::runtime_error(std::string("fastopt: CUDA launch of ") + what +
                             " failed: " + cudaGetErrorString(error));
  }
}

// Whether `pointer` can be read kWidth elements of T at a time.
template <typename T, int kWidth>
bool aligned(const void* pointer) {
  return reinterpret_cast<uintptr_t>(pointer) % (sizeof(T) * kWidth) == 0;
}

template <class Rule, class Store>
void launch_group(const StepLaunch& launch, const typename Rule::Hyper& hyper, int64_t begin,
                  int64_t end) {
  using param_t = typename Store::param_type;
  using state_t = typename Store::state_type;
  constexpr int kWidth = kVectorWidth<Store>;
  static_assert(sizeof(LaunchArgs<Rule, Store>) <= kMaxKernelArgBytes,
                "kernel arguments exceed the parameter space");
  cudaStream_t stream = launch.stream;
  LaunchArgs<Rule, Store> args{};
  args.hyper = hyper;
  args.rounding_seed = launch.rounding_seed;
  args.lr = launch.lr;
  args.grad_scale = launch.grad_scale;
  args.found_inf = launch.found_inf;
  args.maximize = launch.maximize;
  int64_t chunks = 0;
  for (int64_t i = begin; i < end; ++i) {
    const TensorPointers& in = launch.tensors[i];
    auto& t = args.tensors[args.num_tensors];
    t.param = static_cast<param_t*>(in.param);
    t.grad = static_cast<const param_t*>(in.grad);
    t.aligned = aligned<param_t, kWidth>(in.param) && aligned<param_t, kWidth>(in.grad);
    for (int k = 0; k < Rule::kNumSlots; ++k) {
      t.slot[k] = static_cast<state_t*>(in.slot[k]);
      t.aligned = t.aligned && aligned<state_t, kWidth>(in.slot[k]);
      if constexpr (Store::kQuantized) t.scale[k] = in.scale[k];
    }
    t.master = in.master;
    if (Store::kMaster) t.aligned = t.aligned && aligned<float, kWidth>(in.master);
    t.index = uint32_t(i);
    for (int c = 0; c < Rule::kNumScalarStates; ++c) t.scalar_state[c] = in.scalar_state[c];
    t.numel = in.numel;
    args.first_chunk[args.num_tensors++] = int32_t(chunks);
    chunks += (in.numel + kChunkElements - 1) / kChunkElements;
  }
  if (chunks > 0) {
    if constexpr (rules::num_sums<Rule>() > 0) {
      // Note [Reduction phase]; the workspace holds the sums of the whole
      // step, so it holds this launch's (the launches run in stream order).
      constexpr int kSums = rules::num_sums<Rule>();
      args.num_chunks = int32_t(chunks);
      args.lane_sums = launch.reduction_workspace;
      args.chunk_sums = args.lane_sums + chunks * rules::kSumLanes * kSums;
      args.sums = args.chunk_sums + chunks * kSums;
      const unsigned threads = 128;
      launch_kernel(reduce_kernel<Rule, Store>, unsigned(chunks), rules::kSumLanes, stream, args, "reduce_kernel");
      launch_kernel(sum_lanes_kernel<Rule, Store>, unsigned((chunks + threads - 1) / threads), threads, stream,
                    args, "sum_lanes_kernel");
      launch_kernel(sum_chunks_kernel<Rule, Store>, unsigned((args.num_tensors + threads - 1) / threads), threads,
                    stream, args, "sum_chunks_kernel");
    }
    launch_kernel(update_kernel<Rule, Store>, unsigned(chunks), kBlockThreads, stream, args,
                  "update_kernel");
  }
  if constexpr (Rule::kNumScalarStates > 0) {
    ScalarStateArgs<Rule> states{};
    states.num_tensors = int(end - begin);
    states.hyper = hyper;
    states.lr = launch.lr;
    states.found_inf = launch.found_inf;
    states.sums = chunks > 0 ? args.sums : nullptr;
    for (int64_t i = begin; i < end; ++i) {
      for (int c = 0; c < Rule::kNumScalarStates; ++c) {
        states.states[i - begin][c] = launch.tensors[i].scalar_state[c];
      }
    }
    const unsigned threads = 128;
    launch_kernel(advance_scalar_states_kernel<Rule>, (unsigned(states.num_tensors) + threads - 1) / threads,
                  threads, stream, states, "advance_scalar_states_kernel");
  }
}

// Chunks per launch stay below this, so chunk indices fit the int32 block
// index arithmetic (a launch of 2^31 chunks would be 2^47 elements anyway).
constexpr int64_t kMaxChunksPerLaunch = (int64_t(1) << 31) - 1;

// Calls fn(Storage<...>{}) for the launch's storage, as the CPU driver's
// with_storage does (the combinations check_storage accepts).
// kStorageOptions = false instantiates the plain storages only; kQuantized =
// false leaves out 8-bit state (rules without slots).
template <bool kStorageOptions, bool kQuantized, class Fn>
void with_storage(const StepLaunch& launch, Fn&& fn) {
  using BF16 = __nv_bfloat16;
  using F16 = __half;
  if (!launch.master && !launch.stochastic_rounding && launch.state_dtype == launch.dtype) {
    switch (launch.dtype) {
      case Dtype::kFloat32: fn(Storage<float, float, false, false>{}); break;
      case Dtype::kFloat64: fn(Storage<double, double, false, false>{}); break;
      case Dtype::kFloat16: fn(Storage<F16, F16, false, false>{}); break;
      case Dtype::kBFloat16: fn(Storage<BF16, BF16, false, false>{}); break;
      case Dtype::kUInt8: throw std::runtime_error("fastopt: uint8 params");
    }
    return;
  }
  if (!kStorageOptions) {
    throw std::runtime_error("fastopt: this op takes state of the params' dtype only");
  }
  if constexpr (kStorageOptions) {
    if constexpr (kQuantized) {
      if (launch.state_dtype == Dtype::kUInt8) {
        if (launch.master) {
          launch.dtype == Dtype::kBFloat16 ? fn(Storage<BF16, uint8_t, true, false>{})
                                           : fn(Storage<F16, uint8_t, true, false>{});
        } else if (launch.stochastic_rounding) {
          fn(Storage<BF16, uint8_t, false, true>{});
        } else {
          switch (launch.dtype) {
            case Dtype::kFloat16: fn(Storage<F16, uint8_t, false, false>{}); break;
            case Dtype::kBFloat16: fn(Storage<BF16, uint8_t, false, false>{}); break;
            default: fn(Storage<float, uint8_t, false, false>{}); break;
          }
        }
        return;
      }
    }
    if (launch.state_dtype == Dtype::kUInt8) {
      throw std::runtime_error("fastopt: uint8 state for a rule without state slots");
    }
    const bool float_state = launch.state_dtype == Dtype::kFloat32;
    if (launch.master) {
      if (launch.dtype == Dtype::kBFloat16) {
        float_state ? fn(Storage<BF16, float, true, false>{}) : fn(Storage<BF16, BF16, true, false>{});
      } else {
        float_state ? fn(Storage<F16, float, true, false>{}) : fn(Storage<F16, BF16, true, false>{});
      }
    } else if (launch.stochastic_rounding) {
      float_state ? fn(Storage<BF16, float, false, true>{}) : fn(Storage<BF16, BF16, false, true>{});
    } else if (float_state) {  // params of another dtype
      switch (launch.dtype) {
        case Dtype::kFloat64: fn(Storage<double, float, false, false>{}); break;
        case Dtype::kFloat16: fn(Storage<F16, float, false, false>{}); break;
        default: fn(Storage<BF16, float, false, false>{}); break;
      }
    } else {  // bfloat16 state, params of another dtype
      switch (launch.dtype) {
        case Dtype::kFloat64: fn(Storage<double, BF16, false, false>{}); break;
        case Dtype::kFloat16: fn(Storage<F16, BF16, false, false>{}); break;
        default: fn(Storage<float, BF16, false, false>{}); break;
      }
    }
  }
}

// Runs Rule over all tensors of the launch, split into launches that fit
// the kernel-argument space.
// The 32 KB kernel-argument space needs a CUDA 12.1 driver as well as
// runtime; checked before anything is queued, so a step on an older driver
// fails whole instead of half-applied.
inline void check_driver_supports_launch_size() {
  static const int driver_version = [] {
    int version = 0;
    return cudaDriverGetVersion(&version) == cudaSuccess ? version : 0;
  }();
  if (kMaxKernelArgBytes > 4096 && driver_version < 12010) {
    throw std::runtime_error("fastopt: built with CUDA >= 12.1 (32 KB kernel arguments), but the CUDA "
                             "driver is version " + std::to_string(driver_version) +
                             "; update the driver or build fastopt with an older CUDA toolkit");
  }
}

template <class Rule, bool kStorageOptions = true>
void launch_rule(const StepLaunch& launch, const typename Rule::Hyper& hyper) {
  check_driver_supports_launch_size();
  with_storage<kStorageOptions, (Rule::kNumSlots > 0)>(launch, [&](auto storage) {
    using Store = decltype(storage);
    int64_t begin = 0;
    while (begin < launch.num_tensors) {
      int64_t end = begin;
      int64_t chunks = 0;
      while (end < launch.num_tensors && end - begin < Store::kMaxTensors) {
        const int64_t tensor_chunks = (launch.tensors[end].numel + kChunkElements - 1) / kChunkElements;
        if (end > begin && chunks + tensor_chunks > kMaxChunksPerLaunch) break;
        chunks += tensor_chunks;
        ++end;
      }
      launch_group<Rule, Store>(launch, hyper, begin, end);
      begin = end;
    }
  });
}

// One step of an optimizer of the table: the rule variant its hyperparameters
// select, on every tensor of the launch.
template <class Optimizer>
void launch_step(const StepLaunch& launch, const typename Optimizer::Hyper& hyper) {
  Optimizer::with_rule(hyper, [&](auto rule) { launch_rule<decltype(rule)>(launch, hyper); });
}

}  // namespace fastopt::cuda

// The explicit instantiation of launch_step for one row of the optimizer
// table (its generated CUDA translation unit, Note [The optimizer table]).
#define FASTOPT_INSTANTIATE_CUDA_STEP(name, Descriptor)                       \
  template void fastopt::cuda::launch_step<fastopt::rules::Descriptor>(       \
      const fastopt::cuda::StepLaunch&, const fastopt::rules::Descriptor::Hyper&);
