"""The C kernels of Adam's options (cautious, adopt, grams), StableAdamW, GrokAdamW and
AnyPrecisionAdamW held to the torch._foreach_* paths they replace: the same random shards
stepped both ways (the torch path by turning the kernels off), bit for bit, at sizes that are
not multiples of the vector width or the kernels' blocks, over several steps.
"""

from __future__ import annotations

import contextlib
import itertools

import pytest
import torch

from zeroopt.algorithms import adam, variants
from zeroopt.algorithms.base import ShardTensors
from zeroopt.kernels.library import Library

SIZES = (1, 7, 1000, 17001)  # past a block (512) and a chunk (16384) of the kernels
BIG = (300007, 3)

pytestmark = pytest.mark.skipif(not Library("_adam_variants.c").available(),
                                reason="no C compiler (or ZEROOPT_NATIVE=0)")


def _shard(sizes, states, seed, state_init=None):
    """A shard of one piece per param, its states filled by ``state_init(name, n)``."""
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(n, generator=g) for n in sizes]
    init = state_init or (lambda name, n: torch.zeros(n))
    return ShardTensors(params, [torch.zeros(n) for n in sizes],
                        {name: [init(name, n) for n in sizes] for name in states},
                        param_index=torch.arange(len(sizes)), num_params=len(sizes),
                        param_numel=torch.tensor(sizes, dtype=torch.float64))


def _clone(shard: ShardTensors) -> ShardTensors:
    return ShardTensors([p.clone() for p in shard.params], [g.clone() for g in shard.grads],
                        {k: [s.clone() for s in v] for k, v in shard.states.items()},
                        shard.param_index, shard.num_params, shard.param_numel)


def _gradients(shard: ShardTensors, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for grad in shard.grads:
        grad.copy_(torch.randn(grad.numel(), generator=g))
        grad[::11] = 0.0  # zero gradients: sign 0, cautious's mask, ADOPT's clamp_min(eps)


def _assert_same(a: ShardTensors, b: ShardTensors, what: str) -> None:
    for name, x, y in [("params", a.params, b.params),
                       *((k, a.states[k], b.states[k]) for k in a.states)]:
        for i, (u, w) in enumerate(zip(x, y)):
            assert torch.equal(u, w), f"{what}: {name}[{i}] differs by " \
                                      f"{(u - w).abs().max().item()}"


@contextlib.contextmanager
def _torch_path(monkeypatch):
    """Turn every native kernel off (as ZEROOPT_NATIVE=0 does) inside the context."""
    with monkeypatch.context() as patch:
        patch.setattr(Library, "usable", lambda self, *lists: False)
        yield


def _run_both(monkeypatch, step_fn, shard, steps=3, seed=0):
    """Step ``shard`` and a copy, natively and on the torch path, with the same gradients;
    returns both."""
    other = _clone(shard)
    for k in range(steps):
        for which in (shard, other):
            _gradients(which, seed + k)
        step_fn(shard, k + 1)
        with _torch_path(monkeypatch):
            step_fn(other, k + 1)
    return shard, other


# --- Adam(W) with cautious, adopt, grams ------------------------------------------------------


def _adam_step(rule, group):
    def step(shard, t):
        count = torch.tensor(float(t))
        stats = rule.statistics(group, shard, count) if group["cautious"] else None
        rule.fused_step(group, shard, count, stats)
    return step


OPTION_SETS = [dict(zip(("cautious", "adopt", "grams"), flags))
               for flags in itertools.product((False, True), repeat=3) if any(flags)]


@pytest.mark.parametrize("options", OPTION_SETS,
                         ids=lambda o: "+".join(k for k, v in o.items() if v))
@pytest.mark.parametrize("decoupled", [True, False], ids=["adamw", "adam"])
def test_adam_options(monkeypatch, options, decoupled):
    rule = adam.ADAMW if decoupled else adam.ADAM
    for maximize, wd, betas in ((False, 0.0, (0.9, 0.999)), (True, 0.1, (0.9, 0.95)),
                                (False, 0.05, (0.3, 0.99))):  # 1 - beta1 >= 0.5: lerp's other side
        group = dict(rule.defaults, lr=1e-2, betas=betas, weight_decay=wd, maximize=maximize,
                     **options)
        got, want = _run_both(monkeypatch, _adam_step(rule, group),
                              _shard(SIZES, ("exp_avg", "exp_avg_sq"), 1))
        _assert_same(got, want, f"{options} maximize={maximize} wd={wd}")


def test_adam_options_big_and_threads(monkeypatch):
    group = dict(adam.ADAMW.defaults, lr=1e-2, weight_decay=0.1, cautious=True, grams=True)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)  # the kernels' OpenMP split must not change a bit
        got, want = _run_both(monkeypatch, _adam_step(adam.ADAMW, group),
                              _shard(BIG, ("exp_avg", "exp_avg_sq"), 2), steps=3)
    finally:
        torch.set_num_threads(threads)
    _assert_same(got, want, "big")


