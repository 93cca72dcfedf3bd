"""Where a rank's optimizer memory goes, by part, so the totals add up.

``ZeroOptimizer.state_bytes()`` is the state the rank holds wherever it lives;
``device_state_bytes()`` is what sits on the compute device. They differ by two parts: paged
states (host memory or a file; not on the device) and the fp32 windows that non-resident
(8-bit, 4-bit or paged) states are decoded into for a step (on the device; not state)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StateBytes:
    """One rank's optimizer memory, in bytes, by part.

    Attributes:
        states: states kept on the compute device between steps, as stored (8-bit and 4-bit
            codes with their absmax; the per-tensor states of whole params: Muon's momentum,
            GaLore's low-rank moments...).
        paged_states: states kept off the device (``paged=True``: host memory or a file).
        masters: fp32 master copies of 16-bit params.
        scratch: the fp32 windows states are decoded into for a step (``window_numel``
            elements per state; 0 when every state is fp32 and resident).
    """

    states: int
    paged_states: int
    masters: int
    scratch: int

    @property
    def held(self) -> int:
        """``states + paged_states + masters``: ``ZeroOptimizer.state_bytes()``."""
        return self.states + self.paged_states + self.masters

    @property
    def on_device(self) -> int:
        """``states + masters + scratch``: ``ZeroOptimizer.device_state_bytes()``."""
        return self.states + self.masters + self.scratch


def shard_state_bytes(shard) -> StateBytes:
    """The parts of a ``zeroopt.shard.Shard``'s memory (its regions, whole params, masters
    and decode windows)."""
    def nbytes(tensors) -> int:
        return sum(t.numel() * t.element_size() for t in tensors)

    resident = sum(region.device_bytes() for region in shard.regions)
    stored = sum(region.nbytes() for region in shard.regions)
    return StateBytes(states=resident + shard.whole.nbytes(), paged_states=stored - resident,
                      masters=nbytes(shard.masters.values()),
                      scratch=nbytes(shard.scratch.values()))
