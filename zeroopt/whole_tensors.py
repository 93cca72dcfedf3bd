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

Rules that are layerwise by construction (LOMO: ``layerwise_by_construction``) step their
element-wise groups so too: when a bucket is harvested, this rank's pieces of its params are
stepped by the rule's ``fused_step`` right there (``Shard.plan`` counts their step then, and
leaves them out of ``step()``'s plan).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from . import shard_windows
from .layout import ParamSlot
from .states.tensor_states import TensorStates

log = logging.getLogger("zeroopt")


def layerwise_by_construction(rule) -> bool:
    """Whether ``rule`` steps every group during backward, whatever the name (LOMO, AdaLomo:
    their ``fixed`` holds ``layerwise=True``), its element-wise groups included."""
    return rule.fixed.get("layerwise") is True


def without_layerwise(rule) -> str:
    """The way out for a user who needs what only a step after backward gives (a global
    gradient norm to clip by, several reductions per step): the name without ``_layerwise``,
    or, for a rule that always steps during backward, a plain statement that it has none."""
    if layerwise_by_construction(rule):
        return f"{rule.name} always steps during backward: it has no variant that does"
    return "use the name without '_layerwise'"


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
        # element-wise params stepped during backward (layerwise_by_construction): per bucket,
        # their positions in layout.slots; those stepped since the last step()
        self.flat_in_bucket: dict[int, list[int]] = {}
        self.stepped_positions: set[int] = set()
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
        self.flat_in_bucket = {}
        if layerwise_by_construction(self.rule):
            for position, slot in enumerate(shard.layout.slots):
                if not self.rule.whole_tensors(self.param_groups[slot.group]):
                    self.flat_in_bucket.setdefault(slot.bucket, []).append(position)

    @property
    def any_layerwise(self) -> bool:
        """Whether some param group is layerwise (``layerwise=True``) and steps whole
        tensors: it steps during backward, before any global gradient norm exists."""
        return any(g.get("layerwise", False) and (self.rule.whole_tensors(g) or
                                                  layerwise_by_construction(self.rule))
                   for g in self.param_groups)

    @property
    def steps_in_backward(self) -> bool:
        """Whether some bucket has params stepped when it is harvested (the reducer must call
        ``on_bucket_reduced``)."""
        return bool(self.layerwise_in_bucket or self.flat_in_bucket)

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
                raise self._second_reduction()
            self._step(self.param_groups[owned.slot.group], owned)
            self.stepped.add(owned.slot.index)
        positions = self.flat_in_bucket.get(bucket)
        if positions:
            self._step_flat(positions)

    def _step_flat(self, positions: list[int]) -> None:
        """Step this rank's pieces of the element-wise params at ``positions`` (one bucket's)
        with the rule's ``fused_step``, as ``step()`` would; ``Shard.plan`` counts the step and
        leaves them out of ``step()``'s own plan. Each rank decides on its own pieces whether a
        gradient is finite (no global norm exists yet)."""
        if self.stepped_positions.intersection(positions):
            raise self._second_reduction()
        plan = self.shard.plan(frozenset(positions))
        self.stepped_positions.update(positions)
        for group, classes in zip(self.param_groups, plan):
            for step, windows in classes:
                def update(shard) -> None:
                    if not shard.params:
                        return
                    if self.skip_nonfinite and not all(
                            bool(torch.isfinite(g).all()) for g in shard.grads):
                        self.skipped_nonfinite += 1
                        log.warning("zeroopt: a non-finite gradient in this rank's piece of a "
                                    "bucket; its step during backward is skipped")
                        return
                    self.rule.fused_step(group, shard, step, None)

                with torch.no_grad():
                    shard_windows.run(windows, update, load=True, store=True)

    def _second_reduction(self) -> RuntimeError:
        if layerwise_by_construction(self.rule):
            alternative = ""
            what = f"{self.rule.name} steps each param"
        else:
            alternative = f", or {without_layerwise(self.rule)}"
            what = "it steps each matrix"
        return RuntimeError(
            f"a layerwise optimizer got a second reduced gradient before step(): {what} as "
            "soon as its gradient is reduced. Run gradient-accumulation micro-steps inside "
            "opt.no_sync() (the gradient is then reduced once, at the last micro-step)"
            f"{alternative}")

    def end_step(self) -> None:
        """Start the next iteration: forget which params layerwise groups stepped during
        backward (``step`` calls it, and so does an optimizer step that is skipped)."""
        self.stepped.clear()
        self.stepped_positions.clear()

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

    def host_counts(self) -> dict[int, int]:
        """Each per-tensor state's step count, by param index (``restore_host_counts``)."""
        return {index: entry["step"] for index, entry in self.states.entries.items()}

    def restore_host_counts(self, counts: dict[int, int]) -> None:
        """Put back what ``host_counts`` returned; states created since are dropped (their
        step was skipped, so torch.optim would have none)."""
        for index in list(self.states.entries):
            if index in counts:
                self.states.entries[index]["step"] = counts[index]
            else:
                self.states.forget(index)

    def nbytes(self) -> int:
        """Bytes of the per-tensor states of this rank's whole params, 8-bit ones as stored
        (``TensorStates.nbytes``)."""
        return self.states.nbytes()
