"""The registry of update rules, by name.

Names follow HuggingFace Transformers' ``optim`` strings where one exists. Adding a rule is one
new file in this folder plus one ``register`` line below.
"""

from __future__ import annotations

import difflib

from .adagrad import ADAGRAD
from .adam import ADAM, ADAMW
from .ademamix import ADEMAMIX
from .base import ShardTensors, UpdateRule
from .lamb import LAMB
from .lars import LARS
from .lion import LION
from .reference import ReferenceOptimizer
from .rmsprop import RMSPROP
from .schedule_free import SCHEDULE_FREE_ADAMW
from .sgd import NESTEROV, SGD

_RULES: dict[str, UpdateRule] = {}


def register(rule: UpdateRule, aliases: tuple[str, ...] = ()) -> None:
    for name in (rule.name, *aliases):
        if name in _RULES:
            raise ValueError(f"optimizer name {name!r} is already registered")
        _RULES[name] = rule


register(ADAMW, aliases=("adamw_torch", "adamw_torch_fused"))
register(ADAM)
register(SGD)
register(NESTEROV)
register(LION, aliases=("lion_32bit",))
register(LAMB)
register(LARS)
register(ADAGRAD)
register(RMSPROP)
register(ADEMAMIX)
register(SCHEDULE_FREE_ADAMW)


def available_optimizers() -> list[str]:
    """Every name ``ZeroOptimizer(optimizer=...)`` accepts, aliases included."""
    return sorted(_RULES)


def get_rule(name: str) -> UpdateRule:
    key = name.lower() if isinstance(name, str) else name
    if key in _RULES:
        return _RULES[key]
    close = difflib.get_close_matches(str(key), _RULES, n=1, cutoff=0.5)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ValueError(f"Unknown optimizer {name!r}.{hint} "
                     f"Available: {', '.join(available_optimizers())}")


__all__ = ["ReferenceOptimizer", "ShardTensors", "UpdateRule", "available_optimizers",
           "get_rule", "register"]
