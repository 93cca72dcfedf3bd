"""Adam and AdamW (torch.optim semantics), fused with torch's own multi-tensor kernel.

torch has that kernel only on cpu, cuda and mps. On any other device (XLA, ...) the same update
runs as torch._foreach_* ops, the way torch.optim.Adam(W)'s multi-tensor path does it: torch's
CPU fallback for the fused kernel would update copies, and lose the update of params that are
views of a flat buffer (zeroopt's shards are).

The options ``cautious``, ``adopt`` and ``grams`` (variants.py) change the update; with any of
them the step runs variants.py's multi-tensor path instead of the fused kernel. The options for
fine-tuning (``spd``, ``orthograd``, ``agr``, ``tam``, ``alora``, ``dynamic_weight_decay``) are
adamw_options.py's.
"""

from __future__ import annotations

import math

import torch

from . import adamw_options, sources, variants
from .base import (ShardTensors, UpdateRule, adam_arguments, check_betas, check_fixed,
                   check_nonnegative)

_FIXED = {"amsgrad": False}


def _validate(group: dict) -> None:
    check_nonnegative(group, "lr", "eps", "weight_decay")
    check_betas(group)
    check_fixed(group, _FIXED, "adam/adamw")
    for name in variants.OPTIONS:
        if not isinstance(group[name], bool):
            raise ValueError(f"{name} must be True or False, got {group[name]!r}")
    adamw_options.validate(group)


_FUSED_DEVICES = ("cpu", "cuda", "mps")  # where torch has _fused_adam(w)_


def _foreach_step(group: dict, shard: ShardTensors, step_count: torch.Tensor,
                  decoupled: bool) -> None:
    """torch.optim.Adam(W)'s update (amsgrad off) with torch._foreach_* ops, for devices
    without the fused kernel. ``step_count`` is already advanced (and on the CPU)."""
    t = int(step_count.item())
    lr, eps, wd = float(group["lr"]), group["eps"], group["weight_decay"]
    beta1, beta2 = group["betas"]
    params, grads = shard.params, shard.grads
    if group["maximize"]:
        grads = torch._foreach_neg(grads)
    if wd != 0:
        if decoupled:
            torch._foreach_mul_(params, 1 - lr * wd)
        else:
            grads = torch._foreach_add(grads, params, alpha=wd)
    m, v = shard.states["exp_avg"], shard.states["exp_avg_sq"]
    torch._foreach_lerp_(m, grads, 1 - beta1)
    torch._foreach_mul_(v, beta2)
    torch._foreach_addcmul_(v, grads, grads, 1 - beta2)
    denom = torch._foreach_sqrt(v)
    torch._foreach_div_(denom, (1 - beta2**t) ** 0.5)  # as torch.optim
    torch._foreach_add_(denom, eps)
    torch._foreach_addcdiv_(params, m, denom, -lr / (1 - beta1**t))


def _fused(decoupled: bool):
    kernel = torch._fused_adamw_ if decoupled else torch._fused_adam_

    def step(group: dict, shard: ShardTensors, step_count: torch.Tensor, stats=None) -> None:
        """``UpdateRule.fused_step``: torch's fused kernel, or the options' and variants'
        steps (``stats``: their all-reduced statistics, else None)."""
        if adamw_options.any_option(group):
            if stats is not None:
                return adamw_options.fused_step(group, shard, step_count, stats, decoupled)
            group = adamw_options.with_effective_decay(group, step_count)
        if variants.any_option(group):
            return _variant_step(group, shard, step_count, stats, decoupled)
        if shard.params and shard.params[0].device.type not in _FUSED_DEVICES:
            return _foreach_step(group, shard, step_count, decoupled)
        beta1, beta2 = group["betas"]
        # The kernel reads (does not advance) one step tensor per tensor; they all share ours.
        kernel(shard.params, shard.grads, shard.states["exp_avg"], shard.states["exp_avg_sq"],
               [], [step_count] * len(shard.params), lr=float(group["lr"]), beta1=beta1,
               beta2=beta2, weight_decay=group["weight_decay"], eps=group["eps"],
               amsgrad=False, maximize=group["maximize"])

    return step


def _cautious_statistics(decoupled: bool):
    """Phase 1 of cautious: the update direction, masked, stashed over the gradients."""
    def statistics(group: dict, shard: ShardTensors, step: torch.Tensor) -> torch.Tensor:
        """``UpdateRule.statistics``: this rank's partial sums, ``[k, num_params]`` float64."""
        if adamw_options.any_option(group):
            return adamw_options.statistics(group, shard, step, decoupled)
        kept = variants.native_cautious(group, shard, int(step.item()), decoupled)
        if kept is not None:  # one pass: the kernels did all of the below
            return kept
        direction = (variants.adam_direction(group, shard, int(step.item()), decoupled)
                     if shard.params else None)
        if direction is None:  # nothing here, or ADOPT's first step
            return torch.zeros(1, shard.num_params, dtype=torch.float64)
        kept = variants.keep_agreeing(direction, shard.grads, shard)
        torch._foreach_copy_(shard.grads, direction)
        return kept

    return statistics


