"""What bench_checkpoint.py measures in each rank: timers around fsync / sha256 / DCP, one timed
collective call, bytes on disk, and fingerprints of the state to check a load against."""

from __future__ import annotations

import os
import time

import torch
import torch.distributed as dist

# --------------------------------------------------------------------------------------------
# Instrumentation: fsync and (zeroopt) sha256 time, per rank, reset before each timed call


class Counters:
    fsync_s = 0.0
    fsync_n = 0
    hash_s = 0.0
    hash_bytes = 0
    dcp_s = 0.0

    @classmethod
    def reset(cls):
        cls.fsync_s, cls.fsync_n, cls.hash_s, cls.hash_bytes, cls.dcp_s = 0.0, 0, 0.0, 0, 0.0


def _timing(real, record):
    """`real`, with record(seconds, *args) after each call (also when it raises)."""
    def wrapper(*a, **k):
        t0 = time.perf_counter()
        try:
            return real(*a, **k)
        finally:
            record(time.perf_counter() - t0, *a)

    return wrapper


def instrument_fsync():
    def record(s, fd):
        Counters.fsync_s += s
        Counters.fsync_n += 1

    os.fsync = _timing(os.fsync, record)


def instrument_zeroopt_hashing():
    from zeroopt.checkpoint import directory

    def record_hash(s, file):
        Counters.hash_s += s
        Counters.hash_bytes += os.path.getsize(file)

    directory._file_facts = _timing(directory._file_facts, record_hash)

    # zeroopt calls torch.distributed.checkpoint's save/load through the module attribute.
    import torch.distributed.checkpoint as dcp

    def record_dcp(s, *_):
        Counters.dcp_s += s

    for fname in ("save", "load"):
        setattr(dcp, fname, _timing(getattr(dcp, fname), record_dcp))


def timed(fn) -> dict:
    """Run the collective `fn` between barriers; this rank's seconds and counters."""
    Counters.reset()
    dist.barrier()
    t0 = time.perf_counter()
    fn()
    dist.barrier()
    return dict(s=time.perf_counter() - t0, fsync_s=Counters.fsync_s, fsync_n=Counters.fsync_n,
                hash_s=Counters.hash_s, hash_bytes=Counters.hash_bytes, dcp_s=Counters.dcp_s)


def dir_bytes(path: str) -> tuple[int, int]:
    """(bytes, files) under `path` (apparent sizes)."""
    total = files = 0
    for root, _, names in os.walk(path):
        for n in names:
            total += os.path.getsize(os.path.join(root, n))
            files += 1
    return total, files


# --------------------------------------------------------------------------------------------
# Fingerprints: float64 sum and sum of squares of every param and state tensor, and the step


def sums(t: torch.Tensor) -> list[float]:
    t = t.detach().to(torch.float64)
    return [float(t.sum()), float((t * t).sum())]


def torch_layout_fingerprint(model, sd) -> dict:
    """The fingerprint of `model` and a torch.optim-layout optimizer state dict `sd`."""
    fp = {f"param.{n}": sums(p) for n, p in model.named_parameters()}
    names = [n for n, _ in model.named_parameters()]
    for i, st in sd["state"].items():
        for key in ("exp_avg", "exp_avg_sq"):
            fp[f"{key}.{names[i]}"] = sums(st[key])
    steps = {float(st["step"]) for st in sd["state"].values()}
    fp["step"] = [max(steps) if steps else -1.0]
    return fp


def compare(fp: dict | None, ref: dict | None) -> dict:
    """How far fingerprint `fp` is from `ref`: exact, or the largest relative difference."""
    if fp is None or ref is None:
        return dict(ok=False, why="no fingerprint")
    if set(fp) != set(ref):
        return dict(ok=False, why=f"different entries ({len(fp)} vs {len(ref)})")
    worst, where = 0.0, None
    for k, vals in ref.items():
        for a, b in zip(fp[k], vals):
            d = abs(a - b) / max(abs(b), 1e-30)
            if d > worst:
                worst, where = d, k
    return dict(ok=worst < 1e-6, exact=worst == 0.0, max_rel=worst, where=where)
