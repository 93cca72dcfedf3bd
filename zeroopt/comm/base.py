"""The few collectives ZeRO needs, as one small interface.

Bucket collectives work in place on a bucket of ``world_size`` equal chunks:

- ``reduce_bucket(bucket)``: afterwards chunk ``rank`` of the bucket holds the sum over ranks
  (other chunks are unspecified: a backend may reduce-scatter or all-reduce, whichever it does
  faster);
- ``gather_bucket(bucket)``: afterwards every chunk holds its owner's chunk.

Both return a handle with ``wait()`` so that the caller can overlap them with compute.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch


class Handle(Protocol):
    """A collective in flight, as ``reduce_bucket`` and ``gather_bucket`` return it (torch's
    ``Work`` is one)."""

    def wait(self) -> Any:
        """Block until the collective has finished; its result is then in the bucket.

        Raises:
            CollectiveTimeout: with a ``timeout=`` set, it did not finish in time.
        """
        ...

    def is_completed(self) -> bool:
        """Whether it has finished, without blocking (a ring also moves on as far as its
        messages have arrived)."""
        ...


class Done:
    """The handle of a collective that has already finished."""

    def wait(self) -> None:
        """Return at once: there is nothing to wait for."""
        return None

    def is_completed(self) -> bool:
        """Always True."""
        return True


class Collectives:
    """The interface every backend implements (torch.distributed, MPI, XLA, hierarchical).

    ``rank`` and ``world_size`` are this rank's place in the *sharding* group: the buckets are
    cut into ``world_size`` chunks. ``data_parallel_size`` is the number of ranks whose
    gradients are averaged: the same, except with replicated shards (``hierarchical.py``).
    """

    rank: int
    world_size: int
    backend: str
    # Seconds any one wait may take before CollectiveTimeout (deadline.py); None: as long as
    # the backend waits. Set through comm.with_timeout.
    timeout: float | None = None
    # "int8" or "int4": ``reduce_bucket`` exchanges blockwise-quantized chunks (across the
    # replicas only, with ``Hierarchical``); None: exact. Set through comm.compressed.
    compression: str | None = None
    # Whether the handles of reduce_bucket report is_completed() True once done, without a
    # wait (False: gloo's send/recv, whose Work says False until waited for).
    pollable: bool = True
    # Whether a gather_bucket handle's wait is this rank copying its peers' chunks itself
    # (shared memory), rather than bytes that move while it computes (NCCL, sockets).
    gathers_by_copy: bool = False

    @property
    def data_parallel_size(self) -> int:
        """The number of ranks whose gradients are averaged (``world_size`` here; the
        product of both groups' sizes with replicated shards)."""
        return self.world_size

    def agreement_groups(self) -> list["Collectives"]:
        """Groups that together link every pair of ranks of the job: checking that each group
        agrees checks that the whole job does."""
        return [self]

    def allocate(self, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A new zero-filled 1-D tensor for buckets to live in (the flat param buffers, the
        gradient staging buffers). A backend whose ranks share memory returns memory the other
        ranks can read, so its bucket collectives copy nothing extra; the default is plain
        ``torch.zeros``.

        Args:
            numel: elements.
            dtype, device: the tensor's.

        Returns:
            A contiguous 1-D tensor of ``numel`` zeros.
        """
        return torch.zeros(numel, dtype=dtype, device=device)

    def reduce_bucket(self, bucket: torch.Tensor) -> Handle:
        """Start summing a gradient bucket over the ranks, in place.

        Args:
            bucket: a flat tensor of ``world_size`` equal chunks (its length a multiple of
                ``world_size``), the same size and dtype on every rank.

        Returns:
            A ``Handle``; once it is waited for, chunk ``rank`` of ``bucket`` holds the sum
            over the ranks (over every data-parallel rank with replicated shards). The other
            chunks are unspecified.
        """
        raise NotImplementedError

    def gather_bucket(self, bucket: torch.Tensor) -> Handle:
        """Start gathering a param bucket, in place.

        Args:
            bucket: a flat tensor of ``world_size`` equal chunks, chunk ``rank`` holding
                this rank's (updated) part.

        Returns:
            A ``Handle``; once it is waited for, every chunk holds its owner's chunk.
        """
        raise NotImplementedError

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> None:
        """Reduce ``tensor`` over the sharding group, in place, and wait for it.

        Args:
            tensor: any shape, the same on every rank (a device tensor for NCCL and XLA).
            op: "sum", "max" or "min" (default "sum").

        Raises:
            CollectiveTimeout: with a ``timeout=`` set, it did not finish in time.
        """
        raise NotImplementedError

    #: True where collectives only trace into a lazy graph (XLA): a host read of a result
    #: then runs the graph so far, so the step keeps host reads apart (``host_all_reduce``).
    lazy: bool = False

    def host_all_reduce(self, values: torch.Tensor, device: torch.device,
                        op: str = "sum") -> torch.Tensor:
        """``values`` (a small CPU tensor, the same shape on every rank) reduced over every
        rank of the job (on ``device``, the device this backend reduces), returned on the
        CPU, in a graph of its own: where ``lazy``, the agreement on params frozen at
        construction that have gradients now (the layout grows; every other step agrees on the
        device, step_inputs.settle_on_device). Eager backends fold it into the step's one
        all-reduce (step_inputs.py).

        Raises:
            NotImplementedError: a backend that is not ``lazy``.
        """
        raise NotImplementedError(f"{type(self).__name__} is not lazy: step_inputs.settle "
                                  "all-reduces the flags with the norm")

    def all_reduce_over_replicas(self, tensor: torch.Tensor, op: str = "sum") -> None:
        """Reduce over the ranks that hold the same shard (``hierarchical.py``): what
        ``all_reduce`` left out. A no-op where every rank holds a shard of its own."""
        return None

    def all_reduce_async(self, tensor: torch.Tensor) -> Handle:
        """Start summing ``tensor`` over the group, in place, without waiting for it.

        Args:
            tensor: any shape, the same on every rank.

        Returns:
            A ``Handle``; once it is waited for, ``tensor`` holds the sum. The default runs
            ``all_reduce`` to the end and returns ``Done()`` (backends that can overlap it
            override this).

        Raises:
            CollectiveTimeout: with a ``timeout=`` set, it did not finish in time (from the
                handle's ``wait()`` where the backend overlaps it).
        """
        self.all_reduce(tensor)
        return Done()

    def all_to_all(self, send: torch.Tensor, send_sizes: list[int], recv: torch.Tensor,
                   recv_sizes: list[int]) -> Handle:
        """Start an exchange of byte segments of any sizes: segment ``j`` of ``send`` goes to
        rank ``j``, segment ``j`` of ``recv`` comes from rank ``j`` (``all_to_all_single``'s
        contract; this rank's own segment is copied).

        Args:
            send: a flat uint8 tensor, the concatenation of ``world_size`` segments of
                ``send_sizes`` bytes.
            send_sizes: bytes for each rank; rank ``j``'s ``recv_sizes[this rank]`` must equal
                this rank's ``send_sizes[j]``.
            recv: a flat uint8 tensor of ``sum(recv_sizes)`` bytes.
            recv_sizes: bytes from each rank.

        Returns:
            A ``Handle``; once it is waited for, ``recv`` holds every rank's segment.

        Raises:
            NotImplementedError: the backend has no such exchange (compressed reduction,
                which needs it, refuses such a backend at construction).
        """
        raise NotImplementedError(f"{type(self).__name__} has no all_to_all")

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> None:
        """Copy rank ``src``'s ``tensor`` into every rank's, in place, and wait for it.

        Args:
            tensor: the same shape and dtype on every rank.
            src: the sending rank, in this group (default 0).

        Raises:
            CollectiveTimeout: with a ``timeout=`` set, it did not finish in time.
        """
        raise NotImplementedError

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (picklable), on every rank.

        Returns:
            A list of ``world_size`` objects, indexed by rank.

        Raises:
            CollectiveTimeout: with a ``timeout=`` set, it did not finish in time.
        """
        raise NotImplementedError

    def barrier(self) -> None:
        """Wait until every rank of the group has reached it.

        Raises:
            CollectiveTimeout: with a ``timeout=`` set, it did not finish in time.
        """
        raise NotImplementedError


class SingleRank(Collectives):
    """World size 1: every collective is the identity."""

    rank = 0
    world_size = 1
    backend = "none"

    def reduce_bucket(self, bucket: torch.Tensor) -> Handle:
        """Leave ``bucket`` as it is (its one chunk is already the sum); returns ``Done()``."""
        return Done()

    def gather_bucket(self, bucket: torch.Tensor) -> Handle:
        """Leave ``bucket`` as it is; returns ``Done()``."""
        return Done()

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> None:
        """Leave ``tensor`` as it is, whatever ``op``."""
        return None

    def all_to_all(self, send: torch.Tensor, send_sizes: list[int], recv: torch.Tensor,
                   recv_sizes: list[int]) -> Handle:
        """Copy the one segment; returns ``Done()``. See ``Collectives.all_to_all``."""
        recv[:recv_sizes[0]].copy_(send[:send_sizes[0]])
        return Done()

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> None:
        """Leave ``tensor`` as it is."""
        return None

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Returns ``[obj]``."""
        return [obj]

    def barrier(self) -> None:
        """Return at once."""
        return None
