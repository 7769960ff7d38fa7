// Independent double-precision references for the update rules, written from
// the formulas in the top comments of csrc/rules/*.h (and torch.optim), not
// from the rules' code, plus the random inputs the tests feed to both.
//
// Note [Tracked reference values]
// A float computation of x + y where x ≈ -y loses every digit, so "relative
// error of the result" is no tolerance for a recurrence like
// m = m + (1 - beta1) * (g - m) with gradients of random sign.  Each reference
// value therefore carries, next to its value, an error scale `mag`: the same
// computation run on magnitudes (|a| + |b| for a sum, |a| |b| for a product,
// first-order propagation for division and sqrt).  Rounding error of a
// correct implementation is a small multiple of unit roundoff times `mag`,
// so tests compare |got - value| <= rtol * mag with rtol a modest multiple
// of the unit roundoff, while a wrong formula misses by O(mag).
// Hyperparameter-derived scalars (1 - beta1, lr / (1 - beta1^t), ...) are
// computed once per step in double (DESIGN.md) and enter as constants whose
// only error is one rounding.
#pragma once

#include <cmath>
#include <cstdint>

#include "rules/adagrad.h"
#include "rules/adam.h"
#include "rules/rmsprop.h"
#include "rules/sgd.h"

namespace fastopt::test {

struct Tracked {
  double value = 0.0;
  double mag = 0.0;  // error scale, >= |value| (Note [Tracked reference values])
};

// A constant or an input: exact, or off by one rounding.
inline Tracked C(double x) { return {x, std::fabs(x)}; }

inline Tracked operator+(Tracked a, Tracked b) { return {a.value + b.value, a.mag + b.mag}; }
inline Tracked operator-(Tracked a, Tracked b) { return {a.value - b.value, a.mag + b.mag}; }
inline Tracked operator-(Tracked a) { return {-a.value, a.mag}; }
inline Tracked operator*(Tracked a, Tracked b) { return {a.value * b.value, a.mag * b.mag}; }
inline Tracked operator/(Tracked a, Tracked b) {
  const double q = a.value / b.value;
  return {q, (a.mag + std::fabs(q) * b.mag) / std::fabs(b.value)};
}
inline Tracked sqrt(Tracked a) {
  const double r = std::sqrt(a.value);
  return {r, r > 0 ? r + a.mag / (2 * r) : std::sqrt(a.mag)};
}
inline Tracked max(Tracked a, Tracked b) {
  return {a.value > b.value ? a.value : b.value, a.mag > b.mag ? a.mag : b.mag};
}

// ---- references, one per algorithm; slots in the order the ops take them ----

// Slots: exp_avg, exp_avg_sq, max_exp_avg_sq (amsgrad only).  `step` is t,
// the step count after this step's increment (1 on the first step).
inline void adam_reference(Tracked& p, Tracked g, Tracked* slots, const rules::AdamHyper& h,
                           bool decoupled, bool amsgrad, double step) {
  Tracked& m = slots[0];
  Tracked& v = slots[1];
  if (decoupled) {
    p = p * C(1 - h.lr * h.weight_decay);
  } else {
    g = g + C(h.weight_decay) * p;
  }
  m = m + C(1 - h.beta1) * (g - m);
  v = C(h.beta2) * v + C(1 - h.beta2) * g * g;
  Tracked second_moment = v;
  if (amsgrad) {
    Tracked& v_max = slots[2];
    v_max = max(v_max, v);
    second_moment = v_max;
  }
  const double bias_correction1 = 1 - std::pow(h.beta1, step);
  const double bias_correction2 = 1 - std::pow(h.beta2, step);
  p = p - C(h.lr / bias_correction1) * m /
              (sqrt(second_moment) / C(std::sqrt(bias_correction2)) + C(h.eps));
}

// Slots: momentum_buffer (momentum only).
inline void sgd_reference(Tracked& p, Tracked g, Tracked* slots, const rules::SgdHyper& h,
                          bool momentum, bool nesterov) {
  g = g + C(h.weight_decay) * p;
  Tracked d = g;
  if (momentum) {
    Tracked& b = slots[0];
    b = h.first_momentum_step ? g : C(h.momentum) * b + C(1 - h.dampening) * g;
    d = nesterov ? g + C(h.momentum) * b : b;
  }
  p = p - C(h.lr) * d;
}

// Slots: square_avg, grad_avg (centered only), momentum_buffer (momentum only).
inline void rmsprop_reference(Tracked& p, Tracked g, Tracked* slots, const rules::RmspropHyper& h,
                              bool centered, bool momentum) {
  g = g + C(h.weight_decay) * p;
  Tracked& s = slots[0];
  s = C(h.alpha) * s + C(1 - h.alpha) * g * g;
  Tracked variance = s;
  if (centered) {
    Tracked& a = slots[1];
    a = a + C(1 - h.alpha) * (g - a);
    variance = s - a * a;
  }
  const Tracked avg = sqrt(variance) + C(h.eps);
  if (momentum) {
    Tracked& b = slots[centered ? 2 : 1];
    b = C(h.momentum) * b + g / avg;
    p = p - C(h.lr) * b;
  } else {
    p = p - C(h.lr) * g / avg;
  }
}

// Slots: sum.
inline void adagrad_reference(Tracked& p, Tracked g, Tracked* slots, const rules::AdagradHyper& h,
                              double step) {
  Tracked& s = slots[0];
  g = g + C(h.weight_decay) * p;
  s = s + g * g;
  const double clr = h.lr / (1 + (step - 1) * h.lr_decay);
  p = p - C(clr) * g / (sqrt(s) + C(h.eps));
}

// Slots: num_slots streams that each get the gradient added.
inline void roofline_reference(Tracked& p, Tracked g, Tracked* slots, int num_slots) {
  p = p + g;
  for (int k = 0; k < num_slots; ++k) slots[k] = slots[k] + g;
}

// ---- deterministic random inputs ----

// splitmix64: tiny, deterministic on every platform, good enough for inputs.
class Rng {
 public:
  explicit Rng(uint64_t seed) : state_(seed) {}

