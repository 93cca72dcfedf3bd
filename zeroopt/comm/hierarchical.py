"""Shard within a group of ranks, replicate the shards across groups (HSDP-style).

With ``shard_size=S`` the W ranks form W/S sharding groups of S consecutive ranks (a node, when
S is the number of ranks per node) and S replication groups (the ranks holding the same shard,
one per node). The optimizer state is split S ways, not W ways, so the inter-node network
carries only each shard's reduced gradient, once:

    reduce_bucket: reduce-scatter within the node, then all-reduce this rank's chunk (1/S of
                   the bucket) across nodes -> the sum over all W ranks
    gather_bucket: all-gather within the node only (every node updates its shards alike)

Statistics (grad norms, trust-ratio partials) are summed within the sharding group only: the
replicas hold equal shards, and summing them again would count each shard W/S times.

The cross-node all-reduce runs when a bucket is harvested. Buckets are harvested in bucket
order on every rank (grad_sync.py), so every rank issues them in the same order.
"""

from __future__ import annotations

from typing import Any

import torch

from .base import Collectives, Handle
from .torch_dist import TorchDistributed


class Hierarchical(Collectives):
    """Collectives that shard within ``shard`` and replicate across ``replicas``.

    Args:
        shard: this rank's sharding group (its ``rank`` and ``world_size`` become this
            object's: the buckets are cut into ``shard.world_size`` chunks).
        replicas: the ranks holding the same shard as this one, one per sharding group.
    """

    def __init__(self, shard: Collectives, replicas: Collectives):
        self.shard, self.replicas = shard, replicas
        self.rank, self.world_size = shard.rank, shard.world_size
        self.backend = shard.backend

    @property
    def data_parallel_size(self) -> int:
        """Every rank of the job: ``shard.world_size * replicas.world_size``."""
        return self.shard.world_size * self.replicas.world_size

    def agreement_groups(self) -> list[Collectives]:
        """``[shard, replicas]``: together they link every pair of ranks."""
        return [self.shard, self.replicas]

    def reduce_bucket(self, bucket: torch.Tensor) -> Handle:
        """Reduce within the sharding group; ``wait()`` then all-reduces this rank's chunk
        across the replicas, so it holds the sum over all ranks (see
        ``Collectives.reduce_bucket``)."""
        mine = bucket.chunk(self.world_size)[self.rank]
        return _ThenAcrossReplicas(self.shard.reduce_bucket(bucket), mine, self.replicas)

    def gather_bucket(self, bucket: torch.Tensor) -> Handle:
        """All-gather within the sharding group only (every group updates its shards
        alike); see ``Collectives.gather_bucket``."""
        return self.shard.gather_bucket(bucket)

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> None:
        """Reduce within the sharding group only (the replicas hold equal shards); see
        ``Collectives.all_reduce``."""
        self.shard.all_reduce(tensor, op)

    def all_reduce_over_replicas(self, tensor: torch.Tensor, op: str = "sum") -> None:
        """Reduce across the replication group (the ranks holding the same shard)."""
        self.replicas.all_reduce(tensor, op)

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> None:
        """From sharding-group rank ``src`` of the first group to every rank."""
        self.shard.broadcast(tensor, src)
        self.replicas.broadcast(tensor, 0)

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` within the sharding group only (``shard.world_size`` of
        them)."""
        return self.shard.all_gather_object(obj)

    def barrier(self) -> None:
        """A barrier in the sharding group, then in the replication group."""
        self.shard.barrier()
        self.replicas.barrier()


class _ThenAcrossReplicas:
    """Within the node first; ``wait()`` then sums this rank's chunk across the nodes."""

    def __init__(self, within: Handle, mine: torch.Tensor, replicas: Collectives):
        self.within, self.mine, self.replicas = within, mine, replicas
        self.done = False

    def is_completed(self) -> bool:
        """Whether the node's part is done (``wait()`` does the rest); see ``Handle``."""
        return self.done or self.within.is_completed()

    def wait(self) -> None:
        """Wait for the node's part, then the rest across nodes; see ``Handle``."""
        if not self.done:
            self.within.wait()
            self.replicas.all_reduce(self.mine)
            self.done = True


def _split_torch(flat, shard_size: int) -> Hierarchical:
    """Sharding and replication groups over the default torch.distributed group."""
    import torch.distributed as dist

    world = flat.world_size
    shard_group, _ = dist.new_subgroups_by_enumeration(
        [list(range(start, start + shard_size)) for start in range(0, world, shard_size)])
    replica_group, _ = dist.new_subgroups_by_enumeration(
        [list(range(offset, world, shard_size)) for offset in range(shard_size)])
    return Hierarchical(TorchDistributed(shard_group), TorchDistributed(replica_group))


def split(flat: Collectives, shard_size: int | str) -> Hierarchical | Collectives:
    """``flat``'s ranks in sharding groups of ``shard_size`` consecutive ranks; "node": the
    ranks the launcher started on this node."""
    if flat.timeout is not None:  # the new groups wait as long as the job's
        from . import with_timeout

        return with_timeout(split(with_timeout(flat, None), shard_size), flat.timeout)
    if shard_size == "node":
        from .environment import detect

        shard_size = detect().local_world_size
    if not isinstance(shard_size, int) or shard_size < 1 or flat.world_size % shard_size:
        raise ValueError(f"shard_size must be a positive divisor of the world size "
                         f"{flat.world_size} (ranks per sharding group, e.g. the ranks of one "
                         f"node), got {shard_size!r}")
    if shard_size == flat.world_size:
        return flat
    if flat.backend == "mpi":
        return Hierarchical(flat.split(flat.rank // shard_size), flat.split(flat.rank % shard_size))
    if isinstance(flat, TorchDistributed) and flat.group is None:
        return _split_torch(flat, shard_size)
    raise ValueError(f"shard_size needs the job's whole group to split (backend "
                     f"{flat.backend!r}); for your own groups pass "
                     "process_group=(sharding_group, replication_group)")
