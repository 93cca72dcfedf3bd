"""Collectives over a torch.distributed process group (gloo, nccl, and any other backend).

The collectives used for buckets are the fastest measured per backend. NCCL (and other
accelerator backends) run their own reduce-scatter and all-gather, in place. gloo's are slow:
on 4M-element fp32 buckets at W=2, ``all_reduce`` took 12.5 ms, ``reduce_scatter_tensor``
25 ms, list ``all_gather`` 9-10 ms, against 7 ms and 5 ms for a ring of gloo's own tagged
send/recv (ring.py), which also sends half the bytes of an all-reduce. So gloo runs the ring.
``ZEROOPT_BUCKET_COLLECTIVES=ring|native|all_reduce`` overrides the choice (the tests use it
to run the NCCL-style in-place collectives over gloo).
"""

from __future__ import annotations

import atexit
import os
import socket
from typing import Any

import torch
import torch.distributed as dist

from .base import Collectives, Handle
from .environment import Launch
from .ring import Ring

_REDUCE_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}

# torch 2.13 renamed the equal-chunk collectives; older versions have only the old names.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor

# Backends whose own bucket collectives lose to a ring of point-to-point messages.
_RING_BACKENDS = {"gloo"}
_CHOICES = ("auto", "ring", "native", "all_reduce")


class TorchDistributed(Collectives):
    def __init__(self, group: dist.ProcessGroup | None = None):
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.backend = str(dist.get_backend(group))
        choice = os.environ.get("ZEROOPT_BUCKET_COLLECTIVES", "auto")
        if choice not in _CHOICES:
            raise ValueError(f"ZEROOPT_BUCKET_COLLECTIVES={choice!r}: use one of "
                             f"{', '.join(_CHOICES)}")
        if choice == "auto":
            choice = "ring" if self.backend in _RING_BACKENDS else "native"
        self.bucket_collectives = choice
        self._rings = 0  # bucket rings so far: the same count on every rank

    def reduce_bucket(self, bucket: torch.Tensor) -> Handle:
        if self.bucket_collectives == "ring":
            return self._ring(bucket, reduce=True)
        if self.bucket_collectives == "all_reduce":
            return dist.all_reduce(bucket, group=self.group, async_op=True)
        mine = bucket.chunk(self.world_size)[self.rank]
        return _reduce_scatter_single(mine, bucket, group=self.group, async_op=True)

    def gather_bucket(self, bucket: torch.Tensor) -> Handle:
        if self.bucket_collectives == "ring":
            return self._ring(bucket, reduce=False)
        chunks = list(bucket.chunk(self.world_size))
        if self.bucket_collectives == "all_reduce":
            return dist.all_gather(chunks, chunks[self.rank], group=self.group, async_op=True)
        return _all_gather_single(bucket, chunks[self.rank], group=self.group, async_op=True)

    def _ring(self, bucket: torch.Tensor, reduce: bool) -> Handle:
        self._rings += 1
        return Ring(self, bucket, self._rings, reduce)

    # -- point to point, for the ring (ring.py) -------------------------------------------

    max_tag = 1 << 24

    def _global(self, peer: int) -> int:
        return peer if self.group is None else dist.get_global_rank(self.group, peer)

    def isend(self, tensor: torch.Tensor, peer: int, tag: int):
        return dist.isend(tensor, self._global(peer), group=self.group, tag=tag)

    def irecv(self, tensor: torch.Tensor, peer: int, tag: int):
        return dist.irecv(tensor, self._global(peer), group=self.group, tag=tag)

    def test_all(self, requests: list) -> bool:
        return all(request.is_completed() for request in requests)

    def wait_all(self, requests: list) -> None:
        for request in requests:
            request.wait()

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> None:
        dist.all_reduce(tensor, op=_REDUCE_OPS[op], group=self.group)

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> None:
        dist.broadcast(tensor, src=dist.get_global_rank(self.group, src)
                       if self.group is not None else src, group=self.group)

    def all_gather_object(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def barrier(self) -> None:
        dist.barrier(group=self.group)


def init_process_group(backend: str, launch: Launch) -> None:
    """Initialise the default process group for ``launch`` (torchrun's variables, or mpirun's:
    then rank 0's host and a free port are shared over MPI, unless MASTER_ADDR/PORT are set)."""
    if backend == "hccl":
        import torch_npu  # noqa: F401  (registers the "npu" device and the hccl backend)
    if launch.launcher == "mpi" and not ("MASTER_ADDR" in os.environ
                                          and "MASTER_PORT" in os.environ):
        os.environ.update(_rendezvous_over_mpi())
    set_local_device(backend, launch.local_rank)
    dist.init_process_group(backend, rank=launch.rank, world_size=launch.world_size)
    # We made the group, so we tear it down: exiting with gloo's threads alive aborts.
    atexit.register(destroy)


def set_local_device(backend: str, local_rank: int) -> None:
    """One accelerator per rank: the local rank's."""
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    elif backend == "hccl":
        torch.npu.set_device(local_rank)


def _rendezvous_over_mpi() -> dict[str, str]:
    from mpi4py import MPI

    address = None
    if MPI.COMM_WORLD.Get_rank() == 0:
        with socket.socket() as s:
            s.bind(("", 0))
            address = {"MASTER_ADDR": socket.gethostname(), "MASTER_PORT": str(s.getsockname()[1])}
    return MPI.COMM_WORLD.bcast(address, root=0)


def destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
