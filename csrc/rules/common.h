// Shared definitions for the update rules: the host/device qualifier and the
// tuning constants of the drivers, each with the reason for its value.
#pragma once

#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define FASTOPT_HOST_DEVICE __host__ __device__
#else
#define FASTOPT_HOST_DEVICE
#endif

namespace fastopt {

// Most state tensors a rule keeps per param (Adam with amsgrad: exp_avg,
// exp_avg_sq, max_exp_avg_sq); drivers size their per-tensor records by it.
constexpr int kMaxSlots = 3;

// Smallest number of elements worth handing to another CPU thread: below
// about 16K elements (~450 KB of Adam streams) waking a pool thread costs more
// than streaming the elements on the calling thread.
constexpr int64_t kCpuMinElementsPerThread = 16384;

// Params per task when a CPU pass touches each tensor's metadata (checks,
// layout, step counts, reading .grad): enough to amortize a task, few enough
// that threads share the ~100 ns cache miss per tensor that dominates such a
// pass for thousands of small params.
constexpr int64_t kCpuParamsPerTask = 256;

}  // namespace fastopt
