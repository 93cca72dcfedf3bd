"""4-bit blockwise quantization, in torchao's format (``torchao.optim.AdamW4bit``).

A state tensor is cut into blocks of ``block`` elements (torchao's ``block_size``: 128 by
default, 256 as Transformers' ``adamw_torch_4bit`` builds it); each block keeps one fp32
``scale``, its largest magnitude (at least 1e-12), and a 4-bit code per element, an index into
a 16-entry map. Two codes share a byte, the first element in the high nibble. The maps are
torchao's, from Li et al. 2023 ("Memory Efficient Optimizers with 4-bit States"):

- signed states (Adam's m): the dynamic map with 3 exponent bits in 4 bits, from -0.8875 to 1
  (it has 0, and no -1: a block whose largest magnitude is negative stores it as -0.8875);
- non-negative states (Adam's v): the linear map 1/16, 2/16, ..., 1, without 0 (the paper's
  zero-point removal: a zero would otherwise reach 1/sqrt(v) as an infinite step). A value
  below scale / 32 is stored as scale / 16.

Quantization divides by the scale as torchao does, and each quotient gets torchao's code: the
one its search of the map and its fp32 rounding step pick (the nearest code, ties up;
``_codes_reference``), here looked up in tables built from that very search (``_tables``: the
same code for every finite value, in a quarter of the passes). So codes, scales and decoded
values are torchao's bit for bit (tests/test_state_4bit.py). A fresh state is torchao's
``zeros``: codes 0 and scale 0, which decode to 0 in either map.

``quantize_exact`` is for loading saved values: where they are the decoded values of some
4-bit block (a checkpoint's), it finds codes and a scale that decode to them bit for bit, so a
4-bit state survives a round trip through fp32 unchanged; other values are quantized as above.
"""

from __future__ import annotations

from functools import lru_cache

import torch

DEFAULT_BLOCK = 128  # torchao's AdamW4bit(block_size=128)
F32, U8 = torch.float32, torch.uint8


@lru_cache(maxsize=None)
def code_map(signed: bool) -> torch.Tensor:
    """The 16 code values, sorted: torchao's ``get_qmap_signed()`` (its
    ``create_dynamic_map(True, 3, 4)``) or ``get_qmap_unsigned()`` (``linspace(0, 1, 17)[1:]``)."""
    if not signed:
        return torch.linspace(0, 1, 17, dtype=F32)[1:].clone()
    values: list[float] = []
    for exponent in range(3):  # 3 exponent bits; the fraction takes the bits they leave
        edges = torch.linspace(0.1, 1, 2**exponent + 1, dtype=F32)
        means = (10 ** (exponent - 2)) * ((edges[:-1] + edges[1:]) / 2.0)
        values += means.tolist() + (-means).tolist()
    values += [0.0, 1.0]
    assert len(values) == 16
    return torch.tensor(sorted(values), dtype=F32)


