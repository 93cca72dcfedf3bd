"""The one-call 8-bit Adam(W) step (states/adam8bit.py, _adam8bit.c) against today's three
passes (decode into fp32 scratch, torch._fused_adam(w)_, encode): the same params, codes and
absmax, bit for bit, over windows of odd-sized tensors, several steps, Adam and AdamW, weight
decay and maximize, early and late bias corrections, paged states and two threads; and the
window machinery's choice of path (shard_windows.run, one_pass_adam)."""

import ctypes
import platform

import pytest
import torch

from zeroopt.algorithms import ShardTensors, adam
from zeroopt.kernels import build
from zeroopt.shard_windows import Window, one_pass_adam, run
from zeroopt.states import adam8bit
from zeroopt.states.kinds import StateKind
from zeroopt.states.storage import RegionStates

NAMES = adam8bit.STATES
needs_kernel = pytest.mark.skipif(not adam8bit.available(),
                                  reason="one-call 8-bit Adam kernel unavailable here")
# Tensors of a window, in elements: each window is whole 256-element blocks in all, the
# tensors in it are not (each one's last len % 8 elements take torch's tail arithmetic).
WINDOWS = [[1, 7, 1000, 17, 255, 768], [70001, 300007, 2 * 256 * 256 - 70001 - 300007 + 256 * 1024],
           [256], [3, 253, 4096]]


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32) if t.dtype is torch.float32 else t  # NaN and -0.0 exactly


class Setup:
    """Params, gradients and an 8-bit region cut into windows; two with one seed are equal."""

    def __init__(self, seed: int, windows=WINDOWS, paged: bool = False, gap: bool = True,
                 tmp_path=None):
        generator = torch.Generator().manual_seed(seed)
        sizes = [n for window in windows for n in window]
        self.params = torch.randn(sum(sizes), generator=generator)
        self.grads = torch.randn(sum(sizes), generator=generator) * 0.01
        region_numel = sum(sizes) + (256 * len(windows) if gap else 0)
        self.region = RegionStates(NAMES, ("exp_avg_sq",), region_numel,
                                   StateKind("8bit", paged=paged), torch.device("cpu"),
                                   page_dir=str(tmp_path) if tmp_path else None)
        width = max(sum(window) for window in windows)
        self.scratch = {name: torch.empty(width) for name in NAMES}
        self.windows, offset, lo = [], 0, 0
        for window in windows:
            w = Window(ShardTensors([], [], {name: [] for name in NAMES}), self.region,
                       scratch=self.scratch)
            for k, n in enumerate(window):
                if gap and k == len(window) - 1 and sum(window[:-1]) % 256 == 0 and k:
                    lo += 256  # a second stretch of the region in this window
                w.add(self.params[offset:offset + n], self.grads[offset:offset + n], lo, None)
                offset, lo = offset + n, lo + n
            self.windows.append(w)

    def state(self) -> list[torch.Tensor]:
        return [self.params, *self.region.tensors.values()]

    def new_grads(self, seed: int, nonfinite: bool = False) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.grads.copy_(torch.randn(self.grads.numel(), generator=generator) * 0.01)
        if nonfinite:
            self.grads[5] = float("inf")
            self.grads[3000] = float("nan")


def group_of(decoupled: bool, **options) -> dict:
    rule = adam.ADAMW if decoupled else adam.ADAM
    return dict(rule.defaults, **options)


def three_passes(setup: Setup, group: dict, step: torch.Tensor, decoupled: bool) -> None:
    rule = adam.ADAMW if decoupled else adam.ADAM
    run(setup.windows, lambda shard: rule.fused_step(group, shard, step, None), load=True,
        store=True)


def one_pass(setup: Setup, group: dict, step: torch.Tensor, decoupled: bool) -> None:
    rule = adam.ADAMW if decoupled else adam.ADAM
    direct = one_pass_adam(rule, group, step)
    assert direct is not None

    def refuse(shard):
        raise AssertionError("a window took the three-pass path")

    assert run(setup.windows, refuse, load=True, store=True, direct=direct) == \
        [None] * len(setup.windows)


def assert_same(a: Setup, b: Setup) -> None:
    for x, y in zip(a.state(), b.state(), strict=True):
        assert torch.equal(bits(x), bits(y)), (x != y).sum()


def train(setup: Setup, step_fn, group: dict, decoupled: bool, steps, nonfinite=False):
    for k, t in enumerate(steps):
        setup.new_grads(100 + k, nonfinite and k == 1)
        step_fn(setup, group, torch.tensor(float(t)), decoupled)


@needs_kernel
@pytest.mark.parametrize("decoupled", [True, False], ids=["adamw", "adam"])
@pytest.mark.parametrize("options", [{}, dict(weight_decay=0.1), dict(maximize=True),
                                     dict(weight_decay=0.01, maximize=True, betas=(0.3, 0.99),
                                          lr=0.05, eps=1e-6)],
                         ids=["plain", "decay", "maximize", "all"])
