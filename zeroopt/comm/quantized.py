"""Blockwise-quantized gradient exchange (ZeRO++'s qgZ): the wire format and the two handles
compressed reduction is made of. ``compression.py`` says when they run; this module says what
goes on the wire.

Format of one quantized piece of ``n`` values (``quantize``): blocks of ``B`` consecutive
values (the last one may be shorter), each with an fp32 scale ``s``, its largest magnitude, and
one code per value, ``q = round(x * L / s)`` clamped to ``[-L, L]``:

    kind   B     L    codes                                    bytes per value
    int8   256   127  int8                                     1 + 4/256 = 1.016
    int4   128   7    q + 8 in a nibble, two per byte, the     1/2 + 4/128 = 0.531
                      first value in the low nibble

The message is the ``ceil(n/B)`` scales (little-endian fp32 bytes), then the codes: see
``message_bytes``. Block sizes: bitsandbytes' 256 for 8 bits; torchao's 128 for 4 bits
(``states.fourbit.DEFAULT_BLOCK``). The code is linear (absmax), not the dynamic maps of the
8-bit and 4-bit optimizer states (``states.blockwise``, ``states.fourbit``): those put their
codes close together near 0 and far apart near 1 (the signed 8-bit map's largest gap is 1/64 of
the scale, the linear one's 1/127), and a sum of gradients is bounded by its largest terms.

Error: a value decodes to ``q * s / L``, within ``s / (2L)`` of ``x`` (rounding to the nearest
code), plus a few fp32 roundings of ``s`` (``x * (L/s)`` and ``q * (s/L)``: relative 2^-23
each). A block holding a non-finite value decodes to non-finite values (``s`` is inf or NaN),
so ``skip_nonfinite`` still sees it.
"""

from __future__ import annotations

import torch

from .base import Collectives, Handle

BLOCK = {"int8": 256, "int4": 128}
LEVELS = {"int8": 127, "int4": 7}
U8 = torch.uint8


