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
// derives its tensor's per-step scalars itself from the device step count
// and lr, so a step reads no device value on the host: it can be captured
// in a CUDA graph.  Step counts are incremented by a separate small kernel
// before the update kernel of the same launch, so no block can see another
// block's increment.  Streams are read and written 16 bytes at a time when
// every pointer of a tensor is 16-byte aligned, one element at a time
// otherwise; arithmetic is in float for 16-bit dtypes (double for double).
// This file includes no torch header (see step_launch.h).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "step_launch.h"

namespace fastopt::cuda {

// Elements per block: large enough that a block's fixed cost (finding its
// tensor, deriving the scalars) is amortized over 64K elements, small enough
// that a 1M-element tensor still spreads over 16 SMs.
constexpr int64_t kChunkElements = 65536;
constexpr int kBlockThreads = 512;  // 16 warps: enough loads in flight per SM
constexpr int kVectorBytes = 16;    // the widest load a thread issues

#if CUDART_VERSION >= 12010
constexpr int kMaxKernelArgBytes = 32764;
#else
constexpr int kMaxKernelArgBytes = 4096;
#endif

// Per-tensor argument bytes (pointers, size, chunk index): 72 with 3 slots.
constexpr int kBytesPerTensor = 72;
// Leaves room for the hyperparameters and flags of the largest rule.
constexpr int kMaxTensorsPerLaunch = (kMaxKernelArgBytes - 256) / kBytesPerTensor;

template <Dtype kDtype> struct StorageType;
template <> struct StorageType<Dtype::kFloat32> { using type = float; };
template <> struct StorageType<Dtype::kFloat64> { using type = double; };
template <> struct StorageType<Dtype::kFloat16> { using type = __half; };
template <> struct StorageType<Dtype::kBFloat16> { using type = __nv_bfloat16; };

template <typename scalar_t> struct OpMath { using type = float; };
template <> struct OpMath<double> { using type = double; };

// Conversions between storage and opmath.  The 16-bit ones are spelled out:
// torch's extension builds define __CUDA_NO_HALF_CONVERSIONS__ and
// __CUDA_NO_BFLOAT16_CONVERSIONS__, which remove the implicit ones.
template <typename opmath_t, typename scalar_t>
__device__ __forceinline__ opmath_t load_as(scalar_t value) {
  return value;
}
template <>
__device__ __forceinline__ float load_as<float, __half>(__half value) {
  return __half2float(value);
}
template <>
__device__ __forceinline__ float load_as<float, __nv_bfloat16>(__nv_bfloat16 value) {
  return __bfloat162float(value);
}
template <typename scalar_t, typename opmath_t>
__device__ __forceinline__ scalar_t store_as(opmath_t value) {
  return value;
}
// Round to nearest even, as torch's Half and BFloat16 conversions do.
template <>
__device__ __forceinline__ __half store_as<__half, float>(float value) {
  return __float2half_rn(value);
}
template <>
__device__ __forceinline__ __nv_bfloat16 store_as<__nv_bfloat16, float>(float value) {
  return __float2bfloat16_rn(value);
}

template <class Rule, typename scalar_t>
struct LaunchArgs {
  static constexpr int kSlots = Rule::kNumSlots > 0 ? Rule::kNumSlots : 1;
  struct Tensor {
    scalar_t* param;
    const scalar_t* grad;
    scalar_t* slot[kSlots];
    const float* step;
    int64_t numel;
    bool aligned;  // every stream 16-byte aligned: vector loads and stores
  };
  Tensor tensors[kMaxTensorsPerLaunch];
  int32_t first_chunk[kMaxTensorsPerLaunch];  // chunks before tensor t in this launch
  int num_tensors;
  typename Rule::Hyper hyper;
  const float* lr;
  const float* grad_scale;
  const float* found_inf;
  bool maximize;
};

struct StepCountArgs {
  float* steps[kMaxTensorsPerLaunch];
  int num_steps;
  const float* found_inf;
};

__global__ void increment_steps_kernel(const __grid_constant__ StepCountArgs args) {
  if (args.found_inf != nullptr && *args.found_inf != 0.f) return;
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < args.num_steps) *args.steps[i] += 1.f;
}

