"""AdEMAMix (Pagliardini et al. 2024), as apple/ml-ademamix's PyTorch reference computes it.

A fast EMA m1 (bias-corrected) and a slow EMA m2 (not bias-corrected) of the gradient are
mixed, over Adam's denominator:

    x <- x (1 - lr wd) - lr * (m1 / (1 - b1^t) + alpha_t m2) / (sqrt(nu / (1 - b2^t)) + eps)

alpha_t grows linearly from 0 over ``alpha_warmup`` steps; beta3_t grows from beta1 to beta3
over ``beta3_warmup`` steps, linearly in the half-life (apple's linear_hl_warmup_scheduler).

On the CPU (contiguous fp32) the step is one pass over memory in C (zeroopt/kernels/
_ademamix.c), with the torch path's arithmetic op for op; elsewhere the torch._foreach_* path
runs.
"""

from __future__ import annotations

import math

import torch

from . import sources
from .base import (ShardTensors, UpdateRule, adam_denominator, check_betas, check_nonnegative,
                   update_moments_)
from ..kernels import sqrt_check
from ..kernels.library import Library

LIB = Library("_ademamix.c")


def alpha_at(t: int, alpha: float, warmup: int | None) -> float:
    """The slow EMA's mixing weight at step ``t``: linear from 0 to ``alpha`` over ``warmup``
    steps (apple/ml-ademamix's ``linear_warmup_scheduler``).

    Args:
        t: the step number, from 1.
        alpha: the final weight.
        warmup: the warm-up length in steps, or None for no warm-up.

    Returns:
        ``min(t * alpha / warmup, alpha)``, or ``alpha`` when ``warmup`` is None.
    """
    return alpha if warmup is None else min(t * alpha / warmup, alpha)


def beta3_at(t: int, beta1: float, beta3: float, warmup: int | None) -> float:
    """The slow EMA's decay at step ``t``: from ``beta1`` to ``beta3`` over ``warmup`` steps,
    linear in the half-life (apple/ml-ademamix's ``linear_hl_warmup_scheduler``).

    Args:
        t: the step number, from 1.
        beta1: the fast EMA's decay, where the warm-up starts.
        beta3: the slow EMA's final decay.
        warmup: the warm-up length in steps, or None for no warm-up.

    Returns:
        The decay; ``beta3`` when ``warmup`` is None or ``t >= warmup``.
    """
    if warmup is None or t >= warmup:
        return beta3
    half_life = lambda beta: math.log(0.5) / math.log(beta + 1e-8) - 1  # noqa: E731
    a = t / warmup
    return 0.5 ** (1 / ((1 - a) * half_life(beta1) + a * half_life(beta3) + 1))


def _validate(group: dict) -> None:
    check_nonnegative(group, "lr", "eps", "weight_decay", "alpha")
    check_betas(group, count=3)
    for name in ("alpha_warmup", "beta3_warmup"):
        if group[name] is not None and (not isinstance(group[name], int) or group[name] < 1):
            raise ValueError(f"{name} must be None or a positive number of steps, "
                             f"got {group[name]!r}")


def _schedule(group: dict, t: int) -> tuple[float, float]:
    beta1, _, beta3 = group["betas"]
    return (alpha_at(t, group["alpha"], group["alpha_warmup"]),
            beta3_at(t, beta1, beta3, group["beta3_warmup"]))


def _fused(group: dict, shard: ShardTensors, step: torch.Tensor, stats=None) -> None:
    t = int(step.item())
    beta1, beta2, _ = group["betas"]
    alpha, beta3 = _schedule(group, t)
    params, grads = shard.params, shard.grads
    m1, m2, nu = (shard.states[n] for n in ("exp_avg_fast", "exp_avg_slow", "exp_avg_sq"))
    # (a tensor lr: the torch path, whose arithmetic on it the kernel does not repeat)
    if (not isinstance(group["lr"], torch.Tensor) and LIB.usable(params, grads, m1, m2, nu)
            and sqrt_check.matches_torch(LIB)):
        wd = group["weight_decay"]
        LIB.each("zk_ademamix_step", [params, grads, m1, m2, nu],
                 [beta1, 1 - beta1, beta2, 1 - beta2, beta3, 1 - beta3,
                  math.sqrt(1 - beta2**t), group["eps"], 1 / (1 - beta1**t), alpha,
                  1 - group["lr"] * wd if wd != 0 else 1.0, -group["lr"]])
        return
    if group["weight_decay"] != 0:
        torch._foreach_mul_(params, 1 - group["lr"] * group["weight_decay"])
    update_moments_(m1, nu, grads, beta1, beta2)
    torch._foreach_mul_(m2, beta3)
    torch._foreach_add_(m2, grads, alpha=1 - beta3)
    denom = adam_denominator(nu, beta2, t, group["eps"])
    mix = torch._foreach_mul(m1, 1 / (1 - beta1**t))
    torch._foreach_add_(mix, m2, alpha=alpha)
    torch._foreach_div_(mix, denom)
    torch._foreach_add_(params, mix, alpha=-group["lr"])


