"""Schedule-free AdamW (Defazio et al. 2024, "The Road Less Scheduled"), as
facebookresearch/schedule_free's AdamWScheduleFree computes it, and the machinery the
schedule-free rules share (schedule_free_radam.py, schedule_free_sgd.py).

The model holds y, an interpolation between the averaged iterate x and the base iterate z:
y = (1 - beta) z + beta x (beta: betas[0], or SGD's momentum). Each step updates z with a
direction d taken at y (AdamW: the Adam-normalised gradient), and moves y so that x becomes a
weighted average of the z's (weight (k+1)^r * lr_max^power):

    d = g / (sqrt(v / (1 - b2^t)) + eps) + wd y
    y <- lerp(y, z, c) + lr (beta (1 - c) - 1) d         c = weight / weight_sum
    z <- z - lr d

Evaluate at x: ``opt.eval()`` before evaluating (and saving), ``opt.train()`` before training
again; step() in eval mode is an error. The group keeps k, lr_max and weight_sum
(``BOOKKEEPING``), so they are saved with the state. zeroopt starts in train mode; the
package's classes start in eval mode and need ``train()`` before the first step.

AdamW's hyperparameters, as AdamWScheduleFree's: lr (0.0025), betas ((0.9, 0.999): beta1 is
the interpolation beta, beta2 the second moment's decay), eps (1e-8, added outside the root),
weight_decay (0: an L2 term added to the direction, at y), warmup_steps (0: the lr rises
linearly over that many steps), r (0: the average's weights grow as (k+1)^r), weight_lr_power
(2: and as lr_max^power, so that warmup steps weigh less).

On the CPU (contiguous fp32) the step of AdamW and RAdam is one pass over memory in C
(zeroopt/kernels/_schedule_free.c, ``native_step``), with the torch path's arithmetic op for
op; elsewhere the torch._foreach_* path runs.
"""

from __future__ import annotations

from typing import Callable

import torch

from . import sources
from .base import ShardTensors, UpdateRule, adam_arguments, check_betas, check_nonnegative
from ..kernels import sqrt_check
from ..kernels.library import Library

LIB = Library("_schedule_free.c")

# The group's bookkeeping (as the package keeps it there): the step count, the largest lr so
# far, the sum of the average's weights, this step's lr and its interpolation weight c, and the
# mode. Saved with the param groups.
BOOKKEEPING = dict(k=0, lr_max=-1.0, weight_sum=0.0, scheduled_lr=0.0, ckp1=0.0,
                   train_mode=True)


def check_schedule(group: dict) -> None:
    """Check the hyperparameters every schedule-free rule has: lr, weight_decay, r and
    weight_lr_power, each a number >= 0."""
    check_nonnegative(group, "lr", "weight_decay", "r", "weight_lr_power")


def check_foreach(group: dict) -> None:
    """Check ``foreach`` (True, False or None): the packages' choice of implementation, which
    zeroopt accepts for their signature and ignores (it runs its own: the foreach kernels, or
    one pass in C on the CPU, with the same arithmetic)."""
    if group["foreach"] not in (None, True, False):
        raise ValueError(f"foreach must be True, False or None, got {group['foreach']!r}")


def warmup_lr(group: dict) -> float:
    """This step's lr with the package's linear warmup: lr (k+1)/warmup_steps for the first
    warmup_steps steps (k counts the steps before this one), then lr."""
    k, warmup = group["k"], group["warmup_steps"]
    return group["lr"] * ((k + 1) / warmup if k < warmup else 1.0)


def advance(group: dict, lr: float) -> None:
    """The bookkeeping of one step taken at ``lr`` (a rule's ``before_step``): lr_max, the
    average's weight (k+1)^r lr_max^power and its running sum, c = weight / weight_sum (0
    while the sum is 0), and k advanced; in the package's float arithmetic and order."""
    k = group["k"]
    group["scheduled_lr"] = lr
    group["lr_max"] = max(lr, group["lr_max"])
    weight = (k + 1) ** group["r"] * group["lr_max"] ** group["weight_lr_power"]
    group["weight_sum"] += weight
    group["ckp1"] = weight / group["weight_sum"] if group["weight_sum"] else 0.0
    group["k"] = k + 1


def second_moment_(v: list[torch.Tensor], grads: list[torch.Tensor], beta2: float) -> None:
    """v <- b2 v + (1 - b2) g^2, in place."""
    torch._foreach_mul_(v, beta2)
    torch._foreach_addcmul_(v, grads, grads, value=1 - beta2)


def adam_normalise_(grads: list[torch.Tensor], v: list[torch.Tensor], beta2: float, t: int,
                    eps: float) -> None:
    """g <- g / (sqrt(v / (1 - b2^t)) + eps), in place (the package's order of operations)."""
    denom = torch._foreach_div(v, 1 - beta2 ** t)
    torch._foreach_sqrt_(denom)
    torch._foreach_add_(denom, eps)
    torch._foreach_div_(grads, denom)


def step_y_and_z(group: dict, shard: ShardTensors, directions: list[torch.Tensor],
                 beta: float) -> None:
    """The step every schedule-free rule ends with, on a shard (directions are consumed):
    d += wd y; y <- lerp(y, z, c) + lr (beta (1 - c) - 1) d; z <- z - lr d."""
    lr, ckp1 = group["scheduled_lr"], group["ckp1"]
    y, z = shard.params, shard.states["z"]
    if group["weight_decay"] != 0:
        torch._foreach_add_(directions, y, alpha=group["weight_decay"])
    torch._foreach_lerp_(y, z, ckp1)
    torch._foreach_add_(y, directions, alpha=lr * (beta * (1 - ckp1) - 1))
    torch._foreach_sub_(z, directions, alpha=lr)


