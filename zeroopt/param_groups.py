"""Param groups for the low-rank rules (GaLore, APOLLO), built as Transformers builds them from
``optim_target_modules``."""

from __future__ import annotations

import re

from torch import nn


def galore_param_groups(model: nn.Module, target_modules: str | list[str], rank: int = 128,
                        **projection) -> list[dict]:
    """``[{"params": every other param}, {"params": the target Linear weights, "rank": rank,
    **projection}]``: the groups galore-torch's and apollo-torch's optimizers take.

    ``target_modules`` picks modules by name as Transformers' ``optim_target_modules`` does: a
    list of names (a module matches if it equals one, contains one, or fully matches one as a
    regex), one regex string (full match), or ``"all-linear"``. Only ``nn.Linear`` weights are
    projected (their 2-D matrices); biases and every other param stay in the first group and
    run the rule's plain update. ``projection`` holds the other keys (``update_proj_gap``,
    ``scale``, ``proj_type``; APOLLO's ``proj``, ``scale_type``); left out, they take the
    optimizer's defaults. Example::

        groups = zeroopt.galore_param_groups(model, ["attn", "mlp"], rank=128, scale=0.25)
        opt = zeroopt.ZeroOptimizer(groups, "galore_adamw", lr=1e-3)
    """
    if not isinstance(target_modules, (str, list, tuple)):
        raise TypeError(f"target_modules must be a list of module names, a regex string, or "
                        f"'all-linear', got {target_modules!r}")
    all_linear = isinstance(target_modules, str) and \
        target_modules.replace("_", "-") == "all-linear"
    targets = set()
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and (all_linear or _matches(target_modules, name)):
            targets.add(id(module.weight))
    if not targets:
        modules = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
        raise ValueError(f"no nn.Linear module matches target_modules={target_modules!r}; the "
                         f"model's Linear modules are: {', '.join(modules) or 'none'}")
    projected = [p for p in model.parameters() if id(p) in targets]
    others = [p for p in model.parameters() if id(p) not in targets]
    return [{"params": others}, {"params": projected, "rank": rank, **projection}]


def _matches(target_modules: str | list[str], name: str) -> bool:
    """Transformers' check_target_module_exists."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return (name in target_modules or any(key in name for key in target_modules)
            or any(re.fullmatch(key, name) for key in target_modules))
