"""The gradient shard's sums of squares, kept as the gradients are written (grad_sync.py).

The global 2-norm (clipping, the non-finite check) is the sum over ranks of each rank's sum of
squares of its shard. The harvest's kernels (kernels/harvest.py) return that sum for what they
write, so it is known per bucket chunk without reading the shard again; on one rank, where
backward stages straight into the shard, per slot from the staging copies. A sum is unknown
(None) where a kernel could not run or something else wrote the memory; ``total`` reads those
chunks once.
"""

from __future__ import annotations

import torch

from .layout import Bucket, Layout, ParamSlot
from .step_inputs import local_norm_part


class ShardSums:
    """Sums of squares of a gradient shard, per bucket chunk and per slot.

    Args:
        layout: the layout whose buckets cut the shard.
    """

    def __init__(self, layout: Layout):
        self.layout = layout
        self._buckets: list[float | None] = [None] * len(layout.buckets)
        self._slots: list[float | None] = [None] * len(layout.slots)
        self._position = {slot: k for k, slot in enumerate(layout.slots)}

    def set_slot(self, slot: ParamSlot, value: float | None) -> None:
        """The sum of squares of what ``slot``'s staged gradient now holds (None: unknown)."""
        self._slots[self._position[slot]] = value

    def set_bucket(self, b: int, value: float | None) -> None:
        """The sum of squares of bucket ``b``'s chunk of the shard (None: unknown)."""
        self._buckets[b] = value

    def bucket_from_slots(self, b: int, bucket: Bucket) -> None:
        """Bucket ``b``'s sum as that of its slots (known only if every slot's is)."""
        slots = [self._slots[self._position[slot]] for slot in bucket.slots]
        self._buckets[b] = None if None in slots else sum(slots)

    def total(self, shard: torch.Tensor) -> torch.Tensor:
        """The shard's sum of squares, a 1-element fp64 tensor (``local_norm_part``'s form):
        the known sums, and each unknown chunk read once (the whole shard in one reduction
        when no sum is known: an accelerator, where no kernel runs). The sums are then
        forgotten: whatever changes the shard next (clipping) is read at the next call."""
        known = [value for value in self._buckets if value is not None]
        if not known:
            total = local_norm_part(shard, 2.0)
        else:
            total = torch.tensor([sum(known)], dtype=torch.float64, device=shard.device)
            for value, bucket in zip(self._buckets, self.layout.buckets):
                if value is None:
                    lo = bucket.shard_offset
                    total += local_norm_part(shard[lo:lo + bucket.chunk_numel], 2.0)
        self.forget()
        return total

    def forget(self) -> None:
        """Every sum unknown."""
        self._buckets = [None] * len(self._buckets)
        self._slots = [None] * len(self._slots)
