"""The ranks a checkpoint is written and read by, and how they talk while doing it.

torch.distributed.checkpoint coordinates over a torch.distributed process group, so that is
what the whole job uses here: the optimizer's own group (nccl, gloo, hccl), the default group
for hierarchical sharding, and for MPI a gloo group bootstrapped over MPI (it only carries the
save's small plans and hashes). A single rank with no process group needs none.

XLA replicas have no process group of their own (on XLA:CPU they are threads of one process),
so their job talks over the replicas' own collectives (``XlaCollectives.all_gather_object``,
``barrier``: host reads that every replica makes at the same point) and runs DCP's steps over
them (``stepwise.py``), after a ``mark_step`` that leaves no collective pending in the graph.

A step that can fail on one rank runs through ``Job.gather`` or ``Job.run``: they end in an
agreement, so a failure anywhere is raised on every rank (``errors.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from ..comm import Hierarchical, SingleRank, TorchDistributed
from . import errors, stepwise
from .errors import CheckpointError


@dataclass
class Job:
    """The ranks a checkpoint is written and read by, and the collectives they agree with
    (torch.distributed's object collectives over ``group``).

    Attributes:
        group: the process group DCP coordinates over (None: the default group, or none at
            all for a single rank).
        distributed: False for a single rank with no process group: the collectives return
            at once.
        rank: this rank's number in ``group``.
        world_size: the number of ranks in ``group``.
        writes_state: whether this rank writes the sharded optimizer state: with
            hierarchical sharding only the ranks of the first replica do; every rank reads.
        collectives: collectives of the ranks' own (XLA's) to agree over instead of a process
            group (then ``group`` is None): DCP runs step by step over them (``stepwise.py``).
        sync: called on every rank before tensors are read to the host or copied back (XLA's
            ``mark_step``); None: nothing to run.
    """

    group: Any  # the process group DCP coordinates over (None: the default group)
    distributed: bool
    rank: int
    world_size: int
    writes_state: bool  # one replica writes the sharded state; every rank reads it
    collectives: Any = None  # the ranks' own collectives (XLA), when there is no group
    sync: Callable[[], None] | None = None

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (``torch.distributed.all_gather_object`` over ``group``).

        Args:
            obj: a picklable object.

        Returns:
            ``world_size`` objects, by rank; ``[obj]`` when not distributed.
        """
        if not self.distributed:
            return [obj]
        if self.collectives is not None:
            return self.collectives.all_gather_object(obj)
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def barrier(self) -> None:
        """Wait for every rank of ``group`` (``torch.distributed.barrier``); nothing when not
        distributed."""
        if self.collectives is not None:
            self.collectives.barrier()
        elif self.distributed:
            dist.barrier(group=self.group)

    def save(self, items: dict, writer) -> None:
        """``torch.distributed.checkpoint.save`` of ``items`` with ``writer`` over this job's
        ranks (step by step over ``collectives`` where there is no group: ``stepwise.save``).

        Raises:
            CheckpointException (DCP's) or CheckpointError (``stepwise``): the same on every
            rank, if any rank fails.
        """
        if self.collectives is not None:
            stepwise.save(items, writer, self)
        else:
            dcp.save(items, storage_writer=writer, process_group=self.group,
                     no_dist=not self.distributed)

    def load(self, items: dict, reader) -> dict:
        """``torch.distributed.checkpoint.load`` into ``items`` (filled in place, and returned)
        with ``reader`` over this job's ranks; raises as ``save`` does."""
        if self.collectives is not None:
            return stepwise.load(items, reader, self)
        dcp.load(items, storage_reader=reader, process_group=self.group,
                 no_dist=not self.distributed)
        return items

    def settle(self) -> None:
        """Run ``sync`` (on every rank alike), if there is one."""
        if self.sync is not None:
            self.sync()

    def gather(self, what: str, fn: Callable[[], Any],
               keep: tuple[type, ...] = (CheckpointError,)) -> list[Any]:
        """A collective step: call ``fn`` here and share its result with every rank.

        Args:
            what: the step, for the error ("hashing the files written").
            fn: this rank's part; it may raise.
            keep: error types raised as they are (zeroopt's own, with whole messages).
        Returns:
            every rank's result, by rank.
        Raises:
            CheckpointError (or a ``keep`` type), the same on every rank, if ``fn`` raised on
            any rank: the lowest such rank's error.
        """
        return self._step(what, fn, keep, share=True)

    def run(self, what: str, fn: Callable[[], Any],
            keep: tuple[type, ...] = (CheckpointError,)) -> Any:
        """``gather``, but only whether each rank failed is shared; returns this rank's
        result. Raises as ``gather`` does."""
        return self._step(what, fn, keep, share=False)

    def _step(self, what, fn, keep, share: bool):
        try:
            mine, error = fn(), None
        except Exception as e:  # noqa: BLE001 - every rank must hear of it, whatever it is
            mine, error = None, e
        shared = (mine if share else None, None if error is None else errors.report(error, keep))
        parts = self.all_gather_object(shared)
        failed = [(rank, report) for rank, (_, report) in enumerate(parts) if report is not None]
        if failed:
            raise errors.agreed(what, failed, self.world_size, keep) from error
        return [result for result, _ in parts] if share else mine


def job_for(comm) -> Job:
    """The ``Job`` of an optimizer's collectives.

    Args:
        comm: the optimizer's ``Collectives`` (without an optimizer, the default ones):
            ``SingleRank``: one rank, no process group; ``Hierarchical``: the default group,
            the first replica writing the state; ``TorchDistributed``: its own group; MPI:
            the default group, a gloo one bootstrapped over MPI if torch.distributed is not
            initialised; XLA: no group, the replicas' own collectives, ``mark_step`` as sync.

    Returns:
        The ``Job``.

    Raises:
        NotImplementedError: other collectives with no torch.distributed process group.
        RuntimeError: the default group is needed and torch.distributed is not initialised.
    """
    if isinstance(comm, SingleRank):
        return Job(None, False, 0, 1, True)
    if comm.backend == "xla":
        from ..comm.xla import mark_step

        return Job(None, comm.world_size > 1, comm.rank, comm.world_size, True,
                   collectives=comm, sync=mark_step)
    writes = True
    if isinstance(comm, Hierarchical):
        writes = comm.replicas.rank == 0
        group = None
    elif isinstance(comm, TorchDistributed):
        group = comm.group
    elif comm.backend == "mpi":
        group = None
        if not dist.is_initialized():
            from ..comm import environment
            from ..comm.torch_dist import init_process_group

            init_process_group("gloo", environment.detect())
    else:
        raise NotImplementedError(
            f"zeroopt checkpoints need a torch.distributed process group to coordinate the "
            f"ranks' writes; the {comm.backend!r} collectives have none. Use "
            "optimizer.state_dict() (a collective) and torch.save on rank 0 instead")
    if group is None and not dist.is_initialized():
        raise RuntimeError("zeroopt checkpoints of a multi-rank optimizer need torch.distributed "
                           "initialised (the default process group)")
    return Job(group, True, dist.get_rank(group), dist.get_world_size(group), writes)
