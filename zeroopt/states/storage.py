"""The states of one region of the shard (one flat buffer's chunks), stored in its kind's form.

A region's states are addressed by region offsets (0 at the region's first shard element).
Resident 32-bit states are plain fp32 tensors, stepped in place (``view``). Every other form is
decoded into an fp32 window before the rule's step and encoded back after it (``load``,
``store``):

- bf16: one bf16 tensor per state (rounded to nearest even);
- 8bit: uint8 codes per element and one fp32 absmax per 256-element block (``blockwise``);
- 4bit: uint8 bytes of two codes each and one fp32 scale per block of ``kind.block`` elements
  (torchao's format, ``fourbit``); the scales are kept under ``<name>_absmax`` too. Their saved
  form (``encoded``) is the decoded fp32 values, which every reader of a state dict or
  checkpoint takes as a 32-bit state; loaded back into 4-bit they decode to the same values
  bit for bit (``fourbit.quantize_exact``);
- paged, either precision: the same tensors, kept in a memory-mapped file (CPU shard) or pinned
  host memory (accelerator shard) instead of on the device (``paging``).
"""

from __future__ import annotations

import weakref

import torch

from . import blockwise, fourbit, paging
from .kinds import StateKind


class RegionStates:
    """Every state of one region of the flat shard, stored in one ``StateKind``.

    8-bit states are a uint8 code per element and an fp32 ``<name>_absmax`` per block of
    ``blockwise.BLOCK`` (256) elements (bitsandbytes' blockwise format); 4-bit ones a byte per
    two elements and an fp32 ``<name>_absmax`` (torchao's scale) per block of ``kind.block``
    (torchao's format); bf16 and 32-bit ones are one tensor each. Paged states live in a
    memory-mapped file (CPU) or pinned host memory (accelerators); the others on ``device``.
    Every state starts at zero.

    Args:
        names: the rule's states for this region.
        nonnegative: the states never negative (unsigned 8-bit or 4-bit map,
            ``UpdateRule.nonnegative_states``).
        numel: the region's length in elements (a multiple of the block size for 8-bit and
            4-bit).
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
            elif kind.precision == "4bit":  # all zero: torchao's fresh state, decodes to 0
                sizes[name] = (numel // 2, torch.uint8)
                sizes[name + "_absmax"] = (numel // kind.block, torch.float32)
            else:
                sizes[name] = (numel, torch.bfloat16 if kind.precision == "bf16"
                               else torch.float32)
        self._mapped = None
        self._saved_forms: dict[str, weakref.ref] = {}  # 4-bit: encoded()'s fp32 values
        if not kind.paged:
            order = {name: k for k, name in enumerate(names)}
            self.tensors = {name: _zeros(n, dtype, device, order.get(name))
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
        elif self.kind.precision == "4bit":
            fourbit.dequantize(*parts, self.signed[name], out=out)
        else:
            out.copy_(parts[0])

    def store(self, name: str, lo: int, values: torch.Tensor, exact: bool = False) -> None:
        """Encode fp32 ``values`` into state ``name`` from region offset ``lo``. ``exact``
        (loading saved values): a 4-bit state that was saved decodes back to the same values
        bit for bit (``fourbit.quantize_exact``); the other forms store as they always do."""
        targets = self._encoded(name, lo, values.numel())
        staged = targets[0].device != values.device  # paged accelerator states: host copies
        if self.kind.precision not in ("8bit", "4bit"):
            targets[0].copy_(values, non_blocking=staged)
            return
        exact = exact and self.kind.precision == "4bit"
        if not staged and not exact:  # quantize straight into the stored codes and absmax
            self._quantize(name, values, *targets)
        else:
            for target, part in zip(targets, self._quantize(name, values, exact=exact)):
                target.copy_(part, non_blocking=staged)
        saved_form = self._saved_form(name)
        if saved_form is not None:  # still held (FusedOptimizer's state): keep it current
            self.load(name, lo, saved_form[lo:lo + values.numel()])

    def blocks(self, name: str, lo: int, numel: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The stored codes and absmax of 8-bit state ``name`` over region range
        [lo, lo + numel) (whole blocks), live: for kernels that decode, step and encode in
        place (``adam8bit``).

        Raises:
            ValueError: the states are not 8-bit.
        """
        if self.kind.precision != "8bit":
            raise ValueError(f"blocks() of {self.kind.precision} states: 8-bit only")
        codes, absmax = self._encoded(name, lo, numel)
        return codes, absmax

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
        """The saved form of state ``name``, by saved name, with how many elements each
        entry covers (1, or the block size for absmax): the stored tensors themselves, live,
        but for 4-bit states, whose saved form is their values decoded to fp32 (see the module
        notes): a new tensor, which ``store`` keeps current for as long as anyone holds it
        (``FusedOptimizer`` publishes it as its state: an fp32 copy of the 4-bit states)."""
        if self.kind.precision == "4bit":
            values = self._saved_form(name)
            if values is None:
                values = torch.empty(self.numel, dtype=torch.float32, device=self.device)
                for lo in range(0, self.numel, _DECODE_NUMEL):  # paged: page by page
                    window = values[lo:lo + _DECODE_NUMEL]
                    self.load(name, lo, window)
                    self.release(lo, window.numel())
                self._saved_forms[name] = weakref.ref(values)
            return {name: (values, 1)}
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
        if self.kind.precision == "4bit":
            block = self.kind.block
            assert lo % block == 0 and numel % block == 0, "4-bit windows are whole blocks"
            return [self.tensors[name][lo // 2:(lo + numel) // 2],
                    self.tensors[name + "_absmax"][lo // block:(lo + numel) // block]]
        if self.kind.precision == "8bit":
            block = blockwise.BLOCK
            assert lo % block == 0 and numel % block == 0, "8-bit windows are whole blocks"
            return [self.tensors[name][lo:lo + numel],
                    self.tensors[name + "_absmax"][lo // block:(lo + numel) // block]]
        return [self.tensors[name][lo:lo + numel]]

    def _saved_form(self, name: str) -> torch.Tensor | None:
        ref = self._saved_forms.get(name)
        return None if ref is None else ref()

    def _quantize(self, name: str, values: torch.Tensor, codes: torch.Tensor | None = None,
                  absmax: torch.Tensor | None = None,
                  exact: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        signed = self.signed[name]
        if self.kind.precision == "8bit":
            return blockwise.quantize(values, signed, codes, absmax)
        if exact:
            return fourbit.quantize_exact(values, signed, self.kind.block)
        return fourbit.quantize(values, signed, self.kind.block, codes, absmax)

    def _on_device(self, tensor: torch.Tensor) -> torch.Tensor:
        if tensor.device == self.device:
            return tensor
        return tensor.to(self.device, non_blocking=True)


_DECODE_NUMEL = 1 << 20  # elements decoded at a time for the saved form (whole 4-bit blocks)

# Where a CPU state's first byte lies in its 4 KiB page: state k of a region at
# _PAGE_OFFSET + (k + 1) _STAGGER. Every large buffer (params, gradients, each state) would
# otherwise start at the same offset in its page (the allocator's), and a kernel streaming
# five of them in step has its loads and stores 4 KiB apart: the CPU takes them for the same
# address until the full addresses are compared (4K aliasing). Staggered 768 bytes apart, on
# a 12.6M-element shard (AMD EPYC, one thread), torch's fused AdamW step and adamw_options.c's
# steps ran up to 12% faster (0-12% between runs: it also depends on where the pages land).
_PAGE = 4096
_STAGGER = 768
_PAGE_OFFSET = 64


def _zeros(numel: int, dtype: torch.dtype, device: torch.device,
           k: int | None) -> torch.Tensor:
    """``torch.zeros(numel, dtype=dtype, device=device)``; on the CPU, state number ``k`` of
    its region (None: a per-block scale, left where it falls) starts at its own offset in a
    page (see ``_STAGGER``).

    The tensor is a view of a slightly larger zeroed buffer (at most a page more) made with
    ``torch.frombuffer``: its storage is exactly ``numel`` elements (``torch.save`` writes
    those, as for a plain tensor) and keeps the buffer alive.

    Returns:
        A 1-D zeroed tensor of ``numel`` elements.
    """
    if device.type != "cpu" or k is None or numel == 0:
        return torch.zeros(numel, dtype=dtype, device=device)
    size = torch.empty(0, dtype=dtype).element_size()
    raw = torch.zeros(numel * size + _PAGE, dtype=torch.uint8)
    try:
        buffer = raw.numpy()
    except RuntimeError:  # torch without numpy: where the allocator puts it
        return torch.zeros(numel, dtype=dtype)
    target = (_PAGE_OFFSET + (k + 1) * _STAGGER) % _PAGE
    shift = (target - raw.data_ptr()) % _PAGE
    shift -= shift % size  # element-aligned (the allocator's pointers are)
    return torch.frombuffer(buffer, dtype=dtype, count=numel, offset=shift)


def _zero_code(signed: bool) -> int:
    return int((blockwise.dynamic_map(signed) == 0).nonzero())
