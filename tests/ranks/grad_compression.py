"""Compressed gradient reduction (``grad_compression="int8" | "int4"``) on every rank.

The error bound checked (derived in zeroopt/comm/quantized.py and compression.py), per
element of a reduced chunk, before the average divides it by W. A value x in a block of
scale s (the block's largest magnitude) decodes to q s / L with q = round(x L / s), so it is
off by at most s / (2L), L = 127 (int8) or 7 (int4):

- flat: the owner's own value is exact and each other rank's is quantized once, so
  ``|got - exact| <= sum over ranks s != owner of s_s / (2L)``, s_s the scale of the block of
  rank s's chunk that holds the element (blocks start at the chunk's start);
- with ``shard_size`` (R replicas of each chunk, one per sharding group): the within-group sums
  G_g are exact; the chunk is cut in R pieces, piece i summed by replica i from its own G_i and
  the others' quantized pieces (first term: ``b1 = sum over g != i of s(G_g) / (2L)``), then the
  sum quantized once more for every replica (second term: its block's scale is at most
  ``max|exact| + max b1`` over the block, so ``b2 = (that) / (2L)``); ``|got - exact| <= b1 +
  b2``.

Plus fp32 rounding, far below either term: ``2^-20 (sum over ranks |x_s| + the bound)`` (the
fp32 sums of at most 4 terms and the decoding's two roundings of each scale are each within
2^-23 relative; 2^-20 leaves a factor of 8).
"""

from __future__ import annotations

import torch

import zeroopt
from zeroopt.comm import connect, split
from zeroopt.comm.compression import compressed
from zeroopt.comm.quantized import BLOCK, LEVELS
from training import batch, error_of, loss_of, models, world

CHUNKS = [1, 100, 256, 300, 513, 1000]  # chunk lengths: most do not divide the blocks
SLACK = 2.0 ** -20


