"""Collectives over a torch.distributed process group (gloo, nccl, and any other backend).

The collectives used for buckets are the fastest measured per backend. NCCL (and other
accelerator backends) run their own reduce-scatter and all-gather, in place. gloo's are slow:
on 4M-element fp32 buckets at W=2, ``all_reduce`` took 12.5 ms, ``reduce_scatter_tensor``
25 ms, list ``all_gather`` 9-10 ms, against 7 ms and 5 ms for a ring of gloo's own tagged
send/recv (ring.py), which also sends half the bytes of an all-reduce. So gloo runs the ring,
or, when every rank of the group is on this host, reads the peers' buckets from shared memory
(shared_memory.py). ``ZEROOPT_BUCKET_COLLECTIVES=ring|native|all_reduce|shared_memory``
overrides the choice (the tests use it to run the NCCL-style in-place collectives over gloo).

With ``timeout`` set (seconds; ``deadline.py``), a wait that passes it raises
``CollectiveTimeout``: the ring's send/recv wait with ``Work.wait(timeout)`` (gloo honours it,
with no polling on the hot path); the collectives poll ``Work.is_completed()`` until the
deadline, since not every backend honours ``wait(timeout)``. gloo's reduce-scatter honours
neither (torch 2.13: its ``is_completed()`` stays False even once done), so it is waited for
on a helper thread, as are the collectives of backends not tried here (hccl...). Without a timeout the calls are torch's plain blocking ones, bounded by the
process group's own timeout.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import os
import pickle
import socket
from typing import Any

import torch
import torch.distributed as dist

from .base import Collectives, Handle
from .deadline import poll_until, timed_out, wait_in_thread
from .environment import Launch
from .quantized import QuantizedReduceScatter
from .ring import Ring
from .shared_memory import Choice as SharedMemoryChoice

_REDUCE_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}

# torch 2.13 renamed the equal-chunk collectives; older versions have only the old names.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor

# Backends whose own bucket collectives lose to a ring of point-to-point messages.
_RING_BACKENDS = {"gloo"}
_CHOICES = ("auto", "ring", "native", "all_reduce", "shared_memory")


class TorchDistributed(Collectives):
    """Collectives over a torch.distributed process group (see the module docstring).

    Args:
        group: the process group (default None: the default group, which must be
            initialised).

    Raises:
        ValueError: ``ZEROOPT_BUCKET_COLLECTIVES`` is set to other than "auto", "ring",
            "native", "all_reduce" or "shared_memory".
        RuntimeError: (from the first bucket collective or ``allocate``) "shared_memory"
            where the ranks cannot share memory (shared_memory.py).
    """

    def __init__(self, group: dist.ProcessGroup | None = None):
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.backend = str(dist.get_backend(group))
        choice = os.environ.get("ZEROOPT_BUCKET_COLLECTIVES", "auto")
        if choice not in _CHOICES:
            raise ValueError(f"ZEROOPT_BUCKET_COLLECTIVES={choice!r}: use one of "
                             f"{', '.join(_CHOICES)}")
        # gloo ranks all on one host: through shared memory (shared_memory.py), decided at the
        # first bucket collective or allocate; the ring otherwise (and for CUDA tensors)
        self._shared = SharedMemoryChoice(choice)
        if choice == "auto":
            choice = "ring" if self.backend in _RING_BACKENDS else "native"
        self._collectives = choice
        self._rings = 0  # bucket rings so far: the same count on every rank

    @property
    def bucket_collectives(self) -> str:
        """How buckets go: "ring", "native", "all_reduce", or "shared_memory" (set, or picked
        by "auto" once the group's first bucket collective found every rank on this host)."""
        return "shared_memory" if self._shared.joined else self._collectives

    @property
    def gathers_by_copy(self) -> bool:
        """Over shared memory a gather's wait is this rank's own copy of its peers' chunks;
        see ``Collectives.gathers_by_copy``."""
        return self.bucket_collectives == "shared_memory"

    @property
    def pollable(self) -> bool:
        """Whether the bucket handles' ``is_completed()`` turns True once they are done: not
        over gloo's ring or reduce-scatter (gloo's send/recv and reduce-scatter ``Work``
        report False until waited for, torch 2.13, measured); see ``Collectives.pollable``."""
        return not (self.backend == "gloo" and self.bucket_collectives in ("ring", "native"))

    def reduce_bucket(self, bucket: torch.Tensor) -> Handle:
        """A ring of send/recv (gloo), the backend's reduce-scatter (NCCL and others), or an
        all-reduce, as ``bucket_collectives`` says; with ``compression``, a quantized
        all-to-all (quantized.py). See ``Collectives.reduce_bucket``."""
        if self.compression is not None:
            return QuantizedReduceScatter(self, list(bucket.chunk(self.world_size)),
                                          self.compression)
        if (shm := self._shared.transport(self, bucket)) is not None:
            return shm.reduce(self, bucket)
        if self.bucket_collectives in ("ring", "shared_memory"):  # the latter: CUDA tensors
            return self._ring(bucket, reduce=True)
        if self.bucket_collectives == "all_reduce":
            return self._timed(dist.all_reduce(bucket, group=self.group, async_op=True),
                               "all_reduce of a gradient bucket")
        mine = bucket.chunk(self.world_size)[self.rank]
        return self._timed(_reduce_scatter_single(mine, bucket, group=self.group, async_op=True),
                           "reduce-scatter of a gradient bucket", testable=self.backend == "nccl")

    def gather_bucket(self, bucket: torch.Tensor) -> Handle:
        """A ring of send/recv (gloo), the backend's in-place all-gather, or a list
        all-gather, as ``bucket_collectives`` says; see ``Collectives.gather_bucket``."""
        if (shm := self._shared.transport(self, bucket)) is not None:
            return shm.gather(self, bucket)
        if self.bucket_collectives in ("ring", "shared_memory"):
            return self._ring(bucket, reduce=False)
        chunks = list(bucket.chunk(self.world_size))
        if self.bucket_collectives == "all_reduce":
            return self._timed(dist.all_gather(chunks, chunks[self.rank], group=self.group,
                                               async_op=True), "all-gather of a param bucket")
        return self._timed(_all_gather_single(bucket, chunks[self.rank], group=self.group,
                                              async_op=True), "all-gather of a param bucket")

    def allocate(self, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A tensor in a shared-memory file when the buckets go through shared memory and
        ``device`` is the CPU, else ``torch.zeros``; see ``Collectives.allocate``."""
        if torch.device(device).type == "cpu" and (shm := self._shared.transport(self)):
            return shm.allocate(numel, dtype)
        return super().allocate(numel, dtype, device)

    def _ring(self, bucket: torch.Tensor, reduce: bool) -> Handle:
        self._rings += 1
        return Ring(self, bucket, self._rings, reduce)

    def all_to_all(self, send: torch.Tensor, send_sizes: list[int], recv: torch.Tensor,
                   recv_sizes: list[int]) -> Handle:
        """The backend's ``all_to_all_single`` (gloo's too: unlike its send/recv, whose
        ``is_completed()`` stays False until waited for, its ``is_completed()`` turns True
        when it is done, so the reducer's polls see it finish); see
        ``Collectives.all_to_all``."""
        return self._timed(dist.all_to_all_single(recv, send, recv_sizes, send_sizes,
                                                  group=self.group, async_op=True),
                           "all-to-all of compressed gradient chunks")

    def all_reduce_async(self, tensor: torch.Tensor) -> Handle:
        """``dist.all_reduce(async_op=True)`` over the group (its wait within the timeout
        when one is set); see ``Collectives.all_reduce_async``."""
        return self._timed(dist.all_reduce(tensor, group=self.group, async_op=True),
                           "all_reduce across the replicas")

    # -- point to point, for the ring (ring.py) -------------------------------------------

    max_tag = 1 << 24

    def _global(self, peer: int) -> int:
        return peer if self.group is None else dist.get_global_rank(self.group, peer)

    def isend(self, tensor: torch.Tensor, peer: int, tag: int):
        """``dist.isend`` to group rank ``peer``; see ``ring.PointToPoint.isend``."""
        return dist.isend(tensor, self._global(peer), group=self.group, tag=tag)

    def irecv(self, tensor: torch.Tensor, peer: int, tag: int):
        """``dist.irecv`` from group rank ``peer``; see ``ring.PointToPoint.irecv``."""
        return dist.irecv(tensor, self._global(peer), group=self.group, tag=tag)

    def test_all(self, requests: list) -> bool:
        """Whether every request's ``is_completed()`` is True."""
        return all(request.is_completed() for request in requests)

    def wait_all(self, requests: list, what: str = "point-to-point messages",
                 peer: int | None = None) -> None:
        """Wait for each request, with ``Work.wait(timeout)`` when a timeout is set; see
        ``ring.PointToPoint.wait_all``."""
        for request in requests:
            self._wait(request, what, None if peer is None else self._global(peer), p2p=True)

    # -- waits with the optimizer's timeout (deadline.py) ---------------------------------

    def _wait(self, work, what: str, peer: int | None = None, p2p: bool = False,
              testable: bool | None = None) -> None:
        """``work.wait()``, giving up after ``timeout`` seconds when one is set. ``p2p``: a
        send or recv (honours wait(timeout)). ``testable``: whether ``work.is_completed()``
        turns True once it is done (default: on gloo and nccl); else it is waited for on a
        helper thread."""
        if self.timeout is None:
            work.wait()
        elif p2p:
            with _backend_timeout_as_ours(self.timeout, what, peer):
                work.wait(timeout=datetime.timedelta(seconds=self.timeout))
        elif testable if testable is not None else self.backend in ("gloo", "nccl"):
            poll_until(work.is_completed, self.timeout, what, peer)
            # Done, or failed: its error is raised here. The group's own timeout may be the
            # same as ours (init_distributed(timeout=) sets both) and expire first.
            with _backend_timeout_as_ours(self.timeout, what, peer):
                work.wait()
        else:
            wait_in_thread(work.wait, self.timeout, what, peer)

    def _timed(self, work, what: str, testable: bool | None = None) -> Handle:
        return work if self.timeout is None else _Timed(self, work, what, testable)

    def _run(self, start, what: str, peer: int | None = None) -> None:
        """A collective run to completion: blocking as torch runs it, or async and waited
        for with the timeout."""
        if self.timeout is None:
            start(False)
        else:
            self._wait(start(True), what, peer)
        self._shared.sweep()  # the peers are here too: map their new shared-memory files

    # -- small collectives ----------------------------------------------------------------

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> None:
        """``dist.all_reduce`` over the group; see ``Collectives.all_reduce``."""
        self._run(lambda async_op: dist.all_reduce(tensor, op=_REDUCE_OPS[op], group=self.group,
                                                   async_op=async_op), "all_reduce")

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> None:
        """``dist.broadcast`` from group rank ``src``; see ``Collectives.broadcast``."""
        source = self._global(src)
        self._run(lambda async_op: dist.broadcast(tensor, src=source, group=self.group,
                                                  async_op=async_op),
                  f"broadcast from rank {source}", source)

    def all_gather_object(self, obj: Any) -> list[Any]:
        """``dist.all_gather_object``, or its two steps each waited for with the timeout
        when one is set; see ``Collectives.all_gather_object``."""
        if self.timeout is not None:
            return self._all_gather_object_timed(obj)
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def _all_gather_object_timed(self, obj: Any) -> list[Any]:
        """dist.all_gather_object's two steps (sizes, then the padded pickles), each waited
        for with the timeout: torch's own takes none."""
        what = "all_gather_object: the optimizer's construction check"
        device = _object_device(self.backend)
        payload = pickle.dumps(obj)
        size = torch.tensor([len(payload)], dtype=torch.int64, device=device)
        sizes = [torch.empty_like(size) for _ in range(self.world_size)]
        self._wait(dist.all_gather(sizes, size, group=self.group, async_op=True), what)
        lengths = [int(s) for s in sizes]
        data = torch.zeros(max(lengths), dtype=torch.uint8)
        data[:len(payload)] = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
        gathered = [torch.empty(max(lengths), dtype=torch.uint8, device=device)
                    for _ in range(self.world_size)]
        self._wait(dist.all_gather(gathered, data.to(device), group=self.group, async_op=True),
                   what)
        return [pickle.loads(t[:n].cpu().numpy().tobytes()) for t, n in zip(gathered, lengths)]

    def barrier(self) -> None:
        """``dist.barrier`` over the group; see ``Collectives.barrier``."""
        self._run(lambda async_op: dist.barrier(group=self.group, async_op=async_op), "barrier")


@contextlib.contextmanager
def _backend_timeout_as_ours(timeout: float, what: str, peer: int | None):
    """The backend's own timeout error (gloo: "Timed out waiting 5000ms for recv ...") raised
    as zeroopt's CollectiveTimeout: the same event, one error type for the caller."""
    try:
        yield
    except RuntimeError as error:
        if "timed out" in str(error).lower():
            raise timed_out(timeout, what, peer) from error
        raise


class _Timed:
    """A bucket collective's handle whose ``wait()`` gives up after the timeout."""

    def __init__(self, comm: TorchDistributed, work, what: str, testable: bool | None):
        self.comm, self.work, self.what, self.testable = comm, work, what, testable

    def is_completed(self) -> bool:
        """Whether the collective has completed (``Work.is_completed``); see ``Handle``."""
        return self.work.is_completed()

    def wait(self) -> None:
        """Wait for the collective, within the optimizer's timeout; see ``Handle``."""
        self.comm._wait(self.work, self.what, testable=self.testable)


def _object_device(backend: str) -> torch.device:
    """Where dist.all_gather_object's tensors live for ``backend`` (as torch puts them)."""
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    if backend == "hccl":
        return torch.device("npu", torch.npu.current_device())
    return torch.device("cpu")


def init_process_group(backend: str, launch: Launch, timeout: float | None = None) -> None:
    """Initialise the default process group for ``launch`` (torchrun's variables, or mpirun's:
    then rank 0's host and a free port are shared over MPI, unless MASTER_ADDR/PORT are set).
    ``timeout`` (seconds) becomes the group's own, as ``init_process_group(timeout=...)``;
    None keeps torch's default."""
    if backend == "hccl":
        import torch_npu  # noqa: F401  (registers the "npu" device and the hccl backend)
    if launch.launcher == "mpi" and not ("MASTER_ADDR" in os.environ
                                          and "MASTER_PORT" in os.environ):
        os.environ.update(_rendezvous_over_mpi())
    set_local_device(backend, launch.local_rank)
    extra = {} if timeout is None else {"timeout": datetime.timedelta(seconds=timeout)}
    dist.init_process_group(backend, rank=launch.rank, world_size=launch.world_size, **extra)
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
    """Destroy the default process group, if one is initialised (registered at exit by
    ``init_process_group``)."""
    if dist.is_initialized():
        dist.destroy_process_group()