  uint64_t next() {
    uint64_t z = (state_ += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  }
  double uniform(double lo, double hi) { return lo + (hi - lo) * double(next() >> 11) * 0x1.0p-53; }
  double log_uniform(double lo, double hi) {
    return std::exp(uniform(std::log(lo), std::log(hi)));
  }
  bool coin() { return (next() >> 63) != 0; }

  // A value of either sign and magnitude within a factor 10 of `scale`,
  // representable in float so that float and double runs see the same input.
  double signed_value(double scale) { return double(float((coin() ? 1 : -1) * positive(scale))); }
  double positive_value(double scale) { return double(float(positive(scale))); }

 private:
  double positive(double scale) { return scale * std::pow(10.0, uniform(-1, 1)); }
  uint64_t state_;
};

// A weight decay that is zero or not, as the test asks.
inline double random_weight_decay(Rng& rng, bool nonzero) {
  return nonzero ? rng.log_uniform(1e-4, 0.5) : 0.0;
}

// ---- hyperparameters and valid optimizer states at random ----

inline rules::AdamHyper random_adam_hyper(Rng& rng, bool weight_decay) {
  return {rng.log_uniform(1e-4, 0.5), rng.uniform(0.5, 0.99), rng.uniform(0.9, 0.9999),
          rng.log_uniform(1e-8, 1e-1), random_weight_decay(rng, weight_decay)};
}

inline rules::SgdHyper random_sgd_hyper(Rng& rng, bool weight_decay) {
  const double dampening = rng.coin() ? 0.0 : rng.uniform(0.0, 0.9);
  return {rng.log_uniform(1e-4, 0.5), rng.uniform(0.1, 0.99), dampening,
          random_weight_decay(rng, weight_decay), /*nesterov=*/false, /*first_momentum_step=*/false};
}

inline rules::RmspropHyper random_rmsprop_hyper(Rng& rng, bool weight_decay) {
  return {rng.log_uniform(1e-4, 0.1), rng.uniform(0.8, 0.999), rng.log_uniform(1e-8, 1e-1),
          random_weight_decay(rng, weight_decay), rng.uniform(0.1, 0.99)};
}

inline rules::AdagradHyper random_adagrad_hyper(Rng& rng, bool weight_decay) {
  const double lr_decay = rng.coin() ? 0.0 : rng.log_uniform(1e-4, 0.5);
  return {rng.log_uniform(1e-4, 0.5), lr_decay, random_weight_decay(rng, weight_decay),
          rng.log_uniform(1e-10, 1e-1)};
}

// States a run could have reached: second moments positive, a centered
// RMSprop's square_avg above grad_avg^2.  `g` is the gradient scale; an
// RMSprop momentum buffer accumulates normalized steps g / avg, so it is O(1).
inline void random_adam_state(Rng& rng, double* slots, bool amsgrad, double g) {
  slots[0] = rng.signed_value(g);
  slots[1] = rng.positive_value(g * g);
  if (amsgrad) slots[2] = rng.positive_value(g * g);
}

inline void random_rmsprop_state(Rng& rng, double* slots, bool centered, bool momentum, double g) {
  int k = 0;
  if (centered) {
    const double grad_avg = rng.signed_value(g);
    slots[k++] = double(float(grad_avg * grad_avg * rng.uniform(1.1, 3.0)));
    slots[k++] = grad_avg;
  } else {
    slots[k++] = rng.positive_value(g * g);
  }
  if (momentum) slots[k++] = rng.signed_value(1.0);
}

}  // namespace fastopt::test
