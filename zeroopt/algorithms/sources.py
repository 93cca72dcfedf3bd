"""The optimizer classes ``zeroopt.wrap`` builds each rule from, and how their options translate.

A rule lists its classes as ``Source``s in its own file, and ``Sources(...)`` is both its
``UpdateRule.wraps`` (is this optimizer one of them?) and, as ``.from_torch_options``, its
``UpdateRule.from_torch_options``. A class whose update is not the rule's, though its name
says it is, is listed with ``refuse``: wrap then says why instead of building the rule.

bitsandbytes' classes keep their options alike: the storage ones on ``optimizer.args``
(``optim_bits``, ``min_8bit_size``, ``max_unorm``, ``skip_zeros``) and ``optimizer.is_paged``,
and each rule's momentum-like hyperparameters packed into ``betas``. ``bitsandbytes(...)``
builds their sources: 8-bit classes (and ``optim_bits=8``) preset ``state_precision="8bit"``
with their ``min_8bit_size``, paged ones ``paged=True``; what zeroopt cannot honour (update-norm
clipping, ``skip_zeros``, percentile clipping, non-blockwise 8-bit, GlobalOptimManager's
per-param overrides) is refused with the reason.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Callable

import torch

from .base import is_exactly


@dataclass(frozen=True)
class Source:
    """One optimizer class ``zeroopt.wrap`` builds a rule from.

    Attributes:
        cls: the class, or its dotted path (``"bitsandbytes.optim.AdamW8bit"``): that package
            is never imported here (an instance of the class exists only once it is). Only
            that exact class matches: a subclass may change the update.
        when: ``(optimizer) -> bool``: a further condition on the instance, for a class that
            is one rule or another by its options (``torch.optim.Adam`` with
            ``decoupled_weight_decay=True`` is adamw). Default: always.
        options: ``(optimizer, options: dict) -> None``: translates, in place, one options
            dict (the defaults, then each param group) into the rule's hyperparameters
            (renames, unpacks, drops keys that only pick an implementation); raises ValueError
            for an option the rule does not follow. Default: taken as they are.
        preset: ``(optimizer) -> dict``: hyperparameters the instance implies outside its
            param groups (8-bit or paged states; ``maximize`` where the class keeps it on the
            instance); may raise ValueError for a setting zeroopt cannot honour. Default none.
        refuse: why this class, though named like the rule, is not the rule: wrap raises
            TypeError with it. Default None (the class is mapped).
    """

    cls: type | str
    when: Callable[[Any], bool] | None = None
    options: Callable[[Any, dict], None] | None = None
    preset: Callable[[Any], dict] | None = None
    refuse: str | None = None

    @property
    def path(self) -> str:
        """The class's public dotted path ("torch.optim.AdamW", "pytorch_optimizer.Lion")."""
        if isinstance(self.cls, str):
            return self.cls
        if getattr(torch.optim, self.cls.__name__, None) is self.cls:
            return f"torch.optim.{self.cls.__name__}"
        return f"{self.cls.__module__}.{self.cls.__qualname__}"

    def matches(self, optimizer) -> bool:
        """Whether ``optimizer`` is an instance of exactly this class (and ``when`` holds)."""
        return is_exactly(optimizer, self.cls) and (self.when is None or self.when(optimizer))


class Sources:
    """A rule's sources, as its ``wraps`` (call it on an optimizer) and ``from_torch_options``.

    Args:
        *sources: the ``Source``s, in the order to try them.
    """

    def __init__(self, *sources: Source):
        self.sources = sources

    def __call__(self, optimizer) -> bool:
        """``UpdateRule.wraps``: whether ``optimizer`` is one of these classes."""
        return self.find(optimizer) is not None

    def find(self, optimizer) -> Source | None:
        """The source ``optimizer`` matches, or None."""
        return next((s for s in self.sources if s.matches(optimizer)), None)

    def from_torch_options(self, optimizer, defaults: dict, groups: list[dict]) -> None:
        """``UpdateRule.from_torch_options``: translates ``defaults`` and each of ``groups``
        in place with the matching source's ``options``, then adds its ``preset`` to
        ``defaults``.

        Raises:
            TypeError: the source is one the rule refuses (``Source.refuse``).
            ValueError: an option or setting the rule does not follow.
        """
        source = self.find(optimizer)
        if source.refuse is not None:
            raise TypeError(f"zeroopt.wrap does not map {source.path}: {source.refuse}")
        preset = source.preset(optimizer) if source.preset else {}
        if source.options is not None:
            for options in (defaults, *groups):
                source.options(optimizer, options)
        defaults.update(preset)

    def mapped(self) -> list[str]:
        """The dotted paths of the classes these sources map (refused ones left out)."""
        return [s.path for s in self.sources if s.refuse is None]


