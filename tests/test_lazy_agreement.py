"""Which params have gradients, agreed on the device (step_inputs.settle_on_device, what XLA
replicas run), on real gloo ranks.

On XLA with several replicas ``step()`` makes no host read: each replica steps the params it has
gradients for, every bucket is reduced once, and the per-param flags are summed over the
replicas inside the step's graph; the step is kept only where they agreed, and a disagreement
raises at the next settle, on every replica. tests/xla runs it on XLA:CPU; here the same path
runs on gloo (the collectives told they are lazy, as in test_lazy_skip.py) through the loop
patterns torch.optim allows, and is held bit for bit to the eager path, which agrees on the host.
"""
from __future__ import annotations

import pytest
import torch

from distributed import run_ranks
from identical import identical


class _Net(torch.nn.Module):
    """Sizes that straddle the shard boundaries and do not divide by 2 or 3; ``side`` may be
    left out of a step, ``late`` is frozen until it is unfrozen mid-run."""

    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(37, 29), torch.nn.Linear(29, 23)
        self.side, self.head = torch.nn.Linear(29, 23), torch.nn.Linear(23, 1)
        self.late = torch.nn.Linear(23, 1)
        self.late.requires_grad_(False)

    def forward(self, x, use_side: bool, use_late: bool):
        h = torch.tanh(self.a(x))
        h2 = torch.tanh(self.b(h)) + (torch.tanh(self.side(h)) if use_side else 0.0)
        return self.head(h2) + (self.late(h2) if use_late else 0.0)


def _lazy(opt, host_reads: list) -> None:
    """Make ``opt`` take the lazy path: lazy collectives, ``host_all_reduce`` over gloo
    (counted: only a layout that grows should need it)."""
    import torch.distributed as dist

    def host_all_reduce(values, device, op="sum"):
        host_reads.append(values.numel())
        out = values.clone()
        dist.all_reduce(out, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
        return out

    opt.comm.lazy = True
    opt.comm.host_all_reduce = host_all_reduce


def _loss(model, step, rank, use_side=True, use_late=None):
    g = torch.Generator().manual_seed(100 * step + rank)
    x, y = torch.randn(6, 37, generator=g), torch.randn(6, 1, generator=g)
    use_late = model.late.weight.requires_grad if use_late is None else use_late
    return torch.nn.functional.mse_loss(model(x, use_side, use_late), y)


def _consistent(optimizer: str, stage: int, lazy: bool, steps: int = 7) -> dict:
    """Every pattern below is the same on every rank, so the device check agrees."""
    import torch.distributed as dist

    import zeroopt

    rank = dist.get_rank()
    torch.manual_seed(0)
    model = _Net()
    opt = zeroopt.ZeroOptimizer(model.parameters(), optimizer, lr=1e-2, stage=stage,
                                bucket_numel=500)
    late_init = model.late.weight.detach().clone()
    host_reads: list = []
    if lazy:
        _lazy(opt, host_reads)
    for step in range(steps):
        if step == 3:  # unfrozen on every rank: the layout grows (the one host read)
            model.late.requires_grad_(True)
        if step == 4:  # gradients assigned by hand, no backward (side left out)
            loss = _loss(model, step, rank, use_side=False)
            params = [p for p in model.parameters() if p is not model.side.weight
                      and p is not model.side.bias]
            for p, grad in zip(params, torch.autograd.grad(loss, params)):
                p.grad = grad
        elif step == 5:  # two micro-steps, the first without a reduction
            with opt.no_sync():
                _loss(model, step, rank).backward()
            _loss(model, step + 50, rank).backward()
        else:  # step 2: side unused on every rank
            _loss(model, step, rank, use_side=step != 2).backward()
        if step == 6:
            opt.clip_grad_norm_(0.05, norm_type=float("inf"))
        else:
            opt.clip_grad_norm_(0.5)
        opt.step()
        opt.zero_grad()
    return {"params": [p.detach().clone() for p in model.parameters()],
            "state": opt.state_dict()["state"], "host_reads": host_reads,
            "late_moved": float((model.late.weight - late_init).abs().max())}


def _diverging(stage: int) -> dict:
    """Rank 1 leaves ``side`` out of step 2, the others use it: the next step() raises."""
    import torch.distributed as dist

    import zeroopt

    rank = dist.get_rank()
    torch.manual_seed(0)
    model = _Net()
    opt = zeroopt.ZeroOptimizer(model.named_parameters(), "adamw", lr=1e-2, stage=stage,
                                bucket_numel=500)
    _lazy(opt, [])
    for step in range(2):
        _loss(model, step, rank).backward()
        opt.step()
        opt.zero_grad()
    before = [p.detach().clone() for p in model.parameters()]
    state_before = opt.state_dict()["state"]
    _loss(model, 2, rank, use_side=rank != 1).backward()
    opt.step()  # no host read: the disagreement is found when the host next settles
    opt.zero_grad()
    _loss(model, 3, rank).backward()
    try:
        opt.step()
    except RuntimeError as error:
        message = str(error)
    else:
        message = None
    return {"message": message, "before": before, "state_before": state_before,
            "after": [p.detach().clone() for p in model.parameters()],
            "state_after": opt.state_dict()["state"]}


@pytest.mark.parametrize("optimizer,stage,world", [
    ("adamw", 1, 3), ("adamw", 2, 2), ("lamb", 2, 3),  # LAMB: the whole-param statistics
])
def test_device_agreement_matches_host_agreement(optimizer, stage, world):
    host = run_ranks(world, _consistent, optimizer, stage, False, shared=True)
    device = run_ranks(world, _consistent, optimizer, stage, True, shared=True)
    for h, d in zip(host, device):
        assert identical(h["params"], d["params"])
        assert identical(h["state"], d["state"])
        assert len(d["host_reads"]) == 1  # only when `late` was unfrozen
    assert device[0]["late_moved"] > 1e-3  # `late` was trained once unfrozen


@pytest.mark.parametrize("stage", [1, 2])
def test_disagreement_raises_on_every_replica_and_undoes_the_step(stage):
    results = run_ranks(2, _diverging, stage, shared=True)
    for r in results:
        assert r["message"] is not None
        assert "disagreed" in r["message"] and "side.weight" in r["message"]
        assert "on 1 of 2" in r["message"] and "zeros_like" in r["message"]
        assert identical(r["before"], r["after"])  # step 2 undone, step 3 never ran
        assert identical(r["state_before"], r["state_after"])
