// The CUDA kernels of fastopt::row_col_sq_means_ (Note [Row and column sums]
// in rules/row_col_sums.h), three per grad, in the order of addition the
// CPU kernel uses, so both give the same bits: one thread per lane of a row
// (the lanes of a row are neighbouring threads: coalesced loads), one per
// column of a column chunk (a warp reads 32 neighbouring columns of a row),
// then one per row and column adding those sums in order.  No shared memory
// and no host synchronization.  No torch header.
#pragma once

#include "multi_tensor_apply.cuh"

namespace fastopt::cuda {

template <typename scalar_t>
struct RowColArgs {
  using opmath_t = typename OpMath<scalar_t>::type;
  const scalar_t* grad;
  opmath_t* row_means;
  opmath_t* col_means;
  int64_t batches, rows, cols, chunk_rows, chunks;
  const double* grad_scale;
  double* lane_sums;    // [batches * rows][kRowSumLanes]
  double* column_sums;  // [batches * chunks][cols]
};

template <typename scalar_t>
__device__ __forceinline__ double scaled_square(const RowColArgs<scalar_t>& args, int64_t i) {
  using opmath_t = typename OpMath<scalar_t>::type;
  const opmath_t scale = args.grad_scale != nullptr ? opmath_t(*args.grad_scale) : opmath_t(1);
  const double v = double(load_as<opmath_t>(args.grad[i]) / scale);
  return v * v;
}

__device__ __forceinline__ int64_t global_thread() {
  return int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
}

template <typename scalar_t>
__global__ void row_lanes_kernel(const RowColArgs<scalar_t> __grid_constant__ args) {
  const int64_t index = global_thread();
  const int64_t row = index / rules::kRowSumLanes;
  if (row >= args.batches * args.rows) return;
  const int64_t lane = index % rules::kRowSumLanes;
  double sum = 0.0;
  for (int64_t j = lane; j < args.cols; j += rules::kRowSumLanes) sum += scaled_square(args, row * args.cols + j);
  args.lane_sums[index] = sum;
}

template <typename scalar_t>
__global__ void column_chunks_kernel(const RowColArgs<scalar_t> __grid_constant__ args) {
  const int64_t index = global_thread();
  const int64_t matrix_chunk = index / args.cols;  // batch * chunks + chunk
  if (args.cols == 0 || matrix_chunk >= args.batches * args.chunks) return;
  const int64_t batch = matrix_chunk / args.chunks;
  const int64_t first_row = matrix_chunk % args.chunks * args.chunk_rows;
  const int64_t end_row = first_row + args.chunk_rows < args.rows ? first_row + args.chunk_rows : args.rows;
  const int64_t column = index % args.cols;
  double sum = 0.0;
  for (int64_t r = first_row; r < end_row; ++r) sum += scaled_square(args, (batch * args.rows + r) * args.cols + column);
  args.column_sums[index] = sum;
}

// Threads [0, batches * rows): the rows' means; then the columns'.
template <typename scalar_t>
__global__ void row_col_means_kernel(const RowColArgs<scalar_t> __grid_constant__ args) {
  using opmath_t = typename OpMath<scalar_t>::type;
  const int64_t index = global_thread();
  const int64_t row_count = args.batches * args.rows;
  double sum = 0.0;
  if (index < row_count) {
    for (int lane = 0; lane < rules::kRowSumLanes; ++lane) sum += args.lane_sums[index * rules::kRowSumLanes + lane];
    args.row_means[index] = opmath_t(sum / double(args.cols));
    return;
  }
  const int64_t column_index = index - row_count;  // batch * cols + column
  if (column_index >= args.batches * args.cols) return;
  const int64_t batch = column_index / args.cols, column = column_index % args.cols;
  for (int64_t chunk = 0; chunk < args.chunks; ++chunk) {
    sum += args.column_sums[(batch * args.chunks + chunk) * args.cols + column];
  }
  args.col_means[column_index] = opmath_t(sum / double(args.rows));
}

template <typename scalar_t>
void launch_row_col(const RowColLaunch& launch) {
  using opmath_t = typename OpMath<scalar_t>::type;
  RowColArgs<scalar_t> args{};
  args.grad = static_cast<const scalar_t*>(launch.grad);
  args.row_means = static_cast<opmath_t*>(launch.row_means);
  args.col_means = static_cast<opmath_t*>(launch.col_means);
  args.batches = launch.batches;
  args.rows = launch.rows;
  args.cols = launch.cols;
  args.chunk_rows = rules::column_chunk_rows(launch.rows);
  args.chunks = rules::num_column_chunks(launch.rows);
  args.grad_scale = launch.grad_scale;
  args.lane_sums = launch.workspace;
  args.column_sums = launch.workspace + launch.batches * launch.rows * rules::kRowSumLanes;
  constexpr unsigned kThreads = 256;
  const auto launch_over = [&](auto kernel, int64_t threads, const char* what) {
    if (threads > 0) launch_kernel(kernel, unsigned((threads + kThreads - 1) / kThreads), kThreads, launch.stream, args, what);
  };
  launch_over(row_lanes_kernel<scalar_t>, args.batches * args.rows * rules::kRowSumLanes, "row_lanes_kernel");
  launch_over(column_chunks_kernel<scalar_t>, args.batches * args.chunks * args.cols, "column_chunks_kernel");
  launch_over(row_col_means_kernel<scalar_t>, args.batches * (args.rows + args.cols), "row_col_means_kernel");
}

void launch_row_col_sq_means(const RowColLaunch& launch) {
  switch (launch.dtype) {
    case Dtype::kFloat32: return launch_row_col<float>(launch);
    case Dtype::kFloat64: return launch_row_col<double>(launch);
    case Dtype::kFloat16: return launch_row_col<__half>(launch);
    case Dtype::kBFloat16: return launch_row_col<__nv_bfloat16>(launch);
    case Dtype::kUInt8: break;
  }
  throw std::runtime_error("fastopt: row_col_sq_means_ of uint8 grads");
}

}  // namespace fastopt::cuda
