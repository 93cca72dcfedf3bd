"""Saved states into a region's form: 8-bit codes copied as they are where the region is 8-bit
(no re-rounding), decoded where it is not; fp32 or bf16 values encoded into whatever the region
keeps. This is what lets a state saved in one precision, or by bitsandbytes, load in another.

4-bit states are saved as their decoded fp32 values (``states/storage.py``); loaded into a
4-bit region they are encoded so that they decode to the same values bit for bit
(``fourbit.quantize_exact``), so a 4-bit run resumes exactly, at any world size."""

from __future__ import annotations

import torch

from ..states.blockwise import BLOCK, dequantize
from ..states.storage import RegionStates


def check_saved(entry: dict, name: str, numel: int) -> str | None:
    """Why a saved state cannot be loaded, or None."""
    value = entry[name]
    if value.dtype == torch.uint8:
        absmax = entry.get(name + "_absmax")
        blocks = -(-numel // BLOCK)
        if absmax is None:
            return f"8-bit codes without {name + '_absmax'!r}, their blocks' scales"
        if absmax.numel() != blocks:
            return (f"{name + '_absmax'!r} has {absmax.numel()} entries, the param has "
                    f"{blocks} blocks of {BLOCK}")
    elif not value.is_floating_point():
        return f"expected floating-point values or uint8 codes, got {value.dtype}"
    return None


@torch.no_grad()
def load_piece(region: RegionStates, name: str, saved: dict, param_offset: int, numel: int,
               region_lo: int) -> None:
    """Load elements [param_offset, +numel) of a param's saved state ``name`` into the region
    from ``region_lo``. Pieces of 8-bit and 4-bit params start on a block of the param."""
    value = saved[name].reshape(-1)
    if value.dtype == torch.uint8:
        # The blocks covering the piece (a piece of an 8-bit param starts on one of them).
        first, end = param_offset // BLOCK, -(-(param_offset + numel) // BLOCK)
        absmax = saved[name + "_absmax"].reshape(-1)[first:end].float()
        codes = value[first * BLOCK:end * BLOCK]
        if region.kind.precision == "8bit":
            at = region_lo // BLOCK
            region.tensors[name][region_lo:region_lo + numel].copy_(codes[:numel])
            region.tensors[name + "_absmax"][at:at + end - first].copy_(absmax)
            region.release(region_lo, (end - first) * BLOCK)  # whole blocks, as paged
            return
        padded = torch.zeros((end - first) * BLOCK, dtype=torch.uint8)
        padded[:codes.numel()] = codes
        skip = param_offset - first * BLOCK
        value = dequantize(padded, absmax, region.signed[name])[skip:skip + numel]
    else:
        value = value[param_offset:param_offset + numel].float()
    if region.kind.in_place:
        region.view(name, region_lo, numel).copy_(value)
        return
    pad = -numel % region.kind.block_numel  # whole blocks: the param's padding holds zeros
    if pad:
        value = torch.cat([value, value.new_zeros(pad)])
    region.store(name, region_lo, value.to(region.device), exact=True)
    region.release(region_lo, value.numel())
