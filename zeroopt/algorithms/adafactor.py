"""Adafactor (Shazeer & Stern 2018) with transformers.optimization.Adafactor's semantics, and
GaLore's Adafactor (galore-torch's GaLoreAdafactor) for groups that carry ``rank``.

Matrices keep factored second moments (a row and a column mean of g^2, not a full matrix), and
every param's update is scaled by whole-tensor statistics (the param's RMS, the update's RMS
clipped to ``clip_threshold``). So every param is stepped whole, on the one rank that owns it.

    beta2_t = 1 - t^decay_rate        v_row, v_col <- beta2_t v + (1 - beta2_t) mean(g^2 + eps1)
    u = g / sqrt(v_row v_col / mean(v_row))   (1-D params: g / sqrt(v))
    u <- lr_t u / max(1, RMS(u) / clip_threshold);   with beta1: m <- beta1 m + (1 - beta1) u
    x <- x - wd lr_t x - u                  lr_t = lr, or min(1e-2, 1/sqrt(t)) (relative_step),
                                            times max(eps2, RMS(x)) with scale_parameter

The names "adafactor" and "galore_adafactor" preset ``scale_parameter=False,
relative_step=False`` (so an ``lr`` is needed), as Transformers' Trainer does for them; the rule
itself defaults to the class's own (relative step sizes, ``lr=None``).
"""

from __future__ import annotations

import math

import torch

from . import sources
from .base import UpdateRule, check_number
from .projection import (GALORE_PROJECTION, GROUP_KEYS, galore_project, galore_project_back,
                         is_projected, validate_projected)


def _validate(group: dict) -> None:
    lr, relative = group["lr"], group["relative_step"]
    if lr is not None and relative:
        raise ValueError("adafactor: a manual lr and relative_step=True do not combine: pass "
                         "relative_step=False (and scale_parameter=False) to use your lr, or "
                         "lr=None for Adafactor's own relative step sizes")
    if lr is None and not relative:
        raise ValueError("adafactor: relative_step=False needs an lr (for example lr=1e-3)")
    if lr is not None and check_number(lr, "lr") < 0:
        raise ValueError(f"Invalid lr: {lr} (it must be >= 0)")
    if group["warmup_init"] and not relative:
        raise ValueError("adafactor: warmup_init=True requires relative_step=True")
    eps = group["eps"]
    if not isinstance(eps, (tuple, list)) or len(eps) != 2:
        raise ValueError(f"adafactor: eps must be a pair (eps1 for g^2, eps2 for the param "
                         f"scale), got {eps!r}")
    if check_number(group["clip_threshold"], "clip_threshold") <= 0:
        raise ValueError(f"adafactor: clip_threshold must be > 0, got {group['clip_threshold']}")
    if check_number(group["decay_rate"], "decay_rate") > 0:
        raise ValueError(f"adafactor: decay_rate must be <= 0 (beta2_t = 1 - t^decay_rate), "
                         f"got {group['decay_rate']}")
    beta1 = group["beta1"]
    if beta1 is not None and not 0.0 <= check_number(beta1, "beta1") < 1.0:
        raise ValueError(f"adafactor: beta1 must be None or in [0, 1), got {beta1}")
    if check_number(group["weight_decay"], "weight_decay") < 0:
        raise ValueError(f"Invalid weight_decay: {group['weight_decay']} (it must be >= 0)")
    if not isinstance(group["layerwise"], bool):
        raise ValueError(f"layerwise must be True or False, got {group['layerwise']!r}")
    if is_projected(group):
        validate_projected(group, "galore_adafactor")