def _reference(group: dict, param: torch.Tensor, grad: torch.Tensor, state: dict, t: int) -> None:
    beta1, beta2, _ = group["betas"]
    alpha, beta3 = _schedule(group, t)
    m1, m2, nu = state["exp_avg_fast"], state["exp_avg_slow"], state["exp_avg_sq"]
    m1.mul_(beta1).add_(grad, alpha=1 - beta1)
    m2.mul_(beta3).add_(grad, alpha=1 - beta3)
    nu.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    update = (m1 / (1 - beta1**t) + alpha * m2) / (
        nu.sqrt() / math.sqrt(1 - beta2**t) + group["eps"])
    param.mul_(1 - group["lr"] * group["weight_decay"]).add_(update, alpha=-group["lr"])


def _bitsandbytes_options(optimizer, group: dict) -> None:
    """bitsandbytes' AdEMAMix: t_alpha and t_beta3 are the warm-ups (0 is none, as there)."""
    group["alpha_warmup"] = group.pop("t_alpha", None) or None
    group["beta3_warmup"] = group.pop("t_beta3", None) or None


def _pytorch_optimizer_options(optimizer, group: dict) -> None:
    """pytorch-optimizer's AdEMAMix: one warm-up, t_alpha_beta3, for both."""
    sources.decoupled_decay("ademamix")(optimizer, group)
    warmup = group.pop("t_alpha_beta3", None)
    if warmup is not None and float(warmup) != int(warmup):
        raise sources.cannot(sources.class_path(optimizer), "t_alpha_beta3", warmup,
                             "zeroopt's warm-ups are whole numbers of steps")
    group["alpha_warmup"] = group["beta3_warmup"] = None if warmup is None else int(warmup)


# zeroopt.wrap: bitsandbytes' AdEMAMix and pytorch-optimizer's (weight_decouple on: it
# defaults to L2 decay). Both warm beta3 up without the 1e-8 apple's adds in log(beta): a
# relative difference of ~1e-5 in 1 - beta3_t during the warm-up.
_SOURCES = sources.Sources(
    *sources.bitsandbytes(*(f"{paged}AdEMAMix{bits}" for paged in ("", "Paged")
                            for bits in ("", "8bit", "32bit")), options=_bitsandbytes_options),
    sources.Source("pytorch_optimizer.AdEMAMix", options=_pytorch_optimizer_options,
                   preset=sources.no_maximize),
)

ADEMAMIX = UpdateRule(
    name="ademamix",
    nonnegative_states=("exp_avg_sq",),
    defaults=dict(lr=1e-3, betas=(0.9, 0.999, 0.9999), alpha=2.0, alpha_warmup=None,
                  beta3_warmup=None, eps=1e-8, weight_decay=0.0),
    states=lambda group: ("exp_avg_fast", "exp_avg_slow", "exp_avg_sq"),
    fused_step=_fused,
    reference_step=_reference,
    validate=_validate,
    wraps=_SOURCES,
    from_torch_options=_SOURCES.from_torch_options,
    # bitsandbytes' AdEMAMix as the Trainer sets it up, and its optim_args names
    transformers_arguments=lambda args: dict(betas=(args.adam_beta1, args.adam_beta2, 0.9999),
                                             alpha=5.0, eps=args.adam_epsilon),
    transformers_optim_args={"t_alpha": ("alpha_warmup", int), "t_beta3": ("beta3_warmup", int)},
)
