// Adafactor's update for one element (Shazeer & Stern 2018, "Adafactor:
// Adaptive Learning Rates with Sublinear Memory Cost", Algorithms 4 and 5,
// as torch.optim.Adafactor computes it):
//
//   w = t^beta2_decay;  rho = min(lr, 1 / sqrt(t))
//   v = lerp(v, g * g, w)                          (a vector param: v is its state)
//   u = g / sqrt(max(v, eps1^2))
//   alpha = max(eps2, ||p|| / sqrt(n)) * rho       (p before the step, n elements)
//   p = p * (1 - lr * wd) - alpha / max(1, ||u|| / (sqrt(n) * d)) * u
//
// A param of two or more dims keeps row and column factors of v instead
// (fastopt/adafactor.py, Note [Adafactor's passes]); its variant reads the
// estimate v built from them and leaves the slot as it is (kFactored).
// ||p||, ||u|| and n are per-tensor sums (Note [Reduction phase]): n is the
// sum of one per element, exact in double.
#pragma once

#include <cmath>

#include "common.h"
#include "reduction.h"

namespace fastopt::rules {

// The op's hyperparameters (AdafactorOptimizer::kFields).
struct AdafactorHyper {
  double lr, beta2_decay, eps1, eps2, d, weight_decay;
  bool factored;
};

template <typename T>
struct AdafactorScalars {
  LerpWeight<T> to_grad_sq;  // t^beta2_decay: the variance's step towards g * g
  T eps1_sq;                 // the floor of the variance
  T decay_factor;            // 1 - lr * wd
  double rho, eps2, d;
  T neg_step;                // -alpha / max(1, rms(u) / d) (finish)
};

template <bool kFactored>
struct Adafactor {
  enum Slot { kVariance };
  enum Sum { kParamSq, kUpdateSq, kCount };
  static constexpr int kNumSlots = 1;
  static constexpr int kNumScalarStates = 1;  // step
  static constexpr int kNumSums = 3;
  using Hyper = AdafactorHyper;
  template <typename T>
  using Scalars = AdafactorScalars<T>;

  FASTOPT_HOST_DEVICE static void advance(const Hyper&, const double* before, double* after) {
    count_step(before, after);
  }

  template <typename T>
  FASTOPT_HOST_DEVICE static Scalars<T> scalars(const Hyper& h, const double*, const double* after) {
    const double step = after[0];
    Scalars<T> s;
    s.to_grad_sq = LerpWeight<T>::of(std::pow(step, h.beta2_decay));
    s.eps1_sq = T(h.eps1 * h.eps1);
    s.decay_factor = T(1.0 - h.lr * h.weight_decay);
    const double inverse_root_step = 1.0 / std::sqrt(step);
    s.rho = inverse_root_step < h.lr ? inverse_root_step : h.lr;  // Python's min(lr, ...)
    s.eps2 = h.eps2;
    s.d = h.d;
    s.neg_step = T(0);
    return s;
  }

  // The update direction u; advances a vector param's variance.
  template <typename T>
  FASTOPT_HOST_DEVICE static T direction(T grad, T& variance, const Scalars<T>& s) {
    if (!kFactored) variance = lerp(variance, grad * grad, s.to_grad_sq);
    const T floored = variance < s.eps1_sq ? s.eps1_sq : variance;
    return grad * (T(1) / std::sqrt(floored));
  }

  template <typename T>
  FASTOPT_HOST_DEVICE static void reduce(T param, T grad, const T* slot, const Scalars<T>& s, double* terms) {
    T variance = slot[kVariance];
    const double u = double(direction(grad, variance, s));
    terms[kParamSq] = double(param) * double(param);
    terms[kUpdateSq] = u * u;
    terms[kCount] = 1.0;
  }

  template <typename T>
  FASTOPT_HOST_DEVICE static void finish(Scalars<T>& s, const double* sums) {
    const double root_n = std::sqrt(sums[kCount]);
    // As Python's max(a, x) in torch: a unless x > a, so a NaN norm gives eps2 and 1.
    const double param_rms = std::sqrt(sums[kParamSq]) / root_n;
    const double clip_ratio = std::sqrt(sums[kUpdateSq]) / (root_n * s.d);
    const double alpha = (param_rms > s.eps2 ? param_rms : s.eps2) * s.rho;
    const double denom = clip_ratio > 1.0 ? clip_ratio : 1.0;
    s.neg_step = T(-alpha / denom);
  }

  template <typename T>
  FASTOPT_HOST_DEVICE static void update(T& param, T grad, T* slot, const Scalars<T>& s) {
    const T u = direction(grad, slot[kVariance], s);
    param = param * s.decay_factor;
    param = param + s.neg_step * u;
  }
};

struct AdafactorOptimizer {
  static constexpr const char* kName = "adafactor";
  using Hyper = AdafactorHyper;
  static constexpr std::array<const char*, 1> kSlots{"variances"};
  static constexpr std::array<const char*, 1> kScalarStates{"state_steps"};
  static constexpr std::array<Field<Hyper>, 7> kFields{{
      {"lr", &Hyper::lr}, {"beta2_decay", &Hyper::beta2_decay}, {"eps1", &Hyper::eps1},
      {"eps2", &Hyper::eps2}, {"d", &Hyper::d}, {"weight_decay", &Hyper::weight_decay},
      {"factored", &Hyper::factored}}};

  static constexpr std::array<bool, 1> slots_used(const Hyper&) { return {true}; }
  static const char* problem(const Hyper&) { return nullptr; }

  template <class Fn>
  static void with_rule(const Hyper& h, Fn&& fn) {
    h.factored ? fn(Adafactor<true>{}) : fn(Adafactor<false>{});
  }
};

}  // namespace fastopt::rules
