"""LAMB's and LARS's C kernels (zeroopt/kernels/_trust_ratio.c) against their torch._foreach_
paths, in process: both phases, several steps, pieces of awkward sizes at odd offsets of one
flat buffer (as a shard's windows are), a param split over two pieces, exclusion by name.

The element-wise results must be equal bit for bit, LAMB's square roots included (the kernel
takes torch's own, _torch_sqrt.h). The norms' sums are in double (torch's are fp32 norms,
squared): they are held to exact float64 sums instead.
"""

import contextlib

import pytest
import torch

from zeroopt.algorithms import lamb, lars, trust_ratio
from zeroopt.algorithms.base import ShardTensors
from zeroopt.kernels.library import Library

pytestmark = pytest.mark.skipif(not trust_ratio.LIB.available(),
                                reason="native kernels unavailable (no compiler, or "
                                       "ZEROOPT_NATIVE=0)")

SIZES = [1, 7, 1000, 70001, 300007]
PIECE_PARAM = [0, 1, 2, 2, 3]  # param 2 is split over two pieces
NAMES = ["a.weight", "a.bias", "b.weight", "b.bias"]
STEPS = 4

LAMB_GROUPS = [
    dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01, exclude_from_trust_ratio=()),
    dict(lr=1e-3, betas=(0.5, 0.9), eps=1e-8, weight_decay=0.1,
         exclude_from_trust_ratio=("bias",)),
    dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0, exclude_from_trust_ratio=()),
]
LARS_GROUPS = [
    dict(lr=0.1, momentum=0.9, eta=1e-3, weight_decay=1e-4, exclude_from_trust_ratio=()),
    dict(lr=0.5, momentum=0.0, eta=0.02, weight_decay=0.05, exclude_from_trust_ratio=("bias",)),
    dict(lr=0.1, momentum=0.9, eta=1e-3, weight_decay=0.0, exclude_from_trust_ratio=()),
]
CASES = [(lamb.LAMB, g) for g in LAMB_GROUPS] + [(lars.LARS, g) for g in LARS_GROUPS]
IDS = [f"{rule.name}-wd{g['weight_decay']}{'-excl' if g['exclude_from_trust_ratio'] else ''}"
       f"-b{g.get('betas', (g.get('momentum'),))[0]}" for rule, g in CASES]


def _flat_pieces(values: torch.Tensor) -> list[torch.Tensor]:
    """Views of one flat buffer at odd offsets (3 elements apart), as a shard's pieces are."""
    pieces, at = [], 3
    for n in SIZES:
        pieces.append(values[at:at + n])
        at += n + 3
    return pieces


def _shard(rule, generator) -> ShardTensors:
    total = sum(SIZES) + 3 * (len(SIZES) + 1)

    def flat(kind="normal"):
        if kind == "nonnegative":
            return _flat_pieces(torch.rand(total, generator=generator) * 1e-2)
        return _flat_pieces(torch.randn(total, generator=generator))

    states = {name: flat("nonnegative" if name == "exp_avg_sq" else "normal")
              for name in rule.states({})}
    return ShardTensors(flat(), flat(), states, param_index=torch.tensor(PIECE_PARAM),
                        num_params=len(NAMES), param_names=list(NAMES))


def _copy(shard: ShardTensors) -> ShardTensors:
    return ShardTensors([p.clone() for p in shard.params], [g.clone() for g in shard.grads],
                        {k: [t.clone() for t in v] for k, v in shard.states.items()},
                        shard.param_index, shard.num_params, shard.param_numel,
                        list(shard.param_names))


@contextlib.contextmanager
def torch_path(monkeypatch):
    """The rules' torch._foreach_ path (the kernels switched off)."""
    with monkeypatch.context() as m:
        m.setattr(trust_ratio, "native", lambda shard, root=False: False)
        yield


def _exact_sums(shard: ShardTensors, second: list[torch.Tensor]) -> torch.Tensor:
    rows = [[t.double().square().sum() for t in tensors] for tensors in (shard.params, second)]
    return torch.stack([shard.per_param(row) for row in rows])


def _assert_equal(native: ShardTensors, reference: ShardTensors, what: str) -> None:
    for name, got, want in [("params", native.params, reference.params),
                            *[(k, native.states[k], reference.states[k])
                              for k in native.states]]:
        for i, (a, b) in enumerate(zip(got, want)):
            assert torch.equal(a, b), (what, name, i, (a != b).sum().item(),
                                       (a - b).abs().max().item())


def _step_both(rule, group, native, reference, t, monkeypatch):
    """One step of each: the native phase 1, the torch phase 1 (checked against each other),
    then both phase 2s from the native statistics (so that they get the same ratios)."""
    step = torch.tensor(float(t))
    stats = None
    if rule.per_tensor(group):
        stats = rule.statistics(group, native, step)
        with torch_path(monkeypatch):
            torch_stats = rule.statistics(group, reference, step)
        # the torch path's grads now hold what the second norm is of (LAMB's u, LARS' g + wd w)
        exact = _exact_sums(reference, reference.grads)
        assert torch.allclose(stats, exact, rtol=1e-12, atol=0), (stats, exact)
        assert torch.allclose(stats, torch_stats, rtol=1e-4, atol=0)  # fp32 norms, squared
        if rule is lamb.LAMB:
            for i, (a, b) in enumerate(zip(native.grads, reference.grads)):
                assert torch.equal(a, b), ("u", i, (a != b).sum().item())
    rule.fused_step(group, native, step, stats)
    with torch_path(monkeypatch):
        rule.fused_step(group, reference, step, stats)


@pytest.mark.parametrize("rule, group", CASES, ids=IDS)
def test_native_equals_foreach(rule, group, monkeypatch):
    generator = torch.Generator().manual_seed(0)
    native = _shard(rule, generator)
    reference = _copy(native)
    for t in range(1, STEPS + 1):
        grads = [torch.randn(n, generator=generator) for n in SIZES]
        for shard in (native, reference):
            for mine, g in zip(shard.grads, grads):
                mine.copy_(g)
        _step_both(rule, group, native, reference, t, monkeypatch)
        _assert_equal(native, reference, f"step {t}")


@pytest.mark.parametrize("kernel, count", [("zk_lamb_direction", 4), ("zk_lars_squares", 2)])
def test_sums_do_not_depend_on_threads(kernel, count):
    """The chunked double sums, and the updated tensors, are the same on 1 and 2 threads."""
    n = 300007
    results = []
    threads = torch.get_num_threads()
    try:
        for k in (1, 2):
            torch.set_num_threads(k)
            tensors = [torch.randn(n, generator=torch.Generator().manual_seed(i)).abs()
                       for i in range(count)]
            sums = trust_ratio.LIB.run(kernel, tensors,
                                       [0.9, 0.1, 0.999, 1e-3, 0.3, 1e-6, 1.5, 0.01], outputs=2)
            results.append((sums, tensors))
    finally:
        torch.set_num_threads(threads)
    (sums1, t1), (sums2, t2) = results
    assert sums1 == sums2
    assert all(torch.equal(a, b) for a, b in zip(t1, t2))


def test_native_only_for_fp32_cpu_contiguous(monkeypatch):
    shard = _shard(lars.LARS, torch.Generator().manual_seed(3))
    assert trust_ratio.native(shard)
    assert not trust_ratio.native(ShardTensors([], []))
    half = ShardTensors(shard.params, [g.bfloat16() for g in shard.grads], shard.states)
    assert not trust_ratio.native(half)
    monkeypatch.setenv("ZEROOPT_NATIVE", "0")
    assert not Library("_trust_ratio.c").available()
