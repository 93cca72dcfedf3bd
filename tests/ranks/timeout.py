"""Scenarios on every rank for ``timeout=``: rank 1 hangs (it stops making the optimizer's calls)
and rank 0 must stop with zeroopt's error instead of waiting for the process group's 30 minutes.

The hung rank waits for a file that rank 0 writes once it has given up, so nothing here depends
on how long anything takes: on code without the timeout both ranks wait for ever, and the
harness's own deadline fails the test.
"""

from __future__ import annotations

import datetime
import os
import time

import torch
import torch.distributed as dist

import zeroopt
from training import batch, loss_of, models, world


def _hang_until_rank0_gives_up(flag: str) -> str:
    while not os.path.exists(flag):
        time.sleep(0.05)
    return "hung"


def _gave_up(flag: str, run) -> str:
    """``run()`` on rank 0: the CollectiveTimeout's message (or what happened instead)."""
    try:
        run()
        return "no error"
    except zeroopt.comm.CollectiveTimeout as error:
        return str(error)
    finally:
        open(flag, "w").close()


def hung_in_step(timeout, flag_dir: str, collectives: str = "auto") -> str:
    """Rank 1 builds the optimizer, then stops: rank 0's step waits on its gradients."""
    os.environ["ZEROOPT_BUCKET_COLLECTIVES"] = collectives  # ring (gloo's default), or native
    rank, _ = world()
    model, _ = models()
    opt = zeroopt.ZeroOptimizer(model.parameters(), "adamw", timeout=timeout)
    flag = os.path.join(flag_dir, "rank0-gave-up")
    if rank == 1:
        return _hang_until_rank0_gives_up(flag)

    def train_step():
        loss_of(model, *batch(0, rank)).backward()
        opt.step()

    return _gave_up(flag, train_step)


def hung_before_construction(timeout, flag_dir: str) -> str:
    """Rank 1 never builds the optimizer: rank 0's construction check waits on it."""
    rank, _ = world()
    model, _ = models()
    flag = os.path.join(flag_dir, "rank0-gave-up")
    if rank == 1:
        return _hang_until_rank0_gives_up(flag)
    return _gave_up(flag, lambda: zeroopt.ZeroOptimizer(model.parameters(), timeout=timeout))


def init_distributed_with_timeout(port: int, flag_dir: str) -> dict:
    """init_distributed(timeout=) makes the process group (as under torchrun, with the
    harness's group torn down first): the group gets the timeout as its own, and the returned
    collectives give up after it."""
    rank, world_size = world()
    # Both ranks reach the new rendezvous together: its 3 s are the store's wait for the other
    # rank too, which a busy machine's slower process start would otherwise eat.
    dist.barrier()
    dist.destroy_process_group()
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_PORT=str(port))
    comm, device = zeroopt.comm.init_distributed(timeout=datetime.timedelta(seconds=3))
    group = dist.distributed_c10d._get_default_group()
    own = group._get_backend(torch.device("cpu")).options._timeout
    out = {"comm_timeout": comm.timeout, "group_timeout": own.total_seconds(),
           "device": str(device)}
    flag = os.path.join(flag_dir, "rank0-gave-up")
    if rank == 1:
        out["error"] = _hang_until_rank0_gives_up(flag)
    else:
        out["error"] = _gave_up(flag, lambda: comm.all_reduce(torch.ones(3)))
    return out


def same_training_with_a_timeout() -> dict:
    """Training with a timeout that never runs out gives the same params, bit for bit, as
    without one: the ring (gloo's default) and the native collectives (whose waits poll, or
    run on a helper thread)."""
    rank, _ = world()
    out = {}
    for collectives in ("auto", "native"):
        os.environ["ZEROOPT_BUCKET_COLLECTIVES"] = collectives
        params = []
        for timeout in (None, 30):
            model, _ = models()
            opt = zeroopt.ZeroOptimizer(model.parameters(), "lamb", stage=2, bucket_numel=700,
                                        timeout=timeout)
            for step in range(3):
                loss_of(model, *batch(step, rank)).backward()
                opt.clip_grad_norm_(1.0)
                opt.step()
                opt.zero_grad()
            opt.state_dict()  # a collective too
            params.append([p.detach().clone() for p in model.parameters()])
        out[collectives] = all(torch.equal(a, b) for a, b in zip(*params))
    return out


def mpi_hung_in_step() -> str:
    """``hung_in_step`` under mpirun (ZEROOPT_BACKEND=mpi): MPI's waits take no timeout, so
    zeroopt tests the requests until the deadline. Arguments come from the environment."""
    return hung_in_step(float(os.environ["ZEROOPT_TEST_TIMEOUT"]),
                        os.environ["ZEROOPT_TEST_FLAG_DIR"])