@pytest.mark.parametrize("adopt", [False, True])
def test_adam_direction_and_keep_agreeing(monkeypatch, adopt):
    """The public pieces adamw_options.py and lion.py call: the direction (and the gradients
    it leaves), and the mask with its counts."""
    group = dict(adam.ADAM.defaults, lr=1e-2, weight_decay=0.1, maximize=True, adopt=adopt,
                 grams=True)
    for t in (1, 2, 3):
        shard = _shard(SIZES, ("exp_avg", "exp_avg_sq"), 3,
                       lambda name, n: torch.rand(n) if name == "exp_avg_sq" else torch.randn(n))
        _gradients(shard, t)
        other = _clone(shard)
        got = variants.adam_direction(group, shard, t, decoupled=False)
        with _torch_path(monkeypatch):
            want = variants.adam_direction(group, other, t, decoupled=False)
        assert (got is None) == (want is None) == (adopt and t == 1)
        for a, b in zip(shard.grads, other.grads):
            assert torch.equal(a, b)
        _assert_same(shard, other, f"direction t={t}")
        if got is None:
            continue
        for a, b in zip(got, want):
            assert torch.equal(a, b)
        kept = variants.keep_agreeing(got, shard.grads, shard)
        with _torch_path(monkeypatch):
            kept_torch = variants.keep_agreeing(want, other.grads, other)
        assert torch.equal(kept, kept_torch) and kept.dtype == kept_torch.dtype
        for a, b in zip(got, want):
            assert torch.equal(a, b)


# --- StableAdamW ------------------------------------------------------------------------------


@pytest.mark.parametrize("wd, decouple_lr", [(0.0, False), (0.1, False), (0.1, True)])
def test_stable_adamw(monkeypatch, wd, decouple_lr):
    """Growing gradients put rms above 1 from step 2 (lr_t < lr); the per-piece sums agree to
    1e-15 relative (torch adds the same doubles in another order), the shards bit for bit."""
    from zeroopt.algorithms.stable_adamw import STABLE_ADAMW

    group = dict(STABLE_ADAMW.defaults, lr=1e-2, weight_decay=wd, decouple_lr=decouple_lr,
                 max_lr=2e-2 if decouple_lr else None)
    sums = {}

    def step(shard, t):
        for g in shard.grads:
            g.mul_(1 + 4 * t)  # rms > 1 after the first step
        group["step"] = t
        count = torch.tensor(float(t))
        stats = STABLE_ADAMW.statistics(group, shard, count)
        sums.setdefault(t, []).append(stats)
        STABLE_ADAMW.fused_step(group, shard, count, stats)

    got, want = _run_both(monkeypatch, step, _shard(SIZES + (3,), ("exp_avg", "exp_avg_sq"), 4))
    _assert_same(got, want, f"stable_adamw wd={wd} decouple_lr={decouple_lr}")
    assert any((s[0] / torch.tensor(SIZES + (3,))).max() > 1 for s, _ in sums.values())
    for native, torch_path in sums.values():
        torch.testing.assert_close(native, torch_path, rtol=1e-15, atol=0)


# --- GrokAdamW --------------------------------------------------------------------------------


@pytest.mark.parametrize("gamma, clipping, wd, losses", [
    (0.0, 0.0, 0.0, None),  # element-wise: no statistics
    (0.1, 1.0, 1e-2, (0.5, 0.9)),  # positions, clipping, decay, a grokking signal
    (0.2, 50.0, 0.0, None)])  # a clipping bound some params stay under
def test_grokadamw(monkeypatch, gamma, clipping, wd, losses):
    from zeroopt.algorithms.grokadamw import GROKADAMW

    group = dict(GROKADAMW.defaults, lr=1e-2, gamma=gamma, gradient_clipping=clipping,
                 weight_decay=wd)
    if losses:
        group["train_loss"], group["eval_loss"] = losses
    per_tensor = GROKADAMW.per_tensor(group)

    def step(shard, t):
        count = torch.tensor(float(t))
        stats = GROKADAMW.statistics(group, shard, count) if per_tensor else None
        GROKADAMW.fused_step(group, shard, count, stats)

    got, want = _run_both(monkeypatch, step,
                          _shard(SIZES, ("exp_avg", "exp_avg_sq", "grok_ema"), 5))
    _assert_same(got, want, f"grokadamw gamma={gamma} clipping={clipping}")


# --- AnyPrecisionAdamW ------------------------------------------------------------------------


@pytest.mark.parametrize("momentum, variance", [
    (torch.float32, torch.float32), (torch.float32, torch.bfloat16),
    (torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16)])
@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_anyprecision(monkeypatch, momentum, variance, wd):
    """States stored in fp32 holding values of their dtypes (state_precision '32bit'); the
    first states not bf16 values, to hold the kernel to torch's cast of them too."""
    from zeroopt.algorithms.anyprecision import ADAMW_ANYPRECISION

    group = dict(ADAMW_ANYPRECISION.defaults, lr=1e-2, weight_decay=wd, momentum_dtype=momentum,
                 variance_dtype=variance, state_precision="32bit")

    def step(shard, t):
        ADAMW_ANYPRECISION.fused_step(group, shard, torch.tensor(float(t)), None)

    got, want = _run_both(monkeypatch, step, _shard(SIZES, ("exp_avg", "exp_avg_sq"), 6,
                                                    lambda name, n: torch.rand(n) * 1e-3))
    _assert_same(got, want, f"anyprecision {momentum} {variance} wd={wd}")
