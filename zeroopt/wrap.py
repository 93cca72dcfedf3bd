"""``zeroopt.wrap(optimizer)``: the ZeroOptimizer equivalent of an existing optimizer.

Which rule an optimizer is, and how its options translate, are the rules' own facts
(``UpdateRule.wraps`` and ``from_torch_options``; most rules list their classes as
``zeroopt.algorithms.sources.Source``s in their own file)."""

from __future__ import annotations

import torch

from .algorithms import UpdateRule, registered_rules
from .algorithms.sources import class_path
from .checkpoint.torch_interop import IMPLEMENTATION_KEYS
from .optimizer import ZeroOptimizer
from .states.kinds import STATE_DEFAULTS
from .validation import TORCH_GROUP_KEYS


def wrap(optimizer: torch.optim.Optimizer, *, stage: int = 1, process_group=None,
         **options) -> ZeroOptimizer:
    """Build the ZeroOptimizer with the same params, param groups and hyperparameters as
    ``optimizer``: the rule that computes the same update, with the same states.

    What it maps (the message of the TypeError below lists it from the rules):

    - torch.optim: ``AdamW``; ``Adam`` (``"adamw"`` with ``decoupled_weight_decay=True``);
      ``SGD`` (``"sgd"``, Nesterov included: a hyperparameter of the rule); ``RMSprop``;
      ``Adagrad``; ``Muon`` (``"muon"``: its matrices; AdamW's params are another optimizer).
    - ``transformers.optimization.Adafactor`` (``"adafactor"``), ``lion_pytorch.Lion``.
    - bitsandbytes: ``AdamW`` and ``Adam`` (both ``"adamw"``: bitsandbytes' Adam decays the
      weights as AdamW does), ``Lion``, ``RMSprop``, ``Adagrad``, ``SGD``, ``AdEMAMix``, each in
      its ``8bit`` and ``32bit`` forms, and ``Paged`` ones for AdamW, Adam, Lion and AdEMAMix:
      8-bit (by name or ``optim_bits=8``) is ``state_precision="8bit"`` with its
      ``min_8bit_size``, paged is ``paged=True``. zeroopt's 8-bit states round to the nearest
      code, so they stay as close to 32-bit as bitsandbytes' do or closer. Its AdEMAMix warms
      beta3 up as pytorch-optimizer's does (below). Refused with the reason: ``max_unorm``
      (update-norm clipping), ``skip_zeros``, ``percentile_clipping``, ``block_wise=False``,
      GlobalOptimManager overrides; RMSprop's ``momentum`` and SGD's ``dampening``, which
      bitsandbytes' kernels ignore (zeroopt's rules would apply them; SGD's ``nesterov`` is
      ignored there too and not even recorded, so wrap maps the plain momentum bitsandbytes
      computes). Not mapped: bitsandbytes' ``LAMB`` and ``LARS``, which are AdamW and momentum
      SGD with the update's norm clipped to ``max_unorm * ||param||`` (and their 8-bit forms
      clip only the params under ``min_8bit_size``), not the trust ratios of zeroopt's
      ``"lamb"`` and ``"lars"``.
    - pytorch-optimizer: ``Lion`` (with ``cautious``), ``AdEMAMix`` (``t_alpha_beta3`` is
      both warm-ups; its beta3 warm-up leaves out the 1e-8 apple's adds in log(beta), a
      relative difference of ~1e-5 during the warm-up), ``Grams`` (``"adamw"``,
      ``grams=True``); with decoupled weight decay (``weight_decouple=True``) and without
      ``fixed_decay``, as zeroopt decays. Not mapped, as their updates differ:
      ``ADOPT`` (clips at step^0.25 one step later than the authors' ADOPT, which
      ``adopt=True`` follows, and decays on the step that only initialises v), ``Lamb``
      (never bias-corrects v), ``LARS`` (its trust ratio divides by ||g|| + wd ||w||).
      Also ``StableAdamW`` (``"stable_adamw"``; no ``maximize`` there) and ``CAME``
      (``"came"``: ``clip_threshold``, ``eps1``, ``eps2`` and ``maximize`` read from the
      instance, where the package keeps them; a param group's own eps1/eps2, which it ignores,
      refused).
    - ``optimi.StableAdamW`` (``"stable_adamw"``; its ``beta1``/``beta2`` as ``betas``;
      ``kahan_sum`` moot under fp32 masters). Refused: ``gradient_release=True`` (steps inside
      backward; its per-param group entries are not taken for a step) and
      ``optimizer_accumulation``.
    - ``grokadamw.GrokAdamW`` (``"grokadamw"``; ``grokking_signal_fns`` refused: the groups'
      ``train_loss``/``eval_loss`` give its default signal).
    - schedulefree's ``AdamWScheduleFree``, ``RAdamScheduleFree``, ``SGDScheduleFree``
      (``"schedule_free_adamw"``, ``"schedule_free_radam"``, ``"schedule_free_sgd"``): they start
      in eval mode, the wrap in train mode (the same params before a step); call ``eval()`` and
      ``train()`` on it as on them. Not mapped: their ``Closure``, ``Reference`` and ``Paper``
      forms, and ``ScheduleFreeWrapper``.
    - torchao: ``AdamW4bit`` (``"adamw"``, ``state_precision="4bit"`` with its ``block_size``
      and torchao's 4096-element minimum; its tensor ``lr`` as a float). Refused:
      ``bf16_stochastic_round``, ``amsgrad`` (its maximum on another 4-bit map), a
      ``block_size`` that is odd or does not divide 256. ``AdamW8bit`` is refused: its 8-bit
      states quantize only whole-block params and round midpoints otherwise than zeroopt's
      (bitsandbytes') 8-bit format.
    - Not mapped: torch.optim.Adafactor (torch's own variant, not Transformers'), and every
      other class.

    Args:
        optimizer: an optimizer that has not stepped yet; to carry existing state over, pass
            its ``state_dict()`` to the new optimizer's ``load_state_dict``.
        stage, process_group, **options: ZeroOptimizer's other arguments (``bucket_numel``,
            ``reduce_dtype``, ``page_dir``...); a hyperparameter or state option here
            overrides what was read from ``optimizer`` where its groups do not set it.

    Returns:
        The ZeroOptimizer.

    Raises:
        TypeError: a class wrap does not map (the message lists those it maps).
        ValueError: an optimizer that has stepped; an option the rule does not follow (the
            message says why).
    """
    rule = next((r for r in registered_rules() if r.wraps and r.wraps(optimizer)), None)
    if rule is None:
        raise TypeError(
            f"zeroopt.wrap cannot map {type(optimizer).__module__}.{type(optimizer).__name__}: "
            f"it maps {_wrapped_classes()}. Build zeroopt.ZeroOptimizer(params, "
            "optimizer=NAME, ...) directly with a name from zeroopt.available_optimizers().")
    if _has_stepped(optimizer):
        raise ValueError("zeroopt.wrap takes an optimizer that has not stepped yet; to carry "
                         "its state, call load_state_dict(old.state_dict()) on the result")
    groups = [{k: v for k, v in group.items() if k not in IMPLEMENTATION_KEYS}
              for group in optimizer.param_groups]
    defaults = {k: v for k, v in optimizer.defaults.items() if k not in IMPLEMENTATION_KEYS}
    if rule.from_torch_options:
        rule.from_torch_options(optimizer, defaults, groups)
    _refuse_unknown(optimizer, rule, defaults, groups)
    return ZeroOptimizer(groups, rule.name, stage=stage, process_group=process_group,
                         **{**defaults, **options})


