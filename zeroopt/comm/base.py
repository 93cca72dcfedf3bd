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


class Done:
    """The handle of a collective that has already finished."""

    def wait(self) -> None:
        return None

    def is_completed(self) -> bool:
        return True


class Collectives(Protocol):
    rank: int
    world_size: int
    backend: str

    def reduce_bucket(self, bucket: torch.Tensor) -> Handle: ...

    def gather_bucket(self, bucket: torch.Tensor) -> Handle: ...

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> None: ...

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> None: ...

    def all_gather_object(self, obj: Any) -> list[Any]: ...

    def barrier(self) -> None: ...


class SingleRank:
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
