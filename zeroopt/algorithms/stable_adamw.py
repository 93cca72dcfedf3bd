"""StableAdamW (Wortsman et al. 2023, "Stable and low-precision training for large-scale
vision-language models", Algorithm 2), as torch-optimi's ``optimi.StableAdamW`` computes it:
AdamW with Adafactor's update clipping, one learning rate per tensor.

    b1_t = (b1^t - b1) / (b1^t - 1)      b2_t = (b2^t - b2) / (b2^t - 1)   (debiased betas;
                                                           t: the group's step count)
    m <- b1_t m + (1 - b1_t) g           v <- b2_t v + (1 - b2_t) g^2
    rms = sqrt(mean over the whole tensor of g^2 / max(v, eps^2))
    lr_t = lr / max(1, rms)
    x <- x (1 - lr_t wd)                 (decouple_lr: x (1 - lr_t / max_lr wd))
    x <- x - lr_t m / (sqrt(v) + eps)

The debiased betas fold Adam's bias correction into the averages (m and v are the corrected
ones), as the paper's Algorithm 2 and optimi do. ``rms`` is a statistic of the whole param,
which straddles ranks: each rank sums g^2 / max(v, eps^2) over its pieces of each param
(``statistics``, in fp64), the optimizer all-reduces the sums in its one small collective, and
each param's mean divides by its full numel. optimi takes that mean in fp32, so the two differ
by its rounding (~1e-7 relative in ``lr_t``, and only where rms > 1). Phase 1 moves the moments
and writes the direction m / (sqrt(v) + eps) over the gradient shard (which step() consumes);
phase 2 applies the per-param ``lr_t``.

Hyperparameters (optimi's names and defaults; Transformers' ``stable_adamw`` passes ``lr``,
``betas`` and ``eps`` from adam_beta1/2 and adam_epsilon, ``weight_decay``, and
``decouple_lr``, ``max_lr``, ``kahan_sum`` from ``optim_args``):

- ``lr``: the learning rate. optimi requires it (no default); zeroopt's default is 1e-3.
- ``betas``: (b1, b2), default (0.9, 0.99).
- ``eps``: added to sqrt(v), and its square floors v in the rms, default 1e-6. It must be
  > 0 here (optimi takes 0): with eps = 0 an element whose gradient and v are both 0 divides
  0 by 0, and optimi writes NaN into the param.
- ``weight_decay``: decoupled weight decay, scaled by ``lr_t`` (default 1e-2).
- ``decouple_lr``: fully decoupled weight decay, scaled by ``lr_t / max_lr`` instead of
  ``lr_t``: the decay then does not shrink with the learning rate (default False).
- ``max_lr``: the largest scheduled learning rate, for ``decouple_lr``; None takes the
  group's ``lr`` at construction (optimi takes the constructor's ``lr`` for every group: the
  same unless a group sets its own ``lr``; pass ``max_lr`` to be explicit).
- ``step``: bookkeeping, not to be set: the group's step count t, kept in the param group (so
  saved and resumed with it). optimi counts steps per group, as pytorch_optimizer does, not per
  param as torch.optim: a param first stepped in its group's 5th step is debiased as at t = 5.
  zeroopt follows. (A step() that finds no gradient on any rank changes nothing here, the
  count included; optimi's step() still counts it.)
- ``kahan_sum``: accepted (None, True or False) and ignored. optimi's Kahan summation keeps,
  for 16-bit params, a 16-bit compensation buffer that carries the low bits an update loses to
  the param's rounding. zeroopt steps an fp32 master of every 16-bit param and rounds it into
  the param after the step, so nothing is lost to begin with: the master carries more of those
  bits than param + compensation do, and for fp32 params Kahan summation is off in optimi too.
  Refusing it would break Trainer configurations that set it (optimi turns it on by default
  for 16-bit params). The result on 16-bit params is therefore not optimi's bit for bit (it
  is at least as accurate); on fp32 params it is the same update.

Where the references differ:

- Transformers' handler reads ``decouple_lr`` and ``kahan_sum`` from ``optim_args`` with
  ``bool(string)``, so "decouple_lr=False" turns it on there; zeroopt's ``optim_args``
  parser reads true/false as what they say.
- pytorch_optimizer.StableAdamW is the same rule (debiased betas, the same per-tensor rms,
  weight decay scaled by ``lr_t``) with other defaults (eps=1e-8, lr=1e-3, kahan_sum=True),
  without ``decouple_lr``/``max_lr``, with ``weight_decouple=False`` (L2 decay added to the
  gradient, which zeroopt does not offer) and ``maximize``.
- optimi's ``foreach``, ``triton`` and ``gradient_release`` choose an implementation, not the
  update; zeroopt takes none of them.
"""

