"""The gradient harvest's one-pass kernels (zeroopt/kernels/harvest.py) and what rests on them.

- Each kernel writes exactly what the torch expression it replaces writes (torch.equal, at
  lengths that end inside a vector and inside a ZK_CHUNK), and the sum of squares it returns
  is the double-precision sum within 1e-12 relative (a sum of ~1e6 positive terms in double:
  ~1e-13 rounding), the same whatever the thread count.
- On one rank the gradients are staged straight into the shard (no staging buffer, no copy),
  and the global norm comes from the staging copies: every way gradients arrive
  (accumulated backwards, no_sync micro-steps, grads set by hand, clipping twice) gives
  torch's norm and torch.optim's params, with and without the kernels.
"""

import copy

import pytest
import torch

import zeroopt
from zeroopt.kernels import harvest
from zeroopt.kernels.library import Library

SIZES = (1, 7, 1000, 16384 + 13, 70001)


@pytest.fixture(params=["native", "torch"])
def native(request, monkeypatch):
    """Runs the test with the kernels, and again with them off (the torch fallback)."""
    if request.param == "torch":
        monkeypatch.setattr(Library, "available", lambda self: False)
    elif not Library("_harvest.c").available():
        pytest.skip("no C compiler")
    return request.param == "native"


@pytest.mark.parametrize("n", SIZES)
def test_kernels_write_what_torch_writes(native, n):
    torch.manual_seed(n)
    src, old = torch.randn(n), torch.randn(n)
    cases = [
        (lambda d: harvest.scale_into(d, src, 1 / 3), lambda d: torch.mul(src, 1 / 3, out=d)),
        (lambda d: harvest.scale_add_into(d, src, 1 / 3), lambda d: d.add_(src, alpha=1 / 3)),
        (lambda d: harvest.copy_into(d, src), lambda d: d.copy_(src)),
        (lambda d: harvest.add_into(d, src), lambda d: d.add_(src)),
    ]
    for kernel, expression in cases:
        got, want = old.clone(), old.clone()
        sumsq = kernel(got)
        expression(want)
        assert torch.equal(got, want)
        if native:
            exact = float((want.double() ** 2).sum())
            assert abs(sumsq - exact) <= 1e-12 * exact
            assert harvest.squared_sum(want) == sumsq
        else:
            assert sumsq is None


def test_sums_do_not_depend_on_the_thread_count():
    if not Library("_harvest.c").available():
        pytest.skip("no C compiler")
    x = torch.randn(300007)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = harvest.squared_sum(x)
        torch.set_num_threads(2)
        assert harvest.squared_sum(x) == one
    finally:
        torch.set_num_threads(before)


def _pair():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(33, 65), torch.nn.Tanh(), torch.nn.Linear(65, 7))
    return model, copy.deepcopy(model)


def _backward(model, seed):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(9, 33, generator=g), torch.randn(9, 7, generator=g)
    torch.nn.functional.mse_loss(model(x), y).backward()


@torch.no_grad()
def _max_rel_err(a, b):
    return max(float((p - q).abs().max() / q.abs().max())
               for p, q in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("stage", (1, 2))
def test_one_rank_stages_into_the_shard_and_takes_the_norm_on_the_way(native, stage):
    """Accumulated backwards, no_sync micro-steps, a grad set by hand and clipping twice, on
    one rank, against torch.optim.AdamW and torch's clip_grad_norm_ (1e-6 relative: the fused
    kernel against torch.optim's loop and a norm summed in double against torch's fp32 one)."""
    model, ref = _pair()
    opt = zeroopt.ZeroOptimizer(model.parameters(), "adamw", stage=stage, lr=1e-2,
                                bucket_numel=1024)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    assert opt.grads.in_place and opt.grads.staging_bytes() == 0
    for step in range(4):
        for m in (model, ref):
            _backward(m, 10 * step)
        if step == 1:  # two backwards accumulate
            for m in (model, ref):
                _backward(m, 10 * step + 1)
        if step == 2:  # micro-steps under no_sync, then a synchronised one
            with opt.no_sync():
                _backward(model, 10 * step + 1)
            _backward(ref, 10 * step + 1)
            _backward(model, 10 * step + 2)
            _backward(ref, 10 * step + 2)
        if step == 3:  # a grad set by hand on top of backward's
            extra = torch.randn_like(model[2].bias)
            model[2].bias.grad = extra.clone()
            ref[2].bias.grad = ref[2].bias.grad + extra
        norm = opt.clip_grad_norm_(0.5)
        want = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5)
        assert abs(float(norm) - float(want)) <= 1e-6 * float(want)
        again = opt.clip_grad_norm_(0.25)  # reads the clipped shard, not the old sums
        want = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.25)
        assert abs(float(again) - float(want)) <= 1e-6 * float(want)
        opt.step()
        ref_opt.step()
        opt.zero_grad()
        ref_opt.zero_grad()
        assert _max_rel_err(model, ref) < 1e-6


def test_one_rank_skips_a_step_whose_gradient_is_not_finite(native):
    """The staging copies' sums carry an inf gradient into the norm: the step is skipped."""
    model, _ = _pair()
    opt = zeroopt.ZeroOptimizer(model.parameters(), "adamw", lr=1e-2)
    before = [p.detach().clone() for p in model.parameters()]
    (model(torch.randn(2, 33)).sum() * float("inf")).backward()
    opt.step()
    assert opt.last_step_skipped
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    _backward(model, 1)
    opt.step()  # the next finite step goes through
    assert not opt.last_step_skipped
