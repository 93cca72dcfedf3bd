"""A DeepSpeed config, as written for DeepSpeed, split into zeroopt's part and DeepSpeed's.

``plan(config)`` reads DeepSpeed's own sections (``config_mapping``: "optimizer" with DeepSpeed's
Adam, AdamW, Lamb, Lion or Muon and their parameter names and defaults; "zero_optimization"
stage 1/2, reduce_bucket_size, offload_optimizer; communication_data_type;
bf16.bf16_optimizer_states) and an optional "zeroopt" section of ZeroOptimizer's keyword
arguments, which wins over what was mapped::

    "zeroopt": {"state_precision": "8bit", "bucket_numel": 4194304}

The section holds ``optimizer`` (a name from ``zeroopt.available_optimizers()``), the rule's
hyperparameters and state options (``state_precision``, ``min_8bit_size``, ``paged``), and the
optimizer's own (``stage``, ``bucket_numel``, ``reduce_dtype``, ...). When it names the
optimizer it chooses the rule: hyperparameters mapped from "optimizer" that this rule takes
(``lr``, ``betas``...) carry over where the section does not set them, the others are named
in the info line as not used.

What DeepSpeed gets instead is the same config less what zeroopt now does itself:

- "optimizer", "zero_optimization" (DeepSpeed runs at stage 0), "communication_data_type",
  "zeroopt": built into a ZeroOptimizer, handed to DeepSpeed as a client optimizer;
- "bf16": the model's params are cast to bf16 before ZeroOptimizer is built (it keeps the fp32
  masters). Left in, DeepSpeed would wrap the optimizer in its own bf16 optimizer, with masters
  and gradient reduction of its own;
- "gradient_clipping": clipped by ZeroOptimizer.clip_grad_norm_, by the config's value or, if
  it has none, DeepSpeed's default (1.0 in DeepSpeed 0.19.8: absent is not off). DeepSpeed gets
  0: its own clip reads param.grad, which zeroopt consumes during backward (on an empty list it
  fails with an IndexError).

Refused, with the fix named: fp16 and torch_autocast in float16 (no loss scaler), "auto"
values (resolve them first: the Trainer path fills them from TrainingArguments), and what
``config_mapping`` refuses (ZeRO-3, offload_param, Lamb unless "zeroopt" names it...).
"""

from __future__ import annotations

import copy
import difflib
from dataclasses import dataclass, field

import torch

from ..algorithms import get_preset, get_rule
from ..param_groups import model_param_groups
from ..states.kinds import STATE_DEFAULTS
from ..validation import closest_name, taken_elsewhere
from .config_mapping import ConfigError, translate

SECTION = "zeroopt"
# ZeroOptimizer's own arguments; every other key must be a hyperparameter of the rule.
OPTIONS = ("optimizer", "stage", "bucket_numel", "reduce_dtype", "skip_nonfinite",
           "window_numel", "page_dir", "backend", "shard_size", "grad_compression",
           "overlap_param_gather")
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
          "bfloat16": torch.bfloat16, "fp64": torch.float64, "float64": torch.float64}
# Sections zeroopt takes over: DeepSpeed does not see them.
TAKEN = (SECTION, "optimizer", "zero_optimization", "communication_data_type", "bf16",
         "bfloat16", "fp16")

__all__ = ["ConfigError", "Plan", "plan"]