def test_one_pass_equals_three_passes(decoupled, options):
    group = group_of(decoupled, **options)
    a, b = Setup(0), Setup(0)
    steps = [1, 2, 3, 4]
    train(a, three_passes, group, decoupled, steps)
    train(b, one_pass, group, decoupled, steps)
    assert_same(a, b)


@needs_kernel
@pytest.mark.parametrize("decoupled", [True, False], ids=["adamw", "adam"])
def test_late_bias_corrections_and_nonfinite_gradients(decoupled):
    """Step counts far along (bias corrections near 1), and an inf and a NaN gradient: NaN
    blocks take the clamped path of the encoding, the params turn NaN alike."""
    group = group_of(decoupled, weight_decay=0.05)
    a, b = Setup(1), Setup(1)
    steps = [999, 1000, 123456]
    train(a, three_passes, group, decoupled, steps, nonfinite=True)
    train(b, one_pass, group, decoupled, steps, nonfinite=True)
    assert_same(a, b)


@needs_kernel
@pytest.mark.parametrize("decoupled", [True, False], ids=["adamw", "adam"])
def test_nan_gradients_with_maximize(decoupled):
    """With maximize=True a NaN gradient's param may come out with the other NaN sign than
    torch's (_adam8bit.c says why); every code, absmax and other param bit is the same."""
    group = group_of(decoupled, weight_decay=0.05, maximize=True)
    a, b = Setup(1), Setup(1)
    train(a, three_passes, group, decoupled, [1, 2, 3], nonfinite=True)
    train(b, one_pass, group, decoupled, [1, 2, 3], nonfinite=True)
    for x, y in zip(a.state()[1:], b.state()[1:], strict=True):
        assert torch.equal(bits(x), bits(y))
    nan = a.params.isnan()
    assert nan.any() and torch.equal(nan, b.params.isnan())
    assert torch.equal(bits(a.params[~nan]), bits(b.params[~nan]))


# Windows whose tensors straddle the kernel's chunks at odd places (_adam8bit.c: a thread's
# run of more than WHOLE = 2**19 elements is stepped CHUNK = 8192 at a time, at 1 and at 2
# threads here; shorter runs are one chunk), one tensor with its tail right at a chunk's end.
_BIG = 2 * 2**19 + 8192 * 3 + 256 * 5
CHUNKED = [[8191, 8194, 3, _BIG - 8191 - 8194 - 3],
           [16384 - 5, 5, 2**19 + 16384 * 3 + 256 * 7 - 1, 1], [1000, 200000, 2 * 256 * 512 - 201000]]


@needs_kernel
@pytest.mark.parametrize("threads", [1, 2])
def test_chunk_boundaries(threads):
    """Each thread steps its run of blocks a chunk at a time in one reused scratch: tensors
    cut by chunk and thread boundaries come out as in the three passes."""
    before = torch.get_num_threads()
    group = group_of(True, weight_decay=0.01)
    try:
        torch.set_num_threads(threads)
        a, b = Setup(8, CHUNKED), Setup(8, CHUNKED)
        train(a, three_passes, group, True, [1, 2, 3])
        train(b, one_pass, group, True, [1, 2, 3])
        assert_same(a, b)
    finally:
        torch.set_num_threads(before)


@needs_kernel
def test_threads_split_the_blocks_without_changing_results():
    before = torch.get_num_threads()
    group = group_of(True, weight_decay=0.01)
    try:
        a, b = Setup(2), Setup(2)
        torch.set_num_threads(1)
        train(a, one_pass, group, True, [1, 2])
        torch.set_num_threads(2)  # windows above the kernel's PARALLEL_MIN are split
        train(b, one_pass, group, True, [1, 2])
        assert_same(a, b)
        c = Setup(2)
        train(c, three_passes, group, True, [1, 2])
        assert_same(b, c)
    finally:
        torch.set_num_threads(before)


@needs_kernel
def test_paged_states(tmp_path):
    """Paged CPU states (a memory-mapped file): the pages are requested and dropped around
    each window as before, and the results are the resident ones."""
    group = group_of(True)
    a, b = Setup(3, paged=True, tmp_path=tmp_path), Setup(3, paged=True, tmp_path=tmp_path)
    train(a, three_passes, group, True, [1, 2, 3])
    train(b, one_pass, group, True, [1, 2, 3])
    assert_same(a, b)
    assert b.region.resident_bytes() == a.region.resident_bytes()  # released alike
    c = Setup(3)
    train(c, one_pass, group, True, [1, 2, 3])
    assert_same(c, b)  # and resident states step alike


@needs_kernel
def test_windows_that_do_not_qualify_take_the_three_passes():
    """A 32-bit window (region None) and a bf16 region are left to fn, in the same run."""
    group = group_of(True)
    setup = Setup(4)
    bf16 = RegionStates(NAMES, ("exp_avg_sq",), 256, StateKind("bf16"), torch.device("cpu"))
    odd = Window(ShardTensors([], [], {name: [] for name in NAMES}), bf16,
                 scratch=setup.scratch)
    odd.add(torch.randn(256), torch.randn(256), 0, None)
    stepped = []
    direct = one_pass_adam(adam.ADAMW, group, torch.tensor(1.0))
    results = run([*setup.windows, odd], lambda shard: stepped.append(shard) or "fn", load=True,
                  store=True, direct=direct)
    assert results == [None] * len(setup.windows) + ["fn"] and stepped == [odd.shard]


