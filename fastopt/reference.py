"""The update rules in plain PyTorch: fastopt's specification, its fallback
when the compiled extension is missing, and the oracle of its tests.

Each function has the signature of the op ``torch.ops.fastopt.<name>``
(Note [fastopt op schemas] in csrc/optimizer_ops.cpp) and performs the
arithmetic of the matching rule in csrc/rules/ in the same order, in float32
for float16/bfloat16 params (float64 for float64), rounding once on store:
to nearest, or stochastically (Note [Stochastic rounding] in
csrc/rules/rounding.h, bit for bit for tensors the kernels walk in place).
State may be kept in another dtype and params may have float32 master
copies (Note [Storage of a step] in csrc/cpu/multi_tensor_apply.h).
Like the ops, every function checks all its tensors before it changes any.
"""
from __future__ import annotations

import functools
import math
import struct
import sys
from typing import Any, Sequence

import torch
from torch import Tensor

__all__ = [
    "adam_", "sgd_", "rmsprop_", "adagrad_", "nadam_", "radam_", "adamax_", "adadelta_", "asgd_", "rprop_",
    "lion_", "adopt_", "lamb_", "lars_", "muon_momentum_", "muon_update_", "adafactor_",
    "swats_", "grad_sq_norm", "row_col_sq_means_",
    "BoundTensors", "tensor_problem", "is_dense", "ordered_sum", "grad_sq_norm_bound_",
    "quantize_blocks", "dequantize_blocks", "num_quantization_blocks", "QUANTIZATION_BLOCK",
]

_SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def tensor_problem(param_name: str, param: Tensor, tensors: dict[str, Tensor | None],
                   scalar_states: dict[str, Any] | None = None, *, complex_ok: bool = False,
                   sparse_ok: tuple[str, ...] = (), dtypes: dict[str, torch.dtype] | None = None
                   ) -> str | None:
    """What is wrong with one param's tensors, e.g. ``"grads[2] has shape [8]
    but params[2] has shape [7]"``, or None.  The checks of csrc/validate.cpp:
    the param is a dense tensor of a supported dtype (complex ones are stepped
    as real pairs where ``complex_ok``), each of ``tensors`` (name: tensor) has
    its device and shape and its dtype, or the one ``dtypes`` names for it
    (state slots, master copies), and is dense unless named in ``sparse_ok``;
    each of ``scalar_states`` (name: value; the step count, ...) is a
    one-element float tensor."""
    dtypes = dtypes or {}
    if param.layout != torch.strided:
        return f"{param_name} has layout {param.layout}; fastopt supports dense (strided) tensors only"
    dtype = param.dtype.to_real() if complex_ok and param.is_complex() else param.dtype
    if dtype not in _SUPPORTED_DTYPES:
        return f"{param_name} has dtype {param.dtype}; supported: float32, float64, float16, bfloat16"
    for name, t in tensors.items():
        if t is None:
            return f"{name} is None"
        if t.layout != torch.strided and name not in sparse_ok:
            return f"{name} has layout {t.layout}; fastopt supports dense (strided) tensors only"
        for what, got, expected in (("is on", t.device, param.device),
                                    ("has shape", list(t.shape), list(param.shape))):
            if got != expected:
                return f"{name} {what} {got} but {param_name} {what} {expected}"
        expected_dtype = dtypes.get(name, param.dtype)
        if t.dtype != expected_dtype:
            if expected_dtype == param.dtype:
                return f"{name} has dtype {t.dtype} but {param_name} has dtype {param.dtype}"
            return (f"{name} has dtype {t.dtype} but {expected_dtype} was expected "
                    f"({param_name} has dtype {param.dtype})")
    for name, state in (scalar_states or {}).items():
        if (not isinstance(state, Tensor) or state.numel() != 1
                or state.dtype not in (torch.float32, torch.float64)):
            return f"{name} must be a one-element float32 or float64 tensor"
    return None


def _state_dtype(params: Sequence[Tensor], slots: dict[str, Sequence[Tensor]],
                 master_copies: bool) -> torch.dtype | None:
    """The dtype of the call's state slots, as state_dtype_of in csrc/validate.cpp."""
    for tensors in slots.values():
        return tensors[0].dtype if tensors and tensors[0] is not None else params[0].dtype
    return torch.float32 if master_copies else params[0].dtype


def _check_lists(op: str, params: Sequence[Tensor], grads: Sequence[Tensor],
                 slots: dict[str, Sequence[Tensor]], scalar_states: dict[str, Sequence[Tensor]],
                 master_params: Sequence[Tensor] = (), rounding_seed: int | None = None,
                 sparse_grads: bool = False, state_scales: Sequence[Tensor] = ()) -> None:
    """The checks of csrc/validate.cpp: one grad, slot tensor, master copy
    (when given) and scalar state (step count, ...) per param, each on the
    param's device with its shape;
    grads of the param's dtype (``sparse_grads``: they may be sparse), slots of
    the call's state dtype, master copies float32; and a storage the kernels
    support (check_storage)."""
    n = len(params)
    lists = {"grads": grads, **slots}
    if master_params:
        lists["master_params"] = master_params
    for name, tensors in {**lists, **scalar_states}.items():
        if len(tensors) != n:
            raise RuntimeError(f"fastopt::{op}: got {n} params but {len(tensors)} {name}")
    if n == 0:
        return
    state_dtype = _state_dtype(params, slots, bool(master_params))
    _check_storage(op, params[0].dtype, state_dtype, bool(master_params), rounding_seed is not None)
    for i, p in enumerate(params):
        dtypes = {f"{name}[{i}]": state_dtype for name in slots}
        dtypes[f"master_params[{i}]"] = torch.float32
        problem = tensor_problem(
            f"params[{i}]", p, {f"{name}[{i}]": tensors[i] for name, tensors in lists.items()},
            {f"{name}[{i}]": states[i] for name, states in scalar_states.items()},
            sparse_ok=(f"grads[{i}]",) if sparse_grads else (), dtypes=dtypes)
        if problem is None and p.dtype != params[0].dtype:
            problem = (f"params[{i}] has dtype {p.dtype} but params[0] has dtype {params[0].dtype}; "
                       "one call takes tensors of one dtype")
        if problem is not None:
            raise RuntimeError(f"fastopt::{op}: {problem}")
    problem = _state_scales_problem(params, slots, state_scales, state_dtype == torch.uint8)
    if problem is not None:
        raise RuntimeError(f"fastopt::{op}: {problem}")


def _state_scales_problem(params: Sequence[Tensor], slots: dict[str, Sequence[Tensor]],
                          state_scales: Sequence[Tensor], quantized: bool) -> str | None:
    """check_state_scales of csrc/validate.cpp: 8-bit slots come with one
    contiguous float32 scale tensor per slot and param (slot-major), of one
    element per QUANTIZATION_BLOCK; other slots with none."""
    n = len(params)
    if not quantized:
        return None if not state_scales else "state_scales are for uint8 (8-bit) state slots only"
    if len(state_scales) != len(slots) * n:
        return (f"got {n} params and {len(slots)} uint8 state slot lists but {len(state_scales)} "
                f"state_scales (expected {len(slots) * n}, slot-major)")
    for index, scale in enumerate(state_scales):
        i = index % n
        expected = num_quantization_blocks(params[i].numel())
        if (scale.dtype != torch.float32 or scale.device != params[i].device or scale.numel() != expected
                or not scale.is_contiguous()):
            return (f"state_scales[{index}] must be a contiguous float32 tensor of {expected} elements on "
                    f"{params[i].device} (the block scales of params[{i}]'s slot {index // n}), got a "
                    f"{scale.dtype} tensor of {scale.numel()} elements on {scale.device}")
    return None


def _check_storage(op: str, param_dtype: torch.dtype, state_dtype: torch.dtype, master_copies: bool,
                   stochastic_rounding: bool) -> None:
    """check_storage of csrc/validate.cpp."""
    low_precision = param_dtype in (torch.float16, torch.bfloat16)
    if state_dtype not in (param_dtype, torch.float32, torch.bfloat16, torch.uint8):
        raise RuntimeError(f"fastopt::{op}: state of dtype {state_dtype} for params of dtype {param_dtype}; "
                           "supported: the params' dtype, float32, bfloat16 or uint8 (8-bit)")
    if state_dtype == torch.uint8 and param_dtype == torch.float64:
        raise RuntimeError(f"fastopt::{op}: uint8 (8-bit) state is for float32, float16 and bfloat16 "
                           "params, got params of dtype torch.float64")
    if master_copies and not low_precision:
        raise RuntimeError(f"fastopt::{op}: master_params are for float16 / bfloat16 params, got params "
                           f"of dtype {param_dtype}")
    if master_copies and state_dtype not in (torch.float32, torch.bfloat16, torch.uint8):
        raise RuntimeError(f"fastopt::{op}: with master_params the state must be float32, bfloat16 or uint8, "
                           f"got {state_dtype}")
    if stochastic_rounding and (param_dtype != torch.bfloat16 or master_copies):
        raise RuntimeError(f"fastopt::{op}: rounding_seed (stochastic rounding) is for bfloat16 params "
                           f"without master_params, got params of dtype {param_dtype}"
                           + (" with master_params" if master_copies else ""))


def _store(target: Tensor, value: Tensor) -> None:
    if value is not target:
        target.copy_(value)


# -- 8-bit state (Note [8-bit state] in csrc/rules/quantization.h) ------------
QUANTIZATION_BLOCK = 256  # elements per scale: kBlockElements
_MIN_ABSMAX = 2.0**-96  # kMinAbsmax: blocks below it are stored as zeros
_SIGN_BIT = 0x80