from __future__ import annotations

import torch

from ..kernels import sqrt_check
from ..kernels.library import Library
from . import sources
from .base import (ShardTensors, UpdateRule, adam_arguments, check_betas, check_nonnegative,
                   check_number)

# On CPU fp32 shards each phase is one pass of a C kernel with the torch path's arithmetic
# (zeroopt/kernels/_stable_adamw.c); the torch path below runs everywhere else.
_LIB = Library("_stable_adamw.c")


def debias_beta(beta: float, t: int) -> float:
    """optimi's debiased beta: beta (1 - beta^(t-1)) / (1 - beta^t), written as it does."""
    return (beta**t - beta) / (beta**t - 1)


def _validate(group: dict) -> None:
    check_nonnegative(group, "lr", "eps", "weight_decay")
    check_betas(group)
    if group["eps"] == 0:
        raise ValueError("stable_adamw needs eps > 0: with eps = 0 an element whose gradient "
                         "and second moment are both 0 divides 0 by 0 (NaN)")
    if not isinstance(group["decouple_lr"], bool):
        raise ValueError(f"decouple_lr must be True or False, got {group['decouple_lr']!r}")
    if group["kahan_sum"] is not None and not isinstance(group["kahan_sum"], bool):
        raise ValueError(f"kahan_sum must be None, True or False, got {group['kahan_sum']!r}")
    if not isinstance(group["step"], int) or isinstance(group["step"], bool) or group["step"] < 0:
        raise ValueError(f"step counts the group's steps (an int >= 0), got {group['step']!r}")
    if group["max_lr"] is None and group["decouple_lr"]:
        group["max_lr"] = group["lr"]  # fixed now: a schedule moves lr, not max_lr
    if group["max_lr"] is not None:
        max_lr = check_number(group["max_lr"], "max_lr")
        if max_lr < 0 or (max_lr == 0 and group["decouple_lr"]):
            raise ValueError(f"Invalid max_lr: {group['max_lr']} (it must be >= 0, and > 0 "
                             f"with decouple_lr, which divides by it)")


def _max_lr(group: dict) -> float:
    if not group["max_lr"]:  # decouple_lr turned on after construction, without a max_lr
        raise ValueError("stable_adamw: decouple_lr needs max_lr > 0 (the largest scheduled "
                         "lr); set it with decouple_lr")
    return group["max_lr"]


def _count_step(group: dict) -> None:
    group["step"] += 1


def _statistics(group: dict, shard: ShardTensors, step: torch.Tensor) -> torch.Tensor:
    """Phase 1: the moments; per param, this rank's sum of g^2 / max(v, eps^2); the direction
    m / (sqrt(v) + eps) written over the gradients."""
    if not shard.params:
        return shard.per_param([])[None]
    t = group["step"]  # the group's count, as optimi's (not the param's own)
    beta1, beta2 = group["betas"]
    b1, b2 = debias_beta(beta1, t), debias_beta(beta2, t)
    m, v, grads = shard.states["exp_avg"], shard.states["exp_avg_sq"], shard.grads
    if _LIB.usable(grads, m, v) and sqrt_check.matches_torch(_LIB):  # the below in one pass
        sums = _LIB.each("zk_stable_adamw_statistics", [grads, m, v],
                         [1 - b1, b2, 1 - b2, group["eps"] ** 2, group["eps"]], outputs=1)
        return shard.per_param(torch.tensor([s[0] for s in sums], dtype=torch.float64))[None]
    torch._foreach_lerp_(m, grads, 1 - b1)
    torch._foreach_mul_(v, b2)
    torch._foreach_addcmul_(v, grads, grads, value=1 - b2)
    floor = torch._foreach_clamp_min(v, group["eps"] ** 2)  # max(v, eps^2), as optimi's fp32
    torch._foreach_mul_(grads, grads)
    torch._foreach_div_(grads, floor)
    sums = torch._foreach_norm(grads, 1, dtype=torch.float64)  # nonnegative: the sum
    denom = floor  # reused: sqrt(v) + eps
    torch._foreach_copy_(denom, v)
    torch._foreach_sqrt_(denom)
    torch._foreach_add_(denom, group["eps"])
    torch._foreach_copy_(grads, m)
    torch._foreach_div_(grads, denom)
    return shard.per_param(list(sums))[None]