def data(case: int, rank: int, numel: int) -> torch.Tensor:
    """Rank ``rank``'s bucket for ``case``: magnitudes spread over 4 decades, so the blocks'
    scales differ, and a run of zeros (an all-zero block)."""
    g = torch.Generator().manual_seed(1000 * case + rank)
    x = torch.randn(numel, generator=g) * torch.exp(2 * torch.randn(numel, generator=g))
    x[numel // 3:numel // 3 + 300] = 0
    return x


def block_scales(x: torch.Tensor, block: int) -> torch.Tensor:
    """Each element's block's largest magnitude, blocks starting at x's start."""
    pad = torch.zeros(-(-x.numel() // block) * block, dtype=x.dtype)
    pad[:x.numel()] = x.abs()
    return pad.view(-1, block).amax(1).repeat_interleave(block)[:x.numel()]


def bound(kind: str, chunks: list[torch.Tensor], shard: int, owner: int) -> torch.Tensor:
    """The module docstring's bound for one chunk, from every rank's copy of it (fp64, by
    global rank), the sharding group size (the world size: flat) and the chunk's owner in
    its group."""
    levels, block = LEVELS[kind], BLOCK[kind]
    slack = SLACK * torch.stack(chunks).abs().sum(0)
    if shard == len(chunks):  # flat: the owner's own term is exact
        b = sum(block_scales(c, block) for s, c in enumerate(chunks) if s != owner) \
            / (2 * levels)
        return b + SLACK * b + slack
    groups = [sum(chunks[g:g + shard]) for g in range(0, len(chunks), shard)]
    replicas = len(groups)
    pieces = [t.tensor_split(replicas) for t in groups]
    out = []
    for i, exact in enumerate(sum(chunks).tensor_split(replicas)):
        b1 = sum(block_scales(pieces[g][i], block) for g in range(replicas) if g != i) \
            / (2 * levels)
        top = block_scales(exact, block) + block_scales(b1, block)
        out.append(b1 + top / (2 * levels))
    b = torch.cat(out)
    return b + SLACK * b + slack


def reduction(kind: str, shard_size: int | None = None) -> dict:
    """Compressed ``reduce_bucket`` of buckets of ``CHUNKS`` lengths per chunk, all launched
    before any is waited for (as backward does), then waited for in order, one polled first.

    Returns:
        ``{chunk: (max (error - bound), max error / bound, this rank's chunk)}``.
    """
    rank, world_size = world()
    flat = connect(torch.device("cpu"))
    comm = compressed(split(flat, shard_size) if shard_size else flat, kind)
    shard = comm.world_size
    buckets = {c: data(case, rank, c * shard) for case, c in enumerate(CHUNKS)}
    handles = {c: comm.reduce_bucket(bucket) for c, bucket in buckets.items()}
    while not handles[CHUNKS[0]].is_completed():
        pass
    out = {}
    for case, c in enumerate(CHUNKS):
        handles[c].wait()
        got = buckets[c].chunk(shard)[comm.rank].double()
        everyone = [data(case, r, c * shard).double().chunk(shard)[comm.rank]
                    for r in range(world_size)]
        b = bound(kind, everyone, shard, comm.rank)
        err = (got - sum(everyone)).abs()
        out[c] = (float((err - b).max()), float((err / b.clamp_min(1e-30)).max()),
                  got.float())
    return out


def train(kind: str | None, stage: int, shard_size: int | None = None, steps: int = 1,
          optimizer: str = "sgd", **hyper) -> tuple[list, list[float], object]:
    """``steps`` steps on the tests' odd-sized model (700-element buckets), each rank on its
    own fixed batch (so the loss can fall); returns the params before the last step, the
    losses and the optimizer."""
    rank, _ = world()
    model, _ = models()
    opt = zeroopt.ZeroOptimizer(model.parameters(), optimizer, stage=stage, bucket_numel=700,
                                grad_compression=kind, shard_size=shard_size, **hyper)
    losses, before = [], None
    for step in range(steps):
        before = [p.detach().clone() for p in model.parameters()]
        loss = loss_of(model, *batch(0, rank))
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss))
    return before, losses, opt


def local_buckets(opt, rank: int) -> list[torch.Tensor]:
    """Rank ``rank``'s gradient buckets of the first step as the reducer stages them (zeros
    where no param is), from a plain copy of the model."""
    model, _ = models()
    loss_of(model, *batch(0, rank)).backward()
    grads = {id(p): q.grad for p, q in zip(opt.param_groups[0]["params"], model.parameters())}
    out = []
    for bucket in opt.layout.buckets:
        staged = torch.zeros(bucket.numel, dtype=torch.float64)
        for slot in bucket.slots:
            staged[slot.start - bucket.start:slot.end - bucket.start] = \
                grads[id(slot.param)].reshape(-1).double()
        out.append(staged)
    return out


def sgd_step(kind: str, stage: int, shard_size: int | None) -> dict:
    """One plain SGD step (lr 1): each param moves by the reduced average gradient, which is
    checked against the exact average, element by element, within the bound / W (plus the
    fp32 step's own rounding, 2^-22 of the params)."""
    rank, world_size = world()
    before, _, opt = train(kind, stage, shard_size, lr=1.0)
    after = [p.detach() for p in opt.param_groups[0]["params"]]
    shard = opt.layout.world_size
    everyone = [local_buckets(opt, r) for r in range(world_size)]
    worst, ratio = -1.0, 0.0
    for b, bucket in enumerate(opt.layout.buckets):
        moved = torch.zeros(bucket.numel, dtype=torch.float64)
        size = torch.zeros(bucket.numel, dtype=torch.float64)
        for slot in bucket.slots:
            i = next(k for k, p in enumerate(opt.param_groups[0]["params"]) if p is slot.param)
            span = slice(slot.start - bucket.start, slot.end - bucket.start)
            moved[span] = (before[i].double() - after[i].double()).reshape(-1)
            size[span] = before[i].double().abs().reshape(-1) + after[i].double().abs().reshape(-1)
        for owner in range(shard):  # every chunk, from its owner's point of view
            chunks = [e[b].chunk(shard)[owner] for e in everyone]
            bd = bound(kind, chunks, shard, owner) / world_size \
                + 2.0 ** -22 * size.chunk(shard)[owner]
            err = (moved.chunk(shard)[owner] - sum(chunks) / world_size).abs()
            worst = max(worst, float((err - bd).max()))
            ratio = max(ratio, float((err / bd.clamp_min(1e-30)).max()))
    return dict(excess=worst, ratio=ratio, params=[p.clone() for p in after])


def converge(kind: str | None, stage: int) -> list[float]:
    """AdamW, 40 steps on the odd-sized model: the losses."""
    return train(kind, stage, steps=40, optimizer="adamw", lr=3e-3)[1]


def suite() -> dict:
    """Everything the tests check at this world size, in one call (one set of ranks)."""
    rank, world_size = world()
    out = {}
    shard_sizes = [None] + [s for s in range(1, world_size) if world_size % s == 0]
    for kind in ("int8", "int4"):
        for shard_size in shard_sizes:
            out["reduction", kind, shard_size] = reduction(kind, shard_size)
            for stage in (1, 2):
                out["sgd", kind, stage, shard_size] = sgd_step(kind, stage, shard_size)
    for stage in (1, 2):
        for kind in (None, "int8", "int4"):
            out["converge", kind, stage] = converge(kind, stage)
    out["bad kind"] = error_of(lambda: train("int16", 1))
    return out