class _Magnitude:
    """Magnitude<E, M> of quantization.h: an unsigned float format whose
    largest binade is [1, 2), with subnormals; integer math in int64."""

    def __init__(self, exponent_bits: int, mantissa_bits: int) -> None:
        bias = 2**exponent_bits - 1
        self.max = 2.0 - 2.0**-mantissa_bits
        self.max_code = 2**(exponent_bits + mantissa_bits) - 1
        self.rebias = (127 - bias) << 23
        self.dropped = 23 - mantissa_bits
        self.min_normal = 2.0**(1 - bias)
        self.rounder = 2.0**(24 - bias - mantissa_bits)
        self.rounder_bits = (151 - bias - mantissa_bits) << 23  # kRounderBits: its float32 bits
        self.subnormal_step = 2.0**(1 - bias - mantissa_bits)
        self.mantissa_bits = mantissa_bits

    def encode(self, z: Tensor) -> Tensor:
        """Codes (int64) of float32 ``z`` in [0, max] (NaN saturates)."""
        bits = z.view(torch.int32).to(torch.int64) & 0x7FFFFFFF
        subnormal = (z + self.rounder).view(torch.int32).to(torch.int64) - self.rounder_bits
        odd = (bits >> self.dropped) & 1
        normal = (bits - self.rebias + ((1 << (self.dropped - 1)) - 1) + odd) >> self.dropped
        return torch.where(z < self.min_normal, subnormal, normal).clamp_(max=self.max_code)

    def decode(self, code: Tensor) -> Tensor:
        """float32 values of int64 codes."""
        normal = ((code << self.dropped) + self.rebias).to(torch.int32).view(torch.float32)
        subnormal = code.to(torch.float32) * self.subnormal_step
        return torch.where((code >> self.mantissa_bits) == 0, subnormal, normal)


_SIGNED = _Magnitude(4, 3)    # after the sign bit
_UNSIGNED = _Magnitude(5, 3)


def _blocks(values: Tensor) -> Tensor:
    """``values`` in row-major order as rows of QUANTIZATION_BLOCK (the last
    padded with zeros, which change neither absmax nor sign)."""
    flat = values.reshape(-1)
    pad = -flat.numel() % QUANTIZATION_BLOCK
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return flat.view(-1, QUANTIZATION_BLOCK)


def quantize_blocks(values: Tensor) -> tuple[Tensor, Tensor]:
    """8-bit codes (uint8, shaped like ``values``) and block scales (float32,
    one per QUANTIZATION_BLOCK elements in row-major order) of ``values``, as
    the kernels store a state slot of dtype uint8 (Note [8-bit state] in
    csrc/rules/quantization.h): per block, the signed map (sign + E4M3) when
    a value is negative, else the unsigned one (E5M3), scale = ±absmax / max."""
    blocks = _blocks(values.detach().to(torch.float32))
    absmax = blocks.abs().amax(dim=1, keepdim=True)
    negative = (blocks < 0).any(dim=1, keepdim=True)
    scale = torch.where(negative, absmax / _SIGNED.max, absmax / _UNSIGNED.max)
    scale = torch.where(absmax < _MIN_ABSMAX, torch.zeros_like(scale), torch.where(negative, -scale, scale))
    magnitude = scale.abs()
    inverse = torch.where(magnitude > 0, 1.0 / magnitude, torch.zeros_like(magnitude))
    z = blocks.abs() * inverse
    signed = torch.where(blocks < 0, _SIGN_BIT, 0) | _SIGNED.encode(torch.where(z > _SIGNED.max, _SIGNED.max, z))
    unsigned = _UNSIGNED.encode(torch.where(z > _UNSIGNED.max, _UNSIGNED.max, z))
    codes = torch.where(negative, signed, unsigned).to(torch.uint8).reshape(-1)[:values.numel()]
    return codes.view(values.shape), scale.reshape(-1)


def dequantize_blocks(codes: Tensor, scales: Tensor) -> Tensor:
    """The float32 values of 8-bit codes and their block scales (quantize_blocks'
    inverse up to the codes' precision), shaped like ``codes``."""
    code = _blocks(codes.to(torch.int64))
    scale = scales.reshape(-1, 1).to(torch.float32)
    magnitude = scale.abs()
    signed = _SIGNED.decode(code & 0x7F) * magnitude
    signed = torch.where((code & _SIGN_BIT) != 0, -signed, signed)
    unsigned = _UNSIGNED.decode(code) * magnitude
    values = torch.where(torch.signbit(scale), signed, unsigned)
    return values.reshape(-1)[:codes.numel()].view(codes.shape)


