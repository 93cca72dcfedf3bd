"""adamw_options' kernels over a whole window in one call (zk_options_transform_sums_pieces,
zk_options_transform_step_pieces: the pieces lie end to end in every buffer, as a window's do)
held bit for bit to a call per piece (the same pieces as separate tensors), both phases, over
several steps, at sizes that are not multiples of the vector width, the blocks or the chunks.
"""

from __future__ import annotations

import pytest
import torch

from zeroopt.algorithms import adamw_options as ao
from zeroopt.algorithms import adamw_options_native as native_kernels
from zeroopt.algorithms.base import ShardTensors
from zeroopt.kernels.library import Library

SIZES = (1, 7, 1000, 17001, 70001, 3, 129)

pytestmark = pytest.mark.skipif(not Library("_adamw_options.c").available(),
                                reason="no C compiler (or ZEROOPT_NATIVE=0)")

CASES = {
    "agr": dict(agr=True), "orthograd": dict(orthograd=True), "tam": dict(tam=True),
    "all3": dict(agr=True, orthograd=True, tam=True),
    "all3_grams": dict(agr=True, orthograd=True, tam=True, grams=True),
    "all3_adopt": dict(agr=True, orthograd=True, tam=True, adopt=True),
}


def make_group(options: dict, maximize: bool, wd: float) -> dict:
    """A param group of adamw with ``options`` on."""
    group = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=wd, maximize=maximize,
                 cautious=False, adopt=False, grams=False, **ao.DEFAULTS)
    group.update(options)
    return group


def split(flat: torch.Tensor, sizes) -> list[torch.Tensor]:
    """``flat``'s consecutive pieces of ``sizes``: views lying end to end."""
    return list(flat.split(list(sizes)))


def flat_shard(group: dict, sizes, seed: int) -> ShardTensors:
    """Every list's pieces views of one buffer (two pieces per param)."""
    g = torch.Generator().manual_seed(seed)
    n = sum(sizes)
    params = split(torch.randn(n, generator=g), sizes)
    states = {name: split(torch.zeros(n), sizes) for name in ao.states(group)}
    index = torch.arange(len(sizes)) // 2
    numel = torch.zeros(int(index.max()) + 1, dtype=torch.float64)
    numel.index_add_(0, index, torch.tensor(sizes, dtype=torch.float64))
    return ShardTensors(params, split(torch.zeros(n), sizes), states, index, len(numel), numel)


def separate(s: ShardTensors) -> ShardTensors:
    """The same values, each piece a tensor of its own (a kernel call per piece)."""
    return ShardTensors([p.clone() for p in s.params], [g.clone() for g in s.grads],
                        {k: [t.clone() for t in v] for k, v in s.states.items()},
                        s.param_index, s.num_params, s.param_numel)


def fill_gradients(s: ShardTensors, seed: int) -> None:
    """Random gradients, some zero, one nearly parallel to its weight; tiny ones in a piece
    (second moments MKL roots itself)."""
    g = torch.Generator().manual_seed(seed)
    for i, grad in enumerate(s.grads):
        grad.copy_(torch.randn(grad.numel(), generator=g))
        grad[::11] = 0.0
        if i == 2:
            grad.copy_(s.params[i] * 0.5 + 1e-3 * grad)
        if i == 3:
            grad[: grad.numel() // 2].mul_(1e-21)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("maximize,wd,decoupled", [(False, 0.0, True), (True, 0.1, True),
                                                   (False, 0.1, False)])
def test_one_call_per_window_matches_a_call_per_piece(case, maximize, wd, decoupled):
    group = make_group(CASES[case], maximize, wd)
    whole = flat_shard(group, SIZES, 0)
    pieces = separate(whole)
    assert ao.native(group, whole) and ao.native(group, pieces)
    lists = [whole.params, whole.grads] + list(whole.states.values())
    assert native_kernels.spans(lists) is not None  # one call per phase
    assert native_kernels.spans([pieces.params, pieces.grads]) is None  # a call per piece
    for k in range(1, 4):
        step = torch.tensor(float(k))
        for s in (whole, pieces):
            fill_gradients(s, 100 + k)
        stats = ao.statistics(group, whole, step, decoupled)
        want = ao.statistics(group, pieces, step, decoupled)
        assert torch.equal(stats, want), f"{case} step {k}: phase 1's sums differ"
        ao.fused_step(group, whole, step, stats, decoupled)
        ao.fused_step(group, pieces, step, want, decoupled)
        for name, xs, ys in [("params", whole.params, pieces.params)] + [
                (name, whole.states[name], pieces.states[name]) for name in whole.states]:
            for i, (x, y) in enumerate(zip(xs, ys)):
                assert torch.equal(x, y), f"{case} step {k}: {name}[{i}] differs"


def test_spans_refuse_pieces_out_of_order():
    """Pieces of one buffer, but not in its order: no span (a call per piece)."""
    flat = torch.zeros(30)
    a, b, c = split(flat, (10, 10, 10))
    assert native_kernels.spans([[a, b, c]]) is not None
    assert native_kernels.spans([[a, c, b]]) is None
    assert native_kernels.spans([[a, flat[11:20]]]) is None