def cannot(cls: str, option: str, value, why: str) -> ValueError:
    """The error for an option a source's rule does not follow."""
    return ValueError(f"zeroopt.wrap cannot map {cls}({option}={value!r}): {why}")


def drop(options: dict, *keys: str) -> None:
    """Remove ``keys`` (those that only pick an implementation) from ``options``."""
    for key in keys:
        options.pop(key, None)


def maximize_attribute(optimizer) -> dict:
    """pytorch-optimizer keeps ``maximize`` on the instance, not in its param groups."""
    return {"maximize": True} if getattr(optimizer, "maximize", False) else {}


def no_maximize(optimizer) -> dict:
    """For a rule without ``maximize``: refuses an instance that maximizes."""
    if getattr(optimizer, "maximize", False):
        raise cannot(class_path(optimizer), "maximize", True,
                     "this rule has no maximize; negate the loss instead")
    return {}


def class_path(optimizer) -> str:
    """``optimizer``'s class as the shortest dotted path its package exports it under
    ("pytorch_optimizer.Lion", "bitsandbytes.optim.AdamW8bit"), for messages."""
    cls = type(optimizer)
    parts = cls.__module__.split(".")
    for end in range(1, len(parts) + 1):
        module = sys.modules.get(".".join(parts[:end]))
        if getattr(module, cls.__name__, None) is cls:
            return f"{'.'.join(parts[:end])}.{cls.__name__}"
    return f"{cls.__module__}.{cls.__qualname__}"


def decoupled_decay(rule: str, fixed_decay: bool = True) -> Callable[[Any, dict], None]:
    """pytorch-optimizer's options: ``weight_decouple`` must be on (zeroopt's ``rule`` decays
    the weights by lr * weight_decay, AdamW's way) and, where the class has it,
    ``fixed_decay`` off, unless the group does not decay at all; ``foreach`` only picks a
    kernel."""
    def options(optimizer, group: dict) -> None:
        decays = bool(group.get("weight_decay"))
        if not group.pop("weight_decouple", True) and decays:
            raise cannot(class_path(optimizer), "weight_decouple", False,
                         f"it adds weight_decay * w to the gradient (L2); zeroopt's {rule} "
                         f"decays the weights, AdamW's way: pass weight_decouple=True")
        if fixed_decay and group.pop("fixed_decay", False) and decays:
            raise cannot(class_path(optimizer), "fixed_decay", True,
                         f"it decays by weight_decay alone; zeroopt's {rule} decays by lr * "
                         f"weight_decay: pass fixed_decay=False")
        drop(group, "foreach")

    return options


# --- bitsandbytes ------------------------------------------------------------------------------

BITSANDBYTES = "bitsandbytes.optim"


def bitsandbytes(*names: str, options: Callable[[Any, dict], None] | None = None,
                 refuse: str | None = None) -> tuple[Source, ...]:
    """Sources for bitsandbytes' classes ``bitsandbytes.optim.<name>``.

    Args:
        *names: the class names (``"AdamW"``, ``"PagedAdamW8bit"``...).
        options: the rule's translation of each options dict, after the keys every
            bitsandbytes class carries but that rule's do not use (AdEMAMix's ``alpha``,
            ``t_alpha``, ``t_beta3`` at their off values) are dropped.
        refuse: the reason these classes are not the rule (see ``Source.refuse``).

    Returns:
        One ``Source`` per name; each presets 8-bit and paged states from the instance.
    """
    def translate(optimizer, group: dict) -> None:
        if optimizer.optimizer_name != "ademamix":
            if group.get("alpha", 0.0) == 0.0 and group.get("t_alpha") is None \
                    and group.get("t_beta3") is None:
                drop(group, "alpha", "t_alpha", "t_beta3")
        if options is not None:
            options(optimizer, group)

    return tuple(Source(f"{BITSANDBYTES}.{name}", options=translate, preset=bitsandbytes_preset,
                        refuse=refuse) for name in names)