def _rms(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.norm(2) / (tensor.numel() ** 0.5)


def _lr(group: dict, t: int, rms: torch.Tensor):
    step_size = group["lr"]
    if group["relative_step"]:
        min_step = 1e-6 * t if group["warmup_init"] else 1e-2
        step_size = min(min_step, 1.0 / math.sqrt(t))
    scale = max(group["eps"][1], rms) if group["scale_parameter"] else 1.0
    return scale * step_size


def _step(group: dict, param: torch.Tensor, grad: torch.Tensor, state: dict, t: int) -> None:
    """One whole tensor's step (also the reference: the same code, per tensor)."""
    projected = is_projected(group)
    if projected:
        grad = galore_project(group, grad, state, t)
    factored, beta1 = grad.dim() >= 2, group["beta1"]
    if "RMS" not in state:
        if beta1 is not None:
            state["exp_avg"] = torch.zeros_like(grad)
        if factored:
            state["exp_avg_sq_row"] = grad.new_zeros(grad.shape[:-1])
            state["exp_avg_sq_col"] = grad.new_zeros(grad.shape[:-2] + grad.shape[-1:])
        else:
            state["exp_avg_sq"] = torch.zeros_like(grad)
    state["RMS"] = _rms(param)
    lr = _lr(group, t, state["RMS"])
    beta2t = 1.0 - math.pow(t, group["decay_rate"])
    update = grad**2 + group["eps"][0]
    if factored:
        row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
        row.mul_(beta2t).add_(update.mean(dim=-1), alpha=1.0 - beta2t)
        col.mul_(beta2t).add_(update.mean(dim=-2), alpha=1.0 - beta2t)
        row_factor = (row / row.mean(dim=-1, keepdim=True)).rsqrt_().unsqueeze(-1)
        update = torch.mul(row_factor, col.unsqueeze(-2).rsqrt()).mul_(grad)
    else:
        v = state["exp_avg_sq"]
        v.mul_(beta2t).add_(update, alpha=1.0 - beta2t)
        update = v.rsqrt().mul_(grad)
    update.div_((_rms(update) / group["clip_threshold"]).clamp_(min=1.0))
    update.mul_(lr)
    if beta1 is not None:
        state["exp_avg"].mul_(beta1).add_(update, alpha=1 - beta1)
        update = state["exp_avg"]
    if projected:
        update = galore_project_back(group, update, state, param.shape)
    if group["weight_decay"] != 0:
        param.add_(param, alpha=-group["weight_decay"] * lr)
    param.add_(-update)


def _whole_only(group, shard, step, stats=None) -> None:
    raise AssertionError("adafactor steps every param whole (tensor_step); no flat shard")


# zeroopt.wrap: Transformers' Adafactor, which this rule follows, options and all. torch's own
# torch.optim.Adafactor is another variant of the algorithm (its step size, epsilons and
# weight decay are not these).
_SOURCES = sources.Sources(
    sources.Source("transformers.optimization.Adafactor"),
    sources.Source("torch.optim.Adafactor", refuse=(
        "torch's own Adafactor is another variant of the algorithm than "
        "transformers.optimization.Adafactor, which zeroopt's adafactor follows: its step "
        "size, epsilons and weight decay differ")),
)

ADAFACTOR = UpdateRule(
    name="adafactor",
    nonnegative_states=("exp_avg_sq", "exp_avg_sq_row", "exp_avg_sq_col"),
    defaults=dict(lr=None, eps=(1e-30, 1e-3), clip_threshold=1.0, decay_rate=-0.8, beta1=None,
                  weight_decay=0.0, scale_parameter=True, relative_step=True,
                  warmup_init=False, layerwise=False),
    states=lambda group: (),
    fused_step=_whole_only,
    reference_step=_step,
    validate=_validate,
    whole_tensors=lambda group: True,
    tensor_step=_step,
    tensor_states_8bit=("exp_avg", "exp_avg_sq", "exp_avg_sq_row", "exp_avg_sq_col"),
    group_keys=GROUP_KEYS,  # galore_adafactor
    transformers_projection=GALORE_PROJECTION,  # as "galore_adafactor"
    wraps=_SOURCES,
    from_torch_options=_SOURCES.from_torch_options,
)
