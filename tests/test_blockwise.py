"""8-bit blockwise quantization: bitsandbytes' format, exact nearest-code rounding."""

import pytest
import torch

from zeroopt.states import blockwise

F = pytest.importorskip("bitsandbytes.functional")


def states(signed: bool, n_blocks: int = 600) -> torch.Tensor:
    """Values spread over six decades, as optimizer states are; one all-zero block."""
    torch.manual_seed(0 if signed else 1)
    n = blockwise.BLOCK * n_blocks
    x = torch.randn(n) * torch.logspace(-6, 0, n)[torch.randperm(n)]
    x[: blockwise.BLOCK] = 0
    return x if signed else x.abs()


@pytest.mark.parametrize("signed", [True, False])
def test_dynamic_map_is_bitsandbytes(signed):
    assert torch.equal(blockwise.dynamic_map(signed), F.create_dynamic_map(signed=signed))


@pytest.mark.parametrize("signed", [True, False])
def test_codes_are_the_nearest_code(signed):
    x = states(signed)
    codes, absmax = blockwise.quantize(x, signed)
    code = blockwise.dynamic_map(signed)
    blocks = x.view(-1, blockwise.BLOCK)
    normalized = blocks / torch.where(absmax > 0, absmax, torch.ones_like(absmax))[:, None]
    distance = (normalized.reshape(-1, 1) - code).abs()
    best = distance.min(dim=1).values
    chosen = distance.gather(1, codes.long().view(-1, 1)).view(-1)
    assert torch.equal(chosen, best)  # nothing closer exists (ties may go either way)


@pytest.mark.parametrize("signed", [True, False])
def test_interoperates_with_bitsandbytes(signed):
    x = states(signed)
    codes, absmax = blockwise.quantize(x, signed)
    theirs, state = F.quantize_blockwise(x, code=F.create_dynamic_map(signed=signed),
                                         blocksize=blockwise.BLOCK)
    assert torch.equal(absmax, state.absmax)
    # Each side reads the other's codes the same way.
    assert torch.equal(blockwise.dequantize(theirs, state.absmax, signed),
                       F.dequantize_blockwise(theirs, state))
    state.absmax = absmax
    assert torch.equal(F.dequantize_blockwise(codes, state), blockwise.dequantize(codes, absmax,
                                                                                   signed))
    # Where the codes differ, zeroopt's is never the worse approximation.
    ours = (blockwise.dequantize(codes, absmax, signed) - x).abs()
    bnb = (F.dequantize_blockwise(theirs, state) - x).abs()
    differ = codes != theirs
    assert torch.all(ours[differ] <= bnb[differ])
    assert ours.mean() <= bnb.mean()


def test_round_trip_error_and_in_place_outputs():
    x = states(True)
    codes = torch.empty_like(x, dtype=torch.uint8)
    absmax = torch.empty(x.numel() // blockwise.BLOCK)
    blockwise.quantize(x, True, codes=codes, absmax=absmax)
    out = torch.empty_like(x)
    blockwise.dequantize(codes, absmax, True, out=out)
    assert torch.equal(out, blockwise.dequantize(*blockwise.quantize(x, True), True))
    # The dynamic map's worst relative step is below 1/64 of absmax above 0.1 * absmax.
    big = x.abs() > 0.1 * absmax.repeat_interleave(blockwise.BLOCK)
    assert ((out - x).abs()[big] / absmax.repeat_interleave(blockwise.BLOCK)[big]).max() < 1 / 64


def test_rejects_a_length_that_is_not_whole_blocks():
    with pytest.raises(ValueError, match="multiple of 256 elements, got 300"):
        blockwise.quantize(torch.zeros(300), True)
