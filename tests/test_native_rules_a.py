"""The C kernels of Lion, RMSprop, AdEMAMix and schedule-free AdamW / RAdam
(zeroopt/kernels/_lion.c, _rmsprop.c, _ademamix.c, _schedule_free.c) against each rule's
torch._foreach_* path: the same params and states, bit for bit, over several steps, on lists
of odd lengths (vector tails, blocks cut short, OpenMP's split), with every option.

The torch path is the one a rule runs when the kernels are not usable: ``Library.usable`` is
patched to say so. The comparisons run on one thread (two threads on a busy two-core machine
are ~10x slower); test_threads_change_nothing runs the kernels' OpenMP split against them.
"""

import pytest
import torch

from zeroopt.algorithms import ShardTensors, get_rule, rmsprop
from zeroopt.kernels import sqrt_check
from zeroopt.kernels.library import Library

SIZES = (1, 7, 1000, 70001, 300007)  # not multiples of 8, 16 or a block; two cross OpenMP's cut
STEPS = 3


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32)  # -0.0 against 0.0, NaN against NaN: exactly


def make_shard(rule, group: dict, generator: torch.Generator) -> ShardTensors:
    """One piece per size: random params and states (non-negative where the rule says so;
    schedule-free's z starts at the params, as the optimizer starts it)."""
    params = [torch.randn(n, generator=generator) for n in SIZES]
    states = {}
    for name in rule.states(group):
        initial = (rule.initial_values(group) if rule.initial_values else {}).get(name)
        if initial == "param":
            states[name] = [p.clone() for p in params]
        else:
            values = [torch.randn(n, generator=generator) * 0.1 for n in SIZES]
            states[name] = [v.abs() if name in rule.nonnegative_states else v for v in values]
    if "grad_avg" in states:  # centered RMSprop: the variance stays positive
        states["square_avg"] = [s + a * a for s, a in zip(states["square_avg"],
                                                          states["grad_avg"])]
    return ShardTensors(params=params, grads=[torch.empty(0)] * len(SIZES), states=states,
                        param_index=torch.arange(len(SIZES)), num_params=len(SIZES),
                        param_numel=torch.tensor(SIZES, dtype=torch.float64),
                        param_names=[None] * len(SIZES))


def clone(shard: ShardTensors) -> ShardTensors:
    return ShardTensors(params=[p.clone() for p in shard.params], grads=list(shard.grads),
                        states={k: [v.clone() for v in vs] for k, vs in shard.states.items()},
                        param_index=shard.param_index, num_params=shard.num_params,
                        param_numel=shard.param_numel, param_names=shard.param_names)


def step(rule, group: dict, shard: ShardTensors, grads: list[torch.Tensor], t: int) -> None:
    """One step as the optimizer takes it on one rank: bookkeeping, phase 1, phase 2."""
    shard.grads = [g.clone() for g in grads]  # consumed
    if rule.before_step:
        rule.before_step(group)
    counter = torch.tensor(float(t))
    stats = None
    if rule.per_tensor(group):
        stats = rule.statistics(group, shard, counter)  # one rank: the totals
    rule.fused_step(group, shard, counter, stats)


def assert_same(native: ShardTensors, torch_path: ShardTensors, what: str) -> None:
    pairs = [("params", native.params, torch_path.params)]
    pairs += [(name, native.states[name], torch_path.states[name]) for name in native.states]
    for name, ours, theirs in pairs:
        for size, a, b in zip(SIZES, ours, theirs):
            differ = (bits(a) != bits(b)).nonzero().view(-1)
            assert differ.numel() == 0, (
                f"{what}: {name}[{size}] differs at {differ.numel()} elements, first "
                f"{int(differ[0])}: native {a[differ[0]].item()!r} torch {b[differ[0]].item()!r}")


def check_rule(monkeypatch, name: str, threads: int = 0, steps: int = STEPS,
               **hyperparameters) -> None:
    """The native and torch paths of rule ``name`` from the same start, ``steps`` steps; with
    ``threads``, the native path on that many threads against itself on one instead."""
    rule = get_rule(name)
    group = {**rule.defaults, **hyperparameters}
    rule.validate(group)
    generator = torch.Generator().manual_seed(0)
    native = make_shard(rule, group, generator)
    torch_path = clone(native)
    native_group, torch_group = dict(group), dict(group)
    for t in range(1, steps + 1):
        grads = [torch.randn(n, generator=generator) for n in SIZES]
        grads[2][::3] = 0.0  # zero gradients: signs and masks of zero
        if threads:
            torch.set_num_threads(threads)
        called = []
        run = Library.run

        def spy(self, kernel, *args, **kwargs):
            called.append(kernel)
            return run(self, kernel, *args, **kwargs)

        with monkeypatch.context() as patch:
            patch.setattr(Library, "run", spy)
            step(rule, native_group, native, grads, t)
        assert any(kernel.startswith(("zk_lion", "zk_rmsprop", "zk_ademamix",
                                      "zk_schedule_free")) for kernel in called), called
        torch.set_num_threads(1)
        with monkeypatch.context() as patch:
            if not threads:
                patch.setattr(Library, "usable", lambda self, *lists: False)
            step(rule, torch_group, torch_path, grads, t)
        assert_same(native, torch_path, f"{name} {hyperparameters} step {t}")


