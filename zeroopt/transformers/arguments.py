"""TrainingArguments -> ZeroOptimizer: the optimizer Transformers' Trainer would build from
``optim``, ``optim_args`` and ``optim_target_modules``, built sharded by zeroopt.

The hyperparameters each name takes from the arguments follow Transformers' own handlers
(``transformers/trainer_optimizer.py``): ``learning_rate`` for all; ``adam_beta1/2`` and
``adam_epsilon`` for the Adam family (Lion takes the betas only; GaLore and Adafactor neither,
as there); ``warmup_steps`` for schedule-free; GaLore's and APOLLO's projection keys (and
their defaults) from ``optim_args``. Those are the rules' own facts (``UpdateRule``'s
``transformers_*`` fields). Params are grouped as the Trainer groups them: ``weight_decay`` on
all but biases and norms, which get 0.

``optim_args`` ("key=value,key=value") may also carry:
- ``optimizer=NAME``: any zeroopt name, including those TrainingArguments does not accept
  (``lamb``, ``lars``, ``nesterov``...); it replaces ``optim``;
- ZeroOptimizer's options: ``stage``, ``shard_size``, ``bucket_numel``, ``reduce_dtype``
  (``float64``...), ``skip_nonfinite``, ``window_numel``, ``page_dir``, ``backend``;
- any hyperparameter of the rule (``state_precision=8bit``, ``cautious=true``, ``momentum=0.9``);
  an unknown one is an error that names the closest known one.
"""

from __future__ import annotations

import torch
from torch import nn

from ..algorithms import ELSEWHERE, available_optimizers, get_preset, registered_rules
from ..optimizer import ZeroOptimizer
from ..param_groups import galore_param_groups, muon_param_groups
from ..validation import closest_name

# ZeroOptimizer's own keyword arguments that optim_args may set (the rest are hyperparameters).
OPTIMIZER_OPTIONS = ("stage", "shard_size", "bucket_numel", "reduce_dtype", "skip_nonfinite",
                     "window_numel", "page_dir", "backend", "average_grads")

# The Trainer's rule for which params get no weight decay (Trainer.get_decay_parameter_names).
NO_DECAY_PATTERNS = [r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)"]


def create_optimizer(args, model: nn.Module, *, decay_parameter_names: list[str] | None = None,
                     process_group=None, **overrides) -> ZeroOptimizer:
    """The ZeroOptimizer for ``model`` that ``args`` (a TrainingArguments) describe.
    ``overrides`` win over ``args`` and ``optim_args`` (same keys as ``optim_args``, values
    already typed). Build it after the model is on its device and in its dtype."""
    name, groups, options = optimizer_arguments(args, model, decay_parameter_names, overrides)
    return ZeroOptimizer(groups, name, process_group=process_group, **options)


def optimizer_arguments(args, model: nn.Module, decay_parameter_names: list[str] | None = None,
                        overrides: dict | None = None) -> tuple[str, list[dict], dict]:
    """(zeroopt name, param groups, keyword arguments) for ``ZeroOptimizer``."""
    settings = {**parse_optim_args(args.optim_args), **(overrides or {})}
    name = settings.pop("optimizer", None) or zeroopt_name(args.optim)
    rule, _ = get_preset(name)  # an unknown name: an error with the closest known one
    name = name.lower()
    options = {key: settings.pop(key) for key in OPTIMIZER_OPTIONS if key in settings}
    if isinstance(options.get("reduce_dtype"), str):
        options["reduce_dtype"] = _dtype(options["reduce_dtype"])
    projection = _projection(name, rule, settings)
    weight_decay = settings.pop("weight_decay", args.weight_decay)
    hyperparameters = {"lr": args.learning_rate, **rule.transformers_arguments(args),
                       **_renamed_keys(rule, args, settings), **settings}
    if decay_parameter_names is None:
        decay_parameter_names = default_decay_parameter_names(model)
    groups = param_groups(model, set(decay_parameter_names), weight_decay, projection,
                          args.optim_target_modules, name)
    if rule.transformers_hybrid is not None:
        groups = hybrid_groups(model, groups, rule.transformers_hybrid(args),
                               args.optim_target_modules)
    return name, groups, {**options, **hyperparameters}


def zeroopt_name(optim) -> str:
    """The zeroopt name for a TrainingArguments ``optim`` (a string or OptimizerNames)."""
    optim = getattr(optim, "value", optim)
    name = next((rule.name for rule in registered_rules() if optim in rule.transformers_names),
                optim)
    if name in available_optimizers():
        return name
    close = closest_name(optim, available_optimizers())
    hint = (f" ({ELSEWHERE[str(optim).lower()]})." if str(optim).lower() in ELSEWHERE
            else f". The closest zeroopt name is {close!r}." if close else ".")
    raise ValueError(
        f"zeroopt has no update rule for optim={optim!r}{hint} Pick a name zeroopt runs: "
        f"optim=... where TrainingArguments accepts it, or optim_args='optimizer=NAME' for any "
        f"of: {', '.join(available_optimizers())}")


