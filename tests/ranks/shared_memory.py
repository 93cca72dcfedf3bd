"""Rank side of tests/test_shared_memory.py: the shared-memory bucket collectives
(zeroopt/comm/shared_memory.py) against the ring of gloo messages, on the same ranks.

``suite()`` runs on the shared pools (W = 2, 3). Run as a script, this module starts two
fresh ranks of its own (``job``): they train and leave normally, or one is killed mid-step;
the script prints what the survivor saw and which of the job's /dev/shm names are left.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import sys

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode

import zeroopt
from zeroopt.comm import TorchDistributed, shm_files, with_timeout

CHUNKS = [1, 7, 1001]  # elements per chunk: odd, one, and a 4 KiB-crossing size
DTYPES = [torch.float32, torch.bfloat16, torch.float64]
PLACES = ["allocated", "inside", "pooled", "private"]


@contextlib.contextmanager
def collectives(kind: str):
    """``ZEROOPT_BUCKET_COLLECTIVES=kind`` while a TorchDistributed is made."""
    before = os.environ.get("ZEROOPT_BUCKET_COLLECTIVES")
    os.environ["ZEROOPT_BUCKET_COLLECTIVES"] = kind
    try:
        yield
    finally:
        if before is None:
            del os.environ["ZEROOPT_BUCKET_COLLECTIVES"]
        else:
            os.environ["ZEROOPT_BUCKET_COLLECTIVES"] = before


class DataCalls(TorchFunctionMode):
    """Counts the torch calls that copy or add elements."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls += getattr(func, "__name__", "") in ("copy_", "add_", "add")
        return func(*args, **(kwargs or {}))


def comm_of(kind: str) -> TorchDistributed:
    with collectives(kind):
        return TorchDistributed(None)


def place(comm, values: torch.Tensor, where: str) -> torch.Tensor:
    """``values`` copied into a bucket: a whole allocated buffer, a range inside one (at an
    offset, as a param bucket), the start of a bigger pooled one (as grad_sync's stage-2
    staging), or a private tensor (the scratch path)."""
    n, cpu = values.numel(), torch.device("cpu")
    if where == "allocated":
        bucket = comm.allocate(n, values.dtype, cpu)
    elif where == "inside":
        bucket = comm.allocate(n + 13, values.dtype, cpu)[5:5 + n]
    elif where == "pooled":
        bucket = comm.allocate(n + 3 * comm.world_size, values.dtype, cpu)[:n]
    else:
        bucket = torch.zeros(n, dtype=values.dtype)
    return bucket.copy_(values)


def data(rank: int, world_size: int, chunk: int, dtype, integers: bool, case: int):
    g = torch.Generator().manual_seed(1000 * case + rank)
    x = torch.randn(world_size * chunk, generator=g, dtype=torch.float64)
    return ((x * 8).round() if integers else x).to(dtype)


def bucket_collectives(out: dict, shm, ring, rank: int, world_size: int) -> None:
    """Every case launched first, then waited in an order of this rank's own (twice)."""
    cases, handles = [], []
    for case, (chunk, dtype, where, integers) in enumerate(
            (c, d, w, i) for c in CHUNKS for d in DTYPES for w in PLACES for i in (True, False)):
        mine = data(rank, world_size, chunk, dtype, integers, case)
        owned = torch.full((chunk,), rank + 1.0, dtype=dtype)
        reduced, gathered = place(shm, mine, where), place(shm, torch.zeros_like(mine), where)
        gathered.chunk(world_size)[rank].copy_(owned)
        handles += [shm.reduce_bucket(reduced), shm.gather_bucket(gathered)]
        cases.append((case, chunk, dtype, where, integers, mine, reduced, gathered))
    random.Random(rank).shuffle(handles)
    for handle in handles + handles[::3]:
        handle.wait()
    assert all(handle.is_completed() for handle in handles)
    for case, chunk, dtype, where, integers, mine, reduced, gathered in cases:
        by_ring, ring_gathered = mine.clone(), torch.zeros_like(mine)
        ring_gathered.chunk(world_size)[rank].fill_(rank + 1.0)
        ring.reduce_bucket(by_ring).wait()
        ring.gather_bucket(ring_gathered).wait()
        key = (chunk, str(dtype), where, integers)
        got = reduced.chunk(world_size)[rank]
        out["reduce_as_ring", key] = torch.equal(got, by_ring.chunk(world_size)[rank])
        if integers:  # exact in every dtype: the sum of the ranks' integer values
            exact = sum(data(r, world_size, chunk, dtype, True, case).double()
                        for r in range(world_size)).chunk(world_size)[rank]
            out["reduce_exact", key] = torch.equal(got.double(), exact)
        expected = torch.arange(1, world_size + 1, dtype=dtype).repeat_interleave(chunk)
        out["gather", key] = torch.equal(gathered, expected) and torch.equal(ring_gathered,
                                                                             expected)


def train(kind: str, stage: int, reduce_dtype, steps: int = 3):
    from training import batch, loss_of, models

    rank = dist.get_rank()
    model, _ = models()
    with collectives(kind):
        opt = zeroopt.ZeroOptimizer(model.parameters(), "adamw", stage=stage, lr=1e-2,
                                    bucket_numel=700, reduce_dtype=reduce_dtype)
    for step in range(steps):
        loss_of(model, *batch(step, rank)).backward()
        opt.clip_grad_norm_(1.0)
        opt.step()
        opt.zero_grad()
    return [p.detach().clone() for p in model.parameters()], opt.comm.bucket_collectives


