"""AnyPrecisionAdamW: AdamW (Loshchilov & Hutter 2019, decoupled weight decay) with its states
in chosen dtypes, and optionally Kahan-compensated (Kahan 1965) updates of 16-bit params, as
torchdistx.optimizers.AnyPrecisionAdamW computes it (Transformers' ``optim="adamw_anyprecision"``).

    x <- x (1 - lr wd)
    m <- b1 m + (1 - b1) g                  (in momentum_dtype)
    v <- b2 v + (1 - b2) g^2                (in variance_dtype)
    x <- x - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)

Each state is updated by torchdistx's own operations in its own dtype (a bf16 state is rounded
to bf16 after each of them, as there); the bias corrections are computed, as there, from a
float32 step-count tensor. So with fp32 params zeroopt's step is torchdistx's, element for
element (the tests hold it to ``reference_step``, a literal transcription).

Hyperparameters (names and defaults are torchdistx's):

- ``lr`` (1e-3), ``betas`` (0.9, 0.999), ``eps`` (1e-8), ``weight_decay`` (0.0): AdamW's;
- ``momentum_dtype`` (torch.float32), ``variance_dtype`` (torch.bfloat16): the dtypes m and v
  are computed in (a torch.dtype, or its name: "bfloat16", "float32", "float16");
- ``use_kahan_summation`` (False), ``compensation_buffer_dtype`` (torch.bfloat16): torchdistx
  adds the update to a compensation buffer and the buffer to the param, keeping the part
  that did not fit in the param's dtype for the next step. See below: zeroopt's fp32 masters
  take its place.

Transformers' Trainer passes the Adam arguments and, from ``optim_args``,
``use_kahan_summation`` (default False), ``momentum_dtype`` and ``variance_dtype`` (default
float32: not torchdistx's bf16 variance) and ``compensation_buffer_dtype`` (bfloat16): zeroopt's
Transformers integration does the same (``transformers_arguments``, ``transformers_optim_args``).

How the dtypes map onto zeroopt's state storage (``state_precision``): by default
(``state_precision=None``) it follows them: ``momentum_dtype`` and ``variance_dtype`` both
bfloat16 is ``state_precision="bf16"`` (bf16 states in the shard: half the memory); any other
pair is stored "32bit", where a bf16 or fp16 state is held exactly (its value is always one
the dtype represents). ``state_precision="32bit"`` may be given with bf16 dtypes (the same
results, stored wider); "bf16" with a float32 or float16 state, and "8bit" or "4bit", are
refused: the storage would round a state the dtype says to keep.

Where zeroopt differs from torchdistx, and why:

- 16-bit params. zeroopt steps fp32 masters of 16-bit params (the model holds them rounded),
  so a bf16 param is never updated in bf16. torchdistx without Kahan summation adds each
  update to the bf16 param directly, rounding the sum to bf16 (unit roundoff 2^-8: an update
  below 2^-8 |x| may be lost whole); with it, it keeps what was lost in the compensation
  buffer. Here ``use_kahan_summation`` maps onto the masters: accepted, and no buffer is
  kept. Per step, the master's error is that of fp32 rounding, about 2^-24 (|x| + 2 |u|) for
  an update u; torchdistx's compensated pair (bf16 param x, buffer c) rounds c + u, and
  c + (x_old - x_new) (at most half a bf16 ulp of x), in the buffer's dtype: about
  2^-8 |u| + 2^-16 |x| for a bf16 buffer, 2^-11 |u| + 2^-19 |x| for an fp16 one. So the master
  is at least as accurate (``tests/test_anyprecision.py`` measures both against fp64: 1000
  times closer). A 32-bit buffer would make the pair more exact than an fp32 master (its error
  about 2^-24 |u| + 2^-32 |x|), so ``use_kahan_summation=True`` with a float32 (or float64)
  buffer is refused.
- fp32 params with ``use_kahan_summation=True``: torchdistx rounds each update through the
  (bf16) buffer before adding it; zeroopt adds the fp32 update directly (more exact, as above).
- 0-d params: in torchdistx, sqrt(v) / sqrt(1 - b2^t) divides two 0-d tensors, and torch's
  type promotion then computes it in float32, not in variance_dtype (for every other shape the
  float32 0-d divisor does not promote v). zeroopt sees every param as flat elements, and
  computes a 0-d param's denominator as a 1-element one's, in variance_dtype; so does
  ``reference_step`` (it views a 0-d param as 1-element).
- ``reference_step`` is torchdistx's algorithm literally, Kahan summation included, on the
  param in its own dtype: the yardstick. With ``use_kahan_summation=False`` and fp32 params
  the fused step equals it; with Kahan summation it is the accuracy zeroopt must match or beat.
"""

from __future__ import annotations

import torch

from ..kernels import sqrt_check
from ..kernels.library import Library
from ..states import kinds
from .base import ShardTensors, UpdateRule, adam_arguments, check_betas, check_nonnegative

