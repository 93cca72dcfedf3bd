"""GaLore (Zhao et al. 2024): Adam on a low-rank projection of each matrix's gradient, with
galore-torch's semantics, so a galore-torch user changes one line.

Params in groups that carry ``rank`` (projection.py) are stepped whole on the rank that owns
them: project the gradient (refreshing the SVD basis every ``update_proj_gap`` steps), Adam on
the r x n (or m x r) projection, project the update back, scale it. Every other param runs
plain Adam in the same optimizer, element-wise over the flat shard.

- "galore_adamw" is galore-torch's GaLoreAdamW: Transformers' old AdamW (eps added to
  sqrt(v) before bias correction, ``correct_bias``, weight decay applied after the update, as
  ``p <- p - lr wd p``), defaults lr 1e-3, eps 1e-6, weight_decay 0.
- "galore_adamw_8bit" is GaLoreAdamW8bit: bitsandbytes' 8-bit Adam (torch.optim.AdamW's
  formula, defaults eps 1e-8, weight_decay 0.01). Projected matrices run it with weight decay
  0 on the low-rank gradient, then decay the param after projecting back, as galore-torch
  does; their low-rank moments are 8-bit when they have ``min_8bit_size`` elements or more.
"""

from __future__ import annotations

import math

import torch

from . import adam
from .base import ShardTensors, UpdateRule, check_betas, check_nonnegative
from .projection import (GALORE_PROJECTION, GROUP_KEYS, galore_project, galore_project_back,
                         is_projected, validate_projected)

_MOMENTS = ("exp_avg", "exp_avg_sq")


def _validate(rule: str):
    def validate(group: dict) -> None:
        check_nonnegative(group, "lr", "eps", "weight_decay")
        check_betas(group)
        if not isinstance(group["layerwise"], bool):
            raise ValueError(f"layerwise must be True or False, got {group['layerwise']!r}")
        if is_projected(group):
            validate_projected(group, rule)

    return validate


def hf_step_size(group: dict, t: int) -> float:
    """Transformers' old AdamW step size at step ``t`` (from 1): ``lr``, times
    ``sqrt(1 - b2^t) / (1 - b1^t)`` with ``correct_bias`` (its bias correction lives here)."""
    beta1, beta2 = group["betas"]
    if not group["correct_bias"]:
        return group["lr"]
    return group["lr"] * math.sqrt(1.0 - beta2**t) / (1.0 - beta1**t)


def _hf_adamw_fused(group: dict, shard: ShardTensors, step: torch.Tensor, stats=None) -> None:
    """Transformers' old AdamW over the flat shard (the unprojected params)."""
    beta1, beta2 = group["betas"]
    m, v, grads, params = shard.states["exp_avg"], shard.states["exp_avg_sq"], shard.grads, \
        shard.params
    torch._foreach_mul_(m, beta1)
    torch._foreach_add_(m, grads, alpha=1.0 - beta1)
    torch._foreach_mul_(v, beta2)
    torch._foreach_addcmul_(v, grads, grads, value=1.0 - beta2)
    denom = torch._foreach_sqrt(v)
    torch._foreach_add_(denom, group["eps"])
    torch._foreach_add_(params, torch._foreach_div(m, denom),
                        alpha=-hf_step_size(group, int(step.item())))
    if group["weight_decay"] > 0.0:
        torch._foreach_add_(params, params, alpha=-group["lr"] * group["weight_decay"])


def hf_adam_direction(group: dict, low: torch.Tensor, state: dict) -> torch.Tensor:
    """Transformers' old Adam on one (projected) gradient: moments (created on first use)
    updated, ``m / (sqrt(v) + eps)`` returned (the bias correction is in the step size)."""
    if "exp_avg" not in state:
        state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(low), torch.zeros_like(low)
    m, v = state["exp_avg"], state["exp_avg_sq"]
    beta1, beta2 = group["betas"]
    m.mul_(beta1).add_(low, alpha=1.0 - beta1)
    v.mul_(beta2).addcmul_(low, low, value=1.0 - beta2)
    return m / v.sqrt().add_(group["eps"])


