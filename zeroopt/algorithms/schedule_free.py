"""Schedule-free AdamW (Defazio et al. 2024), as facebookresearch/schedule_free's
AdamWScheduleFree computes it.

The model holds y, an interpolation between the averaged iterate x and the base iterate z:
y = (1 - beta1) z + beta1 x. Each step updates z with an Adam-normalised gradient taken at y,
and moves y so that x becomes a weighted average of the z's (weight (k+1)^r * lr_max^power):

    g' = g / (sqrt(v / (1 - b2^t)) + eps) + wd y
    y <- lerp(y, z, c) + lr (b1 (1 - c) - 1) g'         c = weight / weight_sum
    z <- z - lr g'

Evaluate at x: ``opt.eval()`` before evaluating (and saving), ``opt.train()`` before training
again; step() in eval mode is an error. The group keeps k, lr_max and weight_sum, so they are
saved with the state.
"""

from __future__ import annotations

import torch

from .base import ShardTensors, UpdateRule, adam_arguments, check_betas, check_nonnegative


def _validate(group: dict) -> None:
    check_nonnegative(group, "lr", "eps", "weight_decay", "r", "weight_lr_power",
                      "warmup_steps")
    check_betas(group)


def _before_step(group: dict) -> None:
    k, warmup = group["k"], group["warmup_steps"]
    lr = group["lr"] * ((k + 1) / warmup if k < warmup else 1.0)
    group["scheduled_lr"] = lr
    group["lr_max"] = max(lr, group["lr_max"])
    weight = (k + 1) ** group["r"] * group["lr_max"] ** group["weight_lr_power"]
    group["weight_sum"] += weight
    group["ckp1"] = weight / group["weight_sum"] if group["weight_sum"] else 0.0
    group["k"] = k + 1


def _fused(group: dict, shard: ShardTensors, step: torch.Tensor, stats=None) -> None:
    beta1, beta2 = group["betas"]
    lr, ckp1 = group["scheduled_lr"], group["ckp1"]
    y, grads, z, v = shard.params, shard.grads, shard.states["z"], shard.states["exp_avg_sq"]
    torch._foreach_mul_(v, beta2)
    torch._foreach_addcmul_(v, grads, grads, value=1 - beta2)
    denom = torch._foreach_div(v, 1 - beta2 ** group["k"])
    torch._foreach_sqrt_(denom)
    torch._foreach_add_(denom, group["eps"])
    torch._foreach_div_(grads, denom)  # the gradient shard is consumed by step()
    if group["weight_decay"] != 0:
        torch._foreach_add_(grads, y, alpha=group["weight_decay"])
    torch._foreach_lerp_(y, z, ckp1)
    torch._foreach_add_(y, grads, alpha=lr * (beta1 * (1 - ckp1) - 1))
    torch._foreach_sub_(z, grads, alpha=lr)


def _reference(group: dict, param: torch.Tensor, grad: torch.Tensor, state: dict, t: int) -> None:
    beta1, beta2 = group["betas"]
    lr, ckp1 = group["scheduled_lr"], group["ckp1"]
    z, v = state["z"], state["exp_avg_sq"]
    v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    normed = grad / (v.div(1 - beta2 ** group["k"]).sqrt() + group["eps"])
    normed = normed + group["weight_decay"] * param
    param.lerp_(z, ckp1).add_(normed, alpha=lr * (beta1 * (1 - ckp1) - 1))
    z.sub_(normed, alpha=lr)


def _to_eval(group: dict, shard: ShardTensors) -> None:
    torch._foreach_lerp_(shard.params, shard.states["z"], 1 - 1 / group["betas"][0])


def _to_train(group: dict, shard: ShardTensors) -> None:
    torch._foreach_lerp_(shard.params, shard.states["z"], 1 - group["betas"][0])


def _warmup_steps(args) -> int:
    """Schedule-free's warmup is a number of steps; TrainingArguments also allows a ratio."""
    steps = args.warmup_steps
    if 0 < steps < 1:
        raise ValueError(f"schedule_free_adamw warms up over a number of steps; warmup_steps="
                         f"{steps} is a ratio. Give a step count (warmup_steps=N), or "
                         f"optim_args='warmup_steps=N'")
    return int(steps)


SCHEDULE_FREE_ADAMW = UpdateRule(
    name="schedule_free_adamw",
    nonnegative_states=("exp_avg_sq",),
    full_precision_states=("z",),
    defaults=dict(lr=0.0025, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, warmup_steps=0,
                  r=0.0, weight_lr_power=2.0,
                  # bookkeeping, kept in the group (as the reference does) so it is saved
                  k=0, lr_max=-1.0, weight_sum=0.0, scheduled_lr=0.0, ckp1=0.0,
                  train_mode=True),
    states=lambda group: ("z", "exp_avg_sq"),
    fused_step=_fused,
    reference_step=_reference,
    validate=_validate,
    initial_values=lambda group: {"z": "param"},
    before_step=_before_step,
    to_eval=_to_eval,
    to_train=_to_train,
    transformers_arguments=lambda args: dict(adam_arguments(args),
                                             warmup_steps=_warmup_steps(args)),
)
