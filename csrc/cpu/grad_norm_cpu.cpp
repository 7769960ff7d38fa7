// The CPU kernel of fastopt::grad_sq_norm: the sum of squares of all grads,
// the one pass over the grads that max_grad_norm adds to a step (Note
// [Fused gradient clipping] in fastopt/clip.py).
//
// Note [Deterministic grad norm]
// fastopt's steps are bit-identical for any torch.set_num_threads, so the
// norm that scales them must be too.  The concatenated elements of all grads
// are cut into chunks of kNormChunkElements, fixed by position, not by
// thread; each chunk's sum is taken in a fixed order and the chunk partials
// are added in chunk order after the parallel region.  Within a chunk every
// tensor segment is summed into kNormLanes interleaved accumulators, so the
// loop vectorizes and streams at memory speed without reassociation (no
// -ffast-math; -ffp-contract=off keeps every ISA's loop rounding alike).  The
// sums are in double: squares of float32 and 16-bit values are exact there
// and their sum cannot overflow (float64 grads above ~1e154 can).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../validate.h"
#include "multi_tensor_apply.h"

namespace fastopt::cpu {
namespace {

// Elements per chunk: 256 KB of float32, enough to amortize a task, and a
// 1M-element grad still spreads over 16 chunks for the threads to share.
// Changing it changes the norm's last bits (Note [Deterministic grad norm]).
constexpr int64_t kNormChunkElements = 65536;
// Independent accumulators per segment: two AVX-512 (four AVX2) vectors of
// doubles, enough adds in flight to hide their latency.
constexpr int kNormLanes = 16;

template <typename scalar_t>
FASTOPT_ALWAYS_INLINE double sum_squares_body(const scalar_t* x, int64_t n) {
  using opmath_t = at::opmath_type<scalar_t>;
  double lanes[kNormLanes] = {};
  int64_t i = 0;
  for (; i + kNormLanes <= n; i += kNormLanes) {
    for (int k = 0; k < kNormLanes; ++k) {
      const double v = static_cast<double>(static_cast<opmath_t>(x[i + k]));
      lanes[k] += v * v;
    }
  }
  for (int k = 0; i < n; ++i, ++k) {
    const double v = static_cast<double>(static_cast<opmath_t>(x[i]));
    lanes[k] += v * v;
  }
  double sum = 0;
  for (int k = 0; k < kNormLanes; ++k) sum += lanes[k];
  return sum;
}

template <typename scalar_t>
double sum_squares_baseline(const scalar_t* x, int64_t n) {
  return sum_squares_body(x, n);
}

#if FASTOPT_X86_MULTIVERSION
template <typename scalar_t>
FASTOPT_TARGET_AVX2 double sum_squares_avx2(const scalar_t* x, int64_t n) {
  return sum_squares_body(x, n);
}

template <typename scalar_t>
FASTOPT_TARGET_AVX512 double sum_squares_avx512(const scalar_t* x, int64_t n) {
  return sum_squares_body(x, n);
}
#endif

template <typename scalar_t>
double sum_squares(const scalar_t* x, int64_t n) {
#if FASTOPT_X86_MULTIVERSION
  switch (active_isa()) {
    case Isa::kAvx512: return sum_squares_avx512(x, n);
    case Isa::kAvx2: return sum_squares_avx2(x, n);
    case Isa::kBaseline: break;
  }
#endif
  return sum_squares_baseline(x, n);
}

// Elements [begin, begin + count) of a dense tensor, in memory order.
double segment_sum_squares(const at::Tensor& t, int64_t begin, int64_t count) {
  return AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "grad_sq_norm", [&] {
    return sum_squares(t.const_data_ptr<scalar_t>() + begin, count);
  });
}

at::Tensor grad_sq_norm_cpu(at::TensorList grads) {
  check_norm_grads("fastopt::grad_sq_norm", grads, c10::kCPU);
  // Complex grads as real pairs; grads that are not one dense block of
  // memory through contiguous copies (the sum is order-independent in
  // exact arithmetic, and fixed by the layout in floating point).
  std::vector<at::Tensor> dense(grads.size());
  std::vector<int64_t> offsets(grads.size() + 1, 0);
  for (size_t i = 0; i < grads.size(); ++i) {
    const at::Tensor real = grads[i].is_complex() ? at::view_as_real(grads[i]) : grads[i];
    dense[i] = real.is_non_overlapping_and_dense() ? real : real.contiguous();
    offsets[i + 1] = offsets[i] + dense[i].numel();
  }
  const int64_t total = offsets.back();
  const int64_t num_chunks = (total + kNormChunkElements - 1) / kNormChunkElements;
  std::vector<double> partials(num_chunks, 0.0);
  at::parallel_for(0, num_chunks, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
    for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
      int64_t begin = chunk * kNormChunkElements;
      const int64_t end = std::min(total, begin + kNormChunkElements);
      size_t t = std::upper_bound(offsets.begin(), offsets.end(), begin) - offsets.begin() - 1;
      double sum = 0;
      for (; begin < end; ++t) {
        const int64_t stop = std::min(end, offsets[t + 1]);
        if (stop > begin) sum += segment_sum_squares(dense[t], begin - offsets[t], stop - begin);
        begin = stop;
      }
      partials[chunk] = sum;
    }
  });
  double sum = 0;
  for (const double partial : partials) sum += partial;
  return at::scalar_tensor(sum, at::TensorOptions().dtype(at::kDouble));
}

}  // namespace

TORCH_LIBRARY_IMPL(fastopt, CPU, m) {
  m.impl("grad_sq_norm", &grad_sq_norm_cpu);
}

}  // namespace fastopt::cpu
