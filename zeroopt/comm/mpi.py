"""Collectives over MPI, through mpi4py: no torchrun needed, mpirun starts the ranks.

CPU tensors are handed to MPI as buffers without copies (numpy views of the same memory).
CUDA tensors go to MPI directly when the MPI library is CUDA-aware (Open MPI's
``MPIX_Query_cuda_support``, or ``ZEROOPT_MPI_CUDA_AWARE=1``); otherwise they are staged
through host memory. Gradient buckets are reduce-scattered by a ring of point-to-point messages
(ring.py) and param buckets all-gathered in place (``MPI_Iallgather`` with ``MPI_IN_PLACE``): each
rank sends (W-1)/W of a bucket for each, as NCCL's rings do, 2(W-1)/W in all, the volume of
data parallelism's all-reduce (benchmarks/bench_comm.py measures it). Open MPI's own
non-blocking ``MPI_Ireduce_scatter_block`` reduces the whole bucket to rank 0 over a binomial
tree and then scatters it: 1.25x DP's volume at W=2, 1.17x at W=3, measured.

MPI has no bfloat16 sum: reduce in fp32 (the default ``reduce_dtype``); moving bf16 data
(all-gather, broadcast) works, as raw bytes.

Non-blocking MPI collectives progress when MPI is called (Open MPI has no progress thread by
default): overlap with backward is partial, and the handle's ``wait()`` finishes the work.

MPI's waits take no timeout. With ``timeout`` set (``deadline.py``), a wait tests its requests
until the deadline instead, and the pickled all-gather of the construction check is preceded by
a non-blocking barrier waited for so (once every rank is there, it cannot hang).
"""

from __future__ import annotations

import ctypes
import os
from typing import Any, Callable

import torch

from .base import Collectives, Handle
from .deadline import poll_until
from .quantized import QuantizedReduceScatter
from .ring import Exchange, Ring

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
    """Whether the MPI library can take CUDA memory directly (else CUDA tensors are staged
    through the host).

    Returns:
        ``ZEROOPT_MPI_CUDA_AWARE`` when set (true for "1", "true" or "yes"); else
        ``MPIX_Query_cuda_support()`` where the library has it (Open MPI, MPICH 4.x); else
        False.
    """
    override = os.environ.get("ZEROOPT_MPI_CUDA_AWARE")
    if override is not None:
        return override.lower() in ("1", "true", "yes")
    from mpi4py import MPI

    try:  # Open MPI (and MPICH 4.x as MPIX_Query_cuda_support too)
        return bool(ctypes.CDLL(MPI.__file__).MPIX_Query_cuda_support())
    except (AttributeError, OSError):
        return False


class _Request:
    """A pending MPI request; ``then`` runs once it has finished (copy out a result).
    ``timeout``: seconds ``wait()`` may take (tested until then), or None (MPI's Wait)."""

    def __init__(self, request, then: Callable[[], None] | None = None,
                 timeout: float | None = None, what: str = ""):
        self.request, self.then = request, then
        self.timeout, self.what = timeout, what

    def is_completed(self) -> bool:
        """Whether the MPI request has completed (``MPI.Request.Test``); see ``Handle``."""
        return bool(self.request.Test())

    def wait(self) -> None:
        """Wait for the MPI request, within the timeout when one is set; see ``Handle``."""
        if self.timeout is None:
            self.request.Wait()
        else:
            poll_until(self.request.Test, self.timeout, self.what)
        if self.then is not None:
            self.then()
            self.then = None


