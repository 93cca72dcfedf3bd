"""Options that change how Adam and Lion turn moments into an update.

- ``adopt=True`` (Taniguchi et al. 2024, "ADOPT"): the first step only initialises v = g^2; then
  the gradient is normalised by the *previous* v, clipped to +-(t-1)^0.25, and averaged into m,
  which is the update (no bias correction); v is updated last. As the authors' adopt.py.
- ``grams=True`` (Cao et al. 2024, "Grams"): the update takes the gradient's sign and the Adam
  update's magnitude, sign(g) * |u|.
- ``cautious=True`` (Liang et al. 2024, "Cautious Optimizers"): the update is kept only where it
  agrees in sign with the gradient, and rescaled by numel / (kept + 1), counted over the whole
  param across ranks (an all-reduced statistic, as the trust ratios are).

With any of them Adam(W) runs this multi-tensor path instead of torch's fused kernel.
"""

from __future__ import annotations

import math

import torch

from .base import ShardTensors, adam_denominator

OPTIONS = ("cautious", "adopt", "grams")


def any_option(group: dict) -> bool:
    """Whether the group turns on any of ``OPTIONS`` (then Adam(W) runs this path).

    Args:
        group: the param group.

    Returns:
        True if ``cautious``, ``adopt`` or ``grams`` is set and true.
    """
    return any(group.get(name) for name in OPTIONS)


def adam_direction(group: dict, shard: ShardTensors, t: int, decoupled: bool):
    """Weight decay and moments; returns the update direction (new tensors), or None on
    ADOPT's first step, which only initialises v."""
    beta1, beta2 = group["betas"]
    lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
    params, grads = shard.params, shard.grads
    m, v = shard.states["exp_avg"], shard.states["exp_avg_sq"]
    if group["maximize"]:
        torch._foreach_neg_(grads)  # consumed by step()
    if wd != 0 and not decoupled:
        torch._foreach_add_(grads, params, alpha=wd)
    if group["adopt"] and t == 1:
        torch._foreach_addcmul_(v, grads, grads, value=1)
        return None
    if wd != 0 and decoupled:
        torch._foreach_mul_(params, 1 - lr * wd)
    if group["adopt"]:
        denom = torch._foreach_sqrt(v)
        torch._foreach_clamp_min_(denom, eps)
        direction = torch._foreach_div(grads, denom)
        clip = (t - 1) ** 0.25
        torch._foreach_clamp_min_(direction, -clip)
        torch._foreach_clamp_max_(direction, clip)
        torch._foreach_lerp_(m, direction, 1 - beta1)
        torch._foreach_mul_(v, beta2)
        torch._foreach_addcmul_(v, grads, grads, value=1 - beta2)
        torch._foreach_copy_(direction, m)
    else:
        torch._foreach_lerp_(m, grads, 1 - beta1)
        torch._foreach_mul_(v, beta2)
        torch._foreach_addcmul_(v, grads, grads, value=1 - beta2)
        direction = adam_denominator(v, beta2, t, eps)
        torch._foreach_reciprocal_(direction)
        torch._foreach_mul_(direction, m)
        torch._foreach_mul_(direction, 1 / (1 - beta1**t))
    if group["grams"]:
        torch._foreach_abs_(direction)
        torch._foreach_mul_(direction, torch._foreach_sign(grads))
    return direction


def keep_agreeing(direction: list[torch.Tensor], grads: list[torch.Tensor],
                  shard: ShardTensors) -> torch.Tensor:
    """Zero the direction where it disagrees in sign with the gradient; this rank's count of
    kept elements per param, ``[1, num_params]``."""
    kept = []
    for d, g in zip(direction, grads):
        mask = (d * g) > 0
        d.mul_(mask)
        kept.append(mask.sum())
    return shard.per_param(kept).unsqueeze(0)


def cautious_scale(kept: torch.Tensor, shard: ShardTensors) -> list[float]:
    """numel / (kept + 1) per param, spread to the pieces."""
    return shard.per_piece(shard.param_numel / (kept[0] + 1))


def reference_direction(group: dict, param: torch.Tensor, grad: torch.Tensor, state: dict,
                        t: int, decoupled: bool):
    """The per-tensor reference of ``adam_direction`` (mutates param, states); returns the
    direction (None on ADOPT's first step) and the gradient the moments saw."""
    beta1, beta2 = group["betas"]
    lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
    m, v = state["exp_avg"], state["exp_avg_sq"]
    if group["maximize"]:
        grad = -grad
    if wd != 0 and not decoupled:
        grad = grad + wd * param
    if group["adopt"] and t == 1:
        v.addcmul_(grad, grad)
        return None, grad
    if wd != 0 and decoupled:
        param.mul_(1 - lr * wd)
    if group["adopt"]:
        normed = (grad / v.sqrt().clamp_min(eps)).clamp(-(t - 1) ** 0.25, (t - 1) ** 0.25)
        m.lerp_(normed, 1 - beta1)
        v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        direction = m.clone()
    else:
        m.lerp_(grad, 1 - beta1)
        v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        direction = (m / (1 - beta1**t)) / (v.sqrt() / math.sqrt(1 - beta2**t) + eps)
    if group["grams"]:
        direction = grad.sign() * direction.abs()
    return direction, grad


def reference_cautious(direction: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """The per-tensor reference of cautious masking (Liang et al. 2024).

    Args:
        direction: the update direction of one whole param.
        grad: the gradient the moments saw, same shape.

    Returns:
        A new tensor: ``direction`` where it agrees in sign with ``grad``, zero elsewhere,
        times ``numel / (kept + 1)``.
    """
    mask = (direction * grad > 0).to(direction.dtype)
    return direction * mask * (mask.numel() / (mask.sum() + 1))