def num_quantization_blocks(numel: int) -> int:
    """The number of block scales of a state slot of ``numel`` elements."""
    return -(-numel // QUANTIZATION_BLOCK)


_MASK32 = 0xFFFFFFFF


def _mix32(x):
    """mix32 of csrc/rules/rounding.h, on Python ints or int64 tensors holding
    uint32 values (products wrap; the mask keeps their low 32 bits)."""
    x = x ^ (x >> 16)
    x = (x * 0x85EBCA6B) & _MASK32
    x = x ^ (x >> 13)
    x = (x * 0xC2B2AE35) & _MASK32
    return x ^ (x >> 16)


def is_dense(t: Tensor) -> bool:
    """Whether ``t`` covers a gap-free block of memory from its first element
    (contiguous up to a permutation of its dimensions), as the kernels walk it."""
    expected = 1
    for stride, size in sorted((st, n) for st, n in zip(t.stride(), t.shape) if n != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _round_stochastically(value: Tensor, seed: int, tensor: int) -> Tensor:
    """``value`` (float32) rounded to bfloat16 stochastically, as the kernels
    do for element i of the call's tensor ``tensor``, i counted in memory
    order (Note [Stochastic rounding])."""
    index = torch.arange(value.numel(), device=value.device)
    index = index.as_strided(value.shape, value.stride()) if is_dense(value) else index.view(value.shape)
    h = _mix32((seed & _MASK32) ^ ((tensor * 0x9E3779B1) & _MASK32))
    h = _mix32(h ^ (index & _MASK32))
    random16 = _mix32(h ^ (index >> 32)) >> 16
    bits = value.view(torch.int32).to(torch.int64) & _MASK32
    rounded = ((bits + random16) >> 16) << 16
    rounded = torch.where(rounded >= 2**31, rounded - 2**32, rounded).to(torch.int32).view(torch.float32)
    finite = (bits & 0x7F800000) != 0x7F800000
    return torch.where(finite, rounded, value).to(torch.bfloat16)


class _Step:
    """What every op's loop shares: the checks, then per element stream the
    conversion to and from opmath (float32 for 16-bit params, float64 for
    float64), master copies and the rounding of params on store."""

    def __init__(self, op: str, params, grads, slots: dict[str, Sequence[Tensor]],
                 scalar_states: dict[str, Sequence[Tensor]], *, lr: float, lr_tensor, grad_scale,
                 found_inf, master_params, rounding_seed, sparse_grads: bool = False,
                 state_scales: Sequence[Tensor] = ()) -> None:
        _check_lists(op, params, grads, slots, scalar_states, master_params, rounding_seed, sparse_grads,
                     state_scales)
        # The block scales of each 8-bit slot tensor, by identity (slot-major, as given).
        slot_tensors = [t for tensors in slots.values() for t in tensors]
        self.scales = {id(t): scale for t, scale in zip(slot_tensors, state_scales)}
        _check_step_args(op, lr_tensor, grad_scale, found_inf)
        self.skip = _amp_skips(found_inf)
        self.lr = lr if lr_tensor is None else lr_tensor.item()
        self.opmath = torch.float64 if params and params[0].dtype == torch.float64 else torch.float32
        self.grad_scale = None if grad_scale is None else grad_scale.item()
        self.masters = master_params
        self.seed = rounding_seed

    def load(self, t: Tensor) -> Tensor:
        """``t`` in opmath: itself (updated in place) when of that dtype, else a
        copy (8-bit slots: their values, dequantized)."""
        if id(t) in self.scales:
            return dequantize_blocks(t, self.scales[id(t)])
        return t if t.dtype == self.opmath else t.to(self.opmath)

    def store(self, slot: Tensor, value: Tensor) -> None:
        """Stores a state slot's new ``value`` (8-bit slots: quantized, with
        their block scales)."""
        if id(slot) in self.scales:
            codes, scale = quantize_blocks(value)
            slot.copy_(codes)
            self.scales[id(slot)].copy_(scale)
        else:
            _store(slot, value)

    def param(self, i: int, param: Tensor) -> Tensor:
        """The value the rule updates: the master copy (in place) or the param."""
        return self.masters[i] if self.masters else self.load(param)

    def store_param(self, i: int, param: Tensor, value: Tensor) -> None:
        if self.seed is not None:
            param.copy_(_round_stochastically(value, self.seed, i))
        else:
            _store(param, value)

    def grad(self, grad: Tensor, maximize: bool) -> Tensor:
        """The grad the rule sees: unscaled (AMP) and negated for maximize, in opmath."""
        grad = self.load(grad)
        if self.grad_scale is not None:
            grad = grad / self.grad_scale
        return -grad if maximize else grad


def _check_step_args(op: str, lr_tensor: Tensor | None, grad_scale: Tensor | None,
                     found_inf: Tensor | None) -> None:
    """The checks of check_step_args in csrc/validate.cpp."""
    for name, t in (("lr_tensor", lr_tensor), ("grad_scale", grad_scale), ("found_inf", found_inf)):
        if t is not None and (t.numel() != 1 or not t.is_floating_point()):
            raise RuntimeError(f"fastopt::{op}: {name} must be a one-element floating-point tensor")


def _amp_skips(found_inf: Tensor | None) -> bool:
    """AMP found an inf or NaN in the grads: the step changes nothing."""
    return found_inf is not None and found_inf.item() != 0




def _increment(step: Tensor) -> float:
    step += 1
    return step.item()


@torch.no_grad()
def adam_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, *, lr, beta1, beta2,
          eps, weight_decay, decoupled_weight_decay, amsgrad, maximize, lr_tensor=None, grad_scale=None,
          found_inf=None, master_params=(), rounding_seed=None, state_scales=()) -> None:
    """Adam / AdamW (csrc/rules/adam.h)::

        g = -g if maximize;  p *= 1 - lr*wd (decoupled)  or  g += wd*p (L2)
        m += (1 - beta1) * (g - m);  v = beta2*v + (1 - beta2)*g*g;  v_max = max(v_max, v)
        p += -lr/(1 - beta1^t) * m / (sqrt(v or v_max) / sqrt(1 - beta2^t) + eps)
    """
    slots = {"exp_avgs": exp_avgs, "exp_avg_sqs": exp_avg_sqs}
    if amsgrad:
        slots["max_exp_avg_sqs"] = max_exp_avg_sqs
    st = _Step("adam_", params, grads, slots, {"state_steps": state_steps},
               lr=lr, lr_tensor=lr_tensor, grad_scale=grad_scale, found_inf=found_inf,
               master_params=master_params, rounding_seed=rounding_seed,
               state_scales=state_scales)
    if st.skip:
        return
    lr = st.lr
    for i, param in enumerate(params):
        step = _increment(state_steps[i])
        bias_correction1 = 1 - beta1**step
        bias_correction2_sqrt = math.sqrt(1 - beta2**step)
        p, exp_avg, exp_avg_sq = st.param(i, param), st.load(exp_avgs[i]), st.load(exp_avg_sqs[i])
        g = st.grad(grads[i], maximize)
        if weight_decay != 0:
            if decoupled_weight_decay:
                p.mul_(1 - lr * weight_decay)
            else:
                g = g + weight_decay * p
        exp_avg.add_(g - exp_avg, alpha=1 - beta1)
        exp_avg_sq.mul_(beta2).add_(g * g, alpha=1 - beta2)
        second_moment = exp_avg_sq
        if amsgrad:
            second_moment = st.load(max_exp_avg_sqs[i])
            torch.maximum(second_moment, exp_avg_sq, out=second_moment)
            st.store(max_exp_avg_sqs[i], second_moment)
        denom = second_moment.sqrt().div_(bias_correction2_sqrt).add_(eps)
        p.add_(exp_avg / denom, alpha=-(lr / bias_correction1))
        st.store_param(i, param, p)
        st.store(exp_avgs[i], exp_avg)
        st.store(exp_avg_sqs[i], exp_avg_sq)


@torch.no_grad()
def sgd_(params, grads, momentum_buffers, *, lr, momentum, dampening, weight_decay, nesterov,
         first_momentum_step, maximize, lr_tensor=None, grad_scale=None, found_inf=None, master_params=(),
         rounding_seed=None, state_scales=()) -> None:
    """SGD (csrc/rules/sgd.h)::

        g = -g if maximize;  g += wd*p
        b = g (first momentum step)  or  b = momentum*b + (1 - dampening)*g
        p += -lr * (nesterov ? g + momentum*b : b)      (p += -lr*g without momentum)
    """
    if nesterov and momentum <= 0:
        raise RuntimeError("fastopt::sgd_: nesterov needs momentum > 0")
    slots = {"momentum_buffers": momentum_buffers} if momentum != 0 else {}
    st = _Step("sgd_", params, grads, slots, {},
               lr=lr, lr_tensor=lr_tensor, grad_scale=grad_scale, found_inf=found_inf,
               master_params=master_params, rounding_seed=rounding_seed,
               state_scales=state_scales, sparse_grads=True)
    if st.skip:
        return
    lr = st.lr
    for i, param in enumerate(params):
        p = st.param(i, param)
        # A sparse grad adds zeros elsewhere: torch.optim's sparse update, element for element.
        g = st.grad(grads[i].to_dense() if grads[i].is_sparse else grads[i], maximize)
        if weight_decay != 0:
            g = g + weight_decay * p
        direction = g
        if momentum != 0:
            buf = st.load(momentum_buffers[i])
            if first_momentum_step:
                buf.copy_(g)
            else:
                buf.mul_(momentum).add_(g, alpha=1 - dampening)
            st.store(momentum_buffers[i], buf)
            direction = g + momentum * buf if nesterov else buf
        p.add_(direction, alpha=-lr)
        st.store_param(i, param, p)


@torch.no_grad()
def rmsprop_(params, grads, square_avgs, grad_avgs, momentum_buffers, state_steps, *, lr, alpha, eps,
             weight_decay, momentum, centered, maximize, lr_tensor=None, grad_scale=None,
             found_inf=None, master_params=(), rounding_seed=None, state_scales=()) -> None:
    """RMSprop (csrc/rules/rmsprop.h)::

        g = -g if maximize;  g += wd*p;  s = alpha*s + (1 - alpha)*g*g
        a += (1 - alpha)*(g - a) (centered);  avg = sqrt(centered ? s - a*a : s) + eps
        b = momentum*b + g/avg; p += -lr*b  (momentum > 0)  or  p += -lr * g/avg
    """
    slots = {"square_avgs": square_avgs}
    if centered:
        slots["grad_avgs"] = grad_avgs
    if momentum > 0:
        slots["momentum_buffers"] = momentum_buffers
    st = _Step("rmsprop_", params, grads, slots, {"state_steps": state_steps},
               lr=lr, lr_tensor=lr_tensor, grad_scale=grad_scale, found_inf=found_inf,
               master_params=master_params, rounding_seed=rounding_seed,
               state_scales=state_scales)
    if st.skip:
        return
    lr = st.lr
    for i, param in enumerate(params):
        _increment(state_steps[i])
        p, square_avg = st.param(i, param), st.load(square_avgs[i])
        g = st.grad(grads[i], maximize)
        if weight_decay != 0:
            g = g + weight_decay * p
        square_avg.mul_(alpha).add_(g * g, alpha=1 - alpha)
        st.store(square_avgs[i], square_avg)
        variance = square_avg
        if centered:
            grad_avg = st.load(grad_avgs[i])
            grad_avg.add_(g - grad_avg, alpha=1 - alpha)
            st.store(grad_avgs[i], grad_avg)
            variance = square_avg - grad_avg * grad_avg
        avg = variance.sqrt().add_(eps)
        if momentum > 0:
            buf = st.load(momentum_buffers[i])
            buf.mul_(momentum).add_(g / avg)
            st.store(momentum_buffers[i], buf)
            p.add_(buf, alpha=-lr)
        else:
            p.add_(g / avg, alpha=-lr)
        st.store_param(i, param, p)


@torch.no_grad()
def adagrad_(params, grads, state_sums, state_steps, *, lr, lr_decay, weight_decay, eps, maximize,
             lr_tensor=None, grad_scale=None, found_inf=None, master_params=(), rounding_seed=None, state_scales=()) -> None:
    """Adagrad (csrc/rules/adagrad.h)::

        g = -g if maximize;  g += wd*p;  s += g*g
        p += -lr/(1 + (t - 1)*lr_decay) * g / (sqrt(s) + eps)

    A sparse grad (torch.optim's sparse Adagrad, no weight decay) updates ``s``
    and ``p`` at its indices only.
    """
    st = _Step("adagrad_", params, grads, {"state_sums": state_sums}, {"state_steps": state_steps},
               lr=lr, lr_tensor=lr_tensor, grad_scale=grad_scale, found_inf=found_inf,
               master_params=master_params, rounding_seed=rounding_seed,
               state_scales=state_scales,
               sparse_grads=True)
    if weight_decay != 0 and any(g.is_sparse for g in grads):
        raise RuntimeError("weight_decay option is not compatible with sparse gradients")
    if state_scales and any(g.is_sparse for g in grads):
        raise RuntimeError("fastopt::adagrad_: sparse grads with uint8 (8-bit) state are not supported")
    if st.skip:
        return
    lr = st.lr
    for i, param in enumerate(params):
        step = _increment(state_steps[i])
        clr = lr / (1 + (step - 1) * lr_decay)
        if grads[i].is_sparse:
            _adagrad_sparse(param, grads[i], state_sums[i], clr, eps, maximize)
            continue
        p, state_sum = st.param(i, param), st.load(state_sums[i])
        g = st.grad(grads[i], maximize)
        if weight_decay != 0:
            g = g + weight_decay * p
        state_sum.add_(g * g)
        st.store(state_sums[i], state_sum)
        p.add_(g / state_sum.sqrt().add_(eps), alpha=-clr)
        st.store_param(i, param, p)


def _adagrad_sparse(param: Tensor, grad: Tensor, state_sum: Tensor, clr: float, eps: float,
                    maximize: bool) -> None:
    """torch.optim.Adagrad's update for a sparse grad, in the tensors' dtype as torch does."""
    grad = (-grad if maximize else grad).coalesce()  # the update is non-linear: unique indices
    indices, values = grad._indices(), grad._values()
    def at_indices(new_values: Tensor) -> Tensor:
        return torch.sparse_coo_tensor(indices, new_values, grad.shape, check_invariants=False)

    state_sum.add_(at_indices(values.pow(2)))
    std_values = state_sum.sparse_mask(grad)._values().sqrt_().add_(eps)
    param.add_(at_indices(values / std_values), alpha=-clr)


def _float32(value: float) -> float:
    """``value`` rounded to the nearest float32."""
    return struct.unpack("f", struct.pack("f", value))[0]


def _adam_moments(p: Tensor, g: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, *, lr: float, beta1: float,
                  beta2: float, weight_decay: float, decoupled_weight_decay: bool) -> Tensor:
    """What NAdam, RAdam and QHAdam do before their own update (csrc/rules/adam_moments.h),
    in place: weight decay (decoupled: ``p *= 1 - lr*wd``; L2: ``g += wd*p``),
    then ``m += (1 - beta1)*(g - m)``, ``v = beta2*v + (1 - beta2)*g*g``.
    Returns the grad after L2 weight decay."""
    if weight_decay != 0:
        if decoupled_weight_decay:
            p.mul_(1 - lr * weight_decay)
        else:
            g = g + weight_decay * p
    exp_avg.add_(g - exp_avg, alpha=1 - beta1)
    exp_avg_sq.mul_(beta2).add_(g * g, alpha=1 - beta2)
    return g


def _nadam_mu(beta1: float, momentum_decay: float, step: float) -> float:
    """mu_t of NAdam's momentum schedule (nadam_mu in csrc/rules/nadam.h)."""
    return beta1 * (1.0 - 0.5 * 0.96 ** (step * momentum_decay))


@torch.no_grad()
def nadam_(params, grads, exp_avgs, exp_avg_sqs, state_steps, mu_products, *, lr, beta1, beta2, eps,
           weight_decay, momentum_decay, decoupled_weight_decay, maximize, lr_tensor=None, grad_scale=None,
           found_inf=None, master_params=(), rounding_seed=None, state_scales=()) -> None:
    """NAdam / NAdamW (csrc/rules/nadam.h)::

        g = -g if maximize;  p *= 1 - lr*wd (decoupled)  or  g += wd*p (L2)
        mu_t = beta1 * (1 - 0.5 * 0.96^(t*momentum_decay));  mu_product *= mu_t (in float32)
        m += (1 - beta1) * (g - m);  v = beta2*v + (1 - beta2)*g*g;  denom = sqrt(v / (1 - beta2^t)) + eps
        p += -lr*(1 - mu_t)/(1 - mu_product) * g/denom;  p += -lr*mu_{t+1}/(1 - mu_product*mu_{t+1}) * m/denom
    """
    st = _Step("nadam_", params, grads, {"exp_avgs": exp_avgs, "exp_avg_sqs": exp_avg_sqs},
               {"state_steps": state_steps, "mu_products": mu_products},
               lr=lr, lr_tensor=lr_tensor, grad_scale=grad_scale, found_inf=found_inf,
               master_params=master_params, rounding_seed=rounding_seed,
               state_scales=state_scales)
    if st.skip:
        return
    lr = st.lr
    for i, param in enumerate(params):
        step = _increment(state_steps[i])
        mu, mu_next = _nadam_mu(beta1, momentum_decay, step), _nadam_mu(beta1, momentum_decay, step + 1)
        # torch.optim multiplies its float32 mu_product in place by mu, rounded to float32 first.
        mu_products[i].fill_(_float32(_float32(mu_products[i].item()) * _float32(mu)))
        mu_product = mu_products[i].item()
        grad_coefficient = -lr * (1.0 - mu) / (1.0 - mu_product)
        exp_avg_coefficient = -lr * mu_next / (1.0 - mu_product * mu_next)
        bias_correction2 = 1 - beta2**step
        p, exp_avg, exp_avg_sq = st.param(i, param), st.load(exp_avgs[i]), st.load(exp_avg_sqs[i])
        g = _adam_moments(p, st.grad(grads[i], maximize), exp_avg, exp_avg_sq, lr=lr, beta1=beta1, beta2=beta2,
                          weight_decay=weight_decay, decoupled_weight_decay=decoupled_weight_decay)
        denom = exp_avg_sq.div(bias_correction2).sqrt_().add_(eps)
        p.addcdiv_(g, denom, value=grad_coefficient)
        p.addcdiv_(exp_avg, denom, value=exp_avg_coefficient)
        st.store_param(i, param, p)
        st.store(exp_avgs[i], exp_avg)
        st.store(exp_avg_sqs[i], exp_avg_sq)


@torch.no_grad()
def radam_(params, grads, exp_avgs, exp_avg_sqs, state_steps, *, lr, beta1, beta2, eps, weight_decay,
           decoupled_weight_decay, maximize, lr_tensor=None, grad_scale=None, found_inf=None,
           master_params=(), rounding_seed=None, state_scales=()) -> None:
    """RAdam (csrc/rules/radam.h)::

        g = -g if maximize;  p *= 1 - lr*wd (decoupled)  or  g += wd*p (L2)
        m += (1 - beta1) * (g - m);  v = beta2*v + (1 - beta2)*g*g
        rho_inf = 2/(1 - beta2) - 1;  rho_t = rho_inf - 2t*beta2^t/(1 - beta2^t)
        r_t = sqrt((rho_t - 4)(rho_t - 2)rho_inf / ((rho_inf - 4)(rho_inf - 2)rho_t))
        p -= m/(1 - beta1^t) * lr * sqrt(1 - beta2^t)/(sqrt(v) + eps) * r_t    (rho_t > 5)
        p -= m/(1 - beta1^t) * lr                                            (otherwise)
    """
    st = _Step("radam_", params, grads, {"exp_avgs": exp_avgs, "exp_avg_sqs": exp_avg_sqs},
               {"state_steps": state_steps},
               lr=lr, lr_tensor=lr_tensor, grad_scale=grad_scale, found_inf=found_inf,
               master_params=master_params, rounding_seed=rounding_seed,
               state_scales=state_scales)
    if st.skip:
        return
    lr = st.lr
    rho_inf = 2 / (1 - beta2) - 1
    for i, param in enumerate(params):
        step = _increment(state_steps[i])
        bias_correction1 = 1 - beta1**step
        bias_correction2 = 1 - beta2**step
        rho_t = rho_inf - 2 * step * beta2**step / bias_correction2
        p, exp_avg, exp_avg_sq = st.param(i, param), st.load(exp_avgs[i]), st.load(exp_avg_sqs[i])
        g = _adam_moments(p, st.grad(grads[i], maximize), exp_avg, exp_avg_sq, lr=lr, beta1=beta1, beta2=beta2,
                          weight_decay=weight_decay, decoupled_weight_decay=decoupled_weight_decay)
        update = exp_avg / bias_correction1 * lr
        if rho_t > 5.0:
            rectification = math.sqrt((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t))
            adaptive_lr = math.sqrt(bias_correction2) / exp_avg_sq.sqrt().add_(eps)
            update = update * adaptive_lr * rectification
        p.sub_(update)
        st.store_param(i, param, p)
        st.store(exp_avgs[i], exp_avg)
        st.store(exp_avg_sqs[i], exp_avg_sq)


@torch.no_grad()
def adamax_(params, grads, exp_avgs, exp_infs, state_steps, *, lr, beta1, beta2, eps, weight_decay, maximize,
            lr_tensor=None, grad_scale=None, found_inf=None, master_params=(), rounding_seed=None, state_scales=()) -> None:
    """Adamax (csrc/rules/adamax.h)::

        g = -g if maximize;  g += wd*p
        m += (1 - beta1) * (g - m);  u = max(beta2*u, |g| + eps)
        p += -lr/(1 - beta1^t) * m/u
    """
    st = _Step("adamax_", params, grads, {"exp_avgs": exp_avgs, "exp_infs": exp_infs},
               {"state_steps": state_steps},
               lr=lr, lr_tensor=lr_tensor, grad_scale=grad_scale, found_inf=found_inf,
               master_params=master_params, rounding_seed=rounding_seed,
               state_scales=state_scales)
    if st.skip:
        return
    lr = st.lr
    for i, param in enumerate(params):
        step = _increment(state_steps[i])
        p, exp_avg, exp_inf = st.param(i, param), st.load(exp_avgs[i]), st.load(exp_infs[i])
        g = st.grad(grads[i], maximize)
        if weight_decay != 0:
            g = g + weight_decay * p
        exp_avg.add_(g - exp_avg, alpha=1 - beta1)
        torch.maximum(exp_inf.mul_(beta2), g.abs().add_(eps), out=exp_inf)
        p.addcdiv_(exp_avg, exp_inf, value=-(lr / (1 - beta1**step)))
        st.store_param(i, param, p)
        st.store(exp_avgs[i], exp_avg)
        st.store(exp_infs[i], exp_inf)


@torch.no_grad()
def adadelta_(params, grads, square_avgs, acc_deltas, state_steps, *, lr, rho, eps, weight_decay, maximize,
              lr_tensor=None, grad_scale=None, found_inf=None, master_params=(), rounding_seed=None, state_scales=()) -> None:
    """Adadelta (csrc/rules/adadelta.h)::

        g = -g if maximize;  g += wd*p
        s = rho*s + (1 - rho)*g*g;  d = sqrt(a + eps)/sqrt(s + eps) * g;  a = rho*a + (1 - rho)*d*d
        p += -lr * d
    """
    st = _Step("adadelta_", params, grads, {"square_avgs": square_avgs, "acc_deltas": acc_deltas},
               {"state_steps": state_steps},
               lr=lr, lr_tensor=lr_tensor, grad_scale=grad_scale, found_inf=found_inf,
               master_params=master_params, rounding_seed=rounding_seed,
               state_scales=state_scales)
    if st.skip:
        return
    lr = st.lr
    for i, param in enumerate(params):
        _increment(state_steps[i])
        p, square_avg, acc_delta = st.param(i, param), st.load(square_avgs[i]), st.load(acc_deltas[i])
        g = st.grad(grads[i], maximize)
        if weight_decay != 0:
            g = g + weight_decay * p
        square_avg.mul_(rho).add_(g * g, alpha=1 - rho)
        delta = acc_delta.add(eps).sqrt_().div_(square_avg.add(eps).sqrt_()).mul_(g)
        acc_delta.mul_(rho).add_(delta * delta, alpha=1 - rho)
        p.add_(delta, alpha=-lr)
        st.store_param(i, param, p)
        st.store(square_avgs[i], square_avg)
        st.store(acc_deltas[i], acc_delta)


@torch.no_grad()
def asgd_(params, grads, axs, state_steps, etas, mus, *, lr, lambd, alpha, t0, weight_decay, maximize,
          lr_tensor=None, grad_scale=None, found_inf=None, master_params=(), rounding_seed=None, state_scales=()) -> None:
    """ASGD (csrc/rules/asgd.h), with eta and mu as the previous step stored them::

        g = -g if maximize;  g += wd*p;  p = p*(1 - lambd*eta) - eta*g
        ax = p (mu == 1)  or  ax += (p - ax)*mu
        t += 1;  eta = lr / (1 + lambd*lr*t)^alpha;  mu = 1 / max(1, t - t0)
    """
    st = _Step("asgd_", params, grads, {"axs": axs}, {"state_steps": state_steps, "etas": etas, "mus": mus},
               lr=lr, lr_tensor=lr_tensor, grad_scale=grad_scale, found_inf=found_inf,
               master_params=master_params, rounding_seed=rounding_seed,
               state_scales=state_scales)
    if st.skip:
        return
    lr = st.lr
    for i, param in enumerate(params):
        eta, mu = etas[i].item(), mus[i].item()
        step = _increment(state_steps[i])
        p, ax = st.param(i, param), st.load(axs[i])
        g = st.grad(grads[i], maximize)
        if weight_decay != 0:
            g = g + weight_decay * p
        p.mul_(1 - lambd * eta).add_(g, alpha=-eta)
        if mu == 1:
            ax.copy_(p)
        else:
            ax.add_((p - ax).mul_(mu))
        st.store_param(i, param, p)
        st.store(axs[i], ax)
        etas[i].fill_(lr / (1 + lambd * lr * step) ** alpha)
        mus[i].fill_(1 / max(1, step - t0))


@torch.no_grad()
def rprop_(params, grads, prevs, step_sizes, state_steps, *, lr, etaminus, etaplus, step_size_min,
           step_size_max, maximize, lr_tensor=None, grad_scale=None, found_inf=None, master_params=(),
           rounding_seed=None, state_scales=()) -> None:
    """Rprop (csrc/rules/rprop.h); ``lr`` only fills new step sizes (the class's)::

        g = -g if maximize;  x = g*prev
        step_size = clamp(step_size * (etaplus if x > 0, etaminus if x < 0, else 1), min, max)
        g = 0 where x < 0;  p -= sign(g)*step_size;  prev = g
    """
    st = _Step("rprop_", params, grads, {"prevs": prevs, "step_sizes": step_sizes},
               {"state_steps": state_steps},
               lr=lr, lr_tensor=lr_tensor, grad_scale=grad_scale, found_inf=found_inf,
               master_params=master_params, rounding_seed=rounding_seed,
               state_scales=state_scales)
    if st.skip:
        return
    for i, param in enumerate(params):
        _increment(state_steps[i])
        p, prev, step_size = st.param(i, param), st.load(prevs[i]), st.load(step_sizes[i])
        g = st.grad(grads[i], maximize)
        agreement = g * prev
        # ones_like: a where() of two Python numbers would be float32, rounding float64's etas.
        factor = torch.where(agreement > 0, etaplus,
                             torch.where(agreement < 0, etaminus, torch.ones_like(agreement)))
        step_size.mul_(factor).clamp_(step_size_min, step_size_max)
        g = torch.where(agreement < 0, 0.0, g)
        p.sub_(g.sign() * step_size)
        prev.copy_(g)
        st.store_param(i, param, p)
        st.store(prevs[i], prev)
        st.store(step_sizes[i], step_size)


@torch.no_grad()
def lion_(params, grads, exp_avgs, *, lr, beta1, beta2, weight_decay, maximize, lr_tensor=None,
          grad_scale=None, found_inf=None, master_params=(), rounding_seed=None, state_scales=()) -> None:
    """Lion (csrc/rules/lion.h)::

        g = -g if maximize;  p *= 1 - lr*wd
        p -= lr * sign(beta1*m + (1 - beta1)*g);  m = beta2*m + (1 - beta2)*g
    """
    st = _Step("lion_", params, grads, {"exp_avgs": exp_avgs}, {},
               lr=lr, lr_tensor=lr_tensor, grad_scale=grad_scale, found_inf=found_inf,
               master_params=master_params, rounding_seed=rounding_seed,
               state_scales=state_scales)
    if st.skip:
        return
    lr = st.lr
    for i, param in enumerate(params):
        p, exp_avg = st.param(i, param), st.load(exp_avgs[i])
        g = st.grad(grads[i], maximize)
        p.mul_(1 - lr * weight_decay)
        # Products rounded on their own, as in the rule: add(alpha=) would fuse the
        # multiply-add, and one rounding more or less of m or of the interpolation
        # flips the sign where it cancels (a 2*lr difference).
        p.add_((beta1 * exp_avg).add_(g * (1 - beta1)).sign_(), alpha=-lr)
        exp_avg.mul_(beta2).add_(g * (1 - beta2))
        st.store_param(i, param, p)
        st.store(exp_avgs[i], exp_avg)


@torch.no_grad()
def adopt_(params, grads, exp_avgs, exp_avg_sqs, state_steps, *, lr, beta1, beta2, eps, weight_decay,
           decoupled_weight_decay, clip_normalized_grad, maximize, lr_tensor=None, grad_scale=None,
           found_inf=None, master_params=(), rounding_seed=None, state_scales=()) -> None:
    """ADOPT (csrc/rules/adopt.h)::

        g = -g if maximize;  p *= 1 - lr*wd (decoupled)  or  g += wd*p (L2);  t += 1
        t == 1:  v += g*g
        t > 1:   n = g / max(sqrt(v), eps), clamped to +-t^(1/4) (clip_normalized_grad)
                 m += (1 - beta1)*(n - m);  p -= lr*m;  v = beta2*v + (1 - beta2)*g*g
    """
    st = _Step("adopt_", params, grads, {"exp_avgs": exp_avgs, "exp_avg_sqs": exp_avg_sqs},
               {"state_steps": state_steps},
               lr=lr, lr_tensor=lr_tensor, grad_scale=grad_scale, found_inf=found_inf,
               master_params=master_params, rounding_seed=rounding_seed,
               state_scales=state_scales)
    if st.skip:
        return
    lr = st.lr
    for i, param in enumerate(params):
        step = _increment(state_steps[i])
        p, exp_avg, exp_avg_sq = st.param(i, param), st.load(exp_avgs[i]), st.load(exp_avg_sqs[i])
        g = st.grad(grads[i], maximize)
        if weight_decay != 0:
            if decoupled_weight_decay:
                p.mul_(1 - lr * weight_decay)
            else:
                g = g + weight_decay * p
        if step == 1:
            exp_avg_sq.add_(g * g)
        else:
            normed_grad = g / exp_avg_sq.sqrt().clamp_(min=eps)
            if clip_normalized_grad:
                clip = step**0.25
                normed_grad.clamp_(-clip, clip)
            exp_avg.add_(normed_grad - exp_avg, alpha=1 - beta1)
            p.add_(exp_avg, alpha=-lr)
            exp_avg_sq.mul_(beta2).add_(g * g, alpha=1 - beta2)
        st.store_param(i, param, p)
        st.store(exp_avgs[i], exp_avg)
        st.store(exp_avg_sqs[i], exp_avg_sq)


# The kernels' order of addition in a reduction phase (Note [Reduction phase]
# in csrc/rules/reduction.h): kSumLanes and kSumChunkElements.
_SUM_LANES = 512
_SUM_CHUNK_ELEMENTS = 65536


def ordered_sum(terms: Tensor) -> float:
    """The sum of ``terms`` (float64, flat, in the order the kernels walk the
    tensor) added as the kernels add it: element i into lane i % 512 of chunk
    i // 65536, each lane in element order, a chunk's lanes in lane order,
    the chunks in order.  torch.cumsum adds in order on the CPU (on a GPU the
    sum is equal within rounding)."""
    total = 0.0
    for begin in range(0, terms.numel(), _SUM_CHUNK_ELEMENTS):
        chunk = terms[begin:begin + _SUM_CHUNK_ELEMENTS]
        rows = -(-chunk.numel() // _SUM_LANES)
        lanes = torch.zeros(rows * _SUM_LANES, dtype=torch.float64, device=chunk.device)
        lanes[:chunk.numel()] = chunk
        total += lanes.view(rows, _SUM_LANES).cumsum(0)[-1].cumsum(0)[-1].item()
    return total


def _walk_order(values: Tensor, param: Tensor, streams: Sequence[Tensor]) -> Tensor:
    """``values`` (one per element of ``param``) flat, in the order the kernels
    walk the param's elements: memory order when its streams share its
    strides and it is dense (walked in place), else row-major (staged)."""
    if is_dense(param) and all(t.stride() == param.stride() for t in streams):
        dims = sorted(range(param.dim()), key=param.stride, reverse=True)
        return values.permute(dims).reshape(-1)
    return values.reshape(-1)


def _norm(values: Tensor, param: Tensor, streams: Sequence[Tensor]) -> float:
    """The L2 norm of ``values`` (a param, its grad or an update) as the
    kernels' reduction phase takes it: squares in float64, ordered_sum."""
    flat = _walk_order(values, param, streams).double()
    return math.sqrt(ordered_sum(flat * flat))


@torch.no_grad()
def lamb_(params, grads, exp_avgs, exp_avg_sqs, state_steps, *, lr, beta1, beta2, eps, weight_decay,
          bias_correction, adam_w_mode, grad_averaging, use_nvlamb, maximize, lr_tensor=None, grad_scale=None,
          found_inf=None, master_params=(), rounding_seed=None, state_scales=()) -> None:
    """LAMB (csrc/rules/lamb.h)::

        g = -g if maximize;  t += 1;  g += wd*p (unless adam_w_mode)
        m = beta1*m + beta3*g   (beta3 = 1 - beta1 with grad_averaging, else 1)
        v = beta2*v + (1 - beta2)*g*g
        u = (m / bc1) / (sqrt(v / bc2) + eps)  (+ wd*p in adam_w_mode);  bc = 1 - beta^t or 1
        p += -lr * ratio * u,  ratio = ||p|| / ||u|| (1 if either is 0, or if wd == 0 and not use_nvlamb)
    """
    st = _Step("lamb_", params, grads, {"exp_avgs": exp_avgs, "exp_avg_sqs": exp_avg_sqs},
               {"state_steps": state_steps},
               lr=lr, lr_tensor=lr_tensor, grad_scale=grad_scale, found_inf=found_inf,
               master_params=master_params, rounding_seed=rounding_seed,
               state_scales=state_scales)
    if st.skip:
        return
    lr = st.lr
    beta3 = 1 - beta1 if grad_averaging else 1.0
    adapt = use_nvlamb or weight_decay != 0
    for i, param in enumerate(params):
        step = _increment(state_steps[i])
        p, exp_avg, exp_avg_sq = st.param(i, param), st.load(exp_avgs[i]), st.load(exp_avg_sqs[i])
        g = st.grad(grads[i], maximize)
        if not adam_w_mode:
            g = g + weight_decay * p
        exp_avg.mul_(beta1).add_(beta3 * g)
        exp_avg_sq.mul_(beta2).add_((g * g) * (1 - beta2))
        bias_correction1 = 1 - beta1**step if bias_correction else 1.0
        bias_correction2 = 1 - beta2**step if bias_correction else 1.0
        update = (exp_avg / bias_correction1) / ((exp_avg_sq / bias_correction2).sqrt() + eps)
        if adam_w_mode:
            update = update + weight_decay * p
        streams = (grads[i], exp_avgs[i], exp_avg_sqs[i], *master_params[i:i + 1])
        param_norm, update_norm = _norm(p, param, streams), _norm(update, param, streams)
        scaled = adapt and param_norm != 0 and update_norm != 0
        p.add_(update * -(lr * (param_norm / update_norm) if scaled else lr))
        st.store_param(i, param, p)
        st.store(exp_avgs[i], exp_avg)
        st.store(exp_avg_sqs[i], exp_avg_sq)


@torch.no_grad()
def lars_(params, grads, momentum_buffers, *, lr, momentum, dampening, weight_decay, trust_coefficient, eps,
          nesterov, adapt, maximize, lr_tensor=None, grad_scale=None, found_inf=None, master_params=(),
          rounding_seed=None, state_scales=()) -> None:
    """LARS (csrc/rules/lars.h)::

        g = -g if maximize;  wd = 0 unless adapt
        ratio = tc * ||p|| / (||g|| + wd*||p|| + eps)  (1 if ||p|| or the denominator is 0, or not adapt)
        d = (g + wd*p) * ratio;  b = momentum*b + (1 - dampening)*d
        p += -lr * (nesterov ? d + momentum*b : b)      (p += -lr*d without momentum)
    """
    if nesterov and momentum <= 0:
        raise RuntimeError("fastopt::lars_: nesterov needs momentum > 0")
    slots = {"momentum_buffers": momentum_buffers} if momentum != 0 else {}
    st = _Step("lars_", params, grads, slots, {},
               lr=lr, lr_tensor=lr_tensor, grad_scale=grad_scale, found_inf=found_inf,
               master_params=master_params, rounding_seed=rounding_seed,
               state_scales=state_scales)
    if st.skip:
        return
    lr = st.lr
    if not adapt:
        weight_decay = 0.0
    for i, param in enumerate(params):
        p = st.param(i, param)
        g = st.grad(grads[i], maximize)
        ratio = 1.0
        if adapt:
            streams = (grads[i], *momentum_buffers[i:i + 1], *master_params[i:i + 1])
            param_norm = _norm(p, param, streams)
            denominator = _norm(g, param, streams) + weight_decay * param_norm + eps
            if param_norm > 0 and denominator > 0:
                ratio = trust_coefficient * param_norm / denominator
        direction = (g + weight_decay * p if weight_decay != 0 else g) * ratio
        if momentum != 0:
            buf = st.load(momentum_buffers[i])
            buf.mul_(momentum).add_(direction * (1 - dampening))
            st.store(momentum_buffers[i], buf)
            direction = direction + momentum * buf if nesterov else buf
        p.add_(direction * -lr)
        st.store_param(i, param, p)


def _lerp(start: Tensor, end: Tensor, weight: float, opmath: torch.dtype) -> Tensor:
    """torch.lerp(start, end, weight) with the rounding of the rule's lerp
    (csrc/rules/common.h): the weight and 1 - weight in opmath, each
    operation rounded on its own."""
    weight = _float32(weight) if opmath == torch.float32 else weight
    if -0.5 < weight < 0.5:
        return start + (end - start) * weight
    one_minus_weight = _float32(1.0 - weight) if opmath == torch.float32 else 1.0 - weight
    return end - (end - start) * one_minus_weight


@torch.no_grad()
def muon_momentum_(params, grads, momentum_buffers, *, lr, momentum, nesterov, maximize, lr_tensor=None,
                   grad_scale=None, found_inf=None, master_params=(), rounding_seed=None,
                   state_scales=()) -> None:
    """Muon's momentum (csrc/rules/muon_momentum.h), lr unused; ``params`` are
    the buffers that receive the update to orthogonalize::

        g = -g if maximize;  b = lerp(b, g, 1 - momentum)
        params[i] = lerp(g, b, momentum) if nesterov else b
    """
    st = _Step("muon_momentum_", params, grads, {"momentum_buffers": momentum_buffers}, {},
               lr=lr, lr_tensor=lr_tensor, grad_scale=grad_scale, found_inf=found_inf,
               master_params=master_params, rounding_seed=rounding_seed,
               state_scales=state_scales)
    if st.skip:
        return
    for i, update in enumerate(params):
        g = st.grad(grads[i], maximize)
        buf = _lerp(st.load(momentum_buffers[i]), g, 1.0 - momentum, st.opmath)
        st.store(momentum_buffers[i], buf)
        st.store_param(i, update, _lerp(g, buf, momentum, st.opmath) if nesterov else buf)


@torch.no_grad()
def muon_update_(params, grads, *, lr, weight_decay, lr_ratio, maximize, lr_tensor=None, grad_scale=None,
                 found_inf=None, master_params=(), rounding_seed=None, state_scales=()) -> None:
    """Muon's update (csrc/rules/muon_update.h); ``grads`` are the
    orthogonalized updates O::

        O = -O if maximize;  p *= 1 - lr*wd;  p += -(lr * lr_ratio) * O
    """
    st = _Step("muon_update_", params, grads, {}, {},
               lr=lr, lr_tensor=lr_tensor, grad_scale=grad_scale, found_inf=found_inf,
               master_params=master_params, rounding_seed=rounding_seed,
               state_scales=state_scales)
    if st.skip:
        return
    decay_factor, neg_step = 1.0 - st.lr * weight_decay, -(st.lr * lr_ratio)
    for i, param in enumerate(params):
        p = st.param(i, param)
        p.mul_(decay_factor).add_(st.grad(grads[i], maximize) * neg_step)
        st.store_param(i, param, p)


@torch.no_grad()
def adafactor_(params, grads, variances, state_steps, *, lr, beta2_decay, eps1, eps2, d, weight_decay, factored,
               maximize, lr_tensor=None, grad_scale=None, found_inf=None, master_params=(), rounding_seed=None,
               state_scales=()) -> None:
    """Adafactor's update (csrc/rules/adafactor.h); ``variances`` are the
    vector params' variance (lerped here), or with ``factored`` the
    estimates built from the row and column factors (read only)::

        g = -g if maximize;  t += 1;  v = lerp(v, g*g, t^beta2_decay) (unless factored)
        u = g / sqrt(max(v, eps1^2));  alpha = max(eps2, ||p|| / sqrt(n)) * min(lr, 1/sqrt(t))
        p = p * (1 - lr*wd) + u * -(alpha / max(1, ||u|| / (sqrt(n) * d)))
    """
    st = _Step("adafactor_", params, grads, {"variances": variances}, {"state_steps": state_steps},
               lr=lr, lr_tensor=lr_tensor, grad_scale=grad_scale, found_inf=found_inf,
               master_params=master_params, rounding_seed=rounding_seed,
               state_scales=state_scales)
    if st.skip:
        return
    decay_factor = 1.0 - st.lr * weight_decay
    for i, param in enumerate(params):
        step = _increment(state_steps[i])
        if param.numel() == 0:
            continue
        p, variance, g = st.param(i, param), st.load(variances[i]), st.grad(grads[i], maximize)
        if not factored:
            variance = _lerp(variance, g * g, step**beta2_decay, st.opmath)
            st.store(variances[i], variance)
        update = g * (1 / variance.clamp(min=eps1 * eps1).sqrt())
        streams = (grads[i], variances[i], *master_params[i:i + 1])
        root_n = math.sqrt(param.numel())
        inverse_root_step = 1.0 / math.sqrt(step)
        rho = inverse_root_step if inverse_root_step < st.lr else st.lr
        param_rms = _norm(p, param, streams) / root_n
        clip_ratio = _norm(update, param, streams) / (root_n * d)
        alpha = (param_rms if param_rms > eps2 else eps2) * rho
        p.mul_(decay_factor).add_(update * -(alpha / (clip_ratio if clip_ratio > 1.0 else 1.0)))
        st.store_param(i, param, p)


@torch.no_grad()
def swats_(params, grads, exp_avgs, exp_avg_sqs, state_steps, switched, sgd_lrs, lr_avgs, update_sqs,
           update_dot_grads, *, lr, beta1, beta2, eps, weight_decay, maximize, lr_tensor=None, grad_scale=None,
           found_inf=None, master_params=(), rounding_seed=None, state_scales=()) -> None:
    """SWATS's element-wise pass (csrc/rules/swats.h); the group's switch
    (fastopt/swats.py) reads the sums it stores::

        g = -g if maximize;  t += 1;  g += wd*p
        Adam phase (switched == 0):
            m = lerp(m, g, 1 - beta1);  a = beta2*a + (1 - beta2)*g*g
            u = m / (sqrt(a) + eps) * -(lr * sqrt(1 - beta2^t) / (1 - beta1^t));  p += u
            update_sq = sum(u*u);  update_dot_grad = sum(u*g)
        SGD phase: m = g (t == switched) or beta1*m + g;  p += -sgd_lr * ((1 - beta1) * m)
            update_sq = update_dot_grad = 0
    """
    st = _Step("swats_", params, grads, {"exp_avgs": exp_avgs, "exp_avg_sqs": exp_avg_sqs},
               {"state_steps": state_steps, "switched": switched, "sgd_lrs": sgd_lrs, "lr_avgs": lr_avgs,
                "update_sqs": update_sqs, "update_dot_grads": update_dot_grads},
               lr=lr, lr_tensor=lr_tensor, grad_scale=grad_scale, found_inf=found_inf,
               master_params=master_params, rounding_seed=rounding_seed,
               state_scales=state_scales)
    if st.skip:
        return
    for i, param in enumerate(params):
        step = _increment(state_steps[i])
        p, exp_avg, exp_avg_sq = st.param(i, param), st.load(exp_avgs[i]), st.load(exp_avg_sqs[i])
        g = st.grad(grads[i], maximize)
        if weight_decay != 0:
            g = g + weight_decay * p
        sq_sum = dot_sum = 0.0
        switch_step = switched[i].item()
        if switch_step != 0:
            exp_avg = g.clone() if step == switch_step else exp_avg * beta1 + g
            p.add_((exp_avg * (1 - beta1)) * -sgd_lrs[i].item())
        else:
            exp_avg = _lerp(exp_avg, g, 1 - beta1, st.opmath)
            exp_avg_sq = exp_avg_sq * beta2 + (g * g) * (1 - beta2)
            update = exp_avg / (exp_avg_sq.sqrt() + eps) * -(st.lr * math.sqrt(1 - beta2**step) / (1 - beta1**step))
            p.add_(update)
            streams = (grads[i], exp_avgs[i], exp_avg_sqs[i], *master_params[i:i + 1])
            sq_sum = ordered_sum(_walk_order(update.double().square(), param, streams))
            dot_sum = ordered_sum(_walk_order(update.double() * g.double(), param, streams))
        update_sqs[i].fill_(sq_sum)
        update_dot_grads[i].fill_(dot_sum)
        st.store_param(i, param, p)
        st.store(exp_avgs[i], exp_avg)
        st.store(exp_avg_sqs[i], exp_avg_sq)


@torch.no_grad()
def grad_sq_norm(grads) -> Tensor:
    """The sum of squares of every element of ``grads`` (complex ones as real
    pairs), float64, 0-dim, on the grads' device: the squared L2 norm that
    ``torch.nn.utils.clip_grad_norm_`` takes over them (max_grad_norm, Note
    [Fused gradient clipping] in fastopt/clip.py).  Read-only."""
    for i, g in enumerate(grads):
        problem = None
        if g.device != grads[0].device:
            problem = f"is on {g.device} but grads[0] is on {grads[0].device}; one call takes tensors of one device"
        elif g.layout != torch.strided:
            problem = f"has layout {g.layout}; fastopt supports dense (strided) tensors only"
        elif (g.dtype.to_real() if g.is_complex() else g.dtype) not in _SUPPORTED_DTYPES:
            problem = f"has dtype {g.dtype}; supported: float32, float64, float16, bfloat16 and their complex types"
        if problem is not None:
            raise RuntimeError(f"fastopt::grad_sq_norm: grads[{i}] {problem}")
    total = torch.zeros((), dtype=torch.float64, device=grads[0].device if grads else "cpu")
    for g in grads:
        total += (torch.view_as_real(g) if g.is_complex() else g).double().square().sum()
    return total


# The kernels' order of addition of row and column sums (Note [Row and column
# sums] in csrc/rules/row_col_sums.h): kRowSumLanes, and column chunks of
# column_chunk_rows(rows) = ceil(sqrt(rows)) rows.
_ROW_SUM_LANES = 16


def _column_chunk_rows(rows: int) -> int:
    return math.isqrt(rows - 1) + 1 if rows > 1 else 1


def _opmath(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _in_order(terms: Tensor, dim: int, group: int, interleaved: bool) -> Tensor:
    """Sums of ``terms`` (float64, not empty) over ``dim`` as the kernels add
    them: ``dim`` zero-padded to groups of ``group`` elements, interleaved
    (element j in lane j % group: the lanes of a row) or consecutive (the
    chunks of a column); each lane or group added in order, then their sums
    in order (torch.cumsum adds in order on the CPU)."""
    dim %= terms.dim()
    size = terms.size(dim)
    padded = -(-size // group) * group
    pad_shape = list(terms.shape)
    pad_shape[dim] = padded - size
    terms = torch.cat([terms, terms.new_zeros(pad_shape)], dim=dim)
    shape = list(terms.shape)
    shape[dim:dim + 1] = [padded // group, group]
    terms = terms.reshape(shape)  # dim: the groups (lanes: the rows of lanes), dim + 1: within
    inner = terms.cumsum(dim).select(dim, -1) if interleaved else terms.cumsum(dim + 1).select(dim + 1, -1)
    return inner.cumsum(dim).select(dim, -1)


@torch.no_grad()
def row_col_sq_means_(grads, row_means, col_means, *, grad_scale=None) -> None:
    """The mean of ``(grad / grad_scale)**2`` over each row and each column of
    every grad (as matrices: its last two dims), into ``row_means`` (its shape
    with the last dim 1) and ``col_means`` (the second-to-last dim 1), of its
    opmath dtype: the first phase of a factored step (Note [Row and column
    sums] in csrc/rules/row_col_sums.h).  Squares and sums in float64, added
    in the kernels' order, each mean rounded once; a mean over nothing is
    NaN."""
    op = "fastopt::row_col_sq_means_"
    if not (len(row_means) == len(col_means) == len(grads)):
        raise RuntimeError(f"{op}: got {len(grads)} grads, {len(row_means)} row_means and {len(col_means)} "
                           "col_means; one of each per grad")
    for i, g in enumerate(grads):
        if g.layout != torch.strided or g.device != grads[0].device:
            raise RuntimeError(f"{op}: grads[{i}] must be a dense tensor on {grads[0].device} "
                               "(one call takes tensors of one device)")
        if g.dtype not in _SUPPORTED_DTYPES or g.dim() < 2:
            raise RuntimeError(f"{op}: grads[{i}] must have two or more dims and dtype float32, float64, "
                               f"float16 or bfloat16, got a {g.dtype} tensor of shape {list(g.shape)}")
        opmath = _opmath(g.dtype)
        for name, means, dim in (("row_means", row_means, -1), ("col_means", col_means, -2)):
            m, shape = means[i], list(g.shape)
            shape[dim] = 1
            if not (isinstance(m, Tensor) and m.dtype == opmath and m.device == g.device and list(m.shape) == shape
                    and m.is_contiguous()):
                got = (f"a {m.dtype} tensor of shape {list(m.shape)} on {m.device}" if isinstance(m, Tensor)
                       else type(m).__name__)
                raise RuntimeError(f"{op}: {name}[{i}] must be a contiguous {opmath} tensor of shape {shape} "
                                   f"on {g.device}, got {got}")
    if grad_scale is not None and not (grad_scale.numel() == 1 and grad_scale.is_floating_point()
                                       and (not grads or grad_scale.device == grads[0].device)):
        raise RuntimeError(f"{op}: grad_scale must be a one-element floating-point tensor on the grads' device")
    for g, row, col in zip(grads, row_means, col_means):
        opmath = _opmath(g.dtype)
        values = g.to(opmath)
        if grad_scale is not None:
            values = values / grad_scale.to(opmath).reshape(())
        squares = values.double().square()
        rows, cols = g.shape[-2], g.shape[-1]
        if squares.numel() == 0:
            row.copy_(squares.new_zeros(row.shape) / cols)
            col.copy_(squares.new_zeros(col.shape) / rows)
            continue
        row.copy_((_in_order(squares, -1, _ROW_SUM_LANES, interleaved=True) / cols).unsqueeze(-1))
        col.copy_((_in_order(squares, -2, _column_chunk_rows(rows), interleaved=False) / rows).unsqueeze(-2))


class BoundTensors:
    """A bucket's params, state slots (one list per slot of the op, in op
    order, empty for a slot the options leave out), per-tensor scalar states
    (one list per scalar state: step counts, ...), master copies and, for
    8-bit slots, their block scales (one list per slot, as ``slots``), bound
    once (Note [Bound tensors] in csrc/bound_ops.cpp)."""

    # The list ops a step calls (``adam_``, ...): this module's, or those
    # given as ``ops`` (the compiled ops for DTensor buckets and for steps
    # traced by torch.compile, Notes [Step plans] and [Compiled steps] in
    # fastopt/optimizer.py).
    ops: Any = sys.modules[__name__]

    def __init__(self, params: list[Tensor], slots: list[list[Tensor]], scalar_states: list[list[Tensor]],
                 masters: list[Tensor], scales: list[list[Tensor]] | None = None, ops: Any = None) -> None:
        if ops is not None:
            self.ops = ops
        n = len(params)
        for what, lists in (("slot", [s for s in slots if s]), ("scalar-state", scalar_states)):
            for tensors in lists:
                if len(tensors) != n:
                    raise RuntimeError(f"fastopt.BoundTensors: got {n} params but a {what} list of "
                                       f"{len(tensors)}")
        if masters and len(masters) != n:
            raise RuntimeError(f"fastopt.BoundTensors: got {n} params but {len(masters)} master copies")
        scales = scales or []
        for tensors in scales:
            if tensors and len(tensors) != n:
                raise RuntimeError(f"fastopt.BoundTensors: got {n} params but a scale list of {len(tensors)}")
        self.params, self.slots, self.scalar_states, self.masters = params, slots, scalar_states, masters
        self.scales = scales

    def step_tensors(self):
        """The bound lists restricted to params that have a grad: (params, grads,
        slot lists, scalar-state lists, master copies, the state_scales of the
        list op: the 8-bit slots' scale lists joined, slot-major), or None when
        no param has one."""
        keep = [i for i, p in enumerate(self.params) if p.grad is not None]
        if not keep:
            return None

        def select(tensors: list[Tensor]) -> list[Tensor]:
            return [tensors[i] for i in keep] if tensors else []

        params = select(self.params)
        return (params, [p.grad for p in params], [select(slot) for slot in self.slots],
                [select(states) for states in self.scalar_states], select(self.masters),
                [t for scales in self.scales for t in select(scales)])

    def check(self) -> None:
        """Checks this step's tensors as the bucket's op will, before another
        bucket's op runs (Note [Atomic steps across buckets] in csrc/bound_ops.cpp)."""
        tensors = self.step_tensors()
        if tensors is not None:
            params, grads, slots, scalar_states, masters, state_scales = tensors
            _check_lists("BoundTensors.check", params, grads,
                         {f"state_slots{k}": slot for k, slot in enumerate(slots) if slot},
                         {f"scalar_states{c}": states for c, states in enumerate(scalar_states)}, masters,
                         state_scales=state_scales)


@torch.no_grad()
def adabound_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, *, lr, beta1, beta2,
              final_lr, base_lr, gamma, eps, weight_decay, amsbound, maximize, lr_tensor=None,
              grad_scale=None, found_inf=None, master_params=(), rounding_seed=None, state_scales=()) -> None:
    """AdaBound / AMSBound (csrc/rules/adabound.h)::

        g = -g if maximize;  g += wd*p
        m = beta1*m + (1 - beta1)*g;  v = beta2*v + (1 - beta2)*g*g;  v_max = max(v_max, v)
        eta = clamp(lr*sqrt(1 - beta2^t)/(1 - beta1^t) / (sqrt(v or v_max) + eps), lower, upper)
        p -= eta * m,   final = final_lr*lr/base_lr,
        lower = final*(1 - 1/(gamma*t + 1)),  upper = final*(1 + 1/(gamma*t))
    """
    if not base_lr > 0:
        raise RuntimeError("fastopt::adabound_: base_lr must be positive (final_lr is scaled by lr / base_lr)")
    slots = {"exp_avgs": exp_avgs, "exp_avg_sqs": exp_avg_sqs}
    if amsbound:
        slots["max_exp_avg_sqs"] = max_exp_avg_sqs
    st = _Step("adabound_", params, grads, slots, {"state_steps": state_steps},
               lr=lr, lr_tensor=lr_tensor, grad_scale=grad_scale, found_inf=found_inf,
               master_params=master_params, rounding_seed=rounding_seed,
               state_scales=state_scales)
    if st.skip:
        return
    lr = st.lr
    final = final_lr * lr / base_lr
    for i, param in enumerate(params):
        step = _increment(state_steps[i])
        step_size = lr * math.sqrt(1 - beta2**step) / (1 - beta1**step)
        lower = final * (1 - 1 / (gamma * step + 1))
        upper = final * (1 + 1 / (gamma * step)) if gamma != 0 else math.inf
        p, exp_avg, exp_avg_sq = st.param(i, param), st.load(exp_avgs[i]), st.load(exp_avg_sqs[i])
        g = st.grad(grads[i], maximize)
        if weight_decay != 0:
            g = g + weight_decay * p
        exp_avg.mul_(beta1).add_((1 - beta1) * g)
        exp_avg_sq.mul_(beta2).add_((1 - beta2) * g * g)
        second_moment = exp_avg_sq
        if amsbound:
            second_moment = st.load(max_exp_avg_sqs[i])
            torch.maximum(second_moment, exp_avg_sq, out=second_moment)
            st.store(max_exp_avg_sqs[i], second_moment)
        rate = torch.full_like(exp_avg, step_size).div_(second_moment.sqrt().add_(eps))
        # Bounds in opmath, as the kernels take them (a bound beyond float32's range is inf there).
        bounds = torch.tensor([lower, upper], dtype=st.opmath)
        p.sub_(rate.clamp_(bounds[0], bounds[1]).mul_(exp_avg))
        st.store_param(i, param, p)
        st.store(exp_avgs[i], exp_avg)
        st.store(exp_avg_sqs[i], exp_avg_sq)


@torch.no_grad()
def qhadam_(params, grads, exp_avgs, exp_avg_sqs, state_steps, *, lr, beta1, beta2, nu1, nu2, eps,
            weight_decay, decouple_weight_decay, maximize, lr_tensor=None, grad_scale=None, found_inf=None,
            master_params=(), rounding_seed=None, state_scales=()) -> None:
    """QHAdam (csrc/rules/qhadam.h)::

        g = -g if maximize;  p *= 1 - lr*wd (decoupled)  or  g += wd*p (L2)
        m += (1 - beta1)*(g - m);  v = beta2*v + (1 - beta2)*g*g
        p -= lr * ((1 - nu1)*g + nu1/(1 - beta1^t)*m) / (sqrt((1 - nu2)*g*g + nu2/(1 - beta2^t)*v) + eps)
    """
    st = _Step("qhadam_", params, grads, {"exp_avgs": exp_avgs, "exp_avg_sqs": exp_avg_sqs},
               {"state_steps": state_steps},
               lr=lr, lr_tensor=lr_tensor, grad_scale=grad_scale, found_inf=found_inf,
               master_params=master_params, rounding_seed=rounding_seed,
               state_scales=state_scales)
    if st.skip:
        return
    lr = st.lr
    for i, param in enumerate(params):
        step = _increment(state_steps[i])
        p, exp_avg, exp_avg_sq = st.param(i, param), st.load(exp_avgs[i]), st.load(exp_avg_sqs[i])
        g = _adam_moments(p, st.grad(grads[i], maximize), exp_avg, exp_avg_sq, lr=lr, beta1=beta1, beta2=beta2,
                          weight_decay=weight_decay, decoupled_weight_decay=decouple_weight_decay)
        numerator = (1 - nu1) * g + (nu1 / (1 - beta1**step)) * exp_avg
        denom = ((1 - nu2) * (g * g) + (nu2 / (1 - beta2**step)) * exp_avg_sq).sqrt_().add_(eps)
        p.add_(numerator / denom, alpha=-lr)
        st.store_param(i, param, p)
        st.store(exp_avgs[i], exp_avg)
        st.store(exp_avg_sqs[i], exp_avg_sq)


@torch.no_grad()
def aggmo_(params, grads, momentum_buffers_0, momentum_buffers_1, momentum_buffers_2, *, lr, beta1, beta2,
           beta3, num_betas, weight_decay, maximize, lr_tensor=None, grad_scale=None, found_inf=None,
           master_params=(), rounding_seed=None, state_scales=()) -> None:
    """AggMo (csrc/rules/aggmo.h), K = num_betas buffers::

        g = -g if maximize;  g += wd*p
        for each k < K:  b_k = beta_k*b_k + g;  p += -(lr/K) * b_k
    """
    if num_betas not in (1, 2, 3):
        raise RuntimeError("fastopt::aggmo_: num_betas must be 1, 2 or 3 (one state slot per beta)")
    count = int(num_betas)
    buffers = (momentum_buffers_0, momentum_buffers_1, momentum_buffers_2)[:count]
    betas = (beta1, beta2, beta3)[:count]
    st = _Step("aggmo_", params, grads, {f"momentum_buffers_{k}": buffers[k] for k in range(count)}, {},
               lr=lr, lr_tensor=lr_tensor, grad_scale=grad_scale, found_inf=found_inf,
               master_params=master_params, rounding_seed=rounding_seed,
               state_scales=state_scales)
    if st.skip:
        return
    neg_step_size = -(st.lr / count)
    for i, param in enumerate(params):
        p = st.param(i, param)
        g = st.grad(grads[i], maximize)
        if weight_decay != 0:
            g = g + weight_decay * p
        for beta, buffer_list in zip(betas, buffers):
            buf = st.load(buffer_list[i])
            buf.mul_(beta).add_(g)
            p.add_(neg_step_size * buf)
            st.store(buffer_list[i], buf)
        st.store_param(i, param, p)


@torch.no_grad()
def lookahead_(params, grads, slow_params, *, lr, alpha, maximize, lr_tensor=None, grad_scale=None,
               found_inf=None, master_params=(), rounding_seed=None, state_scales=()) -> None:
    """Lookahead's synchronization (csrc/rules/lookahead.h), grads unused (the
    caller passes the params)::

        slow += alpha * (fast - slow);  fast = slow
    """
    st = _Step("lookahead_", params, grads, {"slow_params": slow_params}, {},
               lr=lr, lr_tensor=lr_tensor, grad_scale=grad_scale, found_inf=found_inf,
               master_params=master_params, rounding_seed=rounding_seed,
               state_scales=state_scales)
    if st.skip:
        return
    for i, param in enumerate(params):
        p, slow = st.param(i, param), st.load(slow_params[i])
        slow.add_(alpha * (p - slow))
        p.copy_(slow)
        st.store_param(i, param, p)
        st.store(slow_params[i], slow)


def _bound_step(op: str, bound: BoundTensors, **hyper) -> None:
    """The bound op of list op ``op``: the bound lists (of params with a grad)
    passed in op order, as csrc/bound_ops.cpp does."""
    tensors = bound.step_tensors()
    if tensors is not None:
        params, grads, slots, scalar_states, masters, state_scales = tensors
        scales = {"state_scales": state_scales} if state_scales else {}
        getattr(bound.ops, op)(params, grads, *slots, *scalar_states, master_params=masters, **scales, **hyper)


def __getattr__(name: str) -> Any:
    """``<op>_bound_`` for every list op ``<op>_`` of this module: the bound ops
    follow from the list ops, as in the compiled extension."""
    if name.endswith("_bound_") and name != "grad_sq_norm_bound_" and name[:-len("bound_")] in globals():
        return functools.partial(_bound_step, name[:-len("bound_")])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def grad_sq_norm_bound_(bound: BoundTensors) -> Tensor:
    tensors = bound.step_tensors()
    if tensors is None:
        device = bound.params[0].device if bound.params else "cpu"
        return torch.zeros((), dtype=torch.float64, device=device)
    return bound.ops.grad_sq_norm(tensors[1])
