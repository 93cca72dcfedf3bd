"""Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms").

    update = sign(beta1 * m + (1 - beta1) * g)
    x     <- x * (1 - lr * wd) - lr * update
    m     <- beta2 * m + (1 - beta2) * g

The fused and reference steps use the same element-wise arithmetic (mul, then add), so they agree
bit for bit: a sign taken of a momentum that rounds differently could flip a whole lr step.
"""

from __future__ import annotations

import torch

from .base import ShardTensors, UpdateRule, check_betas, check_nonnegative


def _validate(group: dict) -> None:
    check_nonnegative(group, "lr", "weight_decay")
    check_betas(group)


def _fused(group: dict, shard: ShardTensors, step_count: torch.Tensor, stats=None) -> None:
    lr, wd = float(group["lr"]), group["weight_decay"]
    beta1, beta2 = group["betas"]
    params, grads, exp_avgs = shard.params, shard.grads, shard.states["exp_avg"]
    if group["maximize"]:
        grads = torch._foreach_neg(grads)
    if wd != 0:
        torch._foreach_mul_(params, 1 - lr * wd)
    update = torch._foreach_mul(exp_avgs, beta1)
    torch._foreach_add_(update, grads, alpha=1 - beta1)
    torch._foreach_sign_(update)
    torch._foreach_add_(params, update, alpha=-lr)
    torch._foreach_mul_(exp_avgs, beta2)
    torch._foreach_add_(exp_avgs, grads, alpha=1 - beta2)


def _reference(group: dict, param: torch.Tensor, grad: torch.Tensor, state: dict, t: int) -> None:
    lr, wd = group["lr"], group["weight_decay"]
    beta1, beta2 = group["betas"]
    m = state["exp_avg"]
    if group["maximize"]:
        grad = -grad
    param.mul_(1 - lr * wd)
    update = (m * beta1).add_(grad, alpha=1 - beta1).sign_()
    param.add_(update, alpha=-lr)
    m.mul_(beta2).add_(grad, alpha=1 - beta2)


LION = UpdateRule(
    name="lion",
    defaults=dict(lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, maximize=False),
    states=lambda group: ("exp_avg",),
    fused_step=_fused,
    reference_step=_reference,
    validate=_validate,
)
