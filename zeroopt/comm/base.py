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
    def wait(self) -> Any: ...

    def is_completed(self) -> bool: ...


class Done:
    """The handle of a collective that has already finished."""

    def wait(self) -> None:
        return None

    def is_completed(self) -> bool:
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

    @property
    def data_parallel_size(self) -> int:
        return self.world_size

    def agreement_groups(self) -> list["Collectives"]:
        """Groups that together link every pair of ranks of the job: checking that each group
        agrees checks that the whole job does."""
        return [self]

    def reduce_bucket(self, bucket: torch.Tensor) -> Handle:
        raise NotImplementedError

    def gather_bucket(self, bucket: torch.Tensor) -> Handle:
        raise NotImplementedError

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> None:
        raise NotImplementedError

    def all_reduce_over_replicas(self, tensor: torch.Tensor, op: str = "sum") -> None:
        """Reduce over the ranks that hold the same shard (``hierarchical.py``): what
        ``all_reduce`` left out. A no-op where every rank holds a shard of its own."""
        return None

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> None:
        raise NotImplementedError

    def all_gather_object(self, obj: Any) -> list[Any]:
        raise NotImplementedError

    def barrier(self) -> None:
        raise NotImplementedError


class SingleRank(Collectives):
    """World size 1: every collective is the identity."""

    rank = 0
    world_size = 1
    backend = "none"

    def reduce_bucket(self, bucket: torch.Tensor) -> Handle:
        return Done()

    def gather_bucket(self, bucket: torch.Tensor) -> Handle:
        return Done()

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> None:
        return None

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> None:
        return None

    def all_gather_object(self, obj: Any) -> list[Any]:
        return [obj]

    def barrier(self) -> None:
        return None
