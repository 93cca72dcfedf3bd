"""The params a rule steps whole (GaLore, APOLLO, Adafactor): each on the one rank that owns it.

The layout gives every such param whole to one rank (layout.py), so its averaged gradient
arrives whole in that rank's gradient shard, and its update (an SVD, a projection, factored
moments) needs no communication: each rank steps its own 1/W of the matrices, with their
states kept per tensor (states/tensor_states.py). The updated params reach the other ranks
with the usual all-gather.

Layerwise groups (``layerwise=True``, the ``*_layerwise`` names) step each matrix as soon as
its bucket's averaged gradient is harvested, during backward, instead of in ``step()``. So they
work with data parallelism and with gradient accumulation (the micro-steps run inside
``opt.no_sync()``; the gradient is reduced, and the matrix stepped, once).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from .layout import ParamSlot
from .states.tensor_states import TensorStates

log = logging.getLogger("zeroopt")


@dataclass(eq=False)
class OwnedTensor:
    """A whole param this rank owns and steps, as views into the shard.

    Attributes:
        slot: the param's ``ParamSlot``.
        param: the fp32 master it steps, in the param's shape (``Shard.master_view``: the
            model's own fp32 buffer, or the master copy of a 16-bit param).
        grad: its averaged gradient, a view of the gradient shard in the param's shape.
    """

    slot: ParamSlot
    param: torch.Tensor  # the fp32 master, in the param's shape
    grad: torch.Tensor  # its averaged gradient in the shard, in the param's shape


class WholeTensors:
    """This rank's whole params and their per-tensor states.

    Args:
        shard: the ``zeroopt.shard.Shard`` they belong to (its layout, param groups, masters
            and gradient shard are read through its public names).
        skip_nonfinite: a layerwise matrix with a non-finite gradient skips its own step.
    """

    def __init__(self, shard, skip_nonfinite: bool):
        self.shard, self.rule, self.skip_nonfinite = shard, shard.rule, skip_nonfinite
        self.param_groups = shard.param_groups
        self.states = TensorStates(self.rule.tensor_states_8bit, self.rule.nonnegative_states)
        self.owned: list[list[OwnedTensor]] = [[] for _ in self.param_groups]
        self.layerwise_in_bucket: dict[int, list[OwnedTensor]] = {}
        self.stepped: set[int] = set()  # layerwise params stepped since the last step()
        self.skipped_nonfinite = 0
        self.build()

    def build(self) -> None:
        """Find this rank's whole params (again after a load, whose groups may differ, and
        when the layout or the gradient shard changes)."""
        shard = self.shard
        self.owned = [[] for _ in self.param_groups]
        self.layerwise_in_bucket = {}
        for piece in shard.layout.pieces:
            slot, buffer = piece.slot, shard.layout.buffers[piece.slot.buffer]
            if not buffer.kind.whole:
                continue
            shape = slot.param.shape
            owned = OwnedTensor(
                slot, shard.master_view(buffer, piece.shard_offset, slot.numel).view(shape),
                shard.grad[piece.shard_offset:piece.shard_offset + slot.numel].view(shape))
            self.owned[slot.group].append(owned)
            if self.param_groups[slot.group]["layerwise"]:
                self.layerwise_in_bucket.setdefault(slot.bucket, []).append(owned)

    @property
    def any_layerwise(self) -> bool:
        """Whether some param group is layerwise (``layerwise=True``) and steps whole
        tensors: it steps during backward, before any global gradient norm exists."""
        return any(g.get("layerwise", False) and self.rule.whole_tensors(g)
                   for g in self.param_groups)

    def all_owned(self):
        """Every ``OwnedTensor`` of this rank, group by group.

        Returns:
            A generator of ``OwnedTensor``.
        """
        return (owned for group in self.owned for owned in group)

    def step(self, active: set[int]) -> None:
        """Step every whole param this rank owns whose state_dict index is in ``active`` (it
        has a gradient on some rank; those a layerwise group has already stepped during
        backward are left alone), and start the next iteration."""
        for owned in self.all_owned():
            if owned.slot.index in active and owned.slot.index not in self.stepped:
                self._step(self.param_groups[owned.slot.group], owned)
        self.end_step()

    def on_bucket_reduced(self, bucket: int) -> None:
        """A bucket's averaged gradient is in the shard: step its layerwise params."""
        for owned in self.layerwise_in_bucket.get(bucket, ()):
            if owned.slot.index in self.stepped:
                raise RuntimeError(
                    "a layerwise optimizer got a second reduced gradient before step(): it "
                    "steps each matrix as soon as its gradient is reduced. Run gradient-"
                    "accumulation micro-steps inside opt.no_sync() (the gradient is then reduced "
                    "once, at the last micro-step), or use the name without '_layerwise'")
            self._step(self.param_groups[owned.slot.group], owned)
            self.stepped.add(owned.slot.index)

    def end_step(self) -> None:
        """Start the next iteration: forget which params layerwise groups stepped during
        backward (``step`` calls it, and so does an optimizer step that is skipped)."""
        self.stepped.clear()

    def _step(self, group: dict, owned: OwnedTensor) -> None:
        if group["layerwise"] and self.skip_nonfinite \
                and not bool(torch.isfinite(owned.grad).all()):
            # no global norm exists yet during backward: each matrix is checked on its own
            self.skipped_nonfinite += 1
            log.warning("zeroopt: a non-finite gradient in a param of shape %s; its layerwise "
                        "step is skipped", list(owned.param.shape))
            return
        with torch.no_grad(), self.states.decoded(owned.slot.index, group) as state:
            state["step"] += 1
            self.rule.tensor_step(group, owned.param, owned.grad, state, state["step"])

    def nbytes(self) -> int:
        """Bytes of the per-tensor states of this rank's whole params, 8-bit ones as stored
        (``TensorStates.nbytes``)."""
        return self.states.nbytes()
