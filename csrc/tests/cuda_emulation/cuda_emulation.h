// Note [CUDA emulation]
// The CUDA runtime, as much of it as csrc/cuda/ uses, for the host compiler:
// with this folder first on the include path, the kernels and the driver
// (multi_tensor_apply.cuh, optimizer_kernels.cu) compile unchanged as C++,
// and a launch (Note [One launch point]) runs every block and every thread
// of its grid, one after another, on the calling thread.  The kernels share
// no memory between threads and never synchronize, so any order gives the
// device's results.  Device memory is host memory: pointers are used as they
// are.  csrc/tests/test_cuda_emulated.cpp compares the kernels run this way
// with the CPU driver, bit for bit.
//
// Faithful: the qualifiers (erased), blockIdx / threadIdx / blockDim /
// gridDim, __grid_constant__ arguments (one copy per launch that every thread
// reads in place: a const reference here), the half and bfloat16 conversions (round to nearest even, subnormals,
// overflow to infinity, and the device's canonical NaN 0x7FFF, which c10's
// conversions do not produce: they give 0x7FC0 / 0x7E00), launch errors for
// an empty or oversized grid or block, and the 32 KB limit of a launch's
// arguments (CUDA >= 12.1), checked at compile time.
// Not emulated: the device's double-precision pow (the per-step scalars:
// CUDA's pow is within 2 ulps, glibc's within 1, so a scalar may differ in
// its last double bit and, rarely, in its float rounding); multiply-add
// contraction (the real build turns it off with --fmad=false, this one with
// -ffp-contract=off, so both round every operation); timing, occupancy,
// register limits from __launch_bounds__, the memory model and the 4 KB
// argument space of CUDA < 12.1 (a separate launch size, not compiled here).
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

#include "float16.h"
#include "launch_count.h"

#define CUDART_VERSION 13000

#define __host__
#define __device__
#define __global__
#define __forceinline__ inline
// Kernels declare `const Args __grid_constant__ args`: read in place by every
// thread, as the device does, not copied per emulated thread.
#define __grid_constant__ &
#define __launch_bounds__(...)

struct CUstream_st;
using cudaStream_t = CUstream_st*;

enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
};

struct uint3 {
  unsigned x, y, z;
};

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

// The emulated thread's coordinates, set by the launch before each call.
inline thread_local uint3 blockIdx{0, 0, 0};
inline thread_local uint3 threadIdx{0, 0, 0};
inline thread_local dim3 blockDim;
inline thread_local dim3 gridDim;

namespace fastopt::emulation {

constexpr unsigned kMaxThreadsPerBlock = 1024;
constexpr unsigned kMaxGridX = 2147483647u;
constexpr std::size_t kMaxKernelArgBytes = 32764;  // CUDA >= 12.1

inline thread_local cudaError_t last_error = cudaSuccess;

}  // namespace fastopt::emulation

// ---- the runtime calls the driver makes ----

inline cudaError_t cudaGetLastError() {
  const cudaError_t error = fastopt::emulation::last_error;
  fastopt::emulation::last_error = cudaSuccess;
  return error;
}

inline const char* cudaGetErrorString(cudaError_t error) {
  switch (error) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
  }
  return "unknown error";
}

inline cudaError_t cudaDriverGetVersion(int* version) {
  *version = CUDART_VERSION;
  return cudaSuccess;
}

namespace fastopt::emulation {

template <class... Params, std::size_t... I>
void call_kernel(void (*kernel)(Params...), void** args, std::index_sequence<I...>) {
  kernel(*static_cast<std::remove_cv_t<std::remove_reference_t<Params>>*>(args[I])...);
}

}  // namespace fastopt::emulation

// Runs the kernel for every block and thread of a one-dimensional grid.
template <class... Params>
cudaError_t cudaLaunchKernel(void (*kernel)(Params...), dim3 grid, dim3 block, void** args,
                             std::size_t shared_memory_bytes = 0, cudaStream_t /*stream*/ = nullptr) {
  namespace emu = fastopt::emulation;
  static_assert((sizeof(Params) + ... + 0) <= emu::kMaxKernelArgBytes,
                "kernel arguments exceed the 32 KB parameter space");
  const bool valid = grid.x >= 1 && grid.x <= emu::kMaxGridX && grid.y == 1 && grid.z == 1 &&
                     block.x >= 1 && block.x <= emu::kMaxThreadsPerBlock && block.y == 1 &&
                     block.z == 1 && shared_memory_bytes == 0;
  if (!valid) {
    emu::last_error = cudaErrorInvalidConfiguration;
    return emu::last_error;
  }
  ++emu::launch_count;
  gridDim = grid;
  blockDim = block;
  for (unsigned b = 0; b < grid.x; ++b) {
    for (unsigned t = 0; t < block.x; ++t) {
      blockIdx = uint3{b, 0, 0};
      threadIdx = uint3{t, 0, 0};
      emu::call_kernel(kernel, args, std::index_sequence_for<Params...>{});
    }
  }
  return cudaSuccess;
}
