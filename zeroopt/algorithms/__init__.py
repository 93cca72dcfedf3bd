"""The registry of update rules, by name.

Names follow HuggingFace Transformers' ``optim`` strings where one exists. Adding a rule is one
new file in this folder plus one ``register`` line below.
"""

from __future__ import annotations

from .adafactor import ADAFACTOR
from .adagrad import ADAGRAD
from .adalomo import ADALOMO
from .adam import ADAM, ADAMW
from .ademamix import ADEMAMIX
from .anyprecision import ADAMW_ANYPRECISION
from .apollo import APOLLO_ADAMW
from .base import ShardTensors, UpdateRule
from .came import CAME
from .galore import GALORE_ADAMW, GALORE_ADAMW_8BIT
from .grokadamw import GROKADAMW
from .lamb import LAMB
from .lars import LARS
from .lion import LION
from .lomo import LOMO
from .muon import MUON
from .normuon import NORMUON
from .reference import ReferenceOptimizer
from .rmsprop import RMSPROP
from .schedule_free import SCHEDULE_FREE_ADAMW
from .schedule_free_radam import SCHEDULE_FREE_RADAM
from .schedule_free_sgd import SCHEDULE_FREE_SGD
from .sgd import NESTEROV, SGD
from .stable_adamw import STABLE_ADAMW
from ..validation import closest_name

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


# Transformers' names for the same AdamW on XLA (torch_xla's syncfree AdamW) and on Ascend NPUs
# (torch_npu's NpuFusedAdamW): zeroopt runs its own kernels on every device.
register(ADAMW, aliases=("adamw_torch", "adamw_torch_fused", "adamw_torch_xla",
                         "adamw_torch_npu_fused"))
register(ADAM)
register(SGD)
register(NESTEROV)
register(LION, aliases=("lion_32bit",))
register(LAMB)
register(LARS)
register(ADAGRAD)
# Transformers' "rmsprop_bnb" is bitsandbytes' RMSprop with 32-bit states (its
# _get_bitsandbytes_optimizer sets optim_bits=8 only for names with "8bit"): no preset.
register(RMSPROP, aliases=("rmsprop_bnb", "rmsprop_bnb_32bit"))
register(ADEMAMIX)
register(SCHEDULE_FREE_ADAMW)
register(SCHEDULE_FREE_RADAM)
register(SCHEDULE_FREE_SGD)
register(STABLE_ADAMW)
register(GROKADAMW)
register(ADAMW_ANYPRECISION)  # states in chosen dtypes; bf16 ones stored bf16

# 8-bit and paged states (zeroopt.states), named as in HuggingFace Transformers' ``optim``.
for _name in ("adamw_8bit", "adamw_bnb_8bit", "adamw_torch_8bit"):
    register_alias(_name, ADAMW, state_precision="8bit")
for _name, _rule in (("lion_8bit", LION), ("lamb_8bit", LAMB), ("lars_8bit", LARS),
                     ("rmsprop_bnb_8bit", RMSPROP), ("adagrad_8bit", ADAGRAD),
                     ("ademamix_8bit", ADEMAMIX)):
    register_alias(_name, _rule, state_precision="8bit")
register_alias("sgd_8bit", SGD, state_precision="8bit", momentum=0.9)
# torchao's AdamW4bit, in blocks of 256 as Transformers builds it (states/fourbit.py).
register_alias("adamw_torch_4bit", ADAMW, state_precision="4bit", block_size=256)