def reference_y_and_z(group: dict, param: torch.Tensor, direction: torch.Tensor,
                      z: torch.Tensor, beta: float) -> None:
    """``step_y_and_z`` for one whole param (the eager references)."""
    lr, ckp1 = group["scheduled_lr"], group["ckp1"]
    direction = direction.add(param, alpha=group["weight_decay"])
    param.lerp_(z, ckp1).add_(direction, alpha=lr * (beta * (1 - ckp1) - 1))
    z.sub_(direction, alpha=lr)


def native_step(group: dict, shard: ShardTensors, beta: float, normalise: bool) -> bool:
    """The whole step of schedule-free AdamW or RAdam on a shard in one pass, where the C
    kernel takes the tensors (contiguous fp32 on the CPU, a number for lr): what
    ``second_moment_``, ``adam_normalise_`` (if ``normalise``) and ``step_y_and_z`` do, bit
    for bit. The gradients are left as they are.

    Args:
        group: the param group, its bookkeeping advanced for this step (k, scheduled_lr, ckp1).
        shard: params (y), grads and the states ``z`` and ``exp_avg_sq``.
        beta: the interpolation beta (betas[0]).
        normalise: divide the gradient by Adam's denominator (False: RAdam's SGD phase).

    Returns:
        True if the step was taken; False (nothing done) where the torch path must run.
    """
    y, z, v = shard.params, shard.states["z"], shard.states["exp_avg_sq"]
    if (isinstance(group["lr"], torch.Tensor) or not LIB.usable(y, shard.grads, z, v)
            or not sqrt_check.matches_torch(LIB)):
        return False
    beta2 = group["betas"][1]
    lr, ckp1 = group["scheduled_lr"], group["ckp1"]
    LIB.each("zk_schedule_free_step", [y, shard.grads, z, v],
             [beta2, 1 - beta2, 1 - beta2 ** group["k"], group["eps"], group["weight_decay"],
              ckp1, lr * (beta * (1 - ckp1) - 1), -lr, float(normalise)])
    return True


def mode_switches(beta: Callable[[dict], float]):
    """A rule's ``to_eval`` and ``to_train``, for its interpolation ``beta(group)``: eval sets
    the params to x = lerp(y, z, 1 - 1/beta), train back to y = lerp(x, z, 1 - beta)."""
    def to_eval(group: dict, shard: ShardTensors) -> None:
        """Params to the evaluation point x (``UpdateRule.to_eval``)."""
        torch._foreach_lerp_(shard.params, shard.states["z"], 1 - 1 / beta(group))

    def to_train(group: dict, shard: ShardTensors) -> None:
        """Params back to the training point y (``UpdateRule.to_train``)."""
        torch._foreach_lerp_(shard.params, shard.states["z"], 1 - beta(group))

    return to_eval, to_train


def warmup_steps_argument(args, name: str) -> int:
    """TrainingArguments' ``warmup_steps`` for a schedule-free rule named ``name``: the
    package's warmup is a number of steps; TrainingArguments also allows a ratio, refused."""
    steps = args.warmup_steps
    if 0 < steps < 1:
        raise ValueError(f"{name} warms up over a number of steps; warmup_steps="
                         f"{steps} is a ratio. Give a step count (warmup_steps=N), or "
                         f"optim_args='warmup_steps=N'")
    return int(steps)


# Transformers' handler reads these from optim_args, as floats.
TRANSFORMERS_OPTIM_ARGS = {"weight_lr_power": ("weight_lr_power", float), "r": ("r", float)}


def _validate(group: dict) -> None:
    check_schedule(group)
    check_nonnegative(group, "eps", "warmup_steps")
    check_betas(group)


def _before_step(group: dict) -> None:
    advance(group, warmup_lr(group))


def _fused(group: dict, shard: ShardTensors, step: torch.Tensor, stats=None) -> None:
    beta1, beta2 = group["betas"]
    if native_step(group, shard, beta1, normalise=True):
        return
    grads, v = shard.grads, shard.states["exp_avg_sq"]  # the gradients are consumed
    second_moment_(v, grads, beta2)
    adam_normalise_(grads, v, beta2, group["k"], group["eps"])
    step_y_and_z(group, shard, grads, beta1)


def _reference(group: dict, param: torch.Tensor, grad: torch.Tensor, state: dict, t: int) -> None:
    beta1, beta2 = group["betas"]
    v = state["exp_avg_sq"]
    v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    normed = grad / (v.div(1 - beta2 ** group["k"]).sqrt() + group["eps"])
    reference_y_and_z(group, param, normed, state["z"], beta1)


_TO_EVAL, _TO_TRAIN = mode_switches(lambda group: group["betas"][0])
# zeroopt.wrap: the package's class (it starts in eval mode, this rule in train mode)
_SOURCES = sources.Sources(sources.schedulefree("AdamWScheduleFree"))

SCHEDULE_FREE_ADAMW = UpdateRule(
    name="schedule_free_adamw",
    nonnegative_states=("exp_avg_sq",),
    full_precision_states=("z",),
    defaults=dict(lr=0.0025, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, warmup_steps=0,
                  r=0.0, weight_lr_power=2.0, **BOOKKEEPING),
    states=lambda group: ("z", "exp_avg_sq"),
    fused_step=_fused,
    reference_step=_reference,
    validate=_validate,
    initial_values=lambda group: {"z": "param"},
    before_step=_before_step,
    to_eval=_TO_EVAL,
    to_train=_TO_TRAIN,
    transformers_arguments=lambda args: dict(
        adam_arguments(args), warmup_steps=warmup_steps_argument(args, "schedule_free_adamw")),
    transformers_optim_args=TRANSFORMERS_OPTIM_ARGS,
    wraps=_SOURCES,
    from_torch_options=_SOURCES.from_torch_options,
)
