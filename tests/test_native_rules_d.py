"""The C kernels of AdamW's fine-tuning options with whole-param statistics (agr, orthograd,
tam: zeroopt/kernels/_adamw_options.c; spd with or without cautious: _adamw_spd.c) held to the
torch._foreach_ path of adamw_options.py: the same random shards stepped both ways (the torch
path by turning the kernels off), over several steps, at sizes that are not multiples of the
vector width, the kernels' blocks (256) or their chunks (16384).

Phase 2 is element-wise: bit for bit given the same statistics. Phase 1's float64 sums add
the same exact fp32 products in another order (lanes and chunks against torch.dot's), so they
differ in the last bits (observed relative ~1e-16, bounded by ~n 2^-53); the full step fed
those sums can then differ by an fp32 ulp in a scalar (1 / sum|g|, p, c, cos, SPD's ratio),
so the params of a whole step are compared to a few ulps, and the kernels' phase 2 is held
bit for bit to the torch phase 2 run on the same statistics.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from zeroopt.algorithms import adamw_options as ao
from zeroopt.algorithms.base import ShardTensors
from zeroopt.kernels.library import Library

SIZES = (1, 7, 1000, 17001, 70001)
BIG = (300007, 5)

pytestmark = pytest.mark.skipif(not Library("_adamw_options.c").available(),
                                reason="no C compiler (or ZEROOPT_NATIVE=0)")

CASES = {
    "agr": dict(agr=True), "orthograd": dict(orthograd=True), "tam": dict(tam=True),
    "all3": dict(agr=True, orthograd=True, tam=True),
    "all3_adopt": dict(agr=True, orthograd=True, tam=True, adopt=True),
    "all3_grams": dict(agr=True, orthograd=True, tam=True, grams=True),
    "spd": dict(spd=True), "spd_cautious": dict(spd=True, cautious=True),
    "spd_adopt_grams": dict(spd=True, adopt=True, grams=True),
}


def _group(options: dict, maximize: bool, wd: float) -> dict:
    group = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=wd, maximize=maximize,
                 cautious=False, adopt=False, grams=False, **ao.DEFAULTS)
    group.update(options)
    return group


def _shard(group: dict, sizes, seed: int) -> ShardTensors:
    """Pieces of two params per param index (param i's pieces are entries 2i and 2i+1)."""
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(n, generator=g) for n in sizes]
    states = {}
    for name in ao.states(group):
        states[name] = [p + 0.01 * torch.randn(p.numel(), generator=g)
                        if name == "initial_param" else torch.zeros_like(p) for p in params]
    index = torch.arange(len(sizes)) // 2
    numel = torch.zeros(int(index.max()) + 1, dtype=torch.float64)
    numel.index_add_(0, index, torch.tensor(sizes, dtype=torch.float64))
    return ShardTensors(params, [torch.zeros_like(p) for p in params], states, index,
                        len(numel), numel)


def _clone(s: ShardTensors) -> ShardTensors:
    return ShardTensors([p.clone() for p in s.params], [g.clone() for g in s.grads],
                        {k: [t.clone() for t in v] for k, v in s.states.items()},
                        s.param_index, s.num_params, s.param_numel)