def bitsandbytes_preset(optimizer) -> dict:
    """The state options a bitsandbytes optimizer implies: 8-bit states (with its
    ``min_8bit_size``) for ``optim_bits=8``, paged for ``is_paged``; ValueError for settings
    zeroopt does not follow."""
    cls, args = class_path(optimizer), optimizer.args
    refused = {  # option: (its value, the value zeroopt follows, why)
        "max_unorm": (getattr(args, "max_unorm", 0.0), 0.0,
                      "bitsandbytes scales the update down to max_unorm * ||param||; zeroopt "
                      "has no update-norm clipping (clip_grad_norm_ clips the gradient)"),
        "skip_zeros": (getattr(args, "skip_zeros", False), False,
                       "zeroopt updates every element, zero gradients included"),
        "percentile_clipping": (getattr(args, "percentile_clipping", 100), 100,
                                "zeroopt has no percentile clipping (clip_grad_norm_ clips by "
                                "norm)"),
        "block_wise": (getattr(args, "block_wise", True), True,
                       "zeroopt's 8-bit states are block-wise (256 elements a block)"),
    }
    for option, (value, ours, why) in refused.items():
        if value != ours:
            raise cannot(cls, option, value, why)
    overridden = _overridden_params(optimizer)
    if overridden:
        raise ValueError(f"zeroopt.wrap cannot map {cls}: bitsandbytes' GlobalOptimManager "
                         f"overrides the config of {overridden} of its params. Give those "
                         f"params a param group of their own with the values instead "
                         f"(state_precision='32bit' for optim_bits=32)")
    preset = {}
    if args.optim_bits == 8:
        preset.update(state_precision="8bit", min_8bit_size=args.min_8bit_size)
    elif args.optim_bits != 32:
        raise cannot(cls, "optim_bits", args.optim_bits, "zeroopt keeps 32-bit or 8-bit states")
    if getattr(optimizer, "is_paged", False):
        preset["paged"] = True
    return preset


def _overridden_params(optimizer) -> int:
    """How many of the optimizer's params GlobalOptimManager holds a config override for."""
    manager = getattr(optimizer, "mng", None)
    if manager is None:
        return 0
    ids = {id(p) for group in optimizer.param_groups for p in group["params"]}
    triples = {id(getattr(module, name, None))
               for module, name, _ in getattr(manager, "module_weight_config_triple", ())}
    return len(ids & (set(getattr(manager, "pid2config", {})) | triples))


def unpack_betas(rule: str, first: str, second: str, second_off) -> Callable[[Any, dict], None]:
    """bitsandbytes' 1-state classes keep two hyperparameters as ``betas``: RMSprop's
    (alpha, momentum), SGD's (momentum, dampening). Its kernels ignore the second (RMSprop
    has one state, SGD no dampening), so wrap refuses it unless off: zeroopt's rule would
    apply it."""
    def options(optimizer, group: dict) -> None:
        betas = group.pop("betas", None)
        if betas is None:
            return
        value, ignored = betas[0], betas[1]
        if ignored != second_off:
            raise cannot(class_path(optimizer), second, ignored,
                         f"bitsandbytes' kernel ignores it, and zeroopt's rule would apply it: "
                         f"pass {second}={second_off!r}, or build ZeroOptimizer(params, "
                         f"{rule!r}, {second}=...) for the update with it")
        group[first] = value

    return options


# --- torch-optimi ------------------------------------------------------------------------------


