"""Adam and AdamW (torch.optim semantics), fused with torch's own multi-tensor kernel."""

from __future__ import annotations

import math

import torch

from .base import ShardTensors, UpdateRule, check_betas, check_fixed, check_nonnegative

_FIXED = {"amsgrad": False}


def _validate(group: dict) -> None:
    check_nonnegative(group, "lr", "eps", "weight_decay")
    check_betas(group)
    check_fixed(group, _FIXED, "adam/adamw")


def _fused(decoupled: bool):
    kernel = torch._fused_adamw_ if decoupled else torch._fused_adam_

    def step(group: dict, shard: ShardTensors, step_count: torch.Tensor, stats=None) -> None:
        beta1, beta2 = group["betas"]
        # The kernel reads (does not advance) one step tensor per tensor; they all share ours.
        kernel(shard.params, shard.grads, shard.states["exp_avg"], shard.states["exp_avg_sq"],
               [], [step_count] * len(shard.params), lr=float(group["lr"]), beta1=beta1,
               beta2=beta2, weight_decay=group["weight_decay"], eps=group["eps"],
               amsgrad=False, maximize=group["maximize"])

    return step


def _reference(decoupled: bool):
    def step(group: dict, param: torch.Tensor, grad: torch.Tensor, state: dict, t: int) -> None:
        lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
        beta1, beta2 = group["betas"]
        if group["maximize"]:
            grad = -grad
        if decoupled:
            param.mul_(1 - lr * wd)
        else:
            grad = grad.add(param, alpha=wd)
        m, v = state["exp_avg"], state["exp_avg_sq"]
        m.lerp_(grad, 1 - beta1)
        v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        denom = (v.sqrt() / math.sqrt(1 - beta2**t)).add_(eps)
        param.addcdiv_(m, denom, value=-lr / (1 - beta1**t))

    return step


ADAMW = UpdateRule(
    name="adamw",
    defaults=dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, maximize=False,
                  amsgrad=False),
    states=lambda group: ("exp_avg", "exp_avg_sq"),
    fused_step=_fused(decoupled=True),
    reference_step=_reference(decoupled=True),
    validate=_validate,
    fixed=_FIXED,
)

ADAM = UpdateRule(
    name="adam",
    defaults=dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, maximize=False,
                  amsgrad=False),
    states=lambda group: ("exp_avg", "exp_avg_sq"),
    fused_step=_fused(decoupled=False),
    reference_step=_reference(decoupled=False),
    validate=_validate,
    fixed=_FIXED,
)