def _gradients(s: ShardTensors, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for i, grad in enumerate(s.grads):
        grad.copy_(torch.randn(grad.numel(), generator=g))
        grad[::11] = 0.0
        if i == 2:  # nearly parallel to the weight: orthograd's rescale and guard
            grad.copy_(s.params[i] * 0.5 + 1e-3 * grad)


@contextlib.contextmanager
def _torch_path(monkeypatch):
    with monkeypatch.context() as patch:
        patch.setattr(Library, "usable", lambda self, *lists: False)
        yield


def _states(s: ShardTensors):
    return [("params", s.params)] + sorted(s.states.items())


def _ulps(a: torch.Tensor, b: torch.Tensor) -> int:
    ia, ib = a.view(torch.int32).long(), b.view(torch.int32).long()
    return int((ia - ib).abs().max()) if a.numel() else 0


def _both_phases_match(monkeypatch, group, native, other, step, decoupled, what):
    """Phase 1 natively and on the torch path: sums within 1e-12; then phase 2 on the same
    statistics: bit for bit (the grads phase 1 left are, too)."""
    stats = ao.statistics(group, native, step, decoupled)
    with _torch_path(monkeypatch):
        want = ao.statistics(group, other, step, decoupled)
    torch.testing.assert_close(stats, want, rtol=1e-12, atol=1e-300)
    for a, b in zip(native.grads, other.grads):
        assert torch.equal(a, b), f"{what}: phase 1's gradients differ"
    ao.fused_step(group, native, step, want, decoupled)
    with _torch_path(monkeypatch):
        ao.fused_step(group, other, step, want, decoupled)
    for (name, xs), (_, ys) in zip(_states(native), _states(other)):
        for i, (x, y) in enumerate(zip(xs, ys)):
            assert torch.equal(x, y), f"{what}: {name}[{i}] off by {_ulps(x, y)} ulps"


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("maximize,wd,decoupled", [(False, 0.0, True), (True, 0.1, True),
                                                   (False, 0.1, False)])
def test_native_matches_torch_path(monkeypatch, case, maximize, wd, decoupled):
    group = _group(CASES[case], maximize, wd)
    sizes = SIZES if case != "all3" else SIZES + BIG
    native, other = _shard(group, sizes, 0), None
    other = _clone(native)
    assert ao.native(group, native)
    for k in range(1, 4):
        step = torch.tensor(float(k))
        for which in (native, other):
            _gradients(which, 100 + k)
        _both_phases_match(monkeypatch, group, native, other, step, decoupled, f"{case} step {k}")


@pytest.mark.parametrize("case", ["all3", "spd_cautious"])
def test_whole_native_step_within_ulps_of_torch_path(monkeypatch, case):
    """Both phases natively against both on the torch path: the sums' last bits may move a
    scalar by an ulp, so the params agree to a few ulps."""
    group = _group(CASES[case], False, 0.1)
    native = _shard(group, SIZES, 1)
    other = _clone(native)
    for k in range(1, 4):
        step = torch.tensor(float(k))
        for which in (native, other):
            _gradients(which, 200 + k)
        ao.fused_step(group, native, step, ao.statistics(group, native, step, True), True)
        with _torch_path(monkeypatch):
            ao.fused_step(group, other, step, ao.statistics(group, other, step, True), True)
    for (name, xs), (_, ys) in zip(_states(native), _states(other)):
        for x, y in zip(xs, ys):
            assert _ulps(x, y) <= 4, name


@pytest.mark.parametrize("case", ["all3", "all3_grams", "tam", "spd", "spd_cautious",
                                  "spd_adopt_grams", "spd_grams"])
def test_native_roots_of_tiny_and_zero_moments(monkeypatch, case):
    """Second moments that are zero, subnormal or tiny (below 2^-102, the lanes MKL roots
    itself) in runs and scattered, next to ordinary ones: the kernels' roots are torch's, so
    phase 2 (and spd's phase 1) stay bit for bit."""
    group = _group(dict(spd=True, grams=True) if case == "spd_grams" else CASES[case], False, 0.1)
    group["eps"] = 1e-30  # below the tiny roots, so that each one shows in the step
    native = _shard(group, (1000, 70001, 17001, 7), 3)
    other = _clone(native)
    for k in range(1, 4):
        step = torch.tensor(float(k))
        for which in (native, other):
            _gradients(which, 300 + k)
            for grad in which.grads:
                grad[: grad.numel() // 2].mul_(1e-21)  # v ~ 1e-45..1e-40: subnormal, tiny
                grad[::5] = 0.0
                grad[1::97].mul_(1e-16)  # v ~ 1e-35: normal, below 2^-102
        _both_phases_match(monkeypatch, group, native, other, step, True, f"{case} step {k}")