class MPICollectives(Collectives):
    """Collectives over an mpi4py communicator (see the module docstring).

    Args:
        comm: the mpi4py communicator (``world()`` uses ``MPI.COMM_WORLD``).
    """

    backend = "mpi"

    def __init__(self, comm):
        from mpi4py import MPI

        self.MPI, self.comm = MPI, comm
        self.rank, self.world_size = comm.Get_rank(), comm.Get_size()
        self._ops = {"sum": MPI.SUM, "max": MPI.MAX, "min": MPI.MIN}
        self._cuda_aware: bool | None = None
        # reduce_bucket calls so far: the same count on every rank; shared with the copies
        # that carry another timeout (comm.with_timeout), whose rings share the tags
        self._rings = [0]

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

    def _run(self, tensor: torch.Tensor, summed: bool, start, what: str) -> _Request:
        """Start a collective on ``tensor`` in place (staged through the host if needed)."""
        if self._direct(tensor):
            return _Request(start(self._buffer(tensor, summed)), timeout=self.timeout,
                            what=what)
        host = tensor.cpu()
        return _Request(start(self._buffer(host, summed)), then=lambda: tensor.copy_(host),
                        timeout=self.timeout, what=what)

    # -- collectives ----------------------------------------------------------------------

    def reduce_bucket(self, bucket: torch.Tensor) -> Handle:
        """A ring reduce-scatter of point-to-point messages (ring.py), on a host copy when
        the bucket is on CUDA and MPI is not CUDA-aware; see ``Collectives.reduce_bucket``.

        Raises:
            TypeError: MPI cannot sum the bucket's dtype (reduce in fp32).
        """
        if self.compression is not None:  # quantized chunks, summed by zeroopt (quantized.py)
            return QuantizedReduceScatter(self, list(bucket.chunk(self.world_size)),
                                          self.compression)
        self._buffer(bucket[:0], summed=True)  # a dtype MPI can sum, or a clear error
        self._rings[0] += 1
        if self._direct(bucket):
            return Ring(self, bucket, self._rings[0], reduce=True)
        host = bucket.cpu()  # CUDA, MPI not CUDA-aware: the ring runs on a host copy
        mine = bucket.chunk(self.world_size)[self.rank]
        return Ring(self, host, self._rings[0], reduce=True,
                    then=lambda: mine.copy_(host.chunk(self.world_size)[self.rank]))

    def gather_bucket(self, bucket: torch.Tensor) -> _Request:
        """An in-place ``MPI_Iallgather`` (the bucket moved as bytes, any dtype); see
        ``Collectives.gather_bucket``."""
        return self._run(bucket, False, lambda buf: self.comm.Iallgather(self.MPI.IN_PLACE, buf),
                         "all-gather of a param bucket")

    def all_reduce_async(self, tensor: torch.Tensor) -> Handle:
        """An in-place ``MPI_Iallreduce`` (a sum), not waited for: it moves on when its
        handle is polled; see ``Collectives.all_reduce_async``.

        Raises:
            TypeError: MPI cannot sum the tensor's dtype.
        """
        return self._run(tensor, True, lambda buf: self.comm.Iallreduce(
            self.MPI.IN_PLACE, buf, self.MPI.SUM), "all_reduce across the replicas")

    def all_to_all(self, send: torch.Tensor, send_sizes: list[int], recv: torch.Tensor,
                   recv_sizes: list[int]) -> Handle:
        """``MPI_Isend``/``MPI_Irecv`` per peer (``ring.Exchange``, its tag drawn from the
        rings' count), through host copies when the tensors are on CUDA and MPI is not
        CUDA-aware; see ``Collectives.all_to_all``."""
        self._rings[0] += 1
        if self._direct(send):
            return Exchange(self, send, send_sizes, recv, recv_sizes, self._rings[0])
        host = torch.empty(recv.numel(), dtype=recv.dtype)
        return Exchange(self, send.cpu(), send_sizes, host, recv_sizes, self._rings[0],
                        then=lambda: recv.copy_(host))

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> None:
        """An in-place ``MPI_Iallreduce``, waited for; see ``Collectives.all_reduce``.

        Raises:
            TypeError: MPI cannot sum the tensor's dtype.
        """
        self._run(tensor, True, lambda buf: self.comm.Iallreduce(
            self.MPI.IN_PLACE, buf, self._ops[op]), "all_reduce").wait()

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> None:
        """An ``MPI_Ibcast`` from rank ``src``, waited for; see ``Collectives.broadcast``."""
        self._run(tensor, False, lambda buf: self.comm.Ibcast(buf, root=src),
                  f"broadcast from rank {src}").wait()

    def all_gather_object(self, obj: Any) -> list[Any]:
        """mpi4py's ``allgather``, after a barrier waited for with the timeout when one is
        set (allgather itself takes none); see ``Collectives.all_gather_object``."""
        if self.timeout is not None:  # allgather takes no timeout: meet at a barrier first
            _Request(self.comm.Ibarrier(), timeout=self.timeout,
                     what="all_gather_object: the optimizer's construction check").wait()
        return self.comm.allgather(obj)

    def barrier(self) -> None:
        """``MPI_Barrier`` (``MPI_Ibarrier``, tested until the deadline, with a timeout); see
        ``Collectives.barrier``."""
        if self.timeout is None:
            self.comm.Barrier()
        else:
            _Request(self.comm.Ibarrier(), timeout=self.timeout, what="barrier").wait()

    # -- point to point, for the ring (ring.py) -------------------------------------------

    max_tag = 32767  # the MPI standard's least upper bound for tags

    def isend(self, tensor: torch.Tensor, peer: int, tag: int):
        """``MPI_Isend`` of the tensor's bytes; see ``ring.PointToPoint.isend``."""
        return self.comm.Isend(self._buffer(tensor, False), peer, tag)

    def irecv(self, tensor: torch.Tensor, peer: int, tag: int):
        """``MPI_Irecv`` into the tensor's bytes; see ``ring.PointToPoint.irecv``."""
        return self.comm.Irecv(self._buffer(tensor, False), peer, tag)

    def test_all(self, requests: list) -> bool:
        """``MPI_Testall``: whether every request has finished, without blocking."""
        return bool(self.MPI.Request.Testall(requests))

    def wait_all(self, requests: list, what: str = "point-to-point messages",
                 peer: int | None = None) -> None:
        """``MPI_Waitall``, or ``MPI_Testall`` until the deadline with a timeout; see
        ``ring.PointToPoint.wait_all``."""
        if self.timeout is None:
            self.MPI.Request.Waitall(requests)
        else:
            poll_until(lambda: self.test_all(requests), self.timeout, what, peer)
