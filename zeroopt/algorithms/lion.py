"""Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms").

    update = sign(beta1 * m + (1 - beta1) * g)
    x     <- x * (1 - lr * wd) - lr * update
    m     <- beta2 * m + (1 - beta2) * g

The fused and reference steps use the same element-wise arithmetic (mul, then add), so they agree
bit for bit: a sign taken of a momentum that rounds differently could flip a whole lr step.

``cautious=True`` keeps the update only where it agrees in sign with the gradient, rescaled by
numel / (kept + 1) per whole param (see variants.py). ``adopt`` and ``grams`` are Adam options:
Lion's update is a sign already.

On the CPU (contiguous fp32) each step is one pass over memory in C (zeroopt/kernels/_lion.c),
with the torch path's arithmetic op for op; elsewhere the torch._foreach_* path runs.
"""

from __future__ import annotations

import torch

from . import sources, variants
from .base import ShardTensors, UpdateRule, check_betas, check_nonnegative
from ..kernels.library import Library

LIB = Library("_lion.c")


def _validate(group: dict) -> None:
    check_nonnegative(group, "lr", "weight_decay")
    check_betas(group)
    if not isinstance(group["cautious"], bool):
        raise ValueError(f"cautious must be True or False, got {group['cautious']!r}")
    for name in ("adopt", "grams"):
        if group.get(name):
            raise ValueError(f"{name}=True is an Adam option; Lion's update is a sign already. "
                             "Use optimizer='adamw' with it, or cautious=True with Lion")


def _hyper(group: dict) -> list[float]:
    """The kernels' h: beta1, 1 - beta1, beta2, 1 - beta2, 1 - lr wd, -lr, maximize."""
    lr, wd = float(group["lr"]), group["weight_decay"]
    beta1, beta2 = group["betas"]
    return [beta1, 1 - beta1, beta2, 1 - beta2, 1 - lr * wd if wd != 0 else 1.0, -lr,
            float(group["maximize"])]


def _signed_update(group: dict, shard: ShardTensors) -> list[torch.Tensor]:
    """sign(beta1 m + (1 - beta1) g), then m moves on (it does not depend on the params)."""
    beta1, beta2 = group["betas"]
    grads, exp_avgs = shard.grads, shard.states["exp_avg"]
    if group["maximize"]:
        torch._foreach_neg_(grads)  # consumed by step()
    update = torch._foreach_mul(exp_avgs, beta1)
    torch._foreach_add_(update, grads, alpha=1 - beta1)
    torch._foreach_sign_(update)
    torch._foreach_mul_(exp_avgs, beta2)
    torch._foreach_add_(exp_avgs, grads, alpha=1 - beta2)
    return update


def _statistics(group: dict, shard: ShardTensors, step: torch.Tensor) -> torch.Tensor:
    """Phase 1 of cautious: the masked update, stashed over the gradients."""
    if not shard.params:
        return torch.zeros(1, shard.num_params, dtype=torch.float64)
    if LIB.usable(shard.grads, shard.states["exp_avg"]):
        # The kernel keeps only the agreeing elements itself, so those are exactly the
        # nonzero ones: keep_agreeing of the stash against itself counts them (u u > 0).
        LIB.each("zk_lion_cautious", [shard.grads, shard.states["exp_avg"]], _hyper(group))
        return variants.keep_agreeing(shard.grads, shard.grads, shard)
    update = _signed_update(group, shard)
    kept = variants.keep_agreeing(update, shard.grads, shard)
    torch._foreach_copy_(shard.grads, update)
    return kept


def _fused(group: dict, shard: ShardTensors, step_count: torch.Tensor, stats=None) -> None:
    lr, wd = float(group["lr"]), group["weight_decay"]
    native = LIB.usable(shard.params, shard.grads, shard.states["exp_avg"])
    if native and stats is None:
        LIB.each("zk_lion_step", [shard.params, shard.grads, shard.states["exp_avg"]],
                 _hyper(group))
        return
    if native and variants.scaled_step(shard, variants.cautious_scale(stats, shard), lr,
                                       _hyper(group)[4]):
        return
    if stats is None:
        update = _signed_update(group, shard)
    else:
        update = shard.grads
        torch._foreach_mul_(update, variants.cautious_scale(stats, shard))
    if wd != 0:
        torch._foreach_mul_(shard.params, 1 - lr * wd)
    torch._foreach_add_(shard.params, update, alpha=-lr)


def _reference(group: dict, param: torch.Tensor, grad: torch.Tensor, state: dict, t: int) -> None:
    lr, wd = group["lr"], group["weight_decay"]
    beta1, beta2 = group["betas"]
    m = state["exp_avg"]
    if group["maximize"]:
        grad = -grad
    param.mul_(1 - lr * wd)
    update = (m * beta1).add_(grad, alpha=1 - beta1).sign_()
    if group["cautious"]:
        update = variants.reference_cautious(update, grad)
    param.add_(update, alpha=-lr)
    m.mul_(beta2).add_(grad, alpha=1 - beta2)


_LION_PYTORCH = "lion_pytorch.Lion"  # lucidrains' lion-pytorch, an optional package


def _lion_pytorch_preset(optimizer) -> dict:
    """zeroopt.wrap(lion_pytorch.Lion(...)): with decoupled_weight_decay=True it decays by
    lr * wd / initial_lr, a different rule."""
    if getattr(optimizer, "decoupled_wd", False):
        raise ValueError("zeroopt.wrap cannot map lion_pytorch.Lion(decoupled_weight_decay="
                         "True); use decoupled_weight_decay=False and scale weight_decay")
    return {}


# zeroopt.wrap: lion_pytorch's Lion (its use_triton only picks a kernel), pytorch-optimizer's
# (weight_decouple on and fixed_decay off, as Lion decays; cautious as here) and bitsandbytes'
# (its eps is unused).
_SOURCES = sources.Sources(
    sources.Source(_LION_PYTORCH, options=lambda optimizer, group: sources.drop(
        group, "use_triton"), preset=_lion_pytorch_preset),
    sources.Source("pytorch_optimizer.Lion", options=sources.decoupled_decay("lion"),
                   preset=sources.maximize_attribute),
    *sources.bitsandbytes(*(f"{paged}Lion{bits}" for paged in ("", "Paged")
                            for bits in ("", "8bit", "32bit")),
                          options=lambda optimizer, group: sources.drop(group, "eps")),
)


LION = UpdateRule(
    name="lion",
    statistics_use_states=True,  # cautious
    defaults=dict(lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, maximize=False, cautious=False),
    states=lambda group: ("exp_avg",),
    fused_step=_fused,
    reference_step=_reference,
    validate=_validate,
    per_tensor=lambda group: group["cautious"],
    statistics=_statistics,
    torch_class=_LION_PYTORCH,
    zeroopt_only=dict(maximize=False, cautious=False),
    wraps=_SOURCES,
    from_torch_options=_SOURCES.from_torch_options,
    transformers_arguments=lambda args: dict(betas=(args.adam_beta1, args.adam_beta2)),
)