@dataclass
class Plan:
    """A DeepSpeed config split by ``plan`` into zeroopt's part and DeepSpeed's.

    Attributes:
        deepspeed_config (dict): what ``deepspeed.initialize`` gets.
        optimizer_kwargs (dict): ``ZeroOptimizer(groups, **optimizer_kwargs)``.
        param_dtype (torch.dtype | None): bf16 when the config's bf16 section is enabled.
        gradient_clipping (float | None): the config's ``gradient_clipping``; 0: none; None:
            DeepSpeed's default (1.0 in 0.19).
        adamw_group (dict): DeepSpeed's Muon only: ``lr``, ``betas``, ``eps``,
            ``weight_decay`` of the ``use_muon=False`` groups (its auxiliary AdamW); see
            ``param_groups``.
        ignored (tuple[str, ...]): the config's moot keys (dotted paths), for ``info()``.
    """

    deepspeed_config: dict
    optimizer_kwargs: dict
    param_dtype: torch.dtype | None
    gradient_clipping: float | None
    adamw_group: dict = field(default_factory=dict)
    ignored: tuple = ()

    def param_groups(self, model: torch.nn.Module, model_parameters=None) -> list:
        """What the ZeroOptimizer optimizes.

        Args:
            model: the model (used when ``model_parameters`` is None).
            model_parameters: params or param-group dicts, as ``deepspeed.initialize`` takes
                them. Default None: ``model.parameters()``, or for a rule with hybrid groups
                (muon) ``zeroopt.muon_param_groups(model)``, which honours ``p.use_muon``.

        Returns:
            A list for ``ZeroOptimizer``: the ``use_muon=False`` groups carry ``adamw_group``
            (DeepSpeed's Muon: its AdamW half's settings), where a group given in
            ``model_parameters`` does not set them itself (as DeepSpeed resolves them: the
            group's own value last).
        """
        if model_parameters is None:
            groups = model_param_groups(model, self.optimizer_kwargs.get("optimizer", "adamw"))
            own = False  # built here: muon_param_groups' AdamW betas/eps give way
        else:
            groups = [dict(p) if isinstance(p, dict) else p for p in model_parameters]
            own = True
        if self.adamw_group:
            for group in groups:
                if isinstance(group, dict) and group.get("use_muon") is False:
                    for key, value in self.adamw_group.items():
                        if not own or key not in group:
                            group[key] = value
        return groups

    def info(self) -> str | None:
        """The one info line naming the config's moot keys (None when there are none)."""
        if not self.ignored:
            return None
        return (f"zeroopt runs this DeepSpeed config's optimizer and ZeRO; these keys tune "
                f"what zeroopt replaces and are ignored: {', '.join(self.ignored)}")


def plan(config: dict) -> Plan:
    """Split a DeepSpeed config, unchanged from what DeepSpeed takes, into zeroopt's part and
    DeepSpeed's; every check runs here, before any process joins a collective.

    Args:
        config (dict): the DeepSpeed config; "auto" values must be resolved first (the
            Trainer path fills them from TrainingArguments).

    Returns:
        A ``Plan``: the ZeroOptimizer's arguments (``optimizer_kwargs``, ``param_groups``),
        the bf16 cast, the clipping, and the config DeepSpeed gets.

    Raises:
        ConfigError: an "auto" value; no optimizer (neither "optimizer" nor "zeroopt");
            fp16; what ``config_mapping.translate`` refuses; an unknown key in "zeroopt"
            (naming the closest). The message names the fix.
    """
    if not isinstance(config, dict):
        raise ConfigError(f"a DeepSpeed config is a dict (or a JSON file's path), got "
                          f"{type(config).__name__}")
    _refuse_auto(config)
    section = config.get(SECTION, {})
    if not isinstance(section, dict):
        raise ConfigError(f'the "{SECTION}" section must be a dict of ZeroOptimizer\'s '
                          f"arguments, got {section!r}")
    if config.get("optimizer") is None and SECTION not in config:
        raise ConfigError(f'the DeepSpeed config has no "optimizer" section and no '
                          f'"{SECTION}" section to build the optimizer from; add one, e.g. '
                          f'"optimizer": {{"type": "AdamW", "params": {{"lr": 3e-4}}}}, or '
                          f'"{SECTION}": {{"optimizer": "adamw", "stage": 2, "lr": 3e-4}}')
    _refuse_conflicts(config)
    mapped = translate(config)
    ignored = list(mapped.ignored)
    kwargs = dict(mapped.optimizer_kwargs)
    mapped_name = kwargs.get("optimizer", "adamw")
    chosen = section.get("optimizer", mapped_name)
    own = _optimizer_kwargs(section, chosen)
    adamw_group = mapped.adamw_group
    if "optimizer" in section and config.get("optimizer") is not None:  # the section chooses
        kwargs, dropped = _carried_over(kwargs, chosen)
        ignored += [f"optimizer.params.{k} (not a hyperparameter of {chosen})" for k in dropped]
        if "use_muon" not in get_rule(chosen).defaults:
            adamw_group = {}
    elif mapped.differs:
        raise ConfigError(mapped.differs)
    kwargs.update(own)
    if "reduce_dtype" in kwargs:
        kwargs["reduce_dtype"] = _dtype(kwargs["reduce_dtype"])
    return Plan(deepspeed_config=_for_deepspeed(config), optimizer_kwargs=kwargs,
                param_dtype=torch.bfloat16 if _enabled(config, "bf16", "bfloat16") else None,
                gradient_clipping=_number_or_none(config.get("gradient_clipping")),
                adamw_group=dict(adamw_group), ignored=tuple(ignored))


