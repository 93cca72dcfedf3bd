"""``skip_nonfinite`` decided on the device (lazy_skip.py, what XLA runs) gives the host
decision's result, on real gloo ranks.

tests/xla runs the real thing on XLA:CPU replicas (AdamW, Lion, 8-bit AdamW). Here the same
code path runs on gloo, for the rules XLA's tier does not cover: the optimizer's collectives
are told they are lazy (``comm.lazy``, what XlaCollectives says) and given ``host_all_reduce``
over gloo, so ``step()`` takes lazy_skip's path (no host read of the norm; every write kept
only where the norm is finite; the count settled at the next step). Each run is held to an
identical run that skips on the host, bit for bit: params, states and skipped_steps.
"""
from __future__ import annotations

import pytest
import torch

from distributed import run_ranks
from identical import identical


def _lazy(opt) -> None:
    """Make ``opt`` take lazy_skip's path: lazy collectives, host_all_reduce over gloo."""
    import torch.distributed as dist

    def host_all_reduce(values, device, op="sum"):
        out = values.clone()
        if dist.is_initialized():
            dist.all_reduce(out, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX,
                                     "min": dist.ReduceOp.MIN}[op])
        return out

    opt.comm.lazy = True
    opt.comm.host_all_reduce = host_all_reduce


def _train(optimizer: str, stage: int, lazy: bool, inf_steps: tuple[int, ...]) -> dict:
    import torch.distributed as dist

    import zeroopt

    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    torch.manual_seed(0)
    # sizes that straddle the shard boundaries and do not divide by 2 or 3
    model = torch.nn.Sequential(torch.nn.Linear(37, 29), torch.nn.Tanh(),
                                torch.nn.Linear(29, 23), torch.nn.Tanh(), torch.nn.Linear(23, 1))
    params = zeroopt.muon_param_groups(model) if optimizer == "muon" else model.parameters()
    opt = zeroopt.ZeroOptimizer(params, optimizer, lr=1e-2, stage=stage, bucket_numel=600)
    if lazy:
        _lazy(opt)
    skipped_seen = []
    for step in range(6):
        g = torch.Generator().manual_seed(100 * step + rank)
        x, y = torch.randn(6, 37, generator=g), torch.randn(6, 1, generator=g)
        loss = torch.nn.functional.mse_loss(model(x), y)
        if step in inf_steps and rank == world - 1:  # one rank's gradient overflows
            loss = loss * float("inf")
        loss.backward()
        opt.step()
        opt.zero_grad()
        skipped_seen.append(opt.last_step_skipped)
    state = opt.state_dict()
    return {"params": [p.detach().clone() for p in model.parameters()],
            "state": state["state"], "skipped": opt.skipped_steps, "seen": skipped_seen}


@pytest.mark.parametrize("optimizer,stage,world", [
    ("adamw", 2, 3), ("adamw_8bit", 1, 2), ("schedule_free_adamw", 1, 2),  # before_step
    ("muon", 2, 2),  # whole matrices (per-tensor states)
])
def test_device_side_skip_matches_host_skip(optimizer, stage, world):
    inf_steps = (0, 3)  # the very first step (states created in it are dropped) and a later one
    host = run_ranks(world, _train, optimizer, stage, False, inf_steps, shared=True)
    device = run_ranks(world, _train, optimizer, stage, True, inf_steps, shared=True)
    for h, d in zip(host, device):
        assert h["skipped"] == d["skipped"] == 2
        assert h["seen"] == d["seen"] == [True, False, False, True, False, False]
        assert identical(h["params"], d["params"])
        assert identical(h["state"], d["state"])
        assert all(torch.isfinite(p).all() for p in d["params"])