# On CPU fp32 shards whose states are computed in float32 or bfloat16, the step is one pass
# of a C kernel with the torch path's arithmetic (zeroopt/kernels/_anyprecision.c).
_LIB = Library("_anyprecision.c")
_NATIVE_DTYPES = (torch.float32, torch.bfloat16)

_STATE_DTYPES = {"momentum_dtype": "exp_avg", "variance_dtype": "exp_avg_sq"}
# The dtypes a state may be computed in: zeroopt stores states in at most 32 bits.
_COMPUTABLE = (torch.float32, torch.bfloat16, torch.float16)
_FLOATS = (*_COMPUTABLE, torch.float64)


def dtype_of(group: dict, name: str) -> torch.dtype:
    """A dtype hyperparameter as a torch.dtype (it may be given by name, as optim_args give it).

    Raises:
        ValueError: not a floating torch dtype, nor the name of one.
    """
    value = group[name]
    dtype = getattr(torch, value, None) if isinstance(value, str) else value
    if dtype not in _FLOATS:
        raise ValueError(f"adamw_anyprecision: {name} must be a floating torch dtype (or its "
                         f"name: 'bfloat16', 'float32', 'float16'), got {value!r}")
    return dtype


def _validate(group: dict) -> None:
    check_nonnegative(group, "lr", "eps", "weight_decay")
    check_betas(group)
    if not isinstance(group["use_kahan_summation"], bool):
        raise ValueError(f"use_kahan_summation must be True or False, got "
                         f"{group['use_kahan_summation']!r}")
    dtypes = {name: dtype_of(group, name) for name in _STATE_DTYPES}
    for name, dtype in dtypes.items():
        if dtype not in _COMPUTABLE:
            raise ValueError(f"adamw_anyprecision: {name}={dtype}: zeroopt keeps states in at "
                             f"most 32 bits; use torch.float32, torch.bfloat16 or torch.float16")
    compensation = dtype_of(group, "compensation_buffer_dtype")
    if group["use_kahan_summation"] and compensation.itemsize >= 4:
        raise ValueError(
            f"adamw_anyprecision: use_kahan_summation=True with compensation_buffer_dtype="
            f"{compensation}: zeroopt updates fp32 masters of 16-bit params, which is at least "
            f"as exact as Kahan summation with a 16-bit buffer, but not with a 32-bit one. Use "
            f"compensation_buffer_dtype=torch.bfloat16 (the master replaces the buffer), or "
            f"use_kahan_summation=False")
    both_bf16 = all(dtype == torch.bfloat16 for dtype in dtypes.values())
    precision = group["state_precision"]
    if precision is None:  # follow the dtypes
        group["state_precision"] = "bf16" if both_bf16 else "32bit"
    elif precision != "32bit" and not (precision == "bf16" and both_bf16) \
            and precision in kinds.PRECISIONS:  # (an unknown one: kinds.validate's error)
        raise ValueError(
            f"adamw_anyprecision: state_precision={precision!r} would round a state kept in "
            f"{', '.join(f'{n}={d}' for n, d in dtypes.items())}. Leave state_precision unset "
            f"(it follows the dtypes: 'bf16' when both are torch.bfloat16), or use adamw_8bit "
            f"for 8-bit states")


def _corrections(group: dict, t: int) -> tuple[torch.Tensor, torch.Tensor]:
    """lr / (1 - b1^t) and sqrt(1 - b2^t), computed as torchdistx computes them: from a float32
    step-count tensor, so in float32."""
    beta1, beta2 = group["betas"]
    step = torch.tensor(float(t))
    return group["lr"] / (1 - beta1**step), (1 - beta2**step) ** 0.5


def _moments_and_denominator(group: dict, param: torch.Tensor, grad: torch.Tensor,
                             exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                             denom_correction: torch.Tensor) -> torch.Tensor:
    """torchdistx's step up to the update: weight decay, the moments (each in its own dtype),
    and the denominator sqrt(v) / sqrt(1 - b2^t) + eps (in v's dtype)."""
    beta1, beta2 = group["betas"]
    if group["weight_decay"]:
        param.mul_(1 - group["lr"] * group["weight_decay"])
    exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    return (exp_avg_sq.sqrt() / denom_correction).add_(group["eps"], alpha=1)