// The rule applied to elements [begin, end) of one tensor, kWidth elements
// per thread and iteration (kWidth = 1: any alignment).
template <class Rule, typename scalar_t, int kWidth>
__device__ __forceinline__ void update_elements(
    const typename LaunchArgs<Rule, scalar_t>::Tensor& t,
    const typename Rule::template Scalars<typename OpMath<scalar_t>::type>& scalars,
    typename OpMath<scalar_t>::type grad_scale, typename OpMath<scalar_t>::type grad_sign,
    int64_t begin, int64_t end) {
  using opmath_t = typename OpMath<scalar_t>::type;
  constexpr int kSlots = Rule::kNumSlots;
  struct alignas(sizeof(scalar_t) * kWidth) Pack { scalar_t v[kWidth]; };
  for (int64_t i = begin + int64_t(threadIdx.x) * kWidth; i < end; i += int64_t(blockDim.x) * kWidth) {
    Pack param = *reinterpret_cast<const Pack*>(t.param + i);
    const Pack grad = *reinterpret_cast<const Pack*>(t.grad + i);
    Pack slot[kSlots > 0 ? kSlots : 1];
#pragma unroll
    for (int k = 0; k < kSlots; ++k) slot[k] = *reinterpret_cast<const Pack*>(t.slot[k] + i);
#pragma unroll
    for (int e = 0; e < kWidth; ++e) {
      opmath_t p = load_as<opmath_t>(param.v[e]);
      const opmath_t g = load_as<opmath_t>(grad.v[e]) / grad_scale * grad_sign;
      opmath_t s[kSlots > 0 ? kSlots : 1];
#pragma unroll
      for (int k = 0; k < kSlots; ++k) s[k] = load_as<opmath_t>(slot[k].v[e]);
      Rule::update(p, g, s, scalars);
      param.v[e] = store_as<scalar_t>(p);
#pragma unroll
      for (int k = 0; k < kSlots; ++k) slot[k].v[e] = store_as<scalar_t>(s[k]);
    }
    *reinterpret_cast<Pack*>(t.param + i) = param;
#pragma unroll
    for (int k = 0; k < kSlots; ++k) *reinterpret_cast<Pack*>(t.slot[k] + i) = slot[k];
  }
}

template <class Rule, typename scalar_t>
__global__ void __launch_bounds__(kBlockThreads)
    update_kernel(const __grid_constant__ LaunchArgs<Rule, scalar_t> args) {
  using opmath_t = typename OpMath<scalar_t>::type;
  if (args.found_inf != nullptr && *args.found_inf != 0.f) return;
  // The tensor of this block's chunk: the last one starting at or before it
  // (empty tensors start where the next one does and are never chosen).
  const int chunk = blockIdx.x;
  int lo = 0, hi = args.num_tensors - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (args.first_chunk[mid] <= chunk) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  const auto& t = args.tensors[lo];
  typename Rule::Hyper hyper = args.hyper;
  if (args.lr != nullptr) hyper.lr = *args.lr;
  const double step = Rule::kCountsSteps ? double(*t.step) : 0.0;
  const auto scalars = Rule::template scalars<opmath_t>(hyper, step);
  const opmath_t grad_scale = args.grad_scale != nullptr ? opmath_t(*args.grad_scale) : opmath_t(1);
  const opmath_t grad_sign = args.maximize ? opmath_t(-1) : opmath_t(1);
  const int64_t begin = int64_t(chunk - args.first_chunk[lo]) * kChunkElements;
  const int64_t end = begin + kChunkElements < t.numel ? begin + kChunkElements : t.numel;
  constexpr int kWidth = kVectorBytes / int(sizeof(scalar_t));
  if (t.aligned) {
    // Chunks start at multiples of kWidth, so only the tensor's last chunk
    // can end with a partial vector.
    const int64_t vector_end = begin + (end - begin) / kWidth * kWidth;
    update_elements<Rule, scalar_t, kWidth>(t, scalars, grad_scale, grad_sign, begin, vector_end);
    update_elements<Rule, scalar_t, 1>(t, scalars, grad_scale, grad_sign, vector_end, end);
  } else {
    update_elements<Rule, scalar_t, 1>(t, scalars, grad_scale, grad_sign, begin, end);
  }
}

