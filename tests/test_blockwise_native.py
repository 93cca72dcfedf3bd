"""The C kernels of 8-bit blockwise quantization (states/native.py, _blockwise.c) against the
torch reference in states/blockwise.py: the same codes, absmax and dequantized values, bit for
bit, on every kind of block; and the fallback when the kernels are off or cannot be built."""

import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

import pytest
import torch

import watch
from zeroopt.states import blockwise, native

BLOCK = blockwise.BLOCK
# the subprocesses import this checkout's zeroopt
PYTHONPATH = os.pathsep.join([os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                              os.environ.get("PYTHONPATH", "")])
needs_native = pytest.mark.skipif(not native.available(), reason="native kernels unavailable")
SIGNS = pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32)  # compares -0.0 with 0.0 and NaN with NaN exactly


def assert_native_matches_torch(x: torch.Tensor, signed: bool) -> torch.Tensor:
    ref_codes, ref_absmax = blockwise._quantize_torch(x, signed)
    codes = torch.full_like(x, 77, dtype=torch.uint8)  # not zeros: every code must be written
    absmax = torch.full((x.numel() // BLOCK,), 7.0)
    native.quantize_(x, signed, codes, absmax)
    differ = (codes != ref_codes).nonzero().view(-1)
    assert differ.numel() == 0, (f"{differ.numel()} codes differ, first at {int(differ[0])}: "
                                 f"x={float(x[differ[0]])!r} native={int(codes[differ[0]])} "
                                 f"torch={int(ref_codes[differ[0]])}")
    assert torch.equal(bits(absmax), bits(ref_absmax))
    out = torch.full_like(x, 7.0)
    native.dequantize_(codes, absmax, signed, out)
    assert torch.equal(bits(out), bits(blockwise._dequantize_torch(codes, absmax, signed)))
    return codes


def blocks_with_absmax_one(values: torch.Tensor) -> torch.Tensor:
    """``values`` as normalized values: 255 to a block, after a first element of 1.0."""
    values = torch.cat([values, values.new_zeros(-values.numel() % (BLOCK - 1))])
    ones = values.new_ones(values.numel() // (BLOCK - 1), 1)
    return torch.cat([ones, values.view(-1, BLOCK - 1)], dim=1).view(-1)


@needs_native
@SIGNS
def test_random_values_at_many_scales(signed):
    torch.manual_seed(0)
    # one scale per block over eleven decades, and in half the blocks six decades inside
    scale = torch.logspace(-8, 3, 400).repeat_interleave(BLOCK)
    spread = torch.logspace(-6, 0, 400 * BLOCK)[torch.randperm(400 * BLOCK)]
    spread[: 200 * BLOCK] = 1
    x = torch.randn(400 * BLOCK) * scale * spread
    assert_native_matches_torch(x, signed)
    assert_native_matches_torch(x.abs(), signed)


@needs_native
@SIGNS
def test_a_single_block_and_many(signed):
    torch.manual_seed(1)
    for blocks in (0, 1, 2, 3, 1000):
        assert_native_matches_torch(torch.randn(blocks * BLOCK) ** 3, signed)


@needs_native
@SIGNS
def test_code_values_times_absmax(signed):
    torch.manual_seed(2)
    code = blockwise.dynamic_map(signed)
    for absmax in (1.0, 0.25, 3.0, 1e-3, 7.1e-5, 123.456):
        x = code[torch.randint(0, 256, (64 * BLOCK,))] * absmax
        x.view(-1, BLOCK)[:, 0] = absmax
        codes = assert_native_matches_torch(x, signed)
        if absmax in (1.0, 0.25):  # exact products: each value gets its own code back
            assert torch.equal(code[codes.long()] * absmax, x)


def neighbours(values: torch.Tensor, steps: int = 3) -> torch.Tensor:
    """``values`` and the floats 1 to ``steps`` steps either side of each."""
    near = [values]
    for direction in (float("inf"), -float("inf")):
        step = values
        for _ in range(steps):
            step = torch.nextafter(step, torch.full_like(step, direction))
            near.append(step)
    return torch.cat(near)


@needs_native
@SIGNS
def test_every_midpoint_and_its_neighbours(signed):
    """Ties and near-ties, as normalized values (the block's absmax is 1)."""
    near = neighbours(blockwise.midpoints(signed))
    assert_native_matches_torch(blocks_with_absmax_one(near), signed)
    assert_native_matches_torch(blocks_with_absmax_one(-near), signed)


@needs_native
@SIGNS
def test_midpoints_times_absmax(signed):
    """Values whose quotient by absmax lands within an ulp or two of a midpoint: where x / d
    and x * (1 / d) round apart, the code can differ, so this catches the faster multiply."""
    for absmax in (0.3, 3.7e-4, 1234.5678, 1 - 2**-24, 6.02e23, 1.1e-38):
        d = torch.tensor(absmax)
        near = neighbours(blockwise.midpoints(signed) * d)
        near = torch.cat([near, -near]).clamp(-d, d)
        x = blocks_with_absmax_one(near / d) * d  # the blocks' first element is d
        assert x.abs().view(-1, BLOCK).amax(1).eq(d).all()
        assert_native_matches_torch(x, signed)


@needs_native
@SIGNS
def test_every_float_in_minus_one_to_one(signed):
    """The kernel's table has one entry per 16-bit key prefix and its code is monotonic within
    a prefix with at most one step, like the reference's; so agreeing at both ends of every
    prefix and at every midpoint (above) is agreeing on every float in [-1, 1]."""
    lo, hi = (int(native._key(torch.tensor([end]))) >> 16 for end in (-1.0, 1.0))
    smallest, largest = native.prefix_range(torch.arange(lo, hi + 1))
    ends = torch.cat([smallest, largest]).clamp(-1, 1)
    assert_native_matches_torch(blocks_with_absmax_one(ends), signed)
    # and a sample of all the floats in between, drawn uniformly over their bit patterns
    torch.manual_seed(3)
    pattern = torch.randint(0, 0x3F800001, (1 << 20,), dtype=torch.int32).view(torch.float32)
    sample = torch.where(torch.rand(1 << 20) < 0.5, pattern, -pattern)
    assert_native_matches_torch(blocks_with_absmax_one(sample), signed)


@needs_native
@SIGNS
def test_special_blocks(signed):
    torch.manual_seed(4)
    x = torch.randn(12, BLOCK)
    x[0] = 0.0  # all zero
    x[1] = -0.0
    x[2, ::2] = -0.0
    x[3] = -x[3].abs()
    x[3, 17] = -5.0  # the maximum is negative
    x[4] = torch.randint(1, 1 << 23, (BLOCK,), dtype=torch.int32).view(torch.float32)
    x[4, ::3] *= -1  # subnormals only
    x[5, :128] = x[4, :128]  # subnormals beside normals
    x[6, 9] = float("nan")  # a NaN: absmax NaN, divisor 1, NaN's code, the rest clamped
    x[6, 10] = 4.0
    x[7, 3] = float("inf")  # inf / inf is NaN, finite / inf is 0
    x[8, 4] = -float("inf")
    x[9, 5] = torch.tensor([-1], dtype=torch.int32).view(torch.float32)  # a NaN's payload
    x[10] = torch.finfo(torch.float32).max * torch.sign(x[10])
    x[11] = torch.finfo(torch.float32).tiny
    assert_native_matches_torch(x.view(-1), signed)


@needs_native
@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 flags")
def test_the_portable_c_without_avx2(monkeypatch, tmp_path):
    """The plain-C loops that other CPUs compile (here they only see NaN and inf blocks)."""
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    monkeypatch.setenv("ZEROOPT_CACHE_DIR", str(tmp_path))
    flags = native.FLAGS + ["-mno-avx2", "-mno-avx"]
    monkeypatch.setattr(native, "_lib", native._load(native._compile(cc, flags, "")))
    test_random_values_at_many_scales(True)
    test_every_float_in_minus_one_to_one(False)
    test_midpoints_times_absmax(True)
    test_special_blocks(True)


@pytest.fixture
def threads():
    """Sets torch's thread count for the test (the kernels use as many), then restores it."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


@needs_native
def test_with_subnormals_flushed(threads):
    """torch.set_flush_denormal(True) flushes torch.amax's subnormal maxima to 0: the kernel's
    too. (One thread: the flag is per thread, torch's worker threads do not get it either.)"""
    threads(1)
    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU cannot flush subnormals")
    try:
        x = torch.randint(1, 1 << 23, (4 * BLOCK,), dtype=torch.int32).view(torch.float32)
        x[BLOCK] = 1e-30
        x[2 * BLOCK: 3 * BLOCK] = torch.randn(BLOCK)
        assert_native_matches_torch(x, True)
    finally:
        torch.set_flush_denormal(False)


@needs_native
def test_threads_do_not_change_results(threads):
    torch.manual_seed(5)
    x = torch.randn(1000 * BLOCK) * torch.logspace(-5, 0, 1000 * BLOCK)
    threads(1)
    one = blockwise.quantize(x, True)
    threads(4)  # over a window long enough to be split (_blockwise.c's PARALLEL_MIN)
    codes = assert_native_matches_torch(x, True)
    four = blockwise.quantize(x, True)
    assert torch.equal(one[0], codes) and torch.equal(one[0], four[0])
    assert torch.equal(one[1], four[1])


@needs_native
def test_public_functions_take_the_native_path_with_the_same_results(monkeypatch):
    torch.manual_seed(6)
    x = torch.randn(8 * BLOCK)
    calls = []

    def spy(name):
        real = getattr(native, name)

        def kernel(*args):
            calls.append(name)
            real(*args)
        monkeypatch.setattr(native, name, kernel)

    spy("quantize_")
    spy("dequantize_")
    codes, absmax = blockwise.quantize(x, True)
    ref_codes, ref_absmax = blockwise._quantize_torch(x, True)
    assert (codes.shape, codes.dtype, absmax.shape) == (ref_codes.shape, torch.uint8,
                                                        ref_absmax.shape)
    assert torch.equal(codes, ref_codes) and torch.equal(absmax, ref_absmax)
    out = torch.empty(8, BLOCK)
    assert blockwise.dequantize(codes, absmax, True, out=out).shape == (8 * BLOCK,)
    assert torch.equal(out.view(-1), blockwise._dequantize_torch(codes, absmax, True))
    # in-place outputs are written and returned
    into, into_max = torch.empty_like(codes), torch.empty_like(absmax)
    got = blockwise.quantize(x, True, codes=into, absmax=into_max)
    assert got[0] is into and got[1] is into_max and torch.equal(into, ref_codes)
    assert calls == ["quantize_", "dequantize_", "quantize_"]
    # strided or other dtypes: the torch path, same results
    calls.clear()
    strided = torch.randn(2 * 8 * BLOCK)[::2]
    assert torch.equal(blockwise.quantize(strided, True)[0],
                       blockwise.quantize(strided.contiguous(), True)[0])
    assert blockwise.quantize(x.double(), True)[1].dtype == torch.float64
    assert calls == ["quantize_"]


@needs_native
def test_kernels_reject_what_they_cannot_read():
    x, codes, absmax = torch.randn(2 * BLOCK), torch.empty(2 * BLOCK, dtype=torch.uint8), \
        torch.empty(2)
    with pytest.raises(ValueError, match="multiple of 256 elements, got 300"):
        native.quantize_(torch.randn(300), True, codes, absmax)
    with pytest.raises(TypeError, match="values must be a contiguous CPU torch.float32"):
        native.quantize_(x.double(), True, codes, absmax)
    with pytest.raises(TypeError, match="non-contiguous"):
        native.quantize_(torch.randn(4 * BLOCK)[::2], True, codes, absmax)
    with pytest.raises(ValueError, match="absmax has 3 elements, needs 2"):
        native.quantize_(x, True, codes, torch.empty(3))
    with pytest.raises(ValueError, match="absmax has 2 elements, needs 1"):
        native.dequantize_(codes[:BLOCK], absmax, True, x[:BLOCK])
    with pytest.raises(TypeError, match="out must be"):
        native.dequantize_(codes, absmax, True, x.half())


def test_the_torch_path_when_the_kernels_are_turned_off():
    """ZEROOPT_NATIVE=0, in a fresh interpreter: no kernels, same results."""
    script = (
        "import torch\n"
        "from zeroopt.states import blockwise, native\n"
        "x = torch.randn(4 * 256)\n"
        "codes, absmax = blockwise.quantize(x, True)\n"
        "ref = blockwise._quantize_torch(x, True)\n"
        "assert not native.available()\n"
        "assert torch.equal(codes, ref[0]) and torch.equal(absmax, ref[1])\n"
        "assert torch.equal(blockwise.dequantize(codes, absmax, True),\n"
        "                   blockwise._dequantize_torch(codes, absmax, True))\n"
        "print('ok')\n")
    env = dict(os.environ, ZEROOPT_NATIVE="0", PYTHONPATH=PYTHONPATH)
    done = watch.run([sys.executable, "-c", script], env=env)  # a hang: killed, with its stack
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_no_compiler_gives_one_warning_and_the_torch_path(monkeypatch, tmp_path, caplog):
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setattr(native, "_tried", False)
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.delenv("ZEROOPT_NATIVE", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # no gcc, no cc
    monkeypatch.setenv("ZEROOPT_CACHE_DIR", str(tmp_path / "cache"))
    x = torch.randn(4 * BLOCK)
    with caplog.at_level(logging.WARNING, logger="zeroopt"):
        codes, absmax = blockwise.quantize(x, True)
        values = blockwise.dequantize(codes, absmax, True)
        assert not native.available()
    warnings = [r.getMessage() for r in caplog.records if r.name == "zeroopt"]
    assert len(warnings) == 1 and "no C compiler (gcc/cc) found" in warnings[0], warnings
    ref = blockwise._quantize_torch(x, True)
    assert torch.equal(codes, ref[0]) and torch.equal(absmax, ref[1])
    assert torch.equal(values, blockwise._dequantize_torch(*ref, True))
    with pytest.raises(RuntimeError, match="unavailable"):
        native.quantize_(x, True, codes, absmax)


@needs_native
def test_ranks_building_at_once_share_one_library(tmp_path):
    """Four processes build into one empty cache at the same moment: each loads a whole
    library (a half-written one would fail to load or crash), one file is left, no temporary."""
    script = ("import sys, time, torch\n"
              "from zeroopt.states import blockwise, native\n"
              "time.sleep(max(0.0, float(sys.argv[1]) - time.time()))  # start together\n"
              "assert native.available()\n"
              "x = torch.randn(1024)\n"
              "assert torch.equal(blockwise.quantize(x, True)[0],"
              " blockwise._quantize_torch(x, True)[0])\n")
    env = dict(os.environ, ZEROOPT_CACHE_DIR=str(tmp_path), PYTHONPATH=PYTHONPATH)
    start = str(time.time() + 4)  # after the imports
    logs = [tempfile.TemporaryFile("w+") for _ in range(4)]  # not in the cache directory
    ranks = [subprocess.Popen([sys.executable, "-c", script, start], stderr=log, text=True,
                              env=watch.faulthandler_env(env)) for log in logs]
    watcher = watch.Watch([rank.pid for rank in ranks], what="the four builds")
    hung = None
    try:
        while any(rank.poll() is None for rank in ranks):
            time.sleep(0.2)
            watcher.check()  # a hang: all killed, each one's stacks in its stderr
    except watch.Hung as e:
        hung = e
    errors = [(log.seek(0), log.read())[1] for log in logs]
    assert hung is None, f"{hung}\n" + "\n".join(errors)
    assert [rank.returncode for rank in ranks] == [0] * 4, errors
    assert [p.suffix for p in tmp_path.iterdir()] == [".so"]
