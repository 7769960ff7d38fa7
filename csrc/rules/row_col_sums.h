// Note [Row and column sums]
// The reduction phase per row and per column of a matrix, the first phase of
// a factored step (Adafactor's second-moment factors, fastopt/adafactor.py):
// fastopt::row_col_sq_means_ takes, for each grad viewed as matrices
// [batches, rows, cols] (the last two dims), the mean over each row and each
// column of (g / grad_scale)^2, g in opmath (float32; float64 for float64
// grads), the squares and sums in double, each mean rounded to opmath once.
//
// The means are the same bits for any thread count, on the CPU and CUDA
// drivers and in fastopt/reference.py, because the order of addition is
// fixed by the shape alone:
//   - a row: element j goes to lane j % kRowSumLanes; each lane adds in
//     column order, and the row's sum adds its lanes in lane order (so the
//     CPU vectorizes a row, and the CUDA threads of a row read it coalesced);
//   - a column: the rows of a matrix are cut into chunks of
//     column_chunk_rows(rows) = ceil(sqrt(rows)) rows; each chunk adds its
//     rows in order, and the column's sum adds its chunks' sums in chunk
//     order (so threads share a matrix's columns).  Square-root chunks keep
//     the longest chain of additions at 2 sqrt(rows): float64 grads (whose
//     squares round) stay within a few ulps of torch's pairwise sums on
//     tall matrices, where one chain of 65536 rows did not.  The chunks'
//     sums in memory take sqrt(rows) doubles per column.
// One read of the grads gives both, where torch.optim.Adafactor reads them
// twice (its norm over the columns striding through memory) and squares them
// into a temporary.  The means of an empty row or column are 0 / 0 (NaN), as
// torch's mean.  No torch header: the CUDA kernels include it.
#pragma once

#include <cstdint>

#include "common.h"

namespace fastopt::rules {

// Accumulators per row: two AVX-512 (four AVX2) vectors of doubles, enough
// adds in flight to hide their latency; CUDA threads per row.
constexpr int kRowSumLanes = 16;

// Rows per column chunk of a matrix of `rows` rows: ceil(sqrt(rows)), at
// least 1 (integer arithmetic: the same on every driver).
FASTOPT_HOST_DEVICE inline int64_t column_chunk_rows(int64_t rows) {
  int64_t chunk_rows = 1;
  while (chunk_rows * chunk_rows < rows) chunk_rows *= 2;
  int64_t low = chunk_rows / 2;  // low^2 < rows <= chunk_rows^2 (or rows <= 1)
  while (chunk_rows - low > 1) {
    const int64_t middle = (low + chunk_rows) / 2;
    (middle * middle < rows ? low : chunk_rows) = middle;
  }
  return chunk_rows;
}

// Column chunks of a matrix of `rows` rows (0 without rows).
FASTOPT_HOST_DEVICE inline int64_t num_column_chunks(int64_t rows) {
  const int64_t chunk_rows = column_chunk_rows(rows);
  return (rows + chunk_rows - 1) / chunk_rows;
}

}  // namespace fastopt::rules
