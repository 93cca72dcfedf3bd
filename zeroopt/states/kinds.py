"""Which form a param's optimizer states take: precision (32-bit, bf16, 8-bit or 4-bit
blockwise) and whether they are paged out of device memory.

Every rule takes four extra hyperparameters, per param group:

- ``state_precision``: "32bit" (default), "bf16", "8bit" (bitsandbytes' blockwise format) or
  "4bit" (torchao's ``AdamW4bit`` format: ``states/fourbit.py``);
- ``min_8bit_size``: params with fewer elements keep 32-bit states under "8bit" or "4bit"
  (bitsandbytes' rule, default 4096, which torchao's 4-bit optimizers follow too). Decided on
  the param's full size, never its shard, so one model gets the same precisions at every world
  size. Under "4bit", a param whose size is not a multiple of the block keeps 32-bit states
  too, as in torchao. To keep, say, the embeddings 32-bit, give them a param group with
  ``state_precision="32bit"``;
- ``block_size``: elements per quantization block. None (default) is the precision's own: 256
  for "8bit" (bitsandbytes', the only one it takes), 128 for "4bit" (torchao's ``AdamW4bit``;
  Transformers' ``adamw_torch_4bit`` passes 256). A 4-bit block is even and divides 256, so
  blocks never straddle ranks;
- ``paged``: keep the states off the compute device (a memory-mapped file for a CPU shard,
  pinned host memory for an accelerator's) and stream them through a bounded window.

Params a rule steps whole (GaLore's projected matrices, Adafactor's factored ones: see
``UpdateRule.whole_tensors``) are a kind of their own: each is owned whole by one rank, and its
states, whatever their shape, are kept per tensor on that rank (``states/tensor_states.py``).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from .blockwise import BLOCK
from .fourbit import DEFAULT_BLOCK as BLOCK_4BIT

PRECISIONS = ("32bit", "bf16", "8bit", "4bit")
STATE_DEFAULTS = dict(state_precision="32bit", min_8bit_size=4096, block_size=None, paged=False)
# Blocks must not straddle ranks: a 4-bit block divides the layout's padding of every chunk.
_ALIGNMENT = 256  # zeroopt.layout.DEFAULT_PAD_MULTIPLE


@dataclass(frozen=True)
class StateKind:
    """The form a param's states take (see the module docstring).

    Attributes:
        precision: "32bit" (default), "bf16", "8bit" or "4bit" (one of ``PRECISIONS``).
        paged: whether the states are kept off the compute device (default False).
        whole: whether the param is owned whole by one rank and stepped tensor by tensor
            (``UpdateRule.whole_tensors``; default False).
        block: elements per 4-bit block (``block_size``); None for the other precisions.
    """

    precision: str = "32bit"
    paged: bool = False
    whole: bool = False  # owned whole by one rank, stepped tensor by tensor
    block: int | None = None  # 4-bit only: elements per quantization block

    @property
    def block_numel(self) -> int:
        """Params of this kind start on, and fill, whole blocks of this many elements."""
        if self.whole:
            return 1
        return BLOCK if self.precision == "8bit" else self.block or 1

    @property
    def in_place(self) -> bool:
        """Resident 32-bit states are stepped in place; every other kind through a window.
        Whole tensors keep no states in the flat shard: nothing to window."""
        return self.whole or (self.precision == "32bit" and not self.paged)


def kind_of(group: dict, numel: int, whole: bool = False) -> StateKind:
    """``whole``: the param is stepped whole (its 8-bit choice is then made per state, on
    the state's own size, as bitsandbytes makes it for GaLore's low-rank moments)."""
    if whole:
        return StateKind(group["state_precision"], False, whole=True)
    precision = group["state_precision"]
    if precision in ("8bit", "4bit") and numel < group["min_8bit_size"]:
        precision = "32bit"
    if precision == "4bit":
        block = block_size(group)
        if numel % block:  # torchao's rule: only whole blocks are quantized
            return StateKind("32bit", bool(group["paged"]))
        return StateKind(precision, bool(group["paged"]), block=block)
    return StateKind(precision, bool(group["paged"]))


def block_size(group: dict) -> int:
    """Elements per quantization block of the group's precision (``block_size``, or the
    precision's default)."""
    if group.get("block_size") is not None:
        return group["block_size"]
    return BLOCK_4BIT if group["state_precision"] == "4bit" else BLOCK


def validate(group: dict, rule) -> None:
    """Check a group's state-storage options for ``rule``.

    Args:
        group: the param group (its ``state_precision``, ``min_8bit_size`` and ``paged``).
        rule: the ``UpdateRule``.

    Raises:
        ValueError: an unknown ``state_precision`` (the closest one suggested); a
            ``min_8bit_size`` that is not a non-negative int; a ``block_size`` that is not
            None, or an even int dividing 256 for "4bit", or 256 for "8bit"; a ``paged`` that
            is not a bool;
            ``paged=True`` for params the rule steps whole; or a precision other than
            "32bit" where the rule keeps a state in 32-bit (``full_precision_states``) or
            keeps no state at all for this group.
    """
    precision = group["state_precision"]
    if precision not in PRECISIONS:
        close = difflib.get_close_matches(str(precision), PRECISIONS, n=1, cutoff=0.3)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"Unknown state_precision {precision!r}.{hint} "
                         f"It takes one of {', '.join(map(repr, PRECISIONS))}")
    size = group["min_8bit_size"]
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise ValueError(f"min_8bit_size must be a non-negative int, got {size!r}")
    _check_block_size(group)
    if not isinstance(group["paged"], bool):
        raise ValueError(f"paged must be True or False, got {group['paged']!r}")
    if rule.whole_tensors(group):
        if group["paged"]:
            raise ValueError(f"paged=True: {rule.name} steps these params whole, one tensor at "
                             f"a time, with small per-tensor states (low-rank or factored); "
                             f"paging is for the flat states of element-wise rules. Use "
                             f"paged=False")
        return
    if precision == "32bit":
        return
    exact = set(rule.states(group)) & set(rule.full_precision_states)
    if exact:
        raise ValueError(f"{rule.name} keeps {sorted(exact)} in 32-bit: it is a point in "
                         f"parameter space, not a statistic, and rounding it moves the model. "
                         f"Use state_precision='32bit' (paged=True still saves device memory)")
    if not rule.states(group):
        raise ValueError(f"state_precision={precision!r}: {rule.name} with these "
                         f"hyperparameters keeps no state to store in lower precision (for "
                         f"sgd, set momentum > 0, as bitsandbytes' SGD8bit requires)")


def _check_block_size(group: dict) -> None:
    block, precision = group["block_size"], group["state_precision"]
    if block is None:
        return
    if not isinstance(block, int) or isinstance(block, bool) or block < 1:
        raise ValueError(f"block_size must be None or a positive int, got {block!r}")
    if precision == "8bit" and block != BLOCK:
        raise ValueError(f"block_size={block}: 8-bit states are bitsandbytes' blockwise format, "
                         f"in blocks of {BLOCK}; use block_size=None (or {BLOCK}), or "
                         f"state_precision='4bit' (torchao's format) for other blocks")
    if precision == "4bit" and (block % 2 or _ALIGNMENT % block):
        raise ValueError(f"block_size={block}: 4-bit blocks must be even (two codes a byte) "
                         f"and divide {_ALIGNMENT} (so no block straddles two ranks): 2, 4, "
                         f"8, ..., 128 (torchao's default) or 256 (Transformers')")
