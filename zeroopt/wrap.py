"""``zeroopt.wrap(torch_optimizer)``: the ZeroOptimizer equivalent of an existing optimizer."""

from __future__ import annotations

import torch

from .optimizer import ZeroOptimizer
from .checkpoint.torch_interop import IMPLEMENTATION_KEYS as _IMPLEMENTATION_KEYS


def _rule_name(optimizer: torch.optim.Optimizer) -> str | None:
    cls = type(optimizer)
    if cls is torch.optim.AdamW:
        return "adamw"
    if cls is torch.optim.Adam:
        # torch 2.x Adam(decoupled_weight_decay=True) is AdamW.
        return "adamw" if optimizer.defaults.get("decoupled_weight_decay") else "adam"
    if cls is torch.optim.SGD:
        return "sgd"
    if cls.__module__.startswith("lion_pytorch") and cls.__name__ == "Lion":
        return "lion"
    return None


def wrap(optimizer: torch.optim.Optimizer, *, stage: int = 1, process_group=None,
         **options) -> ZeroOptimizer:
    """Build the ZeroOptimizer with the same params, param groups and hyperparameters as
    ``optimizer`` (torch.optim.AdamW, Adam or SGD, or lion_pytorch.Lion).

    ``optimizer`` must not have stepped yet; to carry existing state over, pass its
    ``state_dict()`` to the new optimizer's ``load_state_dict``."""
    name = _rule_name(optimizer)
    if name is None:
        raise TypeError(
            f"zeroopt.wrap cannot map {type(optimizer).__module__}.{type(optimizer).__name__}: "
            "it maps torch.optim.AdamW, Adam and SGD, and lion_pytorch.Lion. Build "
            "zeroopt.ZeroOptimizer(params, optimizer=NAME, ...) directly with a name from "
            "zeroopt.available_optimizers().")
    if optimizer.state:
        raise ValueError("zeroopt.wrap takes an optimizer that has not stepped yet; to carry "
                         "its state, call load_state_dict(old.state_dict()) on the result")
    groups = [{k: v for k, v in group.items() if k not in _IMPLEMENTATION_KEYS}
              for group in optimizer.param_groups]
    defaults = {k: v for k, v in optimizer.defaults.items() if k not in _IMPLEMENTATION_KEYS}
    if name == "lion":
        if getattr(optimizer, "decoupled_wd", False):
            # lion_pytorch then decays by lr * wd / initial_lr: a different rule.
            raise ValueError("zeroopt.wrap cannot map lion_pytorch.Lion(decoupled_weight_decay="
                             "True); use decoupled_weight_decay=False and scale weight_decay")
        defaults.pop("use_triton", None)
        for group in groups:
            group.pop("use_triton", None)
    return ZeroOptimizer(groups, name, stage=stage, process_group=process_group,
                         **defaults, **options)
