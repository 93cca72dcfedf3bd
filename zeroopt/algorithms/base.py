"""What an update rule is: defaults, checks, state names, a fused step and an eager reference.

The fused step updates a whole shard at once: it receives, for one param group, lists of
same-length flat fp32 tensors (master params, averaged gradients, and each state) that together
cover every element of that group this rank owns, and updates them in place. Element-wise
rules may treat the lists as one long vector. step() consumes the gradients, so a rule may
overwrite them (with its weight-decayed gradient, or its update direction).

Tensor-wise rules (LAMB and LARS trust ratios, cautious masking) need statistics of whole
params, which straddle ranks. For them each list entry is one param's piece
(``ShardTensors.param_index`` says which), and the step runs in two phases:
``statistics(group, shard, step)`` returns this rank's partial sums per param, shaped
``[k, num_params]``; the optimizer all-reduces every group's partials in one collective and
passes the totals to ``fused_step``.

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
    """One param group's part of this rank's shard, as parallel lists of flat fp32 tensors.

    For tensor-wise rules each entry is the piece of one param: ``param_index[i]`` is its
    param's position among the group's trainable params (``num_params`` of them, on all ranks
    together), whose full sizes are ``param_numel`` and names ``param_names`` (None where the
    params were not given with names)."""

    params: list[torch.Tensor]
    grads: list[torch.Tensor]
    states: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    param_index: torch.Tensor | None = None
    num_params: int = 0
    param_numel: torch.Tensor | None = None
    param_names: list[str | None] = field(default_factory=list)

    def per_param(self, values: list[torch.Tensor] | torch.Tensor) -> torch.Tensor:
        """Sum one value per piece into one value per param (this rank's part)."""
        if isinstance(values, list):
            values = torch.stack(values) if values else torch.zeros(0)
        out = torch.zeros(self.num_params, dtype=torch.float64, device=values.device)
        return out.index_add_(0, self.param_index.to(values.device), values.double())

    def per_piece(self, per_param: torch.Tensor) -> list[float]:
        """One value per param, spread back to this rank's pieces (one host sync per step)."""
        return per_param[self.param_index].tolist()


FusedStep = Callable[[dict, ShardTensors, torch.Tensor, "torch.Tensor | None"], None]
ReferenceStep = Callable[[dict, torch.Tensor, torch.Tensor, dict, int], None]
Statistics = Callable[[dict, ShardTensors, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class UpdateRule:
    """An optimizer algorithm, as zeroopt runs it: the extension point for new rules.

    A rule is one file in ``zeroopt/algorithms/`` that builds an ``UpdateRule`` and one
    ``register`` line in ``zeroopt/algorithms/__init__.py``. ``group`` below is a param group
    dict: the rule's ``defaults`` overridden by the user's hyperparameters and the group's own
    keys.

    Attributes:
        name: the name ``ZeroOptimizer(optimizer=...)`` takes (registered by ``register``).
        defaults: every hyperparameter the rule takes, with its default value.
        states: ``(group) -> tuple[str, ...]``: the names of the states this group's params
            need (each a flat fp32 tensor per param, shaped like the param). Called when
            states are laid out and when they are loaded.
        fused_step: ``(group, shard: ShardTensors, step: Tensor, statistics: Tensor | None)
            -> None``: updates this rank's shard of one group in place (see the module
            docstring). ``step`` is the step counter, already incremented (so 1 on the first
            step); ``statistics`` are the all-reduced totals of ``statistics``, or None for a
            rule that is not ``per_tensor`` for this group. Called once per group per step.
            It may overwrite ``shard.grads``.
        reference_step: ``(group, param, grad, state: dict, t: int) -> None``: the plain,
            per-tensor definition of the rule, updating one whole ``param`` and its ``state``
            dict in place; ``t`` counts from 1. Run by ``ReferenceOptimizer``; the tests hold
            ``fused_step`` to it.
        validate: ``(group) -> None``: checks a group's hyperparameters (it may fill in
            defaults of the group's extra keys); raises ValueError for an invalid one. Called
            for each group at construction and when a state dict's param groups are loaded.
        per_tensor: ``(group) -> bool``: whether the group needs whole-param statistics
            (tensor-wise rules: LAMB and LARS trust ratios, cautious masking). Then each shard
            entry is one param's piece, and ``statistics`` runs first. Default: never.
        statistics: ``(group, shard, step) -> Tensor``: phase 1 of a tensor-wise step: this
            rank's partial sums per param, shaped ``[k, num_params]``; the optimizer
            all-reduces every group's partials in one collective and passes the totals to
            ``fused_step``. Default None (no statistics).
        initial_values: ``(group) -> dict[str, float | str]``: the value each state starts at,
            where not zero: a number (Adagrad's accumulator), or "param" for a copy of the
            param (schedule-free's z). Default: every state starts at zero.
        before_step: ``(group) -> None``: bookkeeping kept in the group, run on every rank
            before each step. Default None.
        to_eval, to_train: ``(group, shard) -> None``: move the params to where they are
            evaluated, and back, for rules whose training point is not the point to evaluate
            (schedule-free); called by ``optimizer.eval()`` and ``optimizer.train()``. Default
            None (nothing to move).
        fixed: ``{name: value}``: values a hyperparameter accepts only for compatibility with
            torch.optim's signature (any other value is refused, see ``check_fixed``).
            Default empty.
        nonnegative_states: how states may be stored (zeroopt.states): the states never
            negative, which use the unsigned 8-bit map (it spends the sign bit on precision).
            Default ().
        full_precision_states: states that are points in parameter space (schedule-free's z):
            they stay 32-bit whatever ``state_precision`` says. Default ().
        statistics_use_states: whether phase 1 (``statistics``) reads and writes the states
            (LAMB, cautious: it updates the moments); otherwise only ``fused_step`` does.
            States not in 32-bit are decoded around it. Default False.
        whole_tensors: ``(group) -> bool``: for rules that step some params whole, one tensor
            at a time (GaLore's projection, Adafactor's factored moments): whether this
            group's params are stepped so. Each such param is owned whole by one rank
            (layout.py). Default: never.
        tensor_step: ``(group, param, grad, state: dict, t: int) -> None``: updates one such
            whole param with its own ``state`` dict (any shapes, created on its first step;
            the group's ``states`` are then ()). Default None.
        tensor_states_8bit: those of ``tensor_step``'s states that may be kept 8-bit.
            Default ().
        group_keys: keys a param group may carry besides ``defaults`` (GaLore's ``rank``,
            ...): a group with any other key is refused at construction (validation.py), as a
            misspelt one would be. Default ().
    """

    name: str
    defaults: dict
    # (group) -> names of the states this group's params need
    states: Callable[[dict], tuple[str, ...]]
    # (group, shard tensors, step counter already incremented, all-reduced statistics or None)
    fused_step: FusedStep
    reference_step: ReferenceStep  # (group, param, grad, state dict, step number)
    validate: Callable[[dict], None]
    # Tensor-wise rules: (group) -> whether it needs whole-param statistics, and the partials.
    per_tensor: Callable[[dict], bool] = lambda group: False
    statistics: Statistics | None = None
    # (group) -> the value each state starts at, where not zero: a number (Adagrad's
    # accumulator), or "param" for a copy of the param (schedule-free's z).
    initial_values: Callable[[dict], dict[str, float | str]] = lambda group: {}
    # (group) -> None: bookkeeping kept in the group, run on every rank before each step.
    before_step: Callable[[dict], None] | None = None
    # (group, shard) -> None: move the params to where they are evaluated, and back, for rules
    # whose training point is not the point to evaluate (schedule-free).
    to_eval: Callable[[dict, ShardTensors], None] | None = None
    to_train: Callable[[dict, ShardTensors], None] | None = None
    # Values a hyperparameter accepts only for compatibility with torch.optim's signature.
    fixed: dict = field(default_factory=dict)
    # How states may be stored (zeroopt.states): those never negative use the unsigned 8-bit
    # map, which spends the sign bit on precision; those that are points in parameter space
    # (schedule-free's z) stay 32-bit.
    nonnegative_states: tuple[str, ...] = ()
    full_precision_states: tuple[str, ...] = ()
    # Whether phase 1 (statistics) reads and writes the states (LAMB, cautious: it updates the
    # moments); otherwise only fused_step does. States not in 32-bit are decoded around it.
    statistics_use_states: bool = False
    # Rules that step some params whole, one tensor at a time (GaLore's projection, Adafactor's
    # factored moments): (group) -> whether this group's params are stepped so. Each such param
    # is owned whole by one rank (layout.py), and ``tensor_step(group, param, grad, state, t)``
    # updates it with its own ``state`` dict (any shapes, created on its first step; the group's
    # ``states`` are then ()). ``tensor_states_8bit`` are those states that may be kept 8-bit.
    whole_tensors: Callable[[dict], bool] = lambda group: False
    tensor_step: ReferenceStep | None = None
    tensor_states_8bit: tuple[str, ...] = ()
    # Keys a param group may carry besides ``defaults`` (GaLore's ``rank``, ...): a group with
    # any other key is refused at construction (validation.py), as a misspelt one would be.
    group_keys: tuple[str, ...] = ()

    def state_names(self, groups: list[dict]) -> tuple[str, ...]:
        """Every state some group needs, in a stable order."""
        return tuple(dict.fromkeys(name for g in groups for name in self.states(g)))


def _number(value, name: str) -> float:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if not isinstance(value, (int, float)) or isinstance(value, bool) or math.isnan(value):
        raise ValueError(f"{name} must be a number, got {value!r}")
    return float(value)


def check_nonnegative(group: dict, *names: str) -> None:
    """Check that each named hyperparameter is a number >= 0.

    Args:
        group: the param group.
        *names: the hyperparameters to check (a one-element tensor counts as its number).

    Raises:
        ValueError: one is not a number (or is NaN or a bool), or is negative.
    """
    for name in names:
        if _number(group[name], name) < 0:
            raise ValueError(f"Invalid {name}: {group[name]} (it must be >= 0)")


def check_betas(group: dict, count: int = 2) -> None:
    """Check ``group["betas"]``: a tuple or list of ``count`` numbers, each in [0, 1).

    Args:
        group: the param group.
        count: how many betas the rule takes (default 2; AdEMAMix takes 3).

    Raises:
        ValueError: not a tuple or list of that length, or a beta not a number in [0, 1).
    """
    betas = group["betas"]
    if not isinstance(betas, (tuple, list)) or len(betas) != count:
        raise ValueError(f"betas must be a tuple of {count} numbers, got {betas!r}")
    for i, beta in enumerate(betas):
        if not 0.0 <= _number(beta, f"betas[{i}]") < 1.0:
            raise ValueError(f"Invalid beta at index {i}: {beta} (each beta must be in [0, 1))")


def check_fixed(group: dict, fixed: dict, rule: str) -> None:
    """Check the hyperparameters a rule accepts only at one value (``UpdateRule.fixed``).

    Args:
        group: the param group; a name it does not carry passes.
        fixed: ``{name: the only value accepted}``.
        rule: the rule's name, for the message.

    Raises:
        ValueError: the group sets one of them to another value.
    """
    for name, allowed in fixed.items():
        if group.get(name, allowed) != allowed:
            raise ValueError(f"{rule}: {name}={group[name]!r} is not supported by zeroopt; "
                             f"use {name}={allowed!r}")


def update_moments_(m: list[torch.Tensor], v: list[torch.Tensor], grads: list[torch.Tensor],
                    beta1: float, beta2: float) -> None:
    """Adam's moments, in place: m <- b1 m + (1 - b1) g, v <- b2 v + (1 - b2) g^2."""
    torch._foreach_mul_(m, beta1)
    torch._foreach_add_(m, grads, alpha=1 - beta1)
    torch._foreach_mul_(v, beta2)
    torch._foreach_addcmul_(v, grads, grads, value=1 - beta2)


def adam_denominator(v: list[torch.Tensor], beta2: float, t: int,
                     eps: float) -> list[torch.Tensor]:
    """sqrt(v / (1 - b2^t)) + eps, as new tensors."""
    denom = torch._foreach_sqrt(v)
    torch._foreach_div_(denom, math.sqrt(1 - beta2**t))
    torch._foreach_add_(denom, eps)
    return denom


def resolve_defaults(rule: UpdateRule, hyperparameters: dict) -> dict:
    """The rule's defaults (and every rule's state-storage options) overridden by
    ``hyperparameters``; an unknown name is an error that suggests the closest known one."""
    import difflib

    from ..states.kinds import STATE_DEFAULTS

    known = {**STATE_DEFAULTS, **rule.defaults}  # a rule may default to 8-bit states
    for name in hyperparameters:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1, cutoff=0.5)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise TypeError(f"{rule.name} got an unexpected hyperparameter {name!r}.{hint} "
                            f"It takes: {', '.join(known)}")
    return {**known, **hyperparameters}