# Rules that step some params whole (GaLore, APOLLO, Adafactor), named as in Transformers. The
# Trainer runs "adafactor" and "galore_adafactor" with scale_parameter and relative_step off.
register(GALORE_ADAMW)
register(GALORE_ADAMW_8BIT)
register(APOLLO_ADAMW)
_FIXED_LR = dict(scale_parameter=False, relative_step=False)
register(ADAFACTOR, **_FIXED_LR)
register_alias("galore_adafactor", ADAFACTOR, **_FIXED_LR)
register(CAME)  # not a Transformers name: optim_args="optimizer=came"
register(MUON)  # torch.optim.Muon; groups with use_muon=False run torch.optim.AdamW
register_alias("muon_8bit", MUON, state_precision="8bit")  # the momentum 8-bit blockwise
register(NORMUON)  # pytorch_optimizer.NorMuon; use_muon=False groups run its AdamW
for _name, _rule, _preset in (("galore_adamw", GALORE_ADAMW, {}),
                              ("galore_adamw_8bit", GALORE_ADAMW_8BIT, {}),
                              ("galore_adafactor", ADAFACTOR, _FIXED_LR),
                              ("apollo_adamw", APOLLO_ADAMW, {}),
                              ("muon", MUON, {})):
    register_alias(f"{_name}_layerwise", _rule, layerwise=True, **_preset)
# LOMO and AdaLomo (lomo-optim), as Transformers names them: layerwise by construction.
register(LOMO)
register(ADALOMO)
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
        ValueError: the name is not registered (the message says why, see ``get_preset``).
    """
    return get_preset(name)[0]


def get_preset(name: str) -> tuple[UpdateRule, dict]:
    """The rule a name stands for, and the hyperparameters the name presets.

    Args:
        name: a registered name or alias, any case.

    Returns:
        (the ``UpdateRule``, ``{hyperparameter: value}`` the name presets).

    Raises:
        ValueError: the name is not registered. The message says where an optimizer of that
            name lives (``ELSEWHERE``), or suggests the registered name it is a typo of
            (``zeroopt.validation.closest_name``), and lists every available name.
    """
    key = name.lower() if isinstance(name, str) else name
    if key in _RULES:
        return _RULES[key]
    raise ValueError(f"Unknown optimizer {name!r}{unknown_name_hint(key)} "
                     f"Available: {', '.join(available_optimizers())}")


# Optimizers zeroopt has no rule for that are asked for by name, and where each lives. Such a
# name gets a plain "no rule" message, not a registered name that is merely spelt alike ("adan"
# is not a misspelt "adam", nor "radam"). A name registered later wins over its entry here.
ELSEWHERE = {
    "soap": "SOAP, in pytorch-optimizer",
    "shampoo": "Shampoo, in pytorch-optimizer and Meta's distributed_shampoo",
    "adan": "Adan, in pytorch-optimizer",
    "prodigy": "Prodigy, in prodigyopt and pytorch-optimizer",
    "sophia": "Sophia, as SophiaH in pytorch-optimizer",
    "nadam": "NAdam, in torch.optim",
    "radam": "RAdam, in torch.optim",
    "adamax": "Adamax, in torch.optim; docs/ADDING_A_RULE.md adds it as a rule",
    "adamp": "AdamP, in pytorch-optimizer",
    "sgdw": "SGDW, in pytorch-optimizer",
    "adopt": "ADOPT is an option of adam and adamw here: optimizer='adamw', adopt=True",
    "grams": "Grams is an option of adam and adamw here: optimizer='adamw', grams=True",
    "cautious": "cautious is an option of adam, adamw and lion here: cautious=True",
}


def unknown_name_hint(name) -> str:
    """What to say about a name that is not registered, to follow it in a message: where an
    optimizer of that name lives (``ELSEWHERE``), else "Did you mean" the registered name it
    is a typo of, else nothing.

    Args:
        name: the unknown name (compared in lower case).

    Returns:
        ": zeroopt has no rule for it (SOAP, in pytorch-optimizer)." or ". Did you mean
        'adamw'?" or ".".
    """
    key = str(name).lower()
    if key in ELSEWHERE:
        return f": zeroopt has no rule for it ({ELSEWHERE[key]})."
    close = closest_name(key, _RULES)
    return f". Did you mean {close!r}?" if close else "."


__all__ = ["ELSEWHERE", "ReferenceOptimizer", "ShardTensors", "UpdateRule",
           "available_optimizers", "get_preset", "get_rule", "register", "register_alias",
           "registered_rules", "unknown_name_hint"]