def test_only_plain_adam_and_adamw_are_offered():
    step = torch.tensor(1.0)
    assert one_pass_adam(adam.ADAMW, group_of(True), step) is not None
    assert one_pass_adam(adam.ADAM, group_of(False), step) is not None
    for option in ("cautious", "adopt", "grams"):
        assert one_pass_adam(adam.ADAMW, group_of(True, **{option: True}), step) is None
    assert one_pass_adam(adam.ADAMW, group_of(True), step, stats=torch.zeros(1)) is None
    from zeroopt.algorithms import get_rule
    assert one_pass_adam(get_rule("lion"), dict(get_rule("lion").defaults), step) is None


def test_unavailable_kernel_leaves_every_window_to_the_three_passes(monkeypatch):
    """ZEROOPT_NATIVE=0, no compiler, or no match with torch's kernel: the usual path."""
    monkeypatch.setattr(adam8bit, "available", lambda: False)
    group = group_of(True)
    a, b = Setup(5), Setup(5)
    train(a, three_passes, group, True, [1, 2])
    direct = one_pass_adam(adam.ADAMW, group, torch.tensor(1.0))
    for k, t in enumerate([1, 2]):
        b.new_grads(100 + k)
        run(b.windows, lambda shard: adam.ADAMW.fused_step(group, shard, torch.tensor(float(t))),
            load=True, store=True, direct=direct)
    assert_same(a, b)


@needs_kernel
def test_calibration_rejects_a_wrong_kernel(monkeypatch):
    """The comparison at first use catches arithmetic that differs from torch's: with every
    FMA choice forced to a wrong one, no configuration matches."""
    lib = adam8bit._lib
    real = lib.zq_adam_update

    def wrong(n, p, g, m, v, h, mode, vec):
        real(n, p, g, m, v, h, 0, 1)  # plain arithmetic, everything a tail

    monkeypatch.setattr(lib, "zq_adam_update", wrong)
    assert adam8bit.calibrate(lib) is None


@needs_kernel
def test_step_checks_lengths():
    p, g = torch.zeros(256), torch.zeros(256)
    codes = (torch.zeros(256, dtype=torch.uint8),) * 2
    h = adam8bit.hyper(group_of(True), torch.tensor(1.0), True)
    scratch = (torch.empty(256), torch.empty(256))
    with pytest.raises(ValueError, match="multiple of 256"):
        adam8bit.step_([p[:100]], [g[:100]], codes, (torch.zeros(1),) * 2, scratch, h)
    with pytest.raises(ValueError, match="grad of"):
        adam8bit.step_([p], [g[:10]], codes, (torch.zeros(1),) * 2, scratch, h)
    assert isinstance(h, ctypes.Array)


@needs_kernel
@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 flags")
@pytest.mark.parametrize("flags", [["-mno-avx512f"], ["-mno-avx2", "-mno-avx"]],
                         ids=["avx2", "plain-c"])
def test_builds_for_other_cpus(flags, monkeypatch, tmp_path):
    """The AVX2 and plain-C bodies that CPUs without AVX-512 compile: the same calibration,
    the same results."""
    monkeypatch.setenv("ZEROOPT_CACHE_DIR", str(tmp_path))
    cc = build.compiler()
    path = build.compile_source(adam8bit.SOURCE, cc, build.FLAGS + flags,
                                build.predefined_macros(cc))
    lib = adam8bit.bind(ctypes.CDLL(str(path)))
    assert adam8bit.calibrate(lib) == adam8bit._config
    monkeypatch.setattr(adam8bit, "_lib", lib)
    for decoupled in (True, False):
        group = group_of(decoupled, weight_decay=0.1, maximize=True)
        a, b = Setup(6, WINDOWS[:1] + WINDOWS[2:]), Setup(6, WINDOWS[:1] + WINDOWS[2:])
        train(a, three_passes, group, decoupled, [1, 2])
        train(b, one_pass, group, decoupled, [1, 2])
        assert_same(a, b)


@needs_kernel
def test_replaced_state_tensors_are_followed():
    """A window keeps its kernel arguments between steps; if the region's stored tensors are
    replaced (not copied into), it takes the new ones."""
    group = group_of(True)
    a, b = Setup(7), Setup(7)
    train(a, three_passes, group, True, [1])
    train(b, one_pass, group, True, [1])
    for setup in (a, b):
        for name, tensor in list(setup.region.tensors.items()):
            setup.region.tensors[name] = tensor.clone()
    train(a, three_passes, group, True, [2])
    train(b, one_pass, group, True, [2])
    assert_same(a, b)