inline void check_launch(const char* what) {
  const cudaError_t error = cudaGetLastError();
  if (error != cudaSuccess) {
    throw std::runtime_error(std::string("fastopt: CUDA launch of ") + what +
                             " failed: " + cudaGetErrorString(error));
  }
}

inline bool aligned(const void* pointer) {
  return reinterpret_cast<uintptr_t>(pointer) % kVectorBytes == 0;
}

template <class Rule, typename scalar_t>
void launch_group(const StepLaunch& launch, const typename Rule::Hyper& hyper, int64_t begin,
                  int64_t end) {
  static_assert(sizeof(LaunchArgs<Rule, scalar_t>) <= kMaxKernelArgBytes,
                "kernel arguments exceed the parameter space");
  cudaStream_t stream = launch.stream;
  if (Rule::kCountsSteps) {
    StepCountArgs counts{};
    counts.num_steps = int(end - begin);
    counts.found_inf = launch.found_inf;
    for (int64_t i = begin; i < end; ++i) counts.steps[i - begin] = launch.tensors[i].step;
    const int threads = 128;
    increment_steps_kernel<<<(counts.num_steps + threads - 1) / threads, threads, 0, stream>>>(counts);
    check_launch("increment_steps_kernel");
  }
  LaunchArgs<Rule, scalar_t> args{};
  args.hyper = hyper;
  args.lr = launch.lr;
  args.grad_scale = launch.grad_scale;
  args.found_inf = launch.found_inf;
  args.maximize = launch.maximize;
  int64_t chunks = 0;
  for (int64_t i = begin; i < end; ++i) {
    const TensorPointers& in = launch.tensors[i];
    auto& t = args.tensors[args.num_tensors];
    t.param = static_cast<scalar_t*>(in.param);
    t.grad = static_cast<const scalar_t*>(in.grad);
    t.aligned = aligned(in.param) && aligned(in.grad);
    for (int k = 0; k < Rule::kNumSlots; ++k) {
      t.slot[k] = static_cast<scalar_t*>(in.slot[k]);
      t.aligned = t.aligned && aligned(in.slot[k]);
    }
    t.step = in.step;
    t.numel = in.numel;
    args.first_chunk[args.num_tensors++] = int32_t(chunks);
    chunks += (in.numel + kChunkElements - 1) / kChunkElements;
  }
  if (chunks == 0) return;
  update_kernel<Rule, scalar_t><<<unsigned(chunks), kBlockThreads, 0, stream>>>(args);
  check_launch("update_kernel");
}

// Chunks per launch stay below this, so chunk indices fit the int32 block
// index arithmetic (a launch of 2^31 chunks would be 2^47 elements anyway).
constexpr int64_t kMaxChunksPerLaunch = (int64_t(1) << 31) - 1;

// Runs Rule over all tensors of the launch, split into launches that fit
// the kernel-argument space.
template <class Rule>
void launch_rule(const StepLaunch& launch, const typename Rule::Hyper& hyper) {
  auto run = [&](auto storage) {
    using scalar_t = typename decltype(storage)::type;
    int64_t begin = 0;
    while (begin < launch.num_tensors) {
      int64_t end = begin;
      int64_t chunks = 0;
      while (end < launch.num_tensors && end - begin < kMaxTensorsPerLaunch) {
        const int64_t tensor_chunks = (launch.tensors[end].numel + kChunkElements - 1) / kChunkElements;
        if (end > begin && chunks + tensor_chunks > kMaxChunksPerLaunch) break;
        chunks += tensor_chunks;
        ++end;
      }
      launch_group<Rule, scalar_t>(launch, hyper, begin, end);
      begin = end;
    }
  };
  switch (launch.dtype) {
    case Dtype::kFloat32: run(StorageType<Dtype::kFloat32>{}); break;
    case Dtype::kFloat64: run(StorageType<Dtype::kFloat64>{}); break;
    case Dtype::kFloat16: run(StorageType<Dtype::kFloat16>{}); break;
    case Dtype::kBFloat16: run(StorageType<Dtype::kBFloat16>{}); break;
  }
}

}  // namespace fastopt::cuda
