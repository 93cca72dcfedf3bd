"""LARS (You et al. 2017) with an exact per-tensor trust ratio.

    g <- g + wd w
    trust = eta ||w|| / ||g||       (1 if a norm is 0, or the group has wd = 0)
    v <- momentum v + lr * trust * g
    w <- w - v

The norms are of the whole param, across ranks (see trust_ratio.py). Phase 1 adds the weight
decay into the gradient shard (which step() consumes) and sums the squares; phase 2 applies
the ratio. pytorch-optimizer's LARS differs: its denominator is ||g|| + wd ||w||, and it
never adapts 1-D params (tests/test_trust_ratio.py compares with it).

On the CPU each phase is one pass of C per piece (zeroopt/kernels/_trust_ratio.c), with the
torch._foreach_ path's arithmetic op for op, bit for bit: phase 1 only reads (it sums w^2 and
(g + wd w)^2, leaving the gradients as they are), and phase 2 recomputes g + wd w from the w
and g it reads anyway. Elsewhere the torch._foreach_ code below runs.
"""

from __future__ import annotations

import torch

from . import sources, trust_ratio
from .base import ShardTensors, UpdateRule, check_nonnegative


def _validate(group: dict) -> None:
    check_nonnegative(group, "lr", "momentum", "weight_decay", "eta")
    trust_ratio.check_exclusion(group)


def _statistics(group: dict, shard: ShardTensors, step: torch.Tensor) -> torch.Tensor:
    if trust_ratio.native(shard):  # the same answer in phase 2, which adds the weight decay
        return trust_ratio.native_squares(shard, "zk_lars_squares",
                                          [shard.params, shard.grads], [group["weight_decay"]])
    if shard.params:
        torch._foreach_add_(shard.grads, shard.params, alpha=group["weight_decay"])
    return trust_ratio.partial_squares(shard, shard.params, shard.grads)


def _fused(group: dict, shard: ShardTensors, step: torch.Tensor, stats) -> None:
    lr, velocity = group["lr"], shard.states["momentum_buffer"]
    if stats is not None:
        trust = trust_ratio.ratios(stats[0], stats[1], group["eta"],
                                   trust_ratio.excluded(group, shard))
    if trust_ratio.native(shard):
        scales = [lr] * len(shard.params) if stats is None else shard.per_piece(lr * trust)
        for param, grad, buffer, scale in zip(shard.params, shard.grads, velocity, scales):
            trust_ratio.LIB.run("zk_lars_step", [param, grad, buffer],
                                [group["weight_decay"], scale, group["momentum"]])
        return
    if stats is None:  # no weight decay: trust 1
        scaled = torch._foreach_mul(shard.grads, lr)
    else:
        scaled = torch._foreach_mul(shard.grads, shard.per_piece(lr * trust))
    torch._foreach_mul_(velocity, group["momentum"])
    torch._foreach_add_(velocity, scaled)
    torch._foreach_sub_(shard.params, velocity)


def _reference(group: dict, param: torch.Tensor, grad: torch.Tensor, state: dict, t: int) -> None:
    grad = grad + group["weight_decay"] * param
    trust = trust_ratio.reference_ratio(group, state, param, grad, group["eta"])
    velocity = state["momentum_buffer"]
    velocity.mul_(group["momentum"]).add_(grad, alpha=group["lr"] * trust)
    param.sub_(velocity)


# zeroopt.wrap maps no LARS class: those named so compute other updates.
_SOURCES = sources.Sources(
    *sources.bitsandbytes("LARS", "LARS8bit", "LARS32bit", refuse=(
        "bitsandbytes' LARS is momentum SGD whose update is scaled down to max_unorm * "
        "||param|| where longer (its 8-bit update only for params under min_8bit_size), not "
        "the trust ratio eta ||w|| / ||g + wd w|| of zeroopt's lars. For bitsandbytes' update "
        "with max_unorm=0, wrap bitsandbytes.optim.SGD; for LARS, build "
        "ZeroOptimizer(params, 'lars', ...)")),
    sources.Source("pytorch_optimizer.LARS", refuse=(
        "pytorch-optimizer's LARS divides by ||g|| + wd ||w|| where LARS has ||g + wd w||, and "
        "never adapts 1-D params. Build ZeroOptimizer(params, 'lars', ...)")),
)

LARS = UpdateRule(
    name="lars",
    defaults=dict(lr=1e-3, momentum=0.9, eta=1e-3, weight_decay=1e-4,
                  exclude_from_trust_ratio=()),
    states=lambda group: ("momentum_buffer",),
    fused_step=_fused,
    reference_step=_reference,
    validate=_validate,
    per_tensor=lambda group: group["weight_decay"] != 0,
    statistics=_statistics,
    wraps=_SOURCES,
    from_torch_options=_SOURCES.from_torch_options,
)