def _fused(group: dict, shard: ShardTensors, step: torch.Tensor, stats) -> None:
    """Phase 2: each param's lr_t from its rms, decay, and the step along the direction."""
    rms = (stats[0] / shard.param_numel.to(stats.device)).sqrt()
    lr = group["lr"] / rms.clamp_min(1.0)  # fp64, as optimi's lr / max(1, rms.item())
    wd = group["weight_decay"]
    decay = None
    if wd != 0:
        scale = lr / _max_lr(group) if group["decouple_lr"] else lr
        decay = shard.per_piece(1 - scale * wd)
    if _LIB.usable(shard.params, shard.grads):  # decay and step in one pass
        for k, (p, d, neg_lr) in enumerate(zip(shard.params, shard.grads,
                                               shard.per_piece(-lr))):
            _LIB.run("zk_stable_adamw_step", [p, d],
                     [1.0 if decay is None else decay[k], decay is not None, neg_lr])
        return
    if decay is not None:
        torch._foreach_mul_(shard.params, decay)
    torch._foreach_mul_(shard.grads, shard.per_piece(-lr))
    torch._foreach_add_(shard.params, shard.grads)


def _reference(group: dict, param: torch.Tensor, grad: torch.Tensor, state: dict, t: int) -> None:
    t = group["step"]  # the group's steps, not this param's
    beta1, beta2 = group["betas"]
    b1, b2 = debias_beta(beta1, t), debias_beta(beta2, t)
    m, v, eps = state["exp_avg"], state["exp_avg_sq"], group["eps"]
    m.lerp_(grad, 1 - b1)
    v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
    rms = (grad.square() / v.clamp_min(eps**2)).double().mean().sqrt().item()
    lr = group["lr"] / max(1.0, rms)
    if group["weight_decay"] != 0:
        scale = lr / _max_lr(group) if group["decouple_lr"] else lr
        param.mul_(1 - scale * group["weight_decay"])
    param.addcdiv_(m, v.sqrt().add_(eps), value=-lr)


# zeroopt.wrap: optimi's (betas kept as beta1/beta2; gradient_release refused) and
# pytorch_optimizer's (decoupled decay only; no maximize here).
_SOURCES = sources.Sources(
    sources.Source("optimi.StableAdamW", options=sources.optimi_options,
                   preset=sources.optimi_preset),
    sources.Source("pytorch_optimizer.StableAdamW",
                   options=sources.decoupled_decay("stable_adamw", fixed_decay=False),
                   preset=sources.no_maximize),
)

STABLE_ADAMW = UpdateRule(
    name="stable_adamw",
    defaults=dict(lr=1e-3, betas=(0.9, 0.99), weight_decay=1e-2, eps=1e-6, decouple_lr=False,
                  max_lr=None, kahan_sum=None, step=0),
    states=lambda group: ("exp_avg", "exp_avg_sq"),
    fused_step=_fused,
    reference_step=_reference,
    validate=_validate,
    before_step=_count_step,
    per_tensor=lambda group: True,  # every step needs each param's rms
    statistics=_statistics,
    statistics_use_states=True,  # phase 1 moves the moments
    nonnegative_states=("exp_avg_sq",),
    torch_class="optimi.StableAdamW",
    torch_defaults=dict(lr=1e-3),  # optimi has no default lr
    wraps=_SOURCES,
    from_torch_options=_SOURCES.from_torch_options,
    transformers_arguments=adam_arguments,
)
