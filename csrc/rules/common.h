// Shared definitions for the update rules: the host/device qualifier and the
// tuning constants of the drivers, each with the reason for its value.
#pragma once

#include <array>
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

// Most per-tensor scalar states an optimizer keeps per param (ASGD: step,
// eta, mu); drivers size their per-tensor records by it.
constexpr int kMaxScalarStates = 3;

// Smallest number of elements worth handing to another CPU thread: below
// about 16K elements (~450 KB of Adam streams) waking a pool thread costs more
// than streaming the elements on the calling thread.
constexpr int64_t kCpuMinElementsPerThread = 16384;

// Params per task when a CPU pass touches each tensor's metadata (checks,
// layout, step counts, reading .grad): enough to amortize a task, few enough
// that threads share the ~100 ns cache miss per tensor that dominates such a
// pass for thousands of small params.
constexpr int64_t kCpuParamsPerTask = 256;

namespace rules {

// One keyword argument of an optimizer's op (Note [The optimizer table] in
// csrc/optimizer_table.h): its name in the schema and the member of the
// rule's Hyper struct it fills, a float or (variant flags) a bool.
template <class Hyper>
struct Field {
  const char* name;
  double Hyper::*number = nullptr;
  bool Hyper::*flag = nullptr;
  constexpr Field(const char* name_, double Hyper::*number_) : name(name_), number(number_) {}
  constexpr Field(const char* name_, bool Hyper::*flag_) : name(name_), flag(flag_) {}
};

// The scalar-state advance of a rule whose only scalar state is torch's
// `step` count.
FASTOPT_HOST_DEVICE inline void count_step(const double* before, double* after) {
  after[0] = before[0] + 1.0;
}

}  // namespace rules
}  // namespace fastopt
