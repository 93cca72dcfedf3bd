"""LAMB (You et al. 2019) with apex FusedLAMB's semantics, and an exact per-tensor trust ratio.

    m <- b1 m + (1 - b1) g          v <- b2 v + (1 - b2) g^2
    r  = (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)
    u  = r + wd x
    x <- x - lr * (||x|| / ||u||) * u        (ratio 1 if a norm is 0, or the group has wd = 0)

The norms are of the whole param, across ranks (see trust_ratio.py). Phase 1 updates the moments
and writes u over the gradient shard, which step() consumes; phase 2 applies the ratio.
apex's optional global gradient clipping (max_grad_norm) is left to ``clip_grad_norm_``.

On the CPU each phase is one pass of C per piece (zeroopt/kernels/_trust_ratio.c: phase 1
updates the moments, writes u and sums x^2 and u^2; phase 2 applies the ratio), with the
torch._foreach_ path's arithmetic op for op, but for a correctly rounded sqrt (torch's CPU
sqrt is MKL's, within 1 ulp). Elsewhere the torch._foreach_ code below runs.
"""

from __future__ import annotations

import math

import torch

from . import sources, trust_ratio
from .base import (ShardTensors, UpdateRule, adam_arguments, adam_denominator, check_betas,
                   check_nonnegative, update_moments_)


def _validate(group: dict) -> None:
    check_nonnegative(group, "lr", "eps", "weight_decay")
    check_betas(group)
    trust_ratio.check_exclusion(group)


def _direction(group: dict, shard: ShardTensors, step: torch.Tensor) -> None:
    """Moments, then u written over the gradients."""
    beta1, beta2 = group["betas"]
    t = step.item()
    m, v, grads = shard.states["exp_avg"], shard.states["exp_avg_sq"], shard.grads
    update_moments_(m, v, grads, beta1, beta2)
    denom = adam_denominator(v, beta2, t, group["eps"])
    torch._foreach_reciprocal_(denom)
    torch._foreach_mul_(denom, m)  # in place: denom now holds m / denom
    torch._foreach_mul_(denom, 1 / (1 - beta1**t))
    if group["weight_decay"] != 0:
        torch._foreach_add_(denom, shard.params, alpha=group["weight_decay"])
    torch._foreach_copy_(grads, denom)


def _kernel_hyper(group: dict, step: torch.Tensor) -> list[float]:
    """The C kernels' common hyperparameters, each the number _direction's torch ops take:
    beta1, 1 - beta1, beta2, 1 - beta2, sqrt(1 - beta2^t), eps, 1 / (1 - beta1^t)."""
    beta1, beta2 = group["betas"]
    t = step.item()
    return [beta1, 1 - beta1, beta2, 1 - beta2, math.sqrt(1 - beta2**t), group["eps"],
            1 / (1 - beta1**t)]


def _tensors(shard: ShardTensors) -> list[list[torch.Tensor]]:
    return [shard.params, shard.grads, shard.states["exp_avg"], shard.states["exp_avg_sq"]]


def _statistics(group: dict, shard: ShardTensors, step: torch.Tensor) -> torch.Tensor:
    if trust_ratio.native(shard, root=True):
        return trust_ratio.native_squares(shard, "zk_lamb_direction", _tensors(shard),
                                          _kernel_hyper(group, step) + [group["weight_decay"]])
    if shard.params:
        _direction(group, shard, step)
    return trust_ratio.partial_squares(shard, shard.params, shard.grads)


def _fused(group: dict, shard: ShardTensors, step: torch.Tensor, stats) -> None:
    native = trust_ratio.native(shard, root=True)
    if stats is None:  # no weight decay: ratio 1, no statistics were needed
        if native:
            trust_ratio.LIB.each("zk_lamb_step", _tensors(shard),
                                 _kernel_hyper(group, step) + [-group["lr"]])
            return
        _direction(group, shard, step)
        torch._foreach_add_(shard.params, shard.grads, alpha=-group["lr"])
        return
    ratio = trust_ratio.ratios(stats[0], stats[1], 1.0, trust_ratio.excluded(group, shard))
    scales = shard.per_piece(-group["lr"] * ratio)
    if native:
        for param, direction, scale in zip(shard.params, shard.grads, scales):
            trust_ratio.LIB.run("zk_lamb_apply", [param, direction], [scale])
        return
    torch._foreach_mul_(shard.grads, scales)
    torch._foreach_add_(shard.params, shard.grads)


def _reference(group: dict, param: torch.Tensor, grad: torch.Tensor, state: dict, t: int) -> None:
    beta1, beta2 = group["betas"]
    m, v = state["exp_avg"], state["exp_avg_sq"]
    m.mul_(beta1).add_(grad, alpha=1 - beta1)
    v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    r = (m / (1 - beta1**t)) / ((v / (1 - beta2**t)).sqrt() + group["eps"])
    u = r + group["weight_decay"] * param
    param.add_(u, alpha=-group["lr"] * trust_ratio.reference_ratio(group, state, param, u))


# zeroopt.wrap maps no LAMB class: those named so compute other updates.
_SOURCES = sources.Sources(
    *sources.bitsandbytes("LAMB", "LAMB8bit", "LAMB32bit", refuse=(
        "bitsandbytes' LAMB is AdamW (weight decay outside any ratio) whose update is scaled "
        "down to max_unorm * ||param|| where longer, never up; its 8-bit update has no such "
        "clipping, so LAMB8bit clips only the params under min_8bit_size. zeroopt's lamb is "
        "apex's trust ratio ||x|| / ||r + wd x||. For bitsandbytes' update with max_unorm=0, "
        "wrap bitsandbytes.optim.AdamW; for LAMB, build ZeroOptimizer(params, 'lamb', ...)")),
    sources.Source("pytorch_optimizer.Lamb", refuse=(
        "pytorch-optimizer's Lamb never bias-corrects the second moment, and by default decays "
        "the weights outside the trust ratio; zeroopt's lamb is apex's. Build "
        "ZeroOptimizer(params, 'lamb', ...)")),
)

LAMB = UpdateRule(
    name="lamb",
    nonnegative_states=("exp_avg_sq",),
    statistics_use_states=True,
    defaults=dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01,
                  exclude_from_trust_ratio=()),
    states=lambda group: ("exp_avg", "exp_avg_sq"),
    fused_step=_fused,
    reference_step=_reference,
    validate=_validate,
    per_tensor=lambda group: group["weight_decay"] != 0,
    statistics=_statistics,
    wraps=_SOURCES,
    from_torch_options=_SOURCES.from_torch_options,
    transformers_arguments=adam_arguments,
)
