"""``zeroopt.wrap(torch_optimizer)``: the ZeroOptimizer equivalent of an existing optimizer.

Which rule an optimizer is, and how its options translate, are the rules' own facts
(``UpdateRule.wraps`` and ``from_torch_options``)."""

from __future__ import annotations

import torch

from .algorithms import UpdateRule, registered_rules
from .optimizer import ZeroOptimizer
from .checkpoint.torch_interop import IMPLEMENTATION_KEYS


def wrap(optimizer: torch.optim.Optimizer, *, stage: int = 1, process_group=None,
         **options) -> ZeroOptimizer:
    """Build the ZeroOptimizer with the same params, param groups and hyperparameters as
    ``optimizer`` (torch.optim.AdamW, Adam or SGD, or lion_pytorch.Lion).

    ``optimizer`` must not have stepped yet; to carry existing state over, pass its
    ``state_dict()`` to the new optimizer's ``load_state_dict``."""
    rule = next((r for r in registered_rules() if r.wraps and r.wraps(optimizer)), None)
    if rule is None:
        raise TypeError(
            f"zeroopt.wrap cannot map {type(optimizer).__module__}.{type(optimizer).__name__}: "
            f"it maps {_wrapped_classes()}. Build zeroopt.ZeroOptimizer(params, "
            "optimizer=NAME, ...) directly with a name from zeroopt.available_optimizers().")
    if optimizer.state:
        raise ValueError("zeroopt.wrap takes an optimizer that has not stepped yet; to carry "
                         "its state, call load_state_dict(old.state_dict()) on the result")
    groups = [{k: v for k, v in group.items() if k not in IMPLEMENTATION_KEYS}
              for group in optimizer.param_groups]
    defaults = {k: v for k, v in optimizer.defaults.items() if k not in IMPLEMENTATION_KEYS}
    if rule.from_torch_options:
        rule.from_torch_options(optimizer, defaults, groups)
    return ZeroOptimizer(groups, rule.name, stage=stage, process_group=process_group,
                         **defaults, **options)


def _wrapped_classes() -> str:
    """The classes wrap maps, for its message: "torch.optim.AdamW, ... and lion_pytorch.Lion"."""
    names = list(dict.fromkeys(_class_name(r) for r in registered_rules() if r.wraps))
    return " and ".join(filter(None, [", ".join(names[:-1]), names[-1]]))


def _class_name(rule: UpdateRule) -> str:
    spec = rule.torch_class
    if spec is None or isinstance(spec, str):
        return spec or repr(rule.name)
    if getattr(torch.optim, spec.__name__, None) is spec:
        return f"torch.optim.{spec.__name__}"
    return f"{spec.__module__}.{spec.__qualname__}"