def optimi_options(optimizer, group: dict) -> None:
    """torch-optimi's options: ``beta1``/``beta2`` (kept apart in its groups) packed into
    ``betas``; ``foreach``, ``triton`` and its ``setup`` flag only pick an implementation;
    ``gradient_release`` (each param stepped inside backward, by hooks) refused."""
    if group.get("gradient_release"):
        raise cannot(class_path(optimizer), "gradient_release", True,
                     "optimi steps each param inside backward, through register_gradient_"
                     "release's hooks; zeroopt steps its shards in step(), after the gradients "
                     "are reduced: pass gradient_release=False")
    if "beta1" in group or "beta2" in group:
        group["betas"] = (group.pop("beta1"), group.pop("beta2"))
    drop(group, "gradient_release", "foreach", "triton", "setup")


def optimi_preset(optimizer) -> dict:
    """Refuses optimi's ``optimizer_accumulation`` (gradients accumulated into the states
    during gradient release instead of a step)."""
    if getattr(optimizer, "optimizer_accumulation", False):
        raise cannot(class_path(optimizer), "optimizer_accumulation", True,
                     "it accumulates gradients into the states during gradient release; "
                     "zeroopt has no gradient release: accumulate in the gradients (no_sync)")
    return {}


# --- schedulefree ------------------------------------------------------------------------------


def schedulefree(name: str) -> Source:
    """facebookresearch/schedule_free's ``schedulefree.<name>``: its groups as they are but
    ``train_mode``. Its classes start in eval mode and zeroopt's in train mode; an optimizer
    that has not stepped has no z yet, so its params are both y and x and the mode moves
    nothing: the wrapped one starts in train mode (call ``eval()`` on it as on the package's)."""
    def options(optimizer, group: dict) -> None:
        if "train_mode" in group:
            group["train_mode"] = True

    return Source(f"schedulefree.{name}", options=options)


# --- torchao -----------------------------------------------------------------------------------


def torchao_4bit_options(optimizer, group: dict) -> None:
    """torchao's ``AdamW4bit``: its groups' ``lr`` is an fp32 tensor (as a float, the value it
    steps with); ``amsgrad`` refused (torchao keeps its running maximum on the unsigned 4-bit
    map, zeroopt on the signed one)."""
    if isinstance(group.get("lr"), torch.Tensor):
        group["lr"] = group["lr"].item()
    if group.get("amsgrad"):
        raise cannot(class_path(optimizer), "amsgrad", True,
                     "torchao stores amsgrad's running maximum on its unsigned 4-bit map, "
                     "zeroopt on the signed one, so the two runs differ; build "
                     "ZeroOptimizer(params, 'adamw', amsgrad=True, state_precision='4bit') for "
                     "zeroopt's")


def torchao_4bit_preset(optimizer) -> dict:
    """4-bit states in the instance's ``block_size``, for params of at least 4096 elements (as
    torchao picks them: only whole blocks, as zeroopt too); ``bf16_stochastic_round``
    refused."""
    cls = class_path(optimizer)
    if optimizer.bf16_stochastic_round:
        raise cannot(cls, "bf16_stochastic_round", True,
                     "zeroopt rounds bf16 params to nearest from their fp32 masters")
    block = optimizer.block_size
    if not isinstance(block, int) or block < 2 or block % 2 or 256 % block:
        raise cannot(cls, "block_size", block,
                     "zeroopt's 4-bit blocks are even and divide 256 (so no block straddles "
                     "two ranks): 2, 4, ..., 128 (torchao's default) or 256")
    return dict(state_precision="4bit", block_size=block, min_8bit_size=4096)


TORCHAO_8BIT_REFUSED = (
    "torchao's 8-bit states are not zeroopt's: it quantizes only params whose size is a whole "
    "number of its blocks (zeroopt's 8-bit, bitsandbytes' format, every param of at least "
    "min_8bit_size elements), and it picks the code above a midpoint by an fp32 comparison "
    "(zeroopt the lower at a tie), so the states take other codes and the runs part. Build "
    "ZeroOptimizer(params, 'adamw', state_precision='8bit') for bitsandbytes' 8-bit format, "
    "or wrap torchao.optim.AdamW4bit")
