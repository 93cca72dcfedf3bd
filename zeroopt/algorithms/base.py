"""What an update rule is: defaults, checks, state names, a fused step and an eager reference.

The fused step updates a whole shard at once: it receives, for one param group, lists of
same-length flat fp32 tensors (master params, averaged gradients, and each state) that together
cover every element of that group this rank owns, and updates them in place. Element-wise
rules may treat the lists as one long vector.

The reference step is the plain, per-tensor definition of the rule, written for reading. The
tests hold the fused step, sharded at several world sizes, to it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch


@dataclass
class ShardTensors:
    """One param group's part of this rank's shard, as parallel lists of flat fp32 tensors."""

    params: list[torch.Tensor]
    grads: list[torch.Tensor]
    states: dict[str, list[torch.Tensor]] = field(default_factory=dict)


FusedStep = Callable[[dict, ShardTensors, torch.Tensor], None]
ReferenceStep = Callable[[dict, torch.Tensor, torch.Tensor, dict, int], None]


@dataclass(frozen=True)
class UpdateRule:
    name: str
    defaults: dict
    state_names: tuple[str, ...]
    fused_step: FusedStep  # (group, shard tensors, step counter tensor already incremented)
    reference_step: ReferenceStep  # (group, param, grad, state dict, step number)
    validate: Callable[[dict], None]
    # Values a hyperparameter accepts only for compatibility with torch.optim's signature.
    fixed: dict = field(default_factory=dict)


def _number(value, name: str) -> float:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if not isinstance(value, (int, float)) or isinstance(value, bool) or math.isnan(value):
        raise ValueError(f"{name} must be a number, got {value!r}")
    return float(value)


def check_nonnegative(group: dict, *names: str) -> None:
    for name in names:
        if _number(group[name], name) < 0:
            raise ValueError(f"Invalid {name}: {group[name]} (it must be >= 0)")


def check_betas(group: dict, count: int = 2) -> None:
    betas = group["betas"]
    if not isinstance(betas, (tuple, list)) or len(betas) != count:
        raise ValueError(f"betas must be a tuple of {count} numbers, got {betas!r}")
    for i, beta in enumerate(betas):
        if not 0.0 <= _number(beta, f"betas[{i}]") < 1.0:
            raise ValueError(f"Invalid beta at index {i}: {beta} (each beta must be in [0, 1))")


def check_fixed(group: dict, fixed: dict, rule: str) -> None:
    for name, allowed in fixed.items():
        if group.get(name, allowed) != allowed:
            raise ValueError(f"{rule}: {name}={group[name]!r} is not supported by zeroopt; "
                             f"use {name}={allowed!r}")


def resolve_defaults(rule: UpdateRule, hyperparameters: dict) -> dict:
    """The rule's defaults overridden by ``hyperparameters``; an unknown name is an error that
    suggests the closest known one."""
    import difflib

    for name in hyperparameters:
        if name not in rule.defaults:
            close = difflib.get_close_matches(name, rule.defaults, n=1, cutoff=0.5)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise TypeError(f"{rule.name} got an unexpected hyperparameter {name!r}.{hint} "
                            f"It takes: {', '.join(rule.defaults)}")
    return {**rule.defaults, **hyperparameters}