def _fused(group: dict, shard: ShardTensors, step: torch.Tensor, stats=None) -> None:
    """Piece by piece: each state is cast to its dtype (exactly: it holds a value of it),
    stepped by torchdistx's operations, and written back; the update goes to the fp32 param
    (the master of a 16-bit one) directly: no compensation buffer (see the module docstring)."""
    step_size, denom_correction = _corrections(group, int(step.item()))
    momentum, variance = dtype_of(group, "momentum_dtype"), dtype_of(group, "variance_dtype")
    lists = [shard.params, shard.grads, shard.states["exp_avg"], shard.states["exp_avg_sq"]]
    if momentum in _NATIVE_DTYPES and variance in _NATIVE_DTYPES and _LIB.usable(*lists) \
            and not isinstance(group["lr"], torch.Tensor) and sqrt_check.matches_torch(_LIB):
        beta1, beta2 = group["betas"]
        wd = group["weight_decay"]
        _LIB.each("zk_anyprecision_step", lists, [
            1 - group["lr"] * wd if wd else 1.0, beta1, 1 - beta1, beta2, 1 - beta2,
            float(denom_correction), group["eps"], float(-step_size),
            momentum == torch.bfloat16, variance == torch.bfloat16])
        return
    for param, grad, m, v in zip(shard.params, shard.grads, shard.states["exp_avg"],
                                 shard.states["exp_avg_sq"]):
        exp_avg, exp_avg_sq = m.to(momentum), v.to(variance)
        denom = _moments_and_denominator(group, param, grad, exp_avg, exp_avg_sq,
                                         denom_correction)
        param.addcdiv_(exp_avg, denom, value=-step_size)
        for state, work in ((m, exp_avg), (v, exp_avg_sq)):
            if work is not state:
                state.copy_(work)


def _reference(group: dict, param: torch.Tensor, grad: torch.Tensor, state: dict,
               t: int) -> None:
    """torchdistx's AnyPrecisionAdamW.step for one param, literally: the param in its own dtype
    (a bf16 param is updated in bf16), each state in its dtype (ReferenceOptimizer keeps them
    in fp32, which holds their values exactly), and with ``use_kahan_summation`` the
    compensation buffer (kept in ``state["compensation"]``, created here)."""
    if group["use_kahan_summation"] and "compensation" not in state:
        state["compensation"] = torch.zeros_like(
            param, dtype=dtype_of(group, "compensation_buffer_dtype"))
    if param.dim() == 0:  # as the 1-element tensor it is (see the module docstring)
        param, grad = param.view(1), grad.view(1)
        state = {name: value.view(1) if isinstance(value, torch.Tensor) else value
                 for name, value in state.items()}
    step_size, denom_correction = _corrections(group, t)
    exp_avg = state["exp_avg"].to(dtype_of(group, "momentum_dtype"))
    exp_avg_sq = state["exp_avg_sq"].to(dtype_of(group, "variance_dtype"))
    centered_variance = _moments_and_denominator(group, param, grad, exp_avg, exp_avg_sq,
                                                 denom_correction)
    if group["use_kahan_summation"]:
        compensation = state["compensation"]
        compensation.addcdiv_(exp_avg, centered_variance, value=-step_size)
        temp_buffer = param.detach().clone()
        param.add_(compensation)
        compensation.add_(temp_buffer.sub_(param))
    else:
        param.addcdiv_(exp_avg, centered_variance, value=-step_size)
    state["exp_avg"].copy_(exp_avg)
    state["exp_avg_sq"].copy_(exp_avg_sq)


def _strtobool(value) -> bool:
    """Transformers' strtobool, for ``use_kahan_summation`` in optim_args (already typed)."""
    if isinstance(value, bool):
        return value
    text = str(value).lower()
    if text in ("y", "yes", "t", "true", "on", "1"):
        return True
    if text in ("n", "no", "f", "false", "off", "0"):
        return False
    raise ValueError(f"use_kahan_summation: invalid truth value {value!r}")


def _torch_dtype(name) -> torch.dtype:
    """``getattr(torch, name)``, as Transformers reads the dtypes from optim_args."""
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"{name!r} is not a torch dtype (try bfloat16 or float32)")
    return dtype


def _transformers_arguments(args) -> dict:
    """Transformers' _get_adamw_anyprecision: the Adam arguments, and its own defaults for the
    optim_args keys (float32 states, no Kahan summation, a bf16 buffer)."""
    return dict(adam_arguments(args), use_kahan_summation=False, momentum_dtype=torch.float32,
                variance_dtype=torch.float32, compensation_buffer_dtype=torch.bfloat16)


ADAMW_ANYPRECISION = UpdateRule(
    name="adamw_anyprecision",
    nonnegative_states=("exp_avg_sq",),
    defaults=dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                  use_kahan_summation=False, momentum_dtype=torch.float32,
                  variance_dtype=torch.bfloat16, compensation_buffer_dtype=torch.bfloat16,
                  state_precision=None),  # None: follow the dtypes (see the module docstring)
    states=lambda group: ("exp_avg", "exp_avg_sq"),
    fused_step=_fused,
    reference_step=_reference,
    validate=_validate,
    torch_class="torchdistx.optimizers.AnyPrecisionAdamW",
    transformers_arguments=_transformers_arguments,
    transformers_optim_args={
        "use_kahan_summation": ("use_kahan_summation", _strtobool),
        **{key: (key, _torch_dtype) for key in ("momentum_dtype", "variance_dtype",
                                               "compensation_buffer_dtype")}},
)
