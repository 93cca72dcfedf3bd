"""The states of one region of the shard (one flat buffer's chunks), stored in its kind's form.

A region's states are addressed by region offsets (0 at the region's first shard element).
Resident 32-bit states are plain fp32 tensors, stepped in place (``view``). Every other form is
decoded into an fp32 window before the rule's step and encoded back after it (``load``,
``store``):

- bf16: one bf16 tensor per state (rounded to nearest even);
- 8bit: uint8 codes per element and one fp32 absmax per 256-element block (``blockwise``);
- paged, either precision: the same tensors, kept in a memory-mapped file (CPU shard) or pinned
  host memory (accelerator shard) instead of on the device (``paging``).
"""

from __future__ import annotations

import torch

from . import blockwise, paging
from .kinds import StateKind


class RegionStates:
    """Every state of one region of the flat shard, stored in one ``StateKind``.

    8-bit states are a uint8 code per element and an fp32 ``<name>_absmax`` per block of
    ``blockwise.BLOCK`` (256) elements (bitsandbytes' blockwise format); bf16 and 32-bit ones
    are one tensor each. Paged states live in a memory-mapped file (CPU) or pinned host
    memory (accelerators); the others on ``device``. Every state starts at zero.

    Args:
        names: the rule's states for this region.
        nonnegative: the states never negative (unsigned 8-bit map,
            ``UpdateRule.nonnegative_states``).
        numel: the region's length in elements (a multiple of the block size for 8-bit).
        kind: the storage form.
        device: the compute device.
        page_dir: the directory of the memory-mapped file for paged CPU states (default None:
            the system's temporary directory).
    """

    def __init__(self, names: tuple[str, ...], nonnegative: tuple[str, ...], numel: int,
                 kind: StateKind, device: torch.device, page_dir: str | None = None):
        self.kind, self.device, self.numel = kind, device, numel
        self.signed = {name: name not in nonnegative for name in names}
        sizes = {}
        for name in names:
            if kind.precision == "8bit":
                sizes[name] = (numel, torch.uint8)
                sizes[name + "_absmax"] = (numel // blockwise.BLOCK, torch.float32)
            else:
                sizes[name] = (numel, torch.bfloat16 if kind.precision == "bf16"
                               else torch.float32)
        self._mapped = None
        if not kind.paged:
            self.tensors = {name: torch.zeros(n, dtype=dtype, device=device)
                            for name, (n, dtype) in sizes.items()}
        elif device.type == "cpu":
            self._mapped = paging.MappedFile(sizes, page_dir)
            self.tensors = self._mapped.tensors
        else:
            self.tensors = paging.pinned_host(sizes)
        if kind.precision == "8bit":  # codes of 0 (byte 0 is code -0.99): zero stays zero
            for name in names:
                self.tensors[name].fill_(_zero_code(self.signed[name]))
                self.release(0, numel)

    # -- stepping ---------------------------------------------------------------------------

    def view(self, name: str, lo: int, numel: int) -> torch.Tensor:
        """The fp32 state itself, for in-place kinds."""
        assert self.kind.in_place
        return self.tensors[name][lo:lo + numel]

    def load(self, name: str, lo: int, out: torch.Tensor) -> None:
        """Decode ``out.numel()`` elements of state ``name`` from region offset ``lo``."""
        parts = [self._on_device(t) for t in self._encoded(name, lo, out.numel())]
        if self.kind.precision == "8bit":
            blockwise.dequantize(*parts, self.signed[name], out=out)
        else:
            out.copy_(parts[0])

    def store(self, name: str, lo: int, values: torch.Tensor) -> None:
        """Encode fp32 ``values`` into state ``name`` from region offset ``lo``."""
        targets = self._encoded(name, lo, values.numel())
        staged = targets[0].device != values.device  # paged accelerator states: host copies
        if self.kind.precision != "8bit":
            targets[0].copy_(values, non_blocking=staged)
        elif not staged:  # quantize straight into the stored codes and absmax
            blockwise.quantize(values, self.signed[name], *targets)
        else:
            for target, part in zip(targets, blockwise.quantize(values, self.signed[name])):
                target.copy_(part, non_blocking=True)

    def prefetch(self, lo: int, numel: int) -> None:
        """Ask for the pages of region range [lo, lo + numel) ahead of use."""
        if self._mapped:
            for name in self.signed:
                for part in self._encoded(name, lo, numel):
                    self._mapped.prefetch(part)

    def release(self, lo: int, numel: int) -> None:
        """Drop the pages of region range [lo, lo + numel) from the process."""
        if self._mapped:
            for name in self.signed:
                for part in self._encoded(name, lo, numel):
                    self._mapped.release(part)

    # -- saving and accounting --------------------------------------------------------------

    def encoded(self, name: str) -> dict[str, tuple[torch.Tensor, int]]:
        """The stored tensors of state ``name``, by saved name, with how many elements each
        entry covers (1, or the block size for absmax)."""
        if self.kind.precision == "8bit":
            return {name: (self.tensors[name], 1),
                    name + "_absmax": (self.tensors[name + "_absmax"], blockwise.BLOCK)}
        return {name: (self.tensors[name], 1)}

    def nbytes(self) -> int:
        """Bytes of every stored tensor of this region (codes and absmax included), wherever
        they are kept."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def device_bytes(self) -> int:
        """Bytes kept on the compute device between steps (none when paged)."""
        return 0 if self.kind.paged else self.nbytes()

    def resident_bytes(self) -> int:
        """Paged CPU states: bytes of the mapped file resident in the process now."""
        return self._mapped.resident_bytes() if self._mapped else self.device_bytes()

    # -- internals --------------------------------------------------------------------------

    def _encoded(self, name: str, lo: int, numel: int) -> list[torch.Tensor]:
        if self.kind.precision == "8bit":
            block = blockwise.BLOCK
            assert lo % block == 0 and numel % block == 0, "8-bit windows are whole blocks"
            return [self.tensors[name][lo:lo + numel],
                    self.tensors[name + "_absmax"][lo // block:(lo + numel) // block]]
        return [self.tensors[name][lo:lo + numel]]

    def _on_device(self, tensor: torch.Tensor) -> torch.Tensor:
        if tensor.device == self.device:
            return tensor
        return tensor.to(self.device, non_blocking=True)


def _zero_code(signed: bool) -> int:
    return int((blockwise.dynamic_map(signed) == 0).nonzero())