def message_bytes(numel: int, kind: str) -> int:
    """Bytes of ``numel`` values quantized as ``kind``: 4 per block of ``BLOCK[kind]`` (the
    fp32 scale) plus 1 per value (int8) or 1 per 2 values (int4)."""
    blocks = -(-numel // BLOCK[kind])
    return 4 * blocks + (numel if kind == "int8" else (numel + 1) // 2)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype quantization and sums compute in: fp64 for fp64 tensors, else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def quantize(values: torch.Tensor, kind: str, out: torch.Tensor | None = None) -> torch.Tensor:
    """``values`` (1-D) as a message in the format of the module docstring.

    Args:
        values: a 1-D float tensor (any float dtype; computed in ``accumulation_dtype``).
        kind: "int8" or "int4".
        out: a uint8 tensor of ``message_bytes(values.numel(), kind)`` to write into, or None
            (default: a new one).

    Returns:
        The message (``out`` when given).
    """
    n, block, levels = values.numel(), BLOCK[kind], LEVELS[kind]
    if out is None:
        out = torch.empty(message_bytes(n, kind), dtype=U8, device=values.device)
    if n == 0:
        return out
    blocks, dtype = -(-n // block), accumulation_dtype(values.dtype)
    if n % block == 0:  # whole blocks (zeroopt's chunks are multiples of 256): no padding copy
        padded = values.to(dtype).view(blocks, block)
    else:
        padded = torch.zeros(blocks * block, dtype=dtype, device=values.device)
        padded[:n] = values
        padded = padded.view(blocks, block)
    scale = padded.abs().amax(dim=1).float()  # NaN in a block: NaN; inf: inf
    inverse = torch.where(scale > 0, levels / scale, torch.zeros_like(scale))
    codes = (padded * inverse.to(padded.dtype)[:, None]).round_().clamp_(-levels, levels)
    if kind == "int8":
        codes = codes.to(torch.int8).view(U8).reshape(-1)[:n]
    else:
        nibbles = (codes + 8).to(U8).reshape(-1)
        codes = (nibbles[0::2] | (nibbles[1::2] << 4))[:(n + 1) // 2]
    out[:4 * blocks].copy_(scale.view(U8))
    out[4 * blocks:].copy_(codes)
    return out


def dequantize(message: torch.Tensor, numel: int, kind: str,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The ``numel`` values a ``quantize`` message decodes to.

    Args:
        message: the uint8 message (``message_bytes(numel, kind)`` bytes).
        numel: the number of values.
        kind: "int8" or "int4".
        dtype: the dtype to decode into (default fp32); the same message gives the same
            values on every rank.

    Returns:
        A new 1-D tensor of ``numel`` values.
    """
    block, levels = BLOCK[kind], LEVELS[kind]
    blocks = -(-numel // block)
    if numel == 0:
        return torch.empty(0, dtype=dtype, device=message.device)
    scale = message[:4 * blocks].clone().view(torch.float32).to(dtype)
    codes = message[4 * blocks:]
    if kind == "int8":
        decoded = codes.view(torch.int8).to(dtype)
    else:
        decoded = torch.stack([codes & 15, codes >> 4], dim=1).reshape(-1)[:numel].to(dtype) - 8
    values = decoded
    if numel % block:
        values = torch.zeros(blocks * block, dtype=dtype, device=message.device)
        values[:numel] = decoded
    return values.view(blocks, block).mul_((scale / levels)[:, None]).reshape(-1)[:numel]


class QuantizedReduceScatter:
    """Start summing ``pieces[rank]`` over the ranks: each rank sends its piece ``j``,
    quantized, straight to rank ``j`` (one hop: no rank re-quantizes a partial sum), and the
    owner adds the decoded pieces to its own, unquantized, in ``accumulation_dtype``.

    A ``Handle``: quantizes and posts the messages at construction; ``wait()`` decodes and
    sums into ``pieces[rank]``, in place.

    Args:
        comm: collectives with ``all_to_all``.
        pieces: ``comm.world_size`` 1-D tensors (views of one bucket), the same sizes on
            every rank.
        kind: "int8" or "int4".
    """

    def __init__(self, comm: Collectives, pieces: list[torch.Tensor], kind: str):
        rank = comm.rank
        self.kind, self.mine = kind, pieces[rank]
        n = self.mine.numel()
        out = [0 if j == rank else message_bytes(p.numel(), kind) for j, p in enumerate(pieces)]
        self.sizes = [0 if j == rank else message_bytes(n, kind) for j in range(len(pieces))]
        self.send = torch.empty(sum(out), dtype=U8, device=self.mine.device)
        for j, segment in enumerate(self.send.split(out)):
            if j != rank:
                quantize(pieces[j], kind, segment)
        self.recv = torch.empty(sum(self.sizes), dtype=U8, device=self.mine.device)
        self.work: Handle | None = comm.all_to_all(self.send, out, self.recv, self.sizes)

    def is_completed(self) -> bool:
        """Whether every message has arrived (``wait()`` then only decodes and sums)."""
        return self.work is None or self.work.is_completed()

    def wait(self) -> None:
        """Wait for the messages, then decode and add them into ``pieces[rank]``; see
        ``Handle``."""
        if self.work is None:
            return
        self.work.wait()
        dtype = accumulation_dtype(self.mine.dtype)
        total = self.mine.to(dtype, copy=True)
        for size, message in zip(self.sizes, self.recv.split(self.sizes)):
            if size:
                total += dequantize(message, total.numel(), self.kind, dtype)
        self.mine.copy_(total)
        self.work = self.send = self.recv = None


class QuantizedAllGather:
    """Start sending ``pieces[rank]``, quantized, to every other rank, and replace it by its
    own decoded values, which every rank decodes alike: afterwards every piece holds the same
    values on every rank (a replica steps its copy of the shard alone, so copies must not
    differ by a bit).

    A ``Handle``: quantizes and posts at construction; ``wait()`` decodes the other pieces
    into place.

    Args:
        comm: collectives with ``all_to_all``.
        pieces: ``comm.world_size`` 1-D tensors, the same sizes on every rank.
        kind: "int8" or "int4".
    """

    def __init__(self, comm: Collectives, pieces: list[torch.Tensor], kind: str):
        rank, world = comm.rank, comm.world_size
        self.kind, self.pieces, self.rank = kind, pieces, rank
        mine = pieces[rank]
        message = quantize(mine, kind)
        mine.copy_(dequantize(message, mine.numel(), kind, accumulation_dtype(mine.dtype)))
        out = [0 if j == rank else message.numel() for j in range(world)]
        self.sizes = [0 if j == rank else message_bytes(p.numel(), kind)
                      for j, p in enumerate(pieces)]
        self.send = message.repeat(world - 1)
        self.recv = torch.empty(sum(self.sizes), dtype=U8, device=mine.device)
        self.work: Handle | None = comm.all_to_all(self.send, out, self.recv, self.sizes)

    def is_completed(self) -> bool:
        """Whether every message has arrived (``wait()`` then only decodes)."""
        return self.work is None or self.work.is_completed()

    def wait(self) -> None:
        """Wait for the messages and decode them into place; see ``Handle``."""
        if self.work is None:
            return
        self.work.wait()
        for j, message in enumerate(self.recv.split(self.sizes)):
            if j != self.rank:
                piece = self.pieces[j]
                piece.copy_(dequantize(message, piece.numel(), self.kind,
                                       accumulation_dtype(piece.dtype)))
        self.work = self.send = self.recv = None
