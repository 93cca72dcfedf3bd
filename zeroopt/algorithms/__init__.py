"""The registry of update rules, by name.

Names follow HuggingFace Transformers' ``optim`` strings where one exists. Adding a rule is one
new file in this folder plus one ``register`` line below.
"""

from __future__ import annotations

import difflib

from .adafactor import ADAFACTOR
from .adagrad import ADAGRAD
from .adam import ADAM, ADAMW
from .ademamix import ADEMAMIX
from .apollo import APOLLO_ADAMW
from .base import ShardTensors, UpdateRule
from .galore import GALORE_ADAMW, GALORE_ADAMW_8BIT
from .lamb import LAMB
from .lars import LARS
from .lion import LION
from .reference import ReferenceOptimizer
from .rmsprop import RMSPROP
from .schedule_free import SCHEDULE_FREE_ADAMW
from .schedule_free_radam import SCHEDULE_FREE_RADAM
from .schedule_free_sgd import SCHEDULE_FREE_SGD
from .sgd import NESTEROV, SGD

# name -> (rule, hyperparameters the name presets)
_RULES: dict[str, tuple[UpdateRule, dict]] = {}


def register(rule: UpdateRule, aliases: tuple[str, ...] = (), **preset) -> None:
    """Make ``rule`` available to ``ZeroOptimizer(optimizer=...)`` under its name.

    Args:
        rule: the ``UpdateRule``; it is registered under ``rule.name``.
        aliases: further names for the same rule and preset (default none).
        **preset: hyperparameters every one of these names sets (default none), as
            ``get_preset`` returns them.

    Raises:
        ValueError: ``rule.name`` or an alias is already registered.
    """
    for name in (rule.name, *aliases):
        if name in _RULES:
            raise ValueError(f"optimizer name {name!r} is already registered")
        _RULES[name] = (rule, preset)


def register_alias(name: str, rule: UpdateRule, **preset) -> None:
    """Another name for ``rule`` with some hyperparameters preset (the user's own win)."""
    if name in _RULES:
        raise ValueError(f"optimizer name {name!r} is already registered")
    _RULES[name] = (rule, preset)


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
register(SCHEDULE_FREE_RADAM)
register(SCHEDULE_FREE_SGD)

# 8-bit and paged states (zeroopt.states), named as in HuggingFace Transformers' ``optim``.
for _name in ("adamw_8bit", "adamw_bnb_8bit", "adamw_torch_8bit"):
    register_alias(_name, ADAMW, state_precision="8bit")
for _name, _rule in (("lion_8bit", LION), ("lamb_8bit", LAMB), ("lars_8bit", LARS),
                     ("rmsprop_bnb_8bit", RMSPROP), ("adagrad_8bit", ADAGRAD),
                     ("ademamix_8bit", ADEMAMIX)):
    register_alias(_name, _rule, state_precision="8bit")
register_alias("sgd_8bit", SGD, state_precision="8bit", momentum=0.9)

# Rules that step some params whole (GaLore, APOLLO, Adafactor), named as in Transformers. The
# Trainer runs "adafactor" and "galore_adafactor" with scale_parameter and relative_step off.
register(GALORE_ADAMW)
register(GALORE_ADAMW_8BIT)
register(APOLLO_ADAMW)
_FIXED_LR = dict(scale_parameter=False, relative_step=False)
register(ADAFACTOR, **_FIXED_LR)
register_alias("galore_adafactor", ADAFACTOR, **_FIXED_LR)
for _name, _rule, _preset in (("galore_adamw", GALORE_ADAMW, {}),
                              ("galore_adamw_8bit", GALORE_ADAMW_8BIT, {}),
                              ("galore_adafactor", ADAFACTOR, _FIXED_LR),
                              ("apollo_adamw", APOLLO_ADAMW, {})):
    register_alias(f"{_name}_layerwise", _rule, layerwise=True, **_preset)
for _base, _rule in (("adamw", ADAMW), ("lion", LION), ("ademamix", ADEMAMIX)):
    register_alias(f"paged_{_base}_32bit", _rule, paged=True)
    register_alias(f"paged_{_base}_8bit", _rule, paged=True, state_precision="8bit")


def available_optimizers() -> list[str]:
    """Every name ``ZeroOptimizer(optimizer=...)`` accepts, aliases included."""
    return sorted(_RULES)


def registered_rules() -> list[UpdateRule]:
    """Every registered rule once, in the order registered (aliases not repeated)."""
    return list({id(rule): rule for rule, _ in _RULES.values()}.values())


def get_rule(name: str) -> UpdateRule:
    """The rule a name stands for (``get_preset(name)[0]``, without the preset).

    Args:
        name: a registered name or alias, any case.

    Returns:
        The ``UpdateRule``.

    Raises:
        ValueError: the name is not registered (the message suggests the closest one).
    """
    return get_preset(name)[0]


def get_preset(name: str) -> tuple[UpdateRule, dict]:
    """The rule a name stands for, and the hyperparameters the name presets."""
    key = name.lower() if isinstance(name, str) else name
    if key in _RULES:
        return _RULES[key]
    close = difflib.get_close_matches(str(key), _RULES, n=1, cutoff=0.5)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ValueError(f"Unknown optimizer {name!r}.{hint} "
                     f"Available: {', '.join(available_optimizers())}")


__all__ = ["ReferenceOptimizer", "ShardTensors", "UpdateRule", "available_optimizers",
           "get_preset", "get_rule", "register", "register_alias", "registered_rules"]
