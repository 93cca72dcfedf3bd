"""Collectives over MPI, through mpi4py: no torchrun needed, mpirun starts the ranks.

CPU tensors are handed to MPI as buffers without copies (numpy views of the same memory).
CUDA tensors go to MPI directly when the MPI library is CUDA-aware (Open MPI's
``MPIX_Query_cuda_support``, or ``ZEROOPT_MPI_CUDA_AWARE=1``); otherwise they are staged
through host memory. Gradient buckets are reduce-scattered by a ring of point-to-point messages
(below) and param buckets all-gathered in place (``MPI_Iallgather`` with ``MPI_IN_PLACE``): each
rank sends (W-1)/W of a bucket for each, as NCCL's rings do, 2(W-1)/W in all, the volume of
data parallelism's all-reduce (benchmarks/bench_comm.py measures it).

Why a ring of our own: Open MPI's non-blocking ``MPI_Ireduce_scatter_block`` (coll/libnbc)
reduces the whole bucket to rank 0 over a binomial tree and then scatters it, which sends
1.25x data parallelism's volume at W=2 (1.17x at W=3, measured) and makes rank 0 a hot spot. MPI has no bfloat16 sum: reduce in fp32 (the default
``reduce_dtype``); moving bf16 data (all-gather, broadcast) works, as raw bytes.

Non-blocking MPI collectives progress when MPI is called (Open MPI has no progress thread by
default): overlap with backward is partial, and the handle's ``wait()`` finishes the work.
"""

from __future__ import annotations

import ctypes
import os
from typing import Any, Callable

import torch

from .base import Collectives

_NUMPY_SUMMABLE = {torch.float16, torch.float32, torch.float64, torch.int8, torch.uint8,
                   torch.int16, torch.int32, torch.int64}
_world: "MPICollectives | None" = None


def world() -> "MPICollectives":
    """The collectives over MPI_COMM_WORLD (MPI is initialised on first use)."""
    global _world
    if _world is None:
        from mpi4py import MPI

        _world = MPICollectives(MPI.COMM_WORLD)
    return _world


def cuda_aware() -> bool:
    override = os.environ.get("ZEROOPT_MPI_CUDA_AWARE")
    if override is not None:
        return override.lower() in ("1", "true", "yes")
    from mpi4py import MPI

    try:  # Open MPI (and MPICH 4.x as MPIX_Query_cuda_support too)
        return bool(ctypes.CDLL(MPI.__file__).MPIX_Query_cuda_support())
    except (AttributeError, OSError):
        return False


class _Request:
    """A pending MPI request; ``then`` runs once it has finished (copy out a result)."""

    def __init__(self, request, then: Callable[[], None] | None = None):
        self.request, self.then = request, then

    def is_completed(self) -> bool:
        return bool(self.request.Test())

    def wait(self) -> None:
        self.request.Wait()
        if self.then is not None:
            self.then()
            self.then = None


