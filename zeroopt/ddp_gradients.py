"""Gradients already averaged across ranks: the model is wrapped in DistributedDataParallel.

With ``ZeroOptimizer(..., average_grads=False)`` (stage 1 only), DDP's own all-reduce has
averaged ``param.grad`` by the end of backward; the optimizer must not average again. So this
source reads ``param.grad`` at step time and copies the pieces this rank owns into the shard.
It offers the same methods as ``grad_sync.BucketedReducer``, the default source.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from .kernels import harvest
from .layout import Layout
from .step_inputs import local_norm_part


class LocalGradients:
    """Gradients that are already averaged across ranks (the model is wrapped in DDP).

    Args:
        layout: the ``Layout`` whose owned pieces are read from ``param.grad``.
        device: where the shard lives.

    Attributes:
        shard: this rank's gradient shard: fp32, ``layout.shard_numel`` elements, filled by
            ``complete``.
    """

    def __init__(self, layout: Layout, device: torch.device):
        self.layout = layout
        self.wait_seconds = 0.0  # DDP reduced the gradients: nothing here waits
        self.shard = torch.zeros(layout.shard_numel, dtype=torch.float32, device=device)
        # Per slot (layout.slots order), 1 where the param had a grad that a step consumed
        # since the last zero(); and where torch.optim would hold a zeroed grad
        # (zero(set_to_none=False)) until zero().
        self._had = bytearray(len(layout.slots))
        self._kept = bytearray(len(layout.slots))
        self._sumsq: float | None = None  # the shard's sum of squares, taken by complete()

    def finish(self) -> None:
        """Nothing to do: no reduction is ever in flight here."""
        pass  # nothing is ever in flight

    def take_detached(self) -> None:
        """Nothing to do: ``complete`` reads every gradient from ``param.grad``, however it
        got there."""
        pass  # every gradient is read from param.grad

    def staged_late(self) -> bool:
        """False: nothing is staged here."""
        return False

    def unreduced(self) -> list[int]:
        """None: DDP reduced every gradient (``complete`` only copies)."""
        return []

    def used(self) -> torch.Tensor:
        """fp64 flags, one per slot (``layout.slots`` order): 1 where the param's ``grad`` is
        not None on this rank, or where torch.optim would hold a zeroed grad for it
        (``zero(set_to_none=False)`` after a step consumed its grad).

        Returns:
            A 1-D fp64 CPU tensor of ``len(layout.slots)`` elements.
        """
        return torch.tensor([float(slot.param.grad is not None or kept)
                             for slot, kept in zip(self.layout.slots, self._kept)],
                            dtype=torch.float64)

    def pending(self) -> torch.Tensor:
        """fp64 zeros, one per bucket: nothing is ever staged here for a reduction.

        Returns:
            A 1-D fp64 CPU tensor of ``len(layout.buckets)`` zeros.
        """
        return torch.zeros(len(self.layout.buckets), dtype=torch.float64)

    def carry_over(self, old: "LocalGradients") -> None:
        """Take over from ``old`` (the source of this layout before it grew) which params
        stay used after ``zero(set_to_none=False)``; every gradient is read from
        ``param.grad`` again.

        Args:
            old: the previous ``LocalGradients``.
        """
        self._had[:len(old._had)] = old._had
        self._kept[:len(old._kept)] = old._kept

    def complete(self, launch: list[int]) -> None:
        """Copy the owned pieces of the (already averaged) ``param.grad`` into the shard,
        taking their sum of squares on the way (``squared_norm``)."""
        self._sumsq = 0.0
        for piece in self.layout.pieces:
            dst = self.shard[piece.shard_offset:piece.shard_offset + piece.numel]
            grad = piece.slot.param.grad
            if grad is None:
                dst.zero_()
                continue
            sumsq = harvest.copy_into(
                dst, grad.reshape(-1)[piece.param_offset:piece.param_offset + piece.numel])
            self._sumsq = None if sumsq is None or self._sumsq is None else self._sumsq + sumsq

    def squared_norm(self) -> torch.Tensor:
        """This rank's part of the squared global 2-norm (a 1-element fp64 tensor): the sum
        of squares ``complete`` took, else read from the shard. Call after ``complete``."""
        sumsq, self._sumsq = self._sumsq, None
        if sumsq is None:
            return local_norm_part(self.shard, 2.0)
        return torch.tensor([sumsq], dtype=torch.float64, device=self.shard.device)

    def consume(self) -> None:
        """The step has taken the gradients: set every param's ``grad`` to None, remembering
        which had one, for ``zero(set_to_none=False)``."""
        for position, slot in enumerate(self.layout.slots):
            if slot.param.grad is not None:
                self._had[position] = 1
                slot.param.grad = None

    def zero(self, set_to_none: bool = True) -> None:
        """Clear every param's ``grad``, as torch.optim's ``zero_grad``.

        Args:
            set_to_none: True (default): set ``grad`` to None. False: zero it in place; a
                param whose grad a step consumed since the last ``zero()`` stays used (a zero
                gradient) in every later step until a ``zero(set_to_none=True)``, as
                torch.optim steps a param whose grad was zeroed.
        """
        for position, slot in enumerate(self.layout.slots):
            if set_to_none:
                slot.param.grad = None
                self._kept[position] = 0
            else:
                self._kept[position] |= self._had[position]
                if slot.param.grad is not None:
                    slot.param.grad.zero_()
            self._had[position] = 0

    @contextmanager
    def no_sync(self):
        """A context that changes nothing: the model's ``DistributedDataParallel.no_sync()``
        is the one that skips the reduction in accumulation micro-steps.

        Yields:
            None.
        """
        yield  # DistributedDataParallel.no_sync() is the one that matters here

    def remove_hooks(self) -> None:
        """Nothing to remove: no hooks are registered here."""
        pass
