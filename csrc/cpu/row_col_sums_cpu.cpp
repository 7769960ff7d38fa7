// The CPU kernel of fastopt::row_col_sq_means_ (Note [Row and column sums]
// in rules/row_col_sums.h): one parallel region over the column chunks of
// every matrix, each reading its rows once for the rows' means and its
// columns' partial sums; then one over the matrices, adding the partial sums
// in chunk order.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../rules/row_col_sums.h"
#include "../validate.h"
#include "multi_tensor_apply.h"

namespace fastopt::cpu {
namespace {

using rules::kRowSumLanes;

// Rows [0, rows) of a chunk (row-major, `cols` apart): each row's mean of
// (x / scale)^2 into row_means, each column's sum of the chunk's squares
// into column_sums (in row order).
template <typename scalar_t>
struct ChunkBody {
  using opmath_t = at::opmath_type<scalar_t>;
  static FASTOPT_ALWAYS_INLINE void run(const scalar_t* x, int64_t rows, int64_t cols, opmath_t scale,
                                        opmath_t* row_means, double* column_sums) {
    std::fill(column_sums, column_sums + cols, 0.0);
    for (int64_t r = 0; r < rows; ++r) {
      const scalar_t* row = x + r * cols;
      double lanes[kRowSumLanes] = {};
      int64_t j = 0;
      for (; j + kRowSumLanes <= cols; j += kRowSumLanes) {
        for (int k = 0; k < kRowSumLanes; ++k) {
          const double v = static_cast<double>(static_cast<opmath_t>(row[j + k]) / scale);
          lanes[k] += v * v;
          column_sums[j + k] += v * v;
        }
      }
      for (int k = 0; j < cols; ++j, ++k) {
        const double v = static_cast<double>(static_cast<opmath_t>(row[j]) / scale);
        lanes[k] += v * v;
        column_sums[j] += v * v;
      }
      double sum = 0;
      for (int k = 0; k < kRowSumLanes; ++k) sum += lanes[k];
      row_means[r] = static_cast<opmath_t>(sum / static_cast<double>(cols));
    }
  }
};

// The chunk loop of one grad dtype, per ISA.
template <typename scalar_t>
using ChunkLoop = IsaClones<ChunkBody<scalar_t>, const scalar_t*, int64_t, int64_t, at::opmath_type<scalar_t>,
                            at::opmath_type<scalar_t>*, double*>;

// One grad as matrices, with its outputs and its part of the column sums.
struct Matrices {
  at::Tensor grad;  // dense, row-major
  at::Tensor row_means, col_means;
  int64_t batches, rows, cols, chunk_rows, chunks;
  int64_t first_unit;    // index of its first (matrix, chunk) in the parallel region
  int64_t first_column;  // offset of its column sums: batches * chunks * cols doubles
};

void row_col_sq_means_cpu(at::TensorList grads, at::TensorList row_means, at::TensorList col_means,
                          const std::optional<at::Tensor>& grad_scale) {
  constexpr const char* kOp = "fastopt::row_col_sq_means_";
  check_row_col_means(kOp, grads, row_means, col_means, grad_scale, c10::kCPU);
  const double scale = grad_scale.has_value() ? grad_scale->item<double>() : 1.0;
  std::vector<Matrices> tensors(grads.size());
  int64_t units = 0, column_doubles = 0;
  for (size_t i = 0; i < grads.size(); ++i) {
    Matrices& m = tensors[i];
    m.grad = grads[i].contiguous();
    m.row_means = row_means[i];
    m.col_means = col_means[i];
    m.rows = grads[i].size(-2);
    m.cols = grads[i].size(-1);
    m.batches = matrix_batches(grads[i]);
    m.chunk_rows = rules::column_chunk_rows(m.rows);
    m.chunks = rules::num_column_chunks(m.rows);
    m.first_unit = units;
    m.first_column = column_doubles;
    units += m.batches * m.chunks;
    column_doubles += m.batches * m.chunks * m.cols;
  }
  std::vector<double> column_sums(column_doubles);
  const Isa isa = active_isa();
  auto tensor_of_unit = [&](int64_t unit) {
    return std::upper_bound(tensors.begin(), tensors.end(), unit,
                            [](int64_t u, const Matrices& m) { return u < m.first_unit; }) - 1;
  };
  at::parallel_for(0, units, 1, [&](int64_t begin, int64_t end) {
    for (int64_t unit = begin; unit < end; ++unit) {
      const Matrices& m = *tensor_of_unit(unit);
      const int64_t index = unit - m.first_unit;  // batch * chunks + chunk
      const int64_t batch = index / m.chunks, first_row = index % m.chunks * m.chunk_rows;
      const int64_t rows = std::min(m.chunk_rows, m.rows - first_row);
      const int64_t offset = (batch * m.rows + first_row) * m.cols;
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, m.grad.scalar_type(), kOp, [&] {
        using opmath_t = at::opmath_type<scalar_t>;
        ChunkLoop<scalar_t>::for_isa(isa)(m.grad.const_data_ptr<scalar_t>() + offset, rows, m.cols,
                                          static_cast<opmath_t>(scale),
                                          m.row_means.data_ptr<opmath_t>() + batch * m.rows + first_row,
                                          column_sums.data() + m.first_column + index * m.cols);
      });
    }
  });
  // Each column's sum: its chunks' sums in chunk order.
  at::parallel_for(0, int64_t(tensors.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const Matrices& m = tensors[i];
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, m.grad.scalar_type(), kOp, [&] {
        using opmath_t = at::opmath_type<scalar_t>;
        opmath_t* means = m.col_means.data_ptr<opmath_t>();
        for (int64_t batch = 0; batch < m.batches; ++batch) {
          const double* sums = column_sums.data() + m.first_column + batch * m.chunks * m.cols;
          for (int64_t j = 0; j < m.cols; ++j) {
            double sum = 0;
            for (int64_t c = 0; c < m.chunks; ++c) sum += sums[c * m.cols + j];
            means[batch * m.cols + j] = static_cast<opmath_t>(sum / static_cast<double>(m.rows));
          }
        }
      });
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fastopt, CPU, m) {
  m.impl("row_col_sq_means_", &row_col_sq_means_cpu);
}

}  // namespace fastopt::cpu
