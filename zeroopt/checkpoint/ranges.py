"""One flattened tensor of which this rank holds some ranges, as torch.distributed.checkpoint
reads and writes it.

A param's state is saved flat, in the param's own element order, whatever the layout: each
rank writes the ranges it owns, and on load each rank reads the ranges its new layout gives it;
DCP works out which saved chunks overlap them (that is the resharding). Where a rank holds the
whole tensor it is a plain tensor; otherwise a ShardedTensor of its ranges. ShardedTensor wants
its shards to tile the tensor, but DCP only looks at each rank's local shards (the saved
chunks come from all ranks' write items), so the ranges this rank does not hold are listed as
another rank's. Without a process group (XLA replicas, whose checkpoints ``stepwise.py`` runs
over their own collectives) the tensor is built without one: DCP only reads its shards.
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist

with warnings.catch_warnings():  # ShardedTensor's deprecation notice: it is what DCP reads
    warnings.simplefilter("ignore", FutureWarning)
    from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor, ShardMetadata
    from torch.distributed._shard.sharded_tensor.api import ShardedTensorBase
    from torch.distributed._shard.sharded_tensor.metadata import (ShardedTensorMetadata,
                                                                  TensorProperties)


def merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Disjoint, sorted ``(start, end)`` ranges covering ``ranges``."""
    merged: list[list[int]] = []
    for start, end in sorted(r for r in ranges if r[1] > r[0]):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(a, b) for a, b in merged]


def flat_tensor(numel: int, local: dict[tuple[int, int], torch.Tensor]) -> torch.Tensor:
    """A tensor of ``numel`` elements of which this rank holds ``local`` (disjoint ranges ->
    1-D tensors of their length, contiguous), to save from or load into."""
    if len(local) == 1 and next(iter(local)) == (0, numel):
        return next(iter(local.values()))
    grouped = dist.is_initialized()
    rank = dist.get_rank() if grouped else 0  # without a group, the ranks are nominal
    elsewhere = f"rank:{(rank + 1) % (dist.get_world_size() if grouped else 2)}/cpu"
    device = next(iter(local.values())).device
    here = f"rank:{rank}/{device}"
    shards = [Shard(tensor, ShardMetadata([start], [end - start], here))
              for (start, end), tensor in sorted(local.items())]
    listed, at = [], 0
    for start, end in sorted(local):
        if at < start:
            listed.append(ShardMetadata([at], [start - at], elsewhere))
        listed.append(ShardMetadata([start], [end - start], here))
        at = end
    if at < numel:
        listed.append(ShardMetadata([at], [numel - at], elsewhere))
    dtype = next(iter(local.values())).dtype
    metadata = ShardedTensorMetadata(listed, torch.Size([numel]), TensorProperties(dtype=dtype))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        if not grouped:  # a ShardedTensor that holds its shards and checks them, no group
            tensor = ShardedTensorBase._init_from_local_shards_and_global_metadata(shards,
                                                                                   metadata)
            tensor._process_group = None  # what its ops on metadata (size) are handed
            return tensor
        return ShardedTensor._init_from_local_shards_and_global_metadata(shards, metadata)


def sharded_ranges(value) -> dict[tuple[int, int], torch.Tensor]:
    """The ranges this rank holds of a 1-D ShardedTensor (``flat_tensor``'s), ``{(start, end):
    tensor}``; ``{}`` for anything else."""
    if not isinstance(value, ShardedTensor):
        return {}
    return {(s.metadata.shard_offsets[0], s.metadata.shard_offsets[0] + s.metadata.shard_sizes[0]):
            s.tensor for s in value.local_shards()}