def _on(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    return tensor if tensor.device == device else tensor.to(device)


def check_block(numel: int, block: int) -> None:
    """Check that ``numel`` elements cut into whole blocks of ``block`` (an even number: two
    4-bit codes per byte).

    Raises:
        ValueError: ``block`` is odd or below 2, or does not divide ``numel``.
    """
    if block < 2 or block % 2 or numel % block:
        raise ValueError(f"4-bit blockwise quantization needs an even block size that divides "
                         f"the length: {numel} elements in blocks of {block}")


def _codes_reference(normalized: torch.Tensor, signed: bool) -> torch.Tensor:
    """The code of each value in [-1, 1] (int64), as torchao's quantize_4bit_with_qmap picks
    it, with its operations: a branchless binary search for the last code at or below the
    value (code 0 below the first), then one code up where the value is at least half way to
    the next (``residual >= (up - down) * 0.5`` in fp32: ties go up)."""
    code = code_map(signed).to(normalized.device)
    index = torch.zeros(normalized.shape, dtype=torch.int64, device=normalized.device)
    for step in (8, 4, 2, 1):
        index += torch.where(normalized >= code[index + step], step, 0)
    up = (index + 1).clamp_(max=15)
    down_value, up_value = code[index], code[up]
    return torch.where(normalized - down_value >= (up_value - down_value) * 0.5, up, index)


def _ordered(bits: torch.Tensor) -> torch.Tensor:
    """fp32 bit patterns (in int64) -> integers in the order of their floats (negative floats'
    patterns run backwards, -0.0 just below 0.0)."""
    return torch.where(bits < 1 << 31, bits, (1 << 31) - 1 - bits)


def _patterns(ordered: torch.Tensor) -> torch.Tensor:
    """``_ordered``'s inverse."""
    return torch.where(ordered >= 0, ordered, (1 << 31) - 1 - ordered)


def _floats(bits: torch.Tensor) -> torch.Tensor:
    """The fp32 values of bit patterns held in int64."""
    return torch.where(bits < 1 << 31, bits, bits - (1 << 32)).to(torch.int32).view(F32)


@lru_cache(maxsize=None)
def _tables(signed: bool, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """What ``_codes`` looks codes up in, built from ``_codes_reference``:

    - the code of the lowest value of each range of fp32 values that share their top 16 bits
      (sign, exponent and 7 fraction bits: 65,536 ranges);
    - for each code c, the least fp32 value whose code is above c (+inf for 15).

    No finite range holds two of those thresholds (checked here: neighbouring thresholds are
    much further apart than 2^-7 of their size), so a value's code is its range's code, plus
    one where the value is at or above that code's threshold."""
    wanted = torch.arange(1, 16)
    # each threshold by bisection over the floats from -1 to 1, in their order
    lo = _ordered(torch.full((15,), 0xBF800000, dtype=torch.int64))  # -1.0
    hi = _ordered(torch.full((15,), 0x3F800000, dtype=torch.int64))  # 1.0
    assert bool((_codes_reference(_floats(_patterns(hi)), signed) >= wanted).all())
    assert not bool((_codes_reference(_floats(_patterns(lo)), signed) >= wanted).any())
    while bool((hi - lo > 1).any()):  # code(lo) < wanted <= code(hi)
        mid = (lo + hi) // 2
        above = _codes_reference(_floats(_patterns(mid)), signed) >= wanted
        hi, lo = torch.where(above, mid, hi), torch.where(above, lo, mid)
    thresholds = torch.cat([_floats(_patterns(hi)), torch.tensor([float("inf")])])
    prefixes = torch.arange(1 << 16, dtype=torch.int64) << 16
    negative = prefixes >= 1 << 31
    lowest = _floats(torch.where(negative, prefixes | 0xFFFF, prefixes))
    highest = _floats(torch.where(negative, prefixes, prefixes | 0xFFFF))
    table = _codes_reference(lowest, signed)
    finite = lowest.isfinite() & highest.isfinite()
    assert bool((_codes_reference(highest, signed) - table <= 1)[finite].all())
    return table.to(device), thresholds.to(device)


def _codes(normalized: torch.Tensor, signed: bool) -> torch.Tensor:
    """The code of each value in [-1, 1] (int64, same shape): ``_codes_reference``'s, bit for
    bit for every finite value, in four passes (``_tables``). ``normalized``: contiguous."""
    table, thresholds = _tables(signed, normalized.device)
    prefix = normalized.view(torch.int32).bitwise_right_shift(16).bitwise_and_(0xFFFF).long()
    index = table[prefix]
    return index.add_(normalized >= thresholds[index])


def _pack(index: torch.Tensor, codes: torch.Tensor | None) -> torch.Tensor:
    flat = index.view(-1)
    packed = flat[0::2].bitwise_left_shift(4).bitwise_or_(flat[1::2])
    if codes is None:
        return packed.to(U8)
    codes.copy_(packed)
    return codes


def quantize(values: torch.Tensor, signed: bool, block: int = DEFAULT_BLOCK,
             codes: torch.Tensor | None = None,
             scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed codes (uint8, one byte per two elements) and per-block scales (fp32) of a flat
    fp32 tensor whose length is a multiple of ``block``: torchao's ``OptimState4bit.copy_``.
    Writes into ``codes``/``scale`` when given."""
    check_block(values.numel(), block)
    blocks = values.view(-1, block)
    block_scale = blocks.abs().amax(-1).clip(1e-12)  # torchao's scale_tensor
    normalized = blocks / block_scale.view(-1, 1)
    if scale is not None:
        scale.copy_(block_scale)
        block_scale = scale
    return _pack(_codes(normalized, signed), codes), block_scale


def dequantize(codes: torch.Tensor, scale: torch.Tensor, signed: bool,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """The fp32 values of packed ``codes`` and their blocks' ``scale`` (the block size is
    ``2 * codes.numel() // scale.numel()``): torchao's ``OptimState4bit.dequantize``."""
    code = _on(code_map(signed), codes.device)
    index = torch.stack([codes.bitwise_right_shift(4), codes.bitwise_and(15)], dim=-1).int()
    values = code[index].view(scale.numel(), -1).mul_(scale.view(-1, 1))
    if out is None:
        return values.view(-1)
    return out.view(-1).copy_(values.view(-1))


def quantize_exact(values: torch.Tensor, signed: bool,
                   block: int = DEFAULT_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """``quantize``, except for blocks whose values are exactly what some codes and scale
    decode to (a saved 4-bit state): those get such codes and scale, so they decode to the
    same values bit for bit. A block of zeros gets a fresh state's codes 0 and scale 0.

    Only one scale can fail to round-trip through ``quantize``: torchao's signed map has no
    -1, so a block whose largest magnitude was negative decodes to at most 0.8875 times its
    scale, and requantizing it would shrink the scale. Its scale is recovered from that
    largest magnitude (a few fp32 neighbours of it / 0.8875 are tried).
    """
    check_block(values.numel(), block)
    blocks = values.view(-1, block)
    codes, scale = quantize(values, signed, block)
    missed = (dequantize(codes, scale, signed).view(-1, block) != blocks).any(-1)
    zero = (blocks == 0).all(-1)
    missed &= ~zero
    if signed and bool(missed.any()):
        rows = missed.nonzero().view(-1)
        tried = blocks[rows]
        largest = tried.abs().amax(-1) / code_map(signed)[14].to(values.device)
        found = torch.zeros_like(rows, dtype=torch.bool)
        best_codes = codes.view(-1, block // 2)[rows]
        best_scale = scale[rows]
        for step in (0, 1, -1, 2, -2):  # ulps around largest / 0.8875, nearest first
            candidate = largest
            direction = torch.full_like(largest, float("inf") if step > 0 else 0.0)
            for _ in range(abs(step)):
                candidate = torch.nextafter(candidate, direction)
            normalized = tried / candidate.view(-1, 1)
            trial = _pack(_codes(normalized, signed), None).view(len(rows), -1)
            decoded = dequantize(trial.view(-1), candidate, signed).view(-1, block)
            hit = (decoded == tried).all(-1) & ~found
            best_codes[hit], best_scale[hit] = trial[hit], candidate[hit]
            found |= hit
        codes.view(-1, block // 2)[rows] = best_codes
        scale[rows] = best_scale
    codes.view(-1, block // 2)[zero] = 0
    scale[zero] = 0
    return codes, scale
