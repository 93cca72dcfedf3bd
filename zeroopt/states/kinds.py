"""Which form a param's optimizer states take: precision (32-bit, bf16, 8-bit blockwise) and
whether they are paged out of device memory.

Every rule takes three extra hyperparameters, per param group:

- ``state_precision``: "32bit" (default), "bf16", or "8bit" (bitsandbytes' blockwise format);
- ``min_8bit_size``: params with fewer elements keep 32-bit states under "8bit" (bitsandbytes'
  rule, default 4096). Decided on the param's full size, never its shard, so one model gets
  the same precisions at every world size. To keep, say, the embeddings 32-bit, give them a
  param group with ``state_precision="32bit"``;
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

PRECISIONS = ("32bit", "bf16", "8bit")
STATE_DEFAULTS = dict(state_precision="32bit", min_8bit_size=4096, paged=False)


@dataclass(frozen=True)
class StateKind:
    """The form a param's states take (see the module docstring).

    Attributes:
        precision: "32bit" (default), "bf16" or "8bit" (one of ``PRECISIONS``).
        paged: whether the states are kept off the compute device (default False).
        whole: whether the param is owned whole by one rank and stepped tensor by tensor
            (``UpdateRule.whole_tensors``; default False).
    """

    precision: str = "32bit"
    paged: bool = False
    whole: bool = False  # owned whole by one rank, stepped tensor by tensor

    @property
    def block_numel(self) -> int:
        """Params of this kind start on, and fill, whole blocks of this many elements."""
        return BLOCK if self.precision == "8bit" and not self.whole else 1

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
    if precision == "8bit" and numel < group["min_8bit_size"]:
        precision = "32bit"
    return StateKind(precision, bool(group["paged"]))


def validate(group: dict, rule) -> None:
    """Check a group's state-storage options for ``rule``.

    Args:
        group: the param group (its ``state_precision``, ``min_8bit_size`` and ``paged``).
        rule: the ``UpdateRule``.

    Raises:
        ValueError: an unknown ``state_precision`` (the closest one suggested); a
            ``min_8bit_size`` that is not a non-negative int; a ``paged`` that is not a bool;
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