class MPICollectives(Collectives):
    backend = "mpi"

    def __init__(self, comm):
        from mpi4py import MPI

        self.MPI, self.comm = MPI, comm
        self.rank, self.world_size = comm.Get_rank(), comm.Get_size()
        self._ops = {"sum": MPI.SUM, "max": MPI.MAX, "min": MPI.MIN}
        self._cuda_aware: bool | None = None
        self._rings = 0  # reduce_bucket calls so far: the same count on every rank

    def split(self, color: int) -> "MPICollectives":
        """The sub-communicator of the ranks that pass the same ``color`` (ordered by rank)."""
        return MPICollectives(self.comm.Split(color, self.rank))

    # -- buffers --------------------------------------------------------------------------

    def _direct(self, tensor: torch.Tensor) -> bool:
        """Whether MPI can take ``tensor``'s memory as it is (else it is staged on the host)."""
        if tensor.device.type == "cpu":
            return True
        if self._cuda_aware is None:
            self._cuda_aware = cuda_aware()
        return self._cuda_aware

    @staticmethod
    def _buffer(tensor: torch.Tensor, summed: bool):
        """``tensor``'s memory as an MPI buffer (no copy). Summed data keeps its dtype; data
        that is only moved may be any dtype, as bytes."""
        if summed and tensor.dtype not in _NUMPY_SUMMABLE:
            raise TypeError(f"MPI cannot sum {tensor.dtype} tensors: reduce in fp32 "
                            "(ZeroOptimizer(..., reduce_dtype=torch.float32), the default)")
        flat = tensor.reshape(-1)
        if not summed:
            flat = flat.view(torch.uint8)
        return flat if flat.device.type != "cpu" else flat.numpy()

    def _run(self, tensor: torch.Tensor, summed: bool, start) -> _Request:
        """Start a collective on ``tensor`` in place (staged through the host if needed)."""
        if self._direct(tensor):
            return _Request(start(self._buffer(tensor, summed)))
        host = tensor.cpu()
        return _Request(start(self._buffer(host, summed)), then=lambda: tensor.copy_(host))

    # -- collectives ----------------------------------------------------------------------

    def reduce_bucket(self, bucket: torch.Tensor) -> "_RingReduceScatter":
        self._buffer(bucket[:0], summed=True)  # a dtype MPI can sum, or a clear error
        self._rings += 1
        return _RingReduceScatter(self, bucket, self._rings)

    def gather_bucket(self, bucket: torch.Tensor) -> _Request:
        return self._run(bucket, False, lambda buf: self.comm.Iallgather(self.MPI.IN_PLACE, buf))

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> None:
        self._run(tensor, True, lambda buf: self.comm.Iallreduce(
            self.MPI.IN_PLACE, buf, self._ops[op])).wait()

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> None:
        self._run(tensor, False, lambda buf: self.comm.Ibcast(buf, root=src)).wait()

    def all_gather_object(self, obj: Any) -> list[Any]:
        return self.comm.allgather(obj)

    def barrier(self) -> None:
        self.comm.Barrier()


class _RingReduceScatter:
    """Reduce-scatter of one bucket around the ring of ranks, without blocking.

    In step s (0..W-2) rank r sends its running sum of chunk (r-s-1) mod W to rank r+1 and
    receives chunk (r-s-2) mod W from rank r-1, which it adds into its own copy; after W-1
    steps it holds the total of chunk r. ``is_completed()`` moves the ring on as far as the
    messages have arrived (MPI has no progress thread: grad_sync polls it during backward);
    ``wait()`` finishes it. Each bucket's messages carry its own tags, so several buckets can
    be in flight between the same ranks.
    """

    def __init__(self, mpi: MPICollectives, bucket: torch.Tensor, sequence: int):
        self.mpi, self.bucket = mpi, bucket
        self.work = bucket if mpi._direct(bucket) else bucket.cpu()  # staged: CUDA, not aware
        self.chunks = self.work.chunk(mpi.world_size)
        self.incoming = torch.empty_like(self.chunks[0])
        world = mpi.world_size
        self.tag_base = (sequence % (32767 // world)) * world  # MPI guarantees tags < 32768
        self.step, self.requests = 0, None
        self._post()

    def _post(self) -> None:
        rank, world, comm = self.mpi.rank, self.mpi.world_size, self.mpi.comm
        if self.step == world - 1:
            self.requests = None
            if self.work is not self.bucket:
                self.bucket.chunk(world)[rank].copy_(self.chunks[rank])
            return
        send = self.chunks[(rank - self.step - 1) % world]
        tag = self.tag_base + self.step
        self.requests = [
            comm.Irecv(MPICollectives._buffer(self.incoming, True), (rank - 1) % world, tag),
            comm.Isend(MPICollectives._buffer(send, True), (rank + 1) % world, tag)]

    def _advance(self, block: bool) -> bool:
        MPI, rank, world = self.mpi.MPI, self.mpi.rank, self.mpi.world_size
        while self.requests is not None:
            if block:
                MPI.Request.Waitall(self.requests)
            elif not MPI.Request.Testall(self.requests):
                return False
            self.chunks[(rank - self.step - 2) % world].add_(self.incoming)
            self.step += 1
            self._post()
        return True

    def is_completed(self) -> bool:
        return self._advance(block=False)

    def wait(self) -> None:
        self._advance(block=True)
