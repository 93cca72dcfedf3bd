"""Adagrad (torch.optim.Adagrad semantics), fused with torch's own multi-tensor kernel."""

from __future__ import annotations

import torch

from . import sources
from .base import ShardTensors, UpdateRule, check_nonnegative


def _validate(group: dict) -> None:
    check_nonnegative(group, "lr", "lr_decay", "weight_decay", "initial_accumulator_value", "eps")


def _fused(group: dict, shard: ShardTensors, step: torch.Tensor, stats=None) -> None:
    torch._fused_adagrad_(shard.params, shard.grads, shard.states["sum"],
                          [step] * len(shard.params), lr=float(group["lr"]),
                          lr_decay=group["lr_decay"], weight_decay=group["weight_decay"],
                          eps=group["eps"], maximize=group["maximize"])


def _reference(group: dict, param: torch.Tensor, grad: torch.Tensor, state: dict, t: int) -> None:
    if group["maximize"]:
        grad = -grad
    if group["weight_decay"] != 0:
        grad = grad.add(param, alpha=group["weight_decay"])
    lr = group["lr"] / (1 + (t - 1) * group["lr_decay"])
    state["sum"].addcmul_(grad, grad, value=1)
    param.addcdiv_(grad, state["sum"].sqrt().add_(group["eps"]), value=-lr)


# zeroopt.wrap: torch.optim.Adagrad, and bitsandbytes' Adagrad (betas unused; it refuses lr_decay
# and initial_accumulator_value other than 0 itself).
_SOURCES = sources.Sources(
    sources.Source(torch.optim.Adagrad),
    *sources.bitsandbytes("Adagrad", "Adagrad8bit", "Adagrad32bit",
                          options=lambda optimizer, group: sources.drop(group, "betas")),
)

ADAGRAD = UpdateRule(
    name="adagrad",
    nonnegative_states=("sum",),
    defaults=dict(lr=1e-2, lr_decay=0.0, weight_decay=0.0, initial_accumulator_value=0.0,
                  eps=1e-10, maximize=False),
    states=lambda group: ("sum",),
    fused_step=_fused,
    reference_step=_reference,
    validate=_validate,
    initial_values=lambda group: {"sum": group["initial_accumulator_value"]},
    torch_class=torch.optim.Adagrad,
    wraps=_SOURCES,
    from_torch_options=_SOURCES.from_torch_options,
)