def _refuse_auto(node, path: str = "") -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            _refuse_auto(value, f"{path}.{key}" if path else str(key))
    elif isinstance(node, list):
        for value in node:
            _refuse_auto(value, path)
    elif node == "auto":
        raise ConfigError(f'"{path}" is "auto": zeroopt takes values only. ZeroTrainer '
                          f'(--deepspeed) fills "auto" from TrainingArguments; elsewhere write '
                          f"the value (a trainer that fills in \"auto\" must do so before "
                          f"zeroopt.deepspeed.initialize)")


def _carried_over(mapped: dict, name: str) -> tuple[dict, list]:
    """The mapped arguments the rule ``name`` takes (ZeroOptimizer's own options always), and
    the names of the others."""
    rule, _ = get_preset(name)
    takes = (*OPTIONS, *STATE_DEFAULTS, *rule.defaults)
    kept = {k: v for k, v in mapped.items() if k in takes and k != "optimizer"}
    return kept, [k for k in mapped if k not in takes]


def _refuse_conflicts(config: dict) -> None:
    if _enabled(config, "fp16"):
        raise ConfigError('fp16 needs a loss scaler, which zeroopt does not have (it skips '
                          'steps whose gradients are not finite instead). Use '
                          '"bf16": {"enabled": true}')
    autocast = config.get("torch_autocast") or {}
    if autocast.get("enabled") and str(autocast.get("dtype")).replace("torch.", "") not in (
            "bf16", "bfloat16"):
        raise ConfigError('torch_autocast other than bfloat16 needs a GradScaler over '
                          'param.grad, which zeroopt consumes during backward. Set '
                          '"torch_autocast": {"enabled": true, "dtype": "bfloat16"}, or use '
                          '"bf16": {"enabled": true}')


def _optimizer_kwargs(section: dict, name: str) -> dict:
    """The "zeroopt" section as ZeroOptimizer's keyword arguments, its keys checked against
    ZeroOptimizer's options and the rule ``name``'s hyperparameters."""
    try:
        rule, preset = get_preset(name)
    except ValueError as error:
        raise ConfigError(f'"{SECTION}.optimizer": {error}') from None
    known = (*OPTIONS, *STATE_DEFAULTS, *rule.defaults)
    kwargs = {}
    for key, value in section.items():
        if key not in known:
            close = closest_name(key, known)
            hint = f' Did you mean "{close}"?' if close else ""
            raise ConfigError(f'unknown key "{key}" in the "{SECTION}" section.{hint} It takes '
                              f"ZeroOptimizer's options ({', '.join(OPTIONS)}) and {name}'s "
                              f"hyperparameters ({', '.join([*STATE_DEFAULTS, *rule.defaults])})."
                              f"{taken_elsewhere(key, rule)}")
        kwargs[key] = tuple(value) if isinstance(value, list) else value  # JSON has no tuples
    return kwargs


def _dtype(name) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        close = difflib.get_close_matches(str(name), DTYPES, n=1, cutoff=0.3)
        hint = f' Did you mean "{close[0]}"?' if close else ""
        raise ConfigError(f'"{SECTION}.reduce_dtype" must be one of {", ".join(DTYPES)}, got '
                          f"{name!r}.{hint}")
    return DTYPES[name]


def _for_deepspeed(config: dict) -> dict:
    out = copy.deepcopy(config)
    for key in TAKEN:
        out.pop(key, None)
    out["gradient_clipping"] = 0.0
    return out


def _number_or_none(value) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ConfigError(f"gradient_clipping must be a number >= 0 (0: off), got {value!r}")
    return float(value)


def _enabled(config: dict, *sections: str) -> bool:
    return any(bool((config.get(name) or {}).get("enabled", False)) for name in sections)