def error_of(fn) -> str:
    try:
        fn()
    except (RuntimeError, ValueError) as error:
        return f"{type(error).__name__}: {error}"
    return "no error"


def suite() -> dict:
    rank, world_size = dist.get_rank(), dist.get_world_size()
    out = {}
    shm, ring = comm_of("shared_memory"), comm_of("ring")
    auto = comm_of("auto")
    before = auto.bucket_collectives  # "auto" decides at the first bucket collective
    auto.allocate(4, torch.float32, torch.device("cpu"))
    out["chosen"] = (shm.bucket_collectives, ring.bucket_collectives, before,
                     auto.bucket_collectives)
    t = shm.allocate(10, torch.float32, torch.device("cpu"))
    out["allocated"] = (t._base is None, torch.equal(t, torch.zeros(10)),
                        shm_files.locate(t[3:]) == (shm_files.locate(t)[0], 12))
    bucket_collectives(out, shm, ring, rank, world_size)

    # is_completed() never blocks: rank 0 polls before the others have posted.
    early = place(shm, torch.ones(world_size * 5), "allocated")
    if rank == 0:
        handle = shm.reduce_bucket(early)
        out["early"] = handle.is_completed()
    ring.barrier()
    if rank != 0:
        handle = shm.reduce_bucket(early)
    handle.wait()
    out["late"] = torch.equal(early.chunk(world_size)[rank], torch.full((5,), world_size * 1.0))

    # The transport's own copies and sums are not seen by torch function modes (a mode that
    # waits for pending buckets, as param_gather's guard, would re-enter the handle).
    with DataCalls() as seen:
        reduced = place(shm, torch.ones(world_size * 9), "allocated")
        gathered = place(shm, torch.zeros(world_size * 9), "pooled")
        made = seen.calls
        handles = [shm.reduce_bucket(reduced), shm.gather_bucket(gathered)]
        for handle in handles:
            handle.wait()
    out["modes_see"] = (made > 0, seen.calls - made)

    # A timeout names the rank waited on; the ranks' differing collectives are an error.
    bounded = with_timeout(comm_of("shared_memory"), 0.3)
    bounded.allocate(1, torch.float32, torch.device("cpu"))  # joins: a collective of all ranks
    if rank == 0:
        out["timeout"] = error_of(lambda: bounded.reduce_bucket(early).wait())
    ring.barrier()
    odd = comm_of("shared_memory")
    numel = world_size * (3 if rank == 0 else 4)
    out["differ"] = error_of(lambda: odd.reduce_bucket(torch.ones(numel)).wait())
    ring.barrier()

    for stage in (1, 2):
        for reduce_dtype in (torch.float64, torch.float32, torch.bfloat16):
            by_shm, chosen = train("auto", stage, reduce_dtype)
            by_ring, _ = train("ring", stage, reduce_dtype)
            out["train", stage, str(reduce_dtype)] = (
                chosen, all(torch.equal(a, b) for a, b in zip(by_shm, by_ring)))
    out["bad_choice"] = error_of(lambda: comm_of("shm"))
    return out


def refusals() -> dict:
    """shared_memory.refusals on facts as ranks would gather them (one rank, no group)."""
    from zeroopt.comm.shared_memory import AUTO_MIN_FREE, refusals as why

    base = {"host": "a", "boot": "b", "pidns": "p", "shm": 7, "writable": True,
            "free": AUTO_MIN_FREE, "machine": "x86_64", "rank": 0}
    other_host = dict(base, host="z", rank=1)
    small = dict(base, free=64 << 20, rank=1)
    arm = dict(base, machine="aarch64", rank=1)
    return {"same": why([base, dict(base, rank=1)], False), "host": why([base, other_host], True),
            "small_auto": why([base, small], False), "small_forced": why([base, small], True),
            "arm": why([base, arm], True)}


# -- a job of two fresh ranks, as a script -----------------------------------------------------


def _rank(rank: int, port: int, kill: bool, results) -> None:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from training import batch, loss_of, models

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      ZEROOPT_BUCKET_COLLECTIVES="shared_memory")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    model, _ = models()
    opt = zeroopt.ZeroOptimizer(model.parameters(), "adamw", stage=2, bucket_numel=700)
    results.put(("prefix", rank, shm_files.prefix()))
    error = None
    try:
        for step in range(3):
            if kill and step == 2 and rank == 1:
                os.kill(os.getpid(), signal.SIGKILL)  # mid-job, before its reductions
            loss_of(model, *batch(step, rank)).backward()  # rank 0 waits for rank 1 here
            opt.step()
            opt.zero_grad()
    except RuntimeError as e:
        error = str(e)
    results.put(("error", rank, error))
    if not kill:
        dist.destroy_process_group()


def job(kill: bool) -> dict:
    """Two fresh ranks over gloo + shared memory, leaving normally (atexit runs)."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, port, kill, results)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    got = {}
    while not results.empty():
        what, rank, value = results.get()
        got[what, rank] = value
    prefixes = [got["prefix", r] for r in range(2)]
    left = sorted(n for n in os.listdir(shm_files.DIRECTORY)
                  if any(n.startswith(p + "-") for p in prefixes))
    return {"exit_codes": [p.exitcode for p in procs], "left": left,
            "errors": [got.get(("error", r)) for r in range(2)]}


if __name__ == "__main__":
    print(json.dumps(job(kill=sys.argv[1] == "kill")))
