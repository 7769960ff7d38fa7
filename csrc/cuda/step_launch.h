// The interface between the CUDA launcher (optimizer_ops_cuda.cpp, the only
// file that includes ATen/c10 CUDA headers) and the kernels
// (optimizer_kernels.cu, free of torch headers so that nvcc compiles them on
// machines without a CUDA build of torch; see Note [CUDA driver layout]).
#pragma once

#include <cstdint>

#include "../rules/common.h"
#include "../rules/reduction.h"
#include "../rules/row_col_sums.h"

struct CUstream_st;  // cudaStream_t, without the CUDA runtime headers

namespace fastopt::cuda {

// kUInt8: 8-bit state slots (Note [8-bit state] in rules/quantization.h).
enum class Dtype { kFloat32, kFloat64, kFloat16, kBFloat16, kUInt8 };

// One param's streams in device memory: dense, all with the param's strides
// (contiguous with 8-bit state; the launcher stages anything else through
// contiguous copies).
struct TensorPointers {
  void* param;
  const void* grad;
  void* slot[kMaxSlots];  // the rule's slots in its order; unused ones null
  float* master;          // float32 master copy of the param, or null
  float* scale[kMaxSlots];  // 8-bit slots: their block scales (contiguous); else null
  float* scalar_state[kMaxScalarStates];  // the optimizer's, on the device (step count, ...)
  int64_t numel;
};

// One step of one rule over a list of params of one device and dtype.
struct StepLaunch {
  const TensorPointers* tensors;
  int64_t num_tensors;
  // Note [Storage of a step] (cpu/multi_tensor_apply.h), as accepted by
  // check_storage (validate.h).
  Dtype dtype;        // params and grads
  Dtype state_dtype;  // state slots
  bool master;        // every tensor has a master copy
  bool stochastic_rounding;
  uint32_t rounding_seed;
  // Device values read by the kernels, so a step needs no host sync and can
  // be captured in a CUDA graph; each may be null.
  const double* lr;          // replaces the Hyper's lr (a tensor lr, capturable)
  const double* grad_scale;  // AMP and clipping: grads are divided by it in registers
  const float* found_inf;   // AMP: when nonzero, nothing is written, steps included
  bool maximize;
  CUstream_st* stream;
  // A rule with a reduction phase (Note [Reduction phase]): device memory
  // of reduction_workspace_doubles doubles for its partial sums; else null.
  double* reduction_workspace;
};

// The doubles of device memory a step with `num_sums` per-tensor sums needs:
// every chunk's lane sums and chunk sums, and every tensor's sums.
inline int64_t reduction_workspace_doubles(const StepLaunch& launch, int num_sums) {
  int64_t chunks = 0;
  for (int64_t i = 0; i < launch.num_tensors; ++i) chunks += rules::num_sum_chunks(launch.tensors[i].numel);
  return (chunks * (rules::kSumLanes + 1) + launch.num_tensors) * num_sums;
}

// The same for a step of an optimizer of the table: 0 for a rule variant
// without a reduction phase.
template <class Optimizer>
int64_t reduction_workspace_doubles(const StepLaunch& launch, const typename Optimizer::Hyper& hyper) {
  int num_sums = 0;
  Optimizer::with_rule(hyper, [&](auto rule) { num_sums = rules::num_sums<decltype(rule)>(); });
  return num_sums == 0 ? 0 : reduction_workspace_doubles(launch, num_sums);
}

// Most tensors one kernel launch takes (Note [CUDA driver layout]), with
// 8-bit state or without; a step over more is split into several launches.
int64_t max_tensors_per_launch(bool quantized_state = false);

// One step of an optimizer of the table (instantiated per optimizer in
// generated translation units, Note [The optimizer table]), and of the
// roofline; each throws std::runtime_error when a launch fails.
template <class Optimizer>
void launch_step(const StepLaunch& launch, const typename Optimizer::Hyper& hyper);
void roofline_step(const StepLaunch& launch, int num_slots);

// fastopt::row_col_sq_means_ over one grad (Note [Row and column sums]):
// the grad dense and row-major as [batches, rows, cols], its means of its
// opmath dtype (double for float64 grads, else float).
struct RowColLaunch {
  const void* grad;
  Dtype dtype;
  void* row_means;  // batches * rows
  void* col_means;  // batches * cols
  int64_t batches, rows, cols;
  const double* grad_scale;  // grads are divided by it; may be null
  double* workspace;         // row_col_workspace_doubles(...) doubles of device memory
  CUstream_st* stream;
};

// The doubles of device memory a launch needs: each row's lane sums and each
// column chunk's sums.
inline int64_t row_col_workspace_doubles(int64_t batches, int64_t rows, int64_t cols) {
  return batches * (rows * rules::kRowSumLanes + rules::num_column_chunks(rows) * cols);
}

// Queues the kernels of one RowColLaunch; throws std::runtime_error when a
// launch fails.
void launch_row_col_sq_means(const RowColLaunch& launch);

}  // namespace fastopt::cuda
