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

The cross-node stage is a pipeline stage of its own, overlapping backward as the reduce-scatter
does: as soon as a bucket's reduction within the node is complete, its cross-node all-reduce is
started, asynchronously. No thread runs it: it moves on from the calls the gradient reducer
makes anyway (grad_sync.py): each ``reduce_bucket`` launch and each ``is_completed()`` poll
checks the buckets in flight (which also moves their rings on, as MPI needs), and ``wait()``
starts whatever is due before it. gloo's send/recv cannot be polled (their ``is_completed()``
stays False until they are waited for), so over gloo each ``reduce_bucket`` launch first waits
for the earlier buckets' reductions within the node (launched a bucket's worth of backward
earlier, so done or nearly) and starts their cross-node stage then; the last bucket's starts
when it is harvested. The cross-node collectives are started strictly in bucket order (a
bucket's stage waits behind every earlier bucket's), so every rank issues them in the same
order whichever reduction finishes first on it. With ``compression`` ("int8"/"int4",
compression.py) the cross-node stage sends quantized pieces instead (quantized.py: a quantized
reduce-scatter among the replicas, then a quantized all-gather that every replica decodes
alike, so the replicas keep bit-identical shards); the reduction within the node stays exact.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Callable

import torch

from .base import Collectives, Handle
from .quantized import QuantizedAllGather, QuantizedReduceScatter
from .torch_dist import TorchDistributed


class Hierarchical(Collectives):
    """Collectives that shard within ``shard`` and replicate across ``replicas``.

    Args:
        shard: this rank's sharding group (its ``rank`` and ``world_size`` become this
            object's: the buckets are cut into ``shard.world_size`` chunks).
        replicas: the ranks holding the same shard as this one, one per sharding group.
        compression: "int8" or "int4" to quantize the stage across the replicas
            (``comm.compressed`` sets it), or None (default: exact).
    """

    def __init__(self, shard: Collectives, replicas: Collectives,
                 compression: str | None = None):
        self.shard, self.replicas = shard, replicas
        self.rank, self.world_size = shard.rank, shard.world_size
        self.backend = shard.backend
        self.compression = compression
        # Reductions whose cross-replica stage is not fully started yet, in bucket order
        # (shared by the copies with_timeout makes: one order for the job's replicas).
        self._pending: deque[_Pipelined] = deque()

    @property
    def gathers_by_copy(self) -> bool:
        """The sharding group's (the gathers run there only)."""
        return self.shard.gathers_by_copy

    @property
    def pollable(self) -> bool:
        """The sharding group's ``pollable`` (where it is False, the stage across the replicas
        starts at the next bucket's launch instead: see the module docstring)."""
        return self.shard.pollable

    @property
    def data_parallel_size(self) -> int:
        """Every rank of the job: ``shard.world_size * replicas.world_size``."""
        return self.shard.world_size * self.replicas.world_size

    def agreement_groups(self) -> list[Collectives]:
        """``[shard, replicas]``: together they link every pair of ranks."""
        return [self.shard, self.replicas]

    def reduce_bucket(self, bucket: torch.Tensor) -> Handle:
        """Reduce within the sharding group, then this rank's chunk across the replicas, each
        stage started as soon as the previous one is complete (see the module docstring), so
        that it holds the sum over all ranks; see ``Collectives.reduce_bucket``."""
        self.progress()
        mine = bucket.chunk(self.world_size)[self.rank]
        handle = _Pipelined(self, self.shard.reduce_bucket(bucket), self._stages(mine))
        self._pending.append(handle)
        if not self.shard.pollable:
            # gloo: whether the group's reduction is done cannot be polled, only waited for.
            # Wait for the previous buckets' (launched a bucket's backward ago: done, or
            # nearly), so that their cross-replica stage starts now, not at the harvest.
            for earlier in list(self._pending)[:-1]:
                earlier.wait_within()
        self.progress()
        return handle

    def _stages(self, mine: torch.Tensor) -> list[Callable[[], Handle]]:
        """The cross-replica stage of chunk ``mine``: its collectives, each started once the
        previous one has finished."""
        replicas, kind = self.replicas, self.compression
        if replicas.world_size == 1:
            return []
        if kind is None:
            return [lambda: replicas.all_reduce_async(mine)]
        pieces = list(mine.tensor_split(replicas.world_size))
        return [lambda: QuantizedReduceScatter(replicas, pieces, kind),
                lambda: QuantizedAllGather(replicas, pieces, kind)]

    def progress(self, until: "_Pipelined | None" = None) -> None:
        """Move the reductions in flight on, without blocking: poll each (rings and MPI
        requests move on when polled) and start the cross-replica collectives that are due,
        strictly in bucket order. With ``until``: block until every stage of ``until`` and
        of the reductions before it has been started."""
        for handle in self._pending:
            handle.poll()
        while self._pending:
            head = self._pending[0]
            if not head.start_stages(block=until is not None):
                return
            self._pending.popleft()
            if head is until:
                return

    def allocate(self, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """The sharding group's (its buckets' collectives run there); see
        ``Collectives.allocate``."""
        return self.shard.allocate(numel, dtype, device)

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


class _Pipelined:
    """A bucket's reduction: within the sharding group, then ``stages`` across the replicas,
    each started by its ``Hierarchical`` once the previous part has finished."""

    def __init__(self, owner: Hierarchical, within: Handle,
                 stages: list[Callable[[], Handle]]):
        self.owner, self.within, self.stages = owner, within, stages
        self.current: Handle = within  # the part in flight
        self.started = 0  # stages started so far

    def poll(self) -> bool:
        """Whether the part in flight has finished (polling moves it on)."""
        return self.current.is_completed()

    def wait_within(self) -> None:
        """Wait for the reduction within the sharding group, if it is still the part in
        flight."""
        if self.started == 0:
            self.within.wait()

    def start_stages(self, block: bool) -> bool:
        """Start the next stages whose previous part has finished (with ``block``, waiting
        for it); whether every stage has been started."""
        while self.started < len(self.stages):
            if not block and not self.current.is_completed():
                return False
            self.current.wait()  # finished: only its copies or sums remain
            self.current = self.stages[self.started]()
            self.started += 1
        return True

    def is_completed(self) -> bool:
        """Whether every stage has finished, moving every reduction in flight on first (see
        ``Hierarchical.progress``); see ``Handle``."""
        self.owner.progress()
        return self.started == len(self.stages) and self.current.is_completed()

    def wait(self) -> None:
        """Start every stage still due, of this bucket and the ones before it (bucket order),
        and wait for this bucket's last; see ``Handle``."""
        if self.started < len(self.stages):
            self.owner.progress(until=self)
        self.current.wait()


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
