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

import importlib
import math
import sys
from dataclasses import dataclass, field
from typing import Any, Callable

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


def thin_svd_cost(shape: torch.Size) -> int:
    """The work of stepping a whole matrix of ``shape`` on one rank, up to a constant: that of
    its thin SVD (GaLore's projection, the costliest whole-matrix step), m n min(m, n); a
    tensor of fewer than two dimensions costs its numel. ``UpdateRule.placement_cost``'s
    default.

    Args:
        shape: the param's shape; the dimensions after the first count as one (n).

    Returns:
        The cost, an int.
    """
    if len(shape) < 2:
        return int(torch.Size(shape).numel())
    m, n = shape[0], int(torch.Size(shape[1:]).numel())
    return m * n * min(m, n)


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
            negative, which use the unsigned 8-bit map (it spends the sign bit on precision)
            and the unsigned 4-bit map (torchao's, without zero). Default ().
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
        group_defaults: ``(group, defaults: dict) -> None``: fills in, in place, values a
            param group as the user gave it takes from elsewhere than the optimizer's
            ``defaults`` (pytorch-optimizer's NorMuon: a group with ``use_muon=False`` takes
            ``adamw_lr`` as its lr unless it sets one), before torch.optim fills the rest from
            ``defaults``. Called once per group at construction. Default None.
        placement_cost: ``(shape: torch.Size) -> int``: the work of one step of a param of
            that shape stepped whole (``whole_tensors``), up to a constant: layout.py places
            such params so that the ranks' totals stay even. Default ``thin_svd_cost``.
        torch_class: the optimizer class whose update the rule computes: a torch.optim class
            (``torch.optim.AdamW``), or another package's named by its dotted path
            (``"lion_pytorch.Lion"``), imported only when used (``mirrored_class``): the
            package is optional. ``export_torch_state_dict`` saves the state a torch.optim
            class saves; ``zeroopt.wrap`` builds the rule from an instance of it (``wraps``);
            the tests hold the rule to it (tests/training.py). Default None: the rule mirrors
            no class, and ``reference_step`` is its only yardstick.
        torch_defaults: constructor arguments ``torch_class`` needs to be this rule, under the
            caller's own (``"nesterov"``: ``momentum=0.9, nesterov=True`` for torch.optim.SGD).
            Default empty.
        zeroopt_only: ``{option: the value that turns it off}``: options of the rule that
            ``torch_class`` has no counterpart for (Adam's ``cautious``, ``adopt``,
            ``grams``). With one on, a state is not what ``torch_class`` would continue
            (``export_torch_state_dict`` refuses it), and the tests hold the rule to its
            ``reference_step`` instead. Default empty.
        wraps: ``(optimizer) -> bool``: whether ``zeroopt.wrap`` builds this rule from that
            (not yet stepped) optimizer: its class, and the options that choose between rules
            (torch.optim.Adam(decoupled_weight_decay=True) is ``"adamw"``). The rules set it
            (and ``from_torch_options``) from a ``sources.Sources`` of their classes. Default
            None: wrap builds this rule from no optimizer.
        from_torch_options: ``(optimizer, defaults: dict, groups: list[dict]) -> None``: for
            ``zeroopt.wrap``: adjusts, in place, the defaults and param groups read from an
            optimizer ``wraps`` accepted (drops keys that only choose an implementation, such
            as lion_pytorch's ``use_triton``); raises ValueError for options the rule does not
            follow. Default None (taken as they are).
        transformers_names: HuggingFace Transformers ``optim`` strings this rule runs under
            besides its registered names, for a string that should not be a zeroopt name:
            ``zeroopt.transformers`` runs them as ``name``. (The built-in rules register
            Transformers' strings as names: ``"adamw_torch_xla"``...) Default ().
        transformers_arguments: ``(training_args) -> dict``: the hyperparameters Transformers'
            handler for this rule reads from ``TrainingArguments`` (``adam_beta1/2`` and
            ``adam_epsilon`` for the Adam family, ...); ``learning_rate`` and
            ``weight_decay`` are read for every rule. Default: none.
        transformers_optim_args: ``{key: (hyperparameter, type)}``: ``optim_args`` keys
            Transformers' handler reads under another name, with the type it converts them to
            (AdEMAMix's ``t_alpha`` is ``alpha_warmup``, an int). Default empty.
        transformers_projection: the keys a projected group carries (``rank``,
            ``update_proj_gap``...), with the defaults Transformers' handler gives them, for
            rules that project (GaLore, APOLLO; Adafactor as ``"galore_adafactor"``):
            ``zeroopt.transformers`` uses them for the names Transformers projects under
            (those that start with ``galore_`` or ``apollo_``). Default empty.
        transformers_hybrid: ``(training_args) -> dict``: for rules that step matrices apart
            (Muon): the keys of the groups of the other params (``use_muon=False`` and AdamW's
            betas and eps from ``adam_beta1/2`` and ``adam_epsilon``); ``zeroopt.transformers``
            then splits the Trainer's groups with ``zeroopt.muon_param_groups`` (the matrices of
            ``optim_target_modules``, or every hidden matrix). Default None: no such groups.
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
    # (group as given, the optimizer's defaults) -> None: values it takes from elsewhere.
    group_defaults: Callable[[dict, dict], None] | None = None
    # (shape) -> the work of stepping such a param whole, which layout.py spreads over ranks.
    placement_cost: Callable[[torch.Size], int] = thin_svd_cost
    # The class the rule mirrors (a torch.optim class, or a dotted path to another package's),
    # the constructor arguments it needs to be this rule, and the rule's options it lacks
    # ({option: the value that turns it off}).
    torch_class: type | str | None = None
    torch_defaults: dict = field(default_factory=dict)
    zeroopt_only: dict = field(default_factory=dict)
    # zeroopt.wrap: (optimizer) -> whether it is this rule; (optimizer, defaults, groups) ->
    # None: adjusts what wrap read from it, or refuses options the rule does not follow.
    wraps: Callable[[Any], bool] | None = None
    from_torch_options: Callable[[Any, dict, list], None] | None = None
    # HuggingFace Transformers: the optim strings the rule also runs under, the hyperparameters
    # its handler reads from TrainingArguments, the optim_args keys it reads under other names
    # ({key: (hyperparameter, type)}), and the projection keys' defaults (GaLore, APOLLO).
    transformers_names: tuple[str, ...] = ()
    transformers_arguments: Callable[[Any], dict] = lambda args: {}
    transformers_optim_args: dict = field(default_factory=dict)
    transformers_projection: dict = field(default_factory=dict)
    # (training_args) -> the keys of the groups that are not matrices (Muon's use_muon=False
    # groups, with AdamW's betas and eps from the arguments); None: the rule has no such groups.
    transformers_hybrid: Callable[[Any], dict] | None = None

    def mirrored_class(self) -> type | None:
        """``torch_class`` as a class, a dotted path imported.

        Returns:
            The class; None when the rule has none, or its package is not installed.
        """
        spec = self.torch_class
        if spec is None or isinstance(spec, type):
            return spec
        module, _, name = spec.rpartition(".")
        try:
            return getattr(importlib.import_module(module), name)
        except ImportError:
            return None

    def state_names(self, groups: list[dict]) -> tuple[str, ...]:
        """Every state some group needs, in a stable order."""
        return tuple(dict.fromkeys(name for g in groups for name in self.states(g)))


def check_number(value, name: str) -> float:
    """A hyperparameter's value as a float, checked to be a number.

    Args:
        value: the value (a one-element tensor counts as its number).
        name: the hyperparameter's name, for the message.

    Returns:
        ``float(value)``.

    Raises:
        ValueError: not a number (or is NaN, or a bool).
    """
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
        if check_number(group[name], name) < 0:
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
        if not 0.0 <= check_number(beta, f"betas[{i}]") < 1.0:
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


def adam_arguments(args) -> dict:
    """The hyperparameters Transformers' Adam-family handlers read from ``TrainingArguments``
    (``UpdateRule.transformers_arguments``).

    Args:
        args: the TrainingArguments.

    Returns:
        ``dict(betas=(adam_beta1, adam_beta2), eps=adam_epsilon)``.
    """
    return dict(betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon)


def is_exactly(optimizer, torch_class: type | str) -> bool:
    """Whether ``optimizer``'s class is ``torch_class`` itself (a subclass may change the
    update, so it is not). For ``UpdateRule.wraps``.

    Args:
        optimizer: the optimizer.
        torch_class: a class, or the dotted path of one: its package is not imported (an
            instance of the class exists only once it is).

    Returns:
        True if ``type(optimizer)`` is that class.
    """
    if isinstance(torch_class, type):
        return type(optimizer) is torch_class
    module, _, name = torch_class.rpartition(".")
    package = sys.modules.get(module)
    return package is not None and type(optimizer) is getattr(package, name, None)


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
    ``hyperparameters``; an unknown name is an error that lists the names the rule takes, with
    the one it is a typo of, or the rules that take it (``zeroopt.validation``)."""
    from ..states.kinds import STATE_DEFAULTS
    from ..validation import closest_name, taken_elsewhere

    known = {**STATE_DEFAULTS, **rule.defaults}  # a rule may default to 8-bit states
    for name in hyperparameters:
        if name not in known:
            close = closest_name(name, known)
            hint = f" Did you mean {close!r}?" if close else ""
            raise TypeError(f"{rule.name} got an unexpected hyperparameter {name!r}.{hint} "
                            f"It takes: {', '.join(known)}.{taken_elsewhere(name, rule)}")
    return {**known, **hyperparameters}
