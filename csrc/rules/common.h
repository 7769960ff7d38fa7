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

// Most per-tensor scalar states an optimizer keeps per param (SWATS: step,
// its group's switch, learned step and average, its two sums); drivers size
// their per-tensor records by it.
constexpr int kMaxScalarStates = 6;

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
  // Aliases, not `double Hyper::*number` members: nvcc's host pass rewrites
  // those with parentheses that gcc's -Wparentheses rejects.
  using Number = double Hyper::*;
  using Flag = bool Hyper::*;
  const char* name;
  Number number = nullptr;
  Flag flag = nullptr;
  constexpr Field(const char* name_, Number number_) : name(name_), number(number_) {}
  constexpr Field(const char* name_, Flag flag_) : name(name_), flag(flag_) {}
};

// The scalar-state advance of a rule whose only scalar state is torch's
// `step` count.
FASTOPT_HOST_DEVICE inline void count_step(const double* before, double* after) {
  after[0] = before[0] + 1.0;
}

// One weight of torch.lerp, with the branch of its formula chosen once.
template <typename T>
struct LerpWeight {
  T weight, one_minus_weight;
  bool small;  // |weight| < 0.5: interpolate from the start, else from the end

  FASTOPT_HOST_DEVICE static LerpWeight of(double w) {
    const T weight = T(w);
    return {weight, T(1) - weight, weight < T(0.5) && weight > T(-0.5)};
  }
};

// torch.lerp(start, end, weight) as ATen computes it (Lerp.h): from the
// nearer end, so that weight 1 gives `end` exactly.
template <typename T>
FASTOPT_HOST_DEVICE inline T lerp(T start, T end, const LerpWeight<T>& w) {
  return w.small ? start + w.weight * (end - start) : end - (end - start) * w.one_minus_weight;
}

}  // namespace rules
}  // namespace fastopt
