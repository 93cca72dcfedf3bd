"""Hierarchical sharding (shard within groups of ranks, replicate across them) on every rank.

At world size W with ``shard_size=S``: the optimizer state is split S ways, and each shard is
replicated W/S times. Training must be what flat sharding gives: bit for bit without clipping
(the update is element-wise and the exact fp64 gradient average does not depend on how it was
summed), and within the usual 1e-6 of torch.optim with clipping (the fp32 norm partials depend
on how the shard is chunked, so the clip coefficient may differ in its last bit).
"""

from __future__ import annotations

import os
import time

import torch
import torch.distributed as dist

import zeroopt
from zeroopt.comm import connect, split
from ranks.equivalence import RULES, equivalence
from training import EXACT, batch, error_of, loss_of, models, world


def train(options: dict, stage: int, clip: float | None = None, steps: int = 5):
    rank, _ = world()
    model, _ = models()
    opt = zeroopt.ZeroOptimizer(model.parameters(), "adamw", stage=stage, **EXACT, **options,
                                **RULES["adamw"])
    for step in range(steps):
        loss_of(model, *batch(step, rank)).backward()
        if clip is not None:
            opt.clip_grad_norm_(clip)
        opt.step()
        opt.zero_grad()
    return [p.detach().clone() for p in model.parameters()], opt


def async_stage(shard_size: int, collectives: str = "auto") -> tuple[bool, float, float]:
    """The stage across the replicas runs on its own, before anything waits for it: three
    buckets launched as backward launches them; then the first is only polled
    (``is_completed()``), never waited for, until it says it is done, and must by then hold
    the sum over all ranks.

    Args:
        shard_size: the sharding group's size.
        collectives: ``ZEROOPT_BUCKET_COLLECTIVES`` for the groups ("ring": gloo's send/recv,
            which cannot be polled; "auto": the default, shared memory on one host).

    Returns:
        (whether polling alone saw the first bucket finish within 20 s, its largest error
        then (before any wait), the largest over all three after waiting for them in bucket
        order); errors relative to the sum of the terms' magnitudes.
    """
    rank, world_size = world()
    os.environ["ZEROOPT_BUCKET_COLLECTIVES"] = collectives  # read as the groups are made
    try:
        comm = split(connect(torch.device("cpu")), shard_size)
    finally:
        os.environ.pop("ZEROOPT_BUCKET_COLLECTIVES")
    numel = 4096 * comm.world_size

    def data(b: int, r: int) -> torch.Tensor:
        return torch.randn(numel, generator=torch.Generator().manual_seed(100 * b + r))

    buckets = [data(b, rank) for b in range(3)]
    mine = [[data(b, r).double().chunk(comm.world_size)[comm.rank] for r in range(world_size)]
            for b in range(3)]
    exact, size = [sum(m) for m in mine], [sum(t.abs() for t in m) for m in mine]
    handles = [comm.reduce_bucket(bucket) for bucket in buckets]
    deadline = time.monotonic() + 20
    while not handles[0].is_completed() and time.monotonic() < deadline:
        time.sleep(0.001)
    polled = handles[0].is_completed()

    def error(b: int) -> float:
        got = buckets[b].chunk(comm.world_size)[comm.rank].double()
        return float(((got - exact[b]).abs() / size[b]).max())

    before = error(0)
    for handle in handles:
        handle.wait()
    return polled, before, max(error(b) for b in range(3))


def suite() -> dict:
    rank, world_size = world()
    out = {}
    flat = {stage: train({}, stage) for stage in (1, 2)}
    for shard_size in [s for s in range(1, world_size) if world_size % s == 0]:
        for stage in (1, 2):
            params, opt = train(dict(shard_size=shard_size), stage)
            out["same_as_flat", shard_size, stage] = all(
                torch.equal(a, b) for a, b in zip(params, flat[stage][0]))
            padded = sum(bucket.numel for bucket in opt.layout.buckets)
            out["split", shard_size, stage] = (opt.layout.world_size, opt.comm.data_parallel_size,
                                               opt.state_bytes(), padded)
            out["reference", shard_size, stage] = equivalence(
                "adamw", RULES["adamw"], stage, options={**EXACT, "shard_size": shard_size})
        for collectives in ("auto", "ring"):
            out["async", shard_size, collectives] = async_stage(shard_size, collectives)
    out["bad_shard_size"] = error_of(lambda: train(dict(shard_size=world_size + 1), 1))
    # rank 0 asks for another shard size than the others: an error everywhere, not a hang
    out["disagree"] = error_of(lambda: train(dict(shard_size=1 if rank == 0 else None), 1))
    if dist.is_initialized() and world_size % 2 == 0:  # FSDP-style (shard, replica) groups
        half = world_size // 2
        shard_pg, _ = dist.new_subgroups_by_enumeration([list(range(half)),
                                                         list(range(half, world_size))])
        replica_pg, _ = dist.new_subgroups_by_enumeration(
            [[r, r + half] for r in range(half)])
        params, _ = train(dict(process_group=(shard_pg, replica_pg)), 2)
        out["tuple_groups"] = all(torch.equal(a, b) for a, b in zip(params, flat[2][0]))
    return out
