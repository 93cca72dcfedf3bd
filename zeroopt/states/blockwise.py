"""8-bit blockwise dynamic quantization, in bitsandbytes' format.

A state tensor is cut into blocks of 256 elements; each block keeps one fp32 ``absmax`` and 256
uint8 codes, indices into a 256-entry *dynamic map* (a float8-like code: a dynamic exponent,
the fraction getting the bits the exponent does not use, Dettmers 2015). A value x in a block
is stored as the code nearest to x / absmax. Signed states (Adam's m) use the signed map,
non-negative ones (Adam's v) the unsigned map, which spends the sign bit on precision.

These are bitsandbytes' blocks, maps and absmax, so codes convert both ways: each side
dequantizes the other's codes identically (tests/test_blockwise.py). The rounding is to the
nearest code, exactly; bitsandbytes' CPU kernel intends the same but its table-driven search is
coarse where the map is finest (near 0), so some of its codes differ, never closer to the value.
zeroopt's shards are multiples of 256 elements, so blocks never straddle ranks.

On the CPU, quantize and dequantize run C kernels (native.py, _blockwise.c) with the same
results bit for bit; the torch code here is the reference and the path for other devices.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from . import native

BLOCK = 256
F32, U8 = torch.float32, torch.uint8


@lru_cache(maxsize=None)
def dynamic_map(signed: bool = True) -> torch.Tensor:
    """The 256 code values, sorted, from -1 (or 0) to 1: bitsandbytes' create_dynamic_map with
    its defaults (7 exponent bits, 8 bits in all)."""
    values: list[float] = []
    for exponent in range(7):
        # each exponent's fraction region, split into equal steps; the step midpoints are codes
        items = 2**exponent + 1 if signed else 2 ** (exponent + 1) + 1
        edges = torch.linspace(0.1, 1, items, dtype=torch.float32)
        means = ((edges[:-1] + edges[1:]) / 2.0) * (10 ** (exponent - 6))
        values += means.tolist()
        if signed:
            values += (-means).tolist()
    values += [0.0, 1.0]
    assert len(values) == 256
    return torch.tensor(sorted(values), dtype=torch.float32)


@lru_cache(maxsize=None)
def midpoints(signed: bool) -> torch.Tensor:
    """The 255 midpoints between neighbouring codes of ``dynamic_map(signed)``, sorted: a
    normalized value's code is the number of midpoints strictly below it (the nearest code,
    ties to the lower one). The torch quantizer searches them; native.py builds its table
    from them."""
    code = dynamic_map(signed)
    return (code[1:] + code[:-1]) / 2


def quantize(values: torch.Tensor, signed: bool, codes: torch.Tensor | None = None,
             absmax: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes (uint8, like ``values``) and per-block absmax (fp32) of a flat fp32 tensor whose
    length is a multiple of 256. Writes into ``codes``/``absmax`` when given."""
    if values.numel() % BLOCK:
        raise ValueError(f"blockwise quantization needs a multiple of {BLOCK} elements, "
                         f"got {values.numel()}")
    if not (_native(values, F32) and _native(codes, U8) and _native(absmax, F32)):
        return _quantize_torch(values, signed, codes, absmax)
    if codes is None:
        codes = torch.empty(values.numel(), dtype=U8)
    if absmax is None:
        absmax = torch.empty(values.numel() // BLOCK, dtype=F32)
    native.quantize_(values, signed, codes, absmax)
    return codes, absmax


def dequantize(codes: torch.Tensor, absmax: torch.Tensor, signed: bool,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """The fp32 values of ``codes`` (a multiple of 256 of them) and their blocks' absmax."""
    if not (_native(codes, U8) and _native(absmax, F32) and _native(out, F32)):
        return _dequantize_torch(codes, absmax, signed, out)
    if out is None:
        out = torch.empty(codes.numel(), dtype=F32)
    native.dequantize_(codes, absmax, signed, out)
    return out if out.dim() == 1 else out.view(-1)


def _native(t: torch.Tensor | None, dtype: torch.dtype) -> bool:
    """Whether the C kernels (native.py: the same results, ~40x faster in an AdamW step)
    take ``t``: CPU, contiguous, the usual dtype. Anything else, a GPU above all, runs the
    torch code below, which is also the reference the kernels are tested against and their
    table is built from. (Cheap tests only: t.device alone costs 0.4 us, a tenth of a call.)"""
    return t is None or (t.is_cpu and t.dtype is dtype and t.is_contiguous()
                         and native.available())


def _quantize_torch(values: torch.Tensor, signed: bool, codes: torch.Tensor | None = None,
                    absmax: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    blocks = values.view(-1, BLOCK)
    block_max = torch.amax(blocks.abs(), dim=1, out=absmax)
    # Divide (as bitsandbytes does); an all-zero block divides by 1 and gets the code of 0.
    divisor = torch.where(block_max > 0, block_max, torch.ones_like(block_max))
    normalized = (blocks / divisor[:, None]).clamp_(-1, 1)
    # the number of midpoints strictly below: the nearest code, ties to the lower one
    index = torch.bucketize(normalized, midpoints(signed).to(values.device))
    if codes is None:
        return index.to(torch.uint8).view(-1), block_max
    codes.view(-1, BLOCK).copy_(index)
    return codes, block_max


def _dequantize_torch(codes: torch.Tensor, absmax: torch.Tensor, signed: bool,
                      out: torch.Tensor | None = None) -> torch.Tensor:
    code = dynamic_map(signed).to(codes.device)
    values = code[codes.long()].view(-1, BLOCK).mul_(absmax[:, None])
    if out is None:
        return values.view(-1)
    return out.view(-1, BLOCK).copy_(values).view(-1)