def test_kernels_are_built_and_roots_are_torchs():
    assert rmsprop.LIB.available(), "no kernels: the tests below would compare torch to torch"
    assert sqrt_check.matches_torch(rmsprop.LIB)


def test_inline_root_is_torchs_on_every_kind_of_float():
    """_torch_sqrt.h's inline MKL arithmetic, where sqrt_check chose it (the first it tries),
    on random bit patterns: every binade, subnormals, negatives, infinities and NaNs."""
    if sqrt_check.way(rmsprop.LIB) != sqrt_check.MKL_SSE:
        pytest.skip("MKL runs another kernel on this CPU (or none): the inline root is unused")
    generator = torch.Generator().manual_seed(1)
    x = torch.randint(-2**31, 2**31 - 1, (1_000_003,), dtype=torch.int32,
                      generator=generator).view(torch.float32)
    out = torch.empty_like(x)
    rmsprop.LIB.run("zk_torch_sqrt", [out, x], [sqrt_check.MKL_SSE])
    assert torch.equal(bits(out), bits(torch.sqrt(x)))


def test_inline_root_hands_runs_of_tiny_values_to_mkl_in_one_call():
    """A second moment decayed toward zero makes whole blocks tiny (under 2^-102, MKL's own
    path): every such lane is gathered, rooted by MKL once per block, and put back in place,
    mixed with ordinary lanes and in a tail shorter than a vector."""
    if sqrt_check.way(rmsprop.LIB) != sqrt_check.MKL_SSE:
        pytest.skip("MKL runs another kernel on this CPU (or none): the inline root is unused")
    generator = torch.Generator().manual_seed(2)
    tiny = torch.rand(1537, generator=generator) * 2.0**-110
    tiny[::7] = torch.rand(tiny[::7].shape, generator=generator)  # ordinary lanes among them
    tiny[100:120] = torch.randint(1, 1 << 23, (20,), generator=generator,
                                  dtype=torch.int32).view(torch.float32)  # subnormals
    out = torch.empty_like(tiny)
    rmsprop.LIB.run("zk_torch_sqrt", [out, tiny], [sqrt_check.MKL_SSE])
    assert torch.equal(bits(out), bits(torch.sqrt(tiny)))


@pytest.mark.parametrize("options", [
    {}, dict(weight_decay=0.1), dict(maximize=True, weight_decay=0.01),
    dict(cautious=True), dict(cautious=True, maximize=True, weight_decay=0.1),
    dict(betas=(0.5, 0.3), lr=0.3),
], ids=str)
def test_lion(monkeypatch, options):
    check_rule(monkeypatch, "lion", **options)


@pytest.mark.parametrize("options", [
    {}, dict(weight_decay=0.1, maximize=True), dict(momentum=0.9), dict(centered=True),
    dict(centered=True, momentum=0.5, weight_decay=0.01, maximize=True),
    dict(alpha=0.3, eps=1e-3, momentum=0.2),  # lerp's other branch (weight 0.7)
], ids=str)
def test_rmsprop(monkeypatch, options):
    check_rule(monkeypatch, "rmsprop", **options)


@pytest.mark.parametrize("options", [
    {}, dict(weight_decay=0.1), dict(alpha_warmup=2, beta3_warmup=5, alpha=5.0, eps=1e-3),
    dict(betas=(0.5, 0.6, 0.99), lr=0.1, weight_decay=0.01),
], ids=str)
def test_ademamix(monkeypatch, options):
    check_rule(monkeypatch, "ademamix", **options)


@pytest.mark.parametrize("options", [
    {}, dict(weight_decay=0.1), dict(warmup_steps=2, r=1.0, eps=1e-3),
    dict(betas=(0.3, 0.9), lr=0.1, weight_decay=0.01, weight_lr_power=0.0),
], ids=str)
def test_schedule_free_adamw(monkeypatch, options):
    # c = 1, 1/2, 1/3 over the steps (r = 0, no warmup): both branches of y's lerp
    check_rule(monkeypatch, "schedule_free_adamw", **options)


@pytest.mark.parametrize("options", [
    {}, dict(silent_sgd_phase=False, weight_decay=0.1), dict(betas=(0.5, 0.99), r=2.0),
], ids=str)
def test_schedule_free_radam(monkeypatch, options):
    # beta2 = 0.9 or 0.99: the SGD phase for 4 steps, then Adam's (0.999, the default: 5)
    check_rule(monkeypatch, "schedule_free_radam", steps=7, **{"betas": (0.9, 0.9), **options})


@pytest.mark.parametrize("name, options", [
    ("lion", {}), ("lion", dict(cautious=True)),
    ("rmsprop", dict(centered=True, momentum=0.9)), ("ademamix", dict(weight_decay=0.1)),
    ("schedule_free_adamw", dict(weight_decay=0.1)),
], ids=str)
def test_threads_change_nothing(monkeypatch, name, options):
    check_rule(monkeypatch, name, threads=2, **options)