def galore_adamw_step(group: dict, param: torch.Tensor, grad: torch.Tensor, state: dict,
                      t: int) -> None:
    """galore-torch's GaLoreAdamW step for one whole tensor (also its reference): projected
    when the group carries ``rank``, else Transformers' old AdamW on the whole tensor."""
    projected = is_projected(group)
    low = galore_project(group, grad, state, t) if projected else grad
    norm_grad = hf_adam_direction(group, low, state)
    if projected:
        norm_grad = galore_project_back(group, norm_grad, state, param.shape)
    param.add_(norm_grad, alpha=-hf_step_size(group, t))
    if group["weight_decay"] > 0.0:
        param.add_(param, alpha=-group["lr"] * group["weight_decay"])


def _adamw_8bit_tensor(group: dict, param: torch.Tensor, grad: torch.Tensor, state: dict,
                       t: int) -> None:
    """GaLoreAdamW8bit's step for one projected matrix: torch AdamW (weight decay 0) on the
    projection, projected back, then decoupled weight decay of the param."""
    low = galore_project(group, grad, state, t)
    if "exp_avg" not in state:
        state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(low), torch.zeros_like(low)
    zero = torch.zeros_like(low)
    step = torch.tensor(float(t))
    beta1, beta2 = group["betas"]
    torch._fused_adamw_([zero], [low], [state["exp_avg"]], [state["exp_avg_sq"]], [], [step],
                        lr=1.0, beta1=beta1, beta2=beta2, weight_decay=0.0, eps=group["eps"],
                        amsgrad=False, maximize=False)
    # zero now holds -(the Adam direction): project it back, scaled, and step
    param.add_(galore_project_back(group, zero, state, param.shape), alpha=group["lr"])
    if group["weight_decay"] > 0:
        param.add_(param, alpha=-group["lr"] * group["weight_decay"])


def _adamw_8bit_reference(group: dict, param: torch.Tensor, grad: torch.Tensor, state: dict,
                          t: int) -> None:
    if is_projected(group):
        return _adamw_8bit_tensor(group, param, grad, state, t)
    adam.ADAMW.reference_step({**adam.ADAMW.defaults, **group}, param, grad, state, t)


_COMMON = dict(lr=1e-3, betas=(0.9, 0.999), weight_decay=0.0, layerwise=False)

GALORE_ADAMW = UpdateRule(
    name="galore_adamw",
    nonnegative_states=("exp_avg_sq",),
    defaults=dict(_COMMON, eps=1e-6, correct_bias=True),
    states=lambda group: () if is_projected(group) else _MOMENTS,
    fused_step=_hf_adamw_fused,
    reference_step=galore_adamw_step,
    validate=_validate("galore_adamw"),
    whole_tensors=is_projected,
    tensor_step=galore_adamw_step,
    tensor_states_8bit=_MOMENTS,
    group_keys=GROUP_KEYS,
    transformers_projection=GALORE_PROJECTION,
)


def _adamw_fused(group: dict, shard: ShardTensors, step: torch.Tensor, stats=None) -> None:
    """bitsandbytes' (8-bit) AdamW, that is torch's formula, for the unprojected params."""
    adam.ADAMW.fused_step({**adam.ADAMW.defaults, **group}, shard, step, stats)


GALORE_ADAMW_8BIT = UpdateRule(
    name="galore_adamw_8bit",
    nonnegative_states=("exp_avg_sq",),
    defaults=dict(_COMMON, eps=1e-8, weight_decay=1e-2, state_precision="8bit"),
    states=lambda group: () if is_projected(group) else _MOMENTS,
    fused_step=_adamw_fused,
    reference_step=_adamw_8bit_reference,
    validate=_validate("galore_adamw_8bit"),
    whole_tensors=is_projected,
    tensor_step=_adamw_8bit_tensor,
    tensor_states_8bit=_MOMENTS,
    group_keys=GROUP_KEYS,
    transformers_projection=GALORE_PROJECTION,
)
