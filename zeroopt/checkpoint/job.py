"""The ranks a checkpoint is written and read by, and how they talk while doing it.

torch.distributed.checkpoint coordinates over a torch.distributed process group, so that is
what the whole job uses here: the optimizer's own group (nccl, gloo, hccl), the default group
for hierarchical sharding, and for MPI a gloo group bootstrapped over MPI (it only carries the
save's small plans and hashes). A single rank with no process group needs none.

A step that can fail on one rank runs through ``Job.gather`` or ``Job.run``: they end in an
agreement, so a failure anywhere is raised on every rank (``errors.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch.distributed as dist

from ..comm import Hierarchical, SingleRank, TorchDistributed
from . import errors
from .errors import CheckpointError


@dataclass
class Job:
    group: Any  # the process group DCP coordinates over (None: the default group)
    distributed: bool
    rank: int
    world_size: int
    writes_state: bool  # one replica writes the sharded state; every rank reads it

    def all_gather_object(self, obj: Any) -> list[Any]:
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier(group=self.group)

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
    if isinstance(comm, SingleRank):
        return Job(None, False, 0, 1, True)
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
