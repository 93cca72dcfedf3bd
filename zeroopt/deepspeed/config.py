"""The "zeroopt" section of a DeepSpeed config, and the config DeepSpeed itself is given.

The section holds ZeroOptimizer's keyword arguments: ``optimizer`` (a name from
``zeroopt.available_optimizers()``), the rule's hyperparameters and state options
(``state_precision``, ``min_8bit_size``, ``paged``), and the optimizer's own (``stage``,
``bucket_numel``, ``reduce_dtype``, ...)::

    "zeroopt": {"optimizer": "adamw_8bit", "stage": 2, "lr": 3e-4, "betas": [0.9, 0.95],
                "weight_decay": 0.1, "bucket_numel": 4194304}

What DeepSpeed gets instead is the same config less what zeroopt now does itself:

- "zeroopt": built into a ZeroOptimizer, handed to DeepSpeed as a client optimizer;
- "bf16": the model's params are cast to bf16 before ZeroOptimizer is built (it keeps the fp32
  masters). Left in, DeepSpeed would wrap the optimizer in its own bf16 optimizer, with masters
  and gradient reduction of its own;
- "gradient_clipping": clipped by ZeroOptimizer.clip_grad_norm_, by the config's value or, if
  it has none, DeepSpeed's default (1.0 in DeepSpeed 0.19.8: absent is not off). DeepSpeed gets
  0: its own clip reads param.grad, which zeroopt consumes during backward (on an empty list it
  fails with an IndexError).

Sections the two would fight over are refused with the fix named: an "optimizer" section,
zero_optimization.stage > 0, fp16, torch_autocast in float16.
"""

from __future__ import annotations

import copy
import difflib
from dataclasses import dataclass

import torch

from ..algorithms import get_preset
from ..states.kinds import STATE_DEFAULTS
from ..validation import closest_name, taken_elsewhere

SECTION = "zeroopt"
# ZeroOptimizer's own arguments; every other key must be a hyperparameter of the rule.
OPTIONS = ("optimizer", "stage", "bucket_numel", "reduce_dtype", "skip_nonfinite",
           "window_numel", "page_dir", "backend", "shard_size")
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
          "bfloat16": torch.bfloat16, "fp64": torch.float64, "float64": torch.float64}


class ConfigError(ValueError):
    """A DeepSpeed config that zeroopt cannot run as it is; the message names the fix."""


@dataclass
class Plan:
    """A DeepSpeed config split by ``plan`` into zeroopt's part and DeepSpeed's.

    Attributes:
        deepspeed_config: what ``deepspeed.initialize`` gets.
        optimizer_kwargs: ``ZeroOptimizer(params, **optimizer_kwargs)``.
        param_dtype: bf16 when the config's bf16 section is enabled, else None.
        gradient_clipping: the config's ``gradient_clipping``; 0: none; None: DeepSpeed's
            default (1.0 in 0.19).
    """

    deepspeed_config: dict  # what deepspeed.initialize gets
    optimizer_kwargs: dict  # ZeroOptimizer(params, **optimizer_kwargs)
    param_dtype: torch.dtype | None  # bf16 when the config's bf16 section is enabled
    gradient_clipping: float | None  # 0: none; None: DeepSpeed's default (1.0 in 0.19)


def plan(config: dict) -> Plan:
    """Split a DeepSpeed config into zeroopt's part and DeepSpeed's; every check runs here,
    before any process joins a collective."""
    if not isinstance(config, dict):
        raise ConfigError(f"a DeepSpeed config is a dict (or a JSON file's path), got "
                          f"{type(config).__name__}")
    section = config.get(SECTION)
    if not isinstance(section, dict):
        raise ConfigError(f'the DeepSpeed config has no "{SECTION}" section (a dict) to build '
                          f'the optimizer from; add one, e.g. "{SECTION}": {{"optimizer": '
                          f'"adamw", "stage": 2, "lr": 3e-4}}, or call deepspeed.initialize '
                          f"to run without zeroopt")
    _refuse_conflicts(config)
    return Plan(deepspeed_config=_for_deepspeed(config),
                optimizer_kwargs=_optimizer_kwargs(section),
                param_dtype=torch.bfloat16 if _enabled(config, "bf16", "bfloat16") else None,
                gradient_clipping=_number_or_none(config.get("gradient_clipping")))


def _refuse_conflicts(config: dict) -> None:
    if "optimizer" in config:
        raise ConfigError(f'the config has both an "optimizer" section and a "{SECTION}" section, '
                          f'and both choose the optimizer. Move its type and params into '
                          f'"{SECTION}" (e.g. "{SECTION}": {{"optimizer": "adamw", "lr": 3e-4, '
                          f'"weight_decay": 0.1}}) and delete "optimizer"')
    stage = (config.get("zero_optimization") or {}).get("stage", 0)
    if stage != 0:
        raise ConfigError(f'zero_optimization.stage={stage} would make DeepSpeed shard the '
                          f'optimizer (and reduce the gradients) as well as zeroopt. Put '
                          f'"stage": {min(max(int(stage), 1), 2)} in the "{SECTION}" section '
                          f'and remove zero_optimization (or set its stage to 0)')
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


def _optimizer_kwargs(section: dict) -> dict:
    name = section.get("optimizer", "adamw")
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
        if value == "auto":
            raise ConfigError(f'"{SECTION}.{key}" is "auto": zeroopt takes values only (a '
                              f"trainer that fills in \"auto\" must do so before "
                              f"zeroopt.deepspeed.initialize)")
        kwargs[key] = tuple(value) if isinstance(value, list) else value  # JSON has no tuples
    if "reduce_dtype" in kwargs:
        kwargs["reduce_dtype"] = _dtype(kwargs["reduce_dtype"])
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
    for key in (SECTION, "bf16", "bfloat16", "fp16"):
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