def _has_stepped(optimizer) -> bool:
    """Whether ``optimizer`` has state from a step: a param's state with a step count other
    than 0, or without one but holding a tensor. Not a step's: the step-0 state
    torch.optim.Adagrad makes in its constructor, and optimi's ``{"group": ...}`` entries
    (gradient release). A group's step count (pytorch-optimizer's) or states (grokadamw's,
    kept in the group) are a step's too."""
    for state in optimizer.state.values():
        if not isinstance(state, dict):
            continue
        step = state.get("step")
        if step is not None:
            if float(step) != 0:
                return True
        elif any(isinstance(value, torch.Tensor) for value in state.values()):
            return True
    return any(group.get("step") or group.get("state") for group in optimizer.param_groups)


def _refuse_unknown(optimizer, rule: UpdateRule, defaults: dict, groups: list[dict]) -> None:
    """An option left that the rule does not take: dropped when off (None or False), else
    refused, naming the class and the rule."""
    known = {*rule.defaults, *STATE_DEFAULTS, *rule.group_keys, *TORCH_GROUP_KEYS}
    for options in (defaults, *groups):
        for key in [k for k in options if k not in known]:
            if options[key] is None or options[key] is False:
                del options[key]
            else:
                raise ValueError(
                    f"zeroopt.wrap cannot map {class_path(optimizer)}({key}={options[key]!r}): "
                    f"zeroopt's {rule.name} has no such option. It takes: "
                    f"{', '.join(rule.defaults)}")


def _wrapped_classes() -> str:
    """The classes wrap maps, by package, for its message: "torch.optim.{Adam, AdamW, ...},
    bitsandbytes.optim.{...} and lion_pytorch.Lion"."""
    by_module: dict[str, list[str]] = {}
    for rule in registered_rules():
        paths = (rule.wraps.mapped() if hasattr(rule.wraps, "mapped")
                 else [_class_name(rule)] if rule.wraps else [])
        for path in paths:
            module, _, name = path.rpartition(".")
            by_module.setdefault(module, []).append(name)
    by_module = {module: list(dict.fromkeys(names)) for module, names in by_module.items()}
    listed = [f"{module}.{names[0]}" if len(names) == 1 else f"{module}.{{{', '.join(names)}}}"
              for module, names in by_module.items()]
    return " and ".join(filter(None, [", ".join(listed[:-1]), listed[-1]]))


def _class_name(rule: UpdateRule) -> str:
    spec = rule.torch_class
    if spec is None or isinstance(spec, str):
        return spec or repr(rule.name)
    if getattr(torch.optim, spec.__name__, None) is spec:
        return f"torch.optim.{spec.__name__}"
    return f"{spec.__module__}.{spec.__qualname__}"
