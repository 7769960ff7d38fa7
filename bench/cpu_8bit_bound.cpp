// Where the CPU time of an Adam step with 8-bit state goes, on one core:
// the rule, the codec (Note [8-bit state] in csrc/rules/quantization.h) and
// both together, as the CPU driver runs them per block of 256 elements
// (decode the slots, the element loop, encode them with new scales), on data
// resident in L1 (the arithmetic alone) and on 32M elements (with memory).
// Each figure is the median of repeated passes, in ns per element, and the
// ratios are of figures of the same run.  `make bench-8bit-bound` builds and
// runs it; the README's 8-bit section cites its output.
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <random>
#include <vector>

#include "rules/adam.h"
#include "rules/quantization.h"

namespace {

using namespace fastopt;
using Rule = rules::Adam<rules::WeightDecay::kDecoupled, false>;
using Scalars = rules::AdamScalars<float>;
constexpr int64_t kBlock = quantization::kBlockElements;

// Out of line like the driver's per-ISA loops, so that each is timed alone.
__attribute__((noinline)) void rule_loop(float* __restrict param, const float* __restrict grad,
                                         float* __restrict exp_avg, float* __restrict exp_avg_sq,
                                         const Scalars& scalars, int64_t count) {
  const Scalars s = scalars;
  for (int64_t i = 0; i < count; ++i) {
    float p = param[i], slot[2] = {exp_avg[i], exp_avg_sq[i]};
    Rule::update(p, grad[i], slot, s);
    param[i] = p;
    exp_avg[i] = slot[0];
    exp_avg_sq[i] = slot[1];
  }
}

__attribute__((noinline)) void decode(const uint8_t* codes, float stored_scale, int64_t count, float* values) {
  quantization::decode_block(codes, stored_scale, count, values);
}

__attribute__((noinline)) void encode(const float* values, int64_t count, uint8_t* codes, float* stored_scale) {
  quantization::encode_block_narrowed(values, count, codes, stored_scale);
}

struct State {
  std::vector<float> param, grad, exp_avg, exp_avg_sq, scales[2];
  std::vector<uint8_t> codes[2];

  explicit State(int64_t n) : param(n), grad(n), exp_avg(n), exp_avg_sq(n) {
    std::mt19937 rng(0);
    std::normal_distribution<float> normal;
    for (int64_t i = 0; i < n; ++i) {
      param[i] = normal(rng);
      grad[i] = normal(rng);
      exp_avg[i] = 0.1f * normal(rng);
      exp_avg_sq[i] = 0.01f * normal(rng) * normal(rng) + 1e-6f;
    }
    for (int k = 0; k < 2; ++k) {
      codes[k].resize(n);
      scales[k].resize(quantization::num_blocks(n));
      const float* values = k == 0 ? exp_avg.data() : exp_avg_sq.data();
      for (int64_t b = 0; b < int64_t(scales[k].size()); ++b) {
        encode(values + b * kBlock, std::min(kBlock, n - b * kBlock), codes[k].data() + b * kBlock, &scales[k][b]);
      }
    }
  }
  int64_t size() const { return int64_t(param.size()); }

  void float_step(const Scalars& s) {
    rule_loop(param.data(), grad.data(), exp_avg.data(), exp_avg_sq.data(), s, size());
  }
  // with_rule = false: the codec alone (decode and encode both slots).
  void quantized_step(const Scalars& s, bool with_rule) {
    alignas(64) float values[2][kBlock];
    for (int64_t b = 0; b < int64_t(scales[0].size()); ++b) {
      const int64_t begin = b * kBlock, count = std::min(kBlock, size() - begin);
      for (int k = 0; k < 2; ++k) decode(codes[k].data() + begin, scales[k][b], count, values[k]);
      if (with_rule) rule_loop(param.data() + begin, grad.data() + begin, values[0], values[1], s, count);
      for (int k = 0; k < 2; ++k) encode(values[k], count, codes[k].data() + begin, &scales[k][b]);
    }
  }
};

template <class Fn>
double ns_per_element(int64_t n, int repeats, Fn&& fn) {
  std::vector<double> times;
  fn();  // warm-up
  for (int r = 0; r < repeats; ++r) {
    const auto start = std::chrono::steady_clock::now();
    fn();
    times.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
  }
  std::sort(times.begin(), times.end());
  return times[times.size() / 2] * 1e9 / double(n);
}

void measure(const char* where, int64_t n, int repeats, const Scalars& s) {
  State state(n);
  const double rule = ns_per_element(n, repeats, [&] { state.float_step(s); });
  const double codec = ns_per_element(n, repeats, [&] { state.quantized_step(s, false); });
  const double both = ns_per_element(n, repeats, [&] { state.quantized_step(s, true); });
  std::printf("| %s | %lld | %.3f | %.3f | %.3f | %.2f |\n", where, static_cast<long long>(n), rule, codec, both,
              rule / both);
}

}  // namespace

int main() {
  const double step[1] = {10.0};
  const rules::AdamHyper hyper{1e-3, 0.9, 0.999, 1e-8, 1e-2, true, false};
  const Scalars s = Rule::scalars<float>(hyper, nullptr, step);
  std::printf("ns per element on one core (median); float32 state = the rule's loop over float32 slots;\n"
              "codec = decode + encode of both 8-bit slots; 8-bit step = both, per block as the CPU driver\n\n");
  std::printf("| data | elements | float32 state | codec | 8-bit step | float32 / 8-bit |\n");
  std::printf("| --- | ---: | ---: | ---: | ---: | ---: |\n");
  measure("in L1", 2048, 20001, s);
  measure("in memory", int64_t(32) << 20, 9, s);
  return 0;
}