def _variant_step(group: dict, shard: ShardTensors, step: torch.Tensor, stats,
                  decoupled: bool) -> None:
    t = int(step.item())
    if group["adopt"] and t == 1:
        if not group["cautious"]:
            variants.adam_direction(group, shard, t, decoupled)  # initialises v
        return
    if group["cautious"]:  # phase 1 left the masked direction in the gradients
        return variants.apply_cautious(group, shard, stats, decoupled)
    if variants.native_step(group, shard, t, decoupled):  # one pass per tensor
        return
    direction = variants.adam_direction(group, shard, t, decoupled)
    torch._foreach_add_(shard.params, direction, alpha=-group["lr"])


def _reference(decoupled: bool):
    def step(group: dict, param: torch.Tensor, grad: torch.Tensor, state: dict, t: int) -> None:
        """``UpdateRule.reference_step``: torch.optim.Adam(W)'s update of one whole param."""
        if adamw_options.any_option(group):
            if adamw_options.own_step(group):
                return variants.reference_with_options(group, param, grad, state, t, decoupled)
            group = dict(group, weight_decay=adamw_options.effective_weight_decay(group, t))
        if variants.any_option(group):
            direction, grad = variants.reference_direction(group, param, grad, state, t,
                                                           decoupled)
            if direction is not None:
                if group["cautious"]:
                    direction = variants.reference_cautious(direction, grad)
                param.add_(direction, alpha=-group["lr"])
            return
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


def _decoupled(optimizer) -> bool:
    """torch 2.x Adam(decoupled_weight_decay=True) is AdamW."""
    return bool(optimizer.defaults.get("decoupled_weight_decay"))


def _grams_options(optimizer, group: dict) -> None:
    """pytorch_optimizer.Grams is adamw with grams=True (and decoupled weight decay)."""
    sources.decoupled_decay("adamw", fixed_decay=False)(optimizer, group)
    group["grams"] = True


# zeroopt.wrap: the classes adamw and adam are built from (sources.py). bitsandbytes' Adam
# decays the weights as AdamW does, so it is adamw too.
_ADAMW_SOURCES = sources.Sources(
    sources.Source(torch.optim.AdamW),
    sources.Source(torch.optim.Adam, when=_decoupled),
    *sources.bitsandbytes(*(f"{paged}{name}{bits}" for name in ("AdamW", "Adam")
                            for paged in ("", "Paged") for bits in ("", "8bit", "32bit"))),
    sources.Source("pytorch_optimizer.Grams", options=_grams_options,
                   preset=sources.maximize_attribute),
    sources.Source("pytorch_optimizer.ADOPT", refuse=(
        "pytorch-optimizer's ADOPT clips the normalised gradient at step^0.25 counting the "
        "step after its increment (the authors' ADOPT, which zeroopt's adopt=True follows, "
        "counts it before) and decays the weights on the first step, which only initialises "
        "v. Build ZeroOptimizer(params, 'adamw', adopt=True) for the authors' ADOPT")),
    sources.Source("torchao.optim.AdamW4bit", options=sources.torchao_4bit_options,
                   preset=sources.torchao_4bit_preset),
    sources.Source("torchao.optim.AdamW8bit", refuse=sources.TORCHAO_8BIT_REFUSED),
)
_ADAM_SOURCES = sources.Sources(
    sources.Source(torch.optim.Adam, when=lambda optimizer: not _decoupled(optimizer)))


_ZEROOPT_ONLY = {name: False for name in (*variants.OPTIONS, *adamw_options.OPTIONS)}


def _option_fields(decoupled: bool) -> dict:
    """The UpdateRule fields of the options' states, statistics and whole-param steps."""
    return dict(states=adamw_options.states, per_tensor=adamw_options.per_tensor,
                initial_values=adamw_options.initial_values,
                full_precision_states=("initial_param",), whole_tensors=adamw_options.whole,
                tensor_step=_reference(decoupled), tensor_states_8bit=("exp_avg", "exp_avg_sq"),
                group_keys=("layerwise",), placement_cost=adamw_options.placement_cost)


ADAMW = UpdateRule(
    name="adamw",
    nonnegative_states=("exp_avg_sq",),
    statistics_use_states=True,  # cautious
    defaults=dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, maximize=False,
                  amsgrad=False, cautious=False, adopt=False, grams=False,
                  **adamw_options.DEFAULTS),
    fused_step=_fused(decoupled=True),
    reference_step=_reference(decoupled=True),
    validate=_validate,
    statistics=_cautious_statistics(decoupled=True),
    **_option_fields(decoupled=True),
    fixed=_FIXED,
    torch_class=torch.optim.AdamW,
    zeroopt_only=_ZEROOPT_ONLY,
    wraps=_ADAMW_SOURCES,
    from_torch_options=_ADAMW_SOURCES.from_torch_options,
    transformers_arguments=adam_arguments,
)

ADAM = UpdateRule(
    name="adam",
    nonnegative_states=("exp_avg_sq",),
    statistics_use_states=True,  # cautious
    defaults=dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, maximize=False,
                  amsgrad=False, cautious=False, adopt=False, grams=False,
                  **adamw_options.DEFAULTS),
    fused_step=_fused(decoupled=False),
    reference_step=_reference(decoupled=False),
    validate=_validate,
    statistics=_cautious_statistics(decoupled=False),
    **_option_fields(decoupled=False),
    fixed=_FIXED,
    torch_class=torch.optim.Adam,
    zeroopt_only=_ZEROOPT_ONLY,
    wraps=_ADAM_SOURCES,
    transformers_arguments=adam_arguments,
)