def parse_optim_args(text: str | None) -> dict:
    """``"k=v,k=v"`` as Transformers splits it, with each value typed: true/false, an int, a
    float (``1e-3`` too), else the string."""
    if not text:
        return {}
    parsed = {}
    for item in text.replace(" ", "").split(","):
        if not item:
            continue
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"optim_args must read 'key=value,key=value'; {item!r} in "
                             f"{text!r} has no key=value")
        parsed[key] = _typed(value)
    return parsed


def default_decay_parameter_names(model: nn.Module) -> list[str]:
    """The Trainer's default: every param but biases, norms and LayerNorm weights."""
    from transformers.trainer_pt_utils import get_parameter_names

    return get_parameter_names(model, [nn.LayerNorm], NO_DECAY_PATTERNS)


def param_groups(model: nn.Module, decay: set[str], weight_decay: float,
                 projection: dict | None, target_modules, name: str) -> list[dict]:
    """The Trainer's two groups (decayed, not decayed), and for GaLore/APOLLO a third: the
    target Linear weights, with the projection keys. Empty groups are left out."""
    projected = set()
    if projection is not None:
        if target_modules is None:
            raise ValueError(f"{name} projects the weights of the modules named in "
                             f"optim_target_modules: set it (a list of names, a regex, or "
                             f"'all-linear'), as Transformers requires")
        chosen = galore_param_groups(model, target_modules, **projection)[1]["params"]
        projected = {id(p) for p in chosen}
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for n, p in trainable if n in decay and id(p) not in projected],
         "weight_decay": weight_decay},
        {"params": [p for n, p in trainable if n not in decay and id(p) not in projected],
         "weight_decay": 0.0},
    ]
    if projected:
        groups.append({"params": [p for _, p in trainable if id(p) in projected],
                       "weight_decay": weight_decay, **projection})
    return [group for group in groups if group["params"]]


def hybrid_groups(model: nn.Module, groups: list[dict], others: dict,
                  target_modules) -> list[dict]:
    """Each of the Trainer's groups split in two for Muon-like rules: its matrices (those
    ``zeroopt.muon_param_groups(model, target_modules)`` gives Muon), and the rest with the
    keys ``others`` (``use_muon=False``, AdamW's betas and eps). Empty groups are left out."""
    matrices = {id(p) for p in muon_param_groups(model, target_modules)[0]["params"]}
    split = []
    for group in groups:
        params = group["params"]
        split.append({**group, "params": [p for p in params if id(p) in matrices]})
        split.append({**group, **others, "params": [p for p in params if id(p) not in matrices]})
    return [group for group in split if group["params"]]


def _renamed_keys(rule, args, settings: dict) -> dict:
    """optim_args keys Transformers reads under other names, taken out of ``settings``:
    beta1/beta2 (and beta3, for a rule with three betas: AdEMAMix) are ``betas``; the rule's
    own ``transformers_optim_args`` (AdEMAMix's t_alpha/t_beta3, its warmups)."""
    renamed = {}
    parts = [settings.pop(key, None) for key in ("beta1", "beta2", "beta3")]
    if any(part is not None for part in parts):
        defaults = (args.adam_beta1, args.adam_beta2, 0.9999)
        count = 3 if len(rule.defaults.get("betas", ())) == 3 else 2
        if count == 2 and parts[2] is not None:
            raise ValueError(f"beta3 in optim_args is AdEMAMix's; {rule.name} has two betas")
        renamed["betas"] = tuple(float(part if part is not None else default)
                                 for part, default in zip(parts[:count], defaults))
    for key, (ours, kind) in rule.transformers_optim_args.items():
        if key in settings:
            renamed[ours] = kind(settings.pop(key))
    return renamed


def _projection(name: str, rule, settings: dict) -> dict | None:
    """GaLore's or APOLLO's projection keys (the rule's ``transformers_projection``: its
    defaults as Transformers' handler sets them; optim_args win), taken out of ``settings``;
    None for names that project nothing (Transformers projects under the names that start
    with galore_ or apollo_: "galore_adafactor" projects, "adafactor" does not)."""
    if not rule.transformers_projection or not name.startswith(("galore_", "apollo_")):
        return None
    return {key: settings.pop(key, default)
            for key, default in rule.transformers_projection.items()}


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"reduce_dtype={name!r} is not a torch dtype; use float32, float64 or "
                         f"bfloat16")
    return dtype


def _typed(value: str):
    if value.lower() in ("true", "false"):
        return value.lower() == "true"
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value
