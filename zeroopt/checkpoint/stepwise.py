"""torch.distributed.checkpoint's save and load, step by step, over a ``Job``'s own collectives.

``dcp.save`` / ``dcp.load`` coordinate the ranks over a torch.distributed process group. XLA
replicas on XLA:CPU are threads of one process (``CPU_NUM_DEVICES=N``), with no process group
per replica, and on TPU the replicas' own XLA collectives are there anyway. So for such a job
this module runs the very steps ``dcp.save`` / ``dcp.load`` run, with DCP's public planners and
storage layer (``DefaultSavePlanner``, ``FileSystemWriter``, ...), and exchanges the plans and
write results with ``Job.gather``, which also makes a failure on any rank the same
``CheckpointError`` on every rank:

- save: every rank plans its items (``create_local_plan``); rank 0 makes the global plan (it
  spreads replicated tensors over the ranks and names each rank's files ``__<rank>_*``); every
  rank writes its part; rank 0 writes DCP's ``.metadata`` from every rank's write results.
- load: every rank plans its reads against the checkpoint's metadata; rank 0 approves the
  plans; every rank reads its part.

The files are DCP's own, the same as a save over a process group writes, so a checkpoint saved
on XLA replicas loads under torchrun + gloo (or on one process) at any world size, and back.

Tensors on an accelerator's lazy device (XLA) are read to the host before DCP sees them, and
loads are read into host tensors and copied to the device afterwards (``host_items`` /
``host_targets``). The job's ``sync`` (``mark_step`` on XLA) runs first, on every rank at the
same point, so that the host reads are plain transfers: no collective is left pending in a
graph that one rank's reads would run and another's not.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.distributed.checkpoint import DefaultLoadPlanner, DefaultSavePlanner

from .ranges import flat_tensor, sharded_ranges


def save(items: dict, writer, job) -> None:
    """``dcp.save(items, storage_writer=writer)`` with ``job``'s ranks coordinated over
    ``job.gather``.

    Args:
        items: the state dict to save (tensors, ShardedTensors of this rank's ranges, bytes);
            tensors on another device are saved from host copies.
        writer: the StorageWriter (``errors.Writer``).
        job: the ``Job`` (its ``rank``, ``gather``, ``run``, ``settle``).

    Raises:
        CheckpointError: the same on every rank, if any rank's step fails.
    """
    job.settle()
    coordinator = job.rank == 0
    planner = DefaultSavePlanner()

    def local_plan():  # the host copies too: a failure there must reach every rank
        """This rank's save plan, over host copies of ``items``."""
        planner.set_up_planner(state_dict=host_items(items), storage_meta=writer.storage_meta(),
                               is_coordinator=coordinator)
        writer.set_up_storage_writer(coordinator, rank=job.rank, use_collectives=True)
        return writer.prepare_local_plan(planner.create_local_plan())

    plans = job.gather("planning the save", local_plan)
    metadata = None

    def global_plan():
        """Rank 0: every rank's final plan (and the checkpoint's metadata); others: None."""
        nonlocal metadata
        if not coordinator:
            return None
        central, metadata = planner.create_global_plan(plans)
        return writer.prepare_global_plan(central)

    mine = job.gather("planning the save (rank 0)", global_plan)[0][job.rank]

    def write():
        """This rank's tensors written; returns DCP's write results."""
        writes = writer.write_data(planner.finish_plan(mine), planner)
        writes.wait()
        return writes.value()

    results = job.gather("writing the tensors", write)
    job.run("writing the checkpoint's metadata",
            lambda: writer.finish(metadata=metadata, results=results) if coordinator else None)


def load(items: dict, reader, job) -> dict:
    """``dcp.load(items, storage_reader=reader)`` with ``job``'s ranks coordinated over
    ``job.gather``; ``items`` is filled in place (and returned).

    Args:
        items: the state dict to fill: tensors (on any device: read on the host, then copied
            in), ShardedTensors of this rank's ranges, None for saved bytes (replaced by the
            unpickled value).
        reader: the StorageReader (``dcp.FileSystemReader`` of the checkpoint).
        job: the ``Job``.

    Raises:
        CheckpointError: the same on every rank, if any rank's step fails.
    """
    job.settle()
    host, copy_back = host_targets(items)  # host tensors allocated: nothing read yet
    coordinator = job.rank == 0
    planner = DefaultLoadPlanner()

    def local_plan():
        """This rank's load plan into the host tensors."""
        metadata = reader.read_metadata()
        planner.set_up_planner(host, metadata, coordinator)
        reader.set_up_storage_reader(metadata, coordinator, rank=job.rank, use_collectives=True)
        return reader.prepare_local_plan(planner.create_local_plan())

    plans = job.gather("planning the load", local_plan)
    approved = job.gather("planning the load (rank 0)", lambda: reader.prepare_global_plan(
        planner.create_global_plan(plans)) if coordinator else None)[0]

    def read():
        """This rank's reads, then the host tensors copied onto the device."""
        reads = reader.read_data(planner.finish_plan(approved[job.rank]), planner)
        reads.wait()
        copy_back()

    job.run("reading the tensors", read)
    for key, value in host.items():  # saved bytes and objects, unpickled by the planner
        if not isinstance(value, torch.Tensor) and not sharded_ranges(value):
            items[key] = value
    return items


def _each_tensor(items: dict, fn: Callable[[torch.Tensor], torch.Tensor]) -> dict:
    """``items`` with ``fn`` applied to every tensor, a ShardedTensor's ranges included, in
    key order (the same on every rank); other values as they are."""
    out = {}
    for key in sorted(items):
        value = items[key]
        ranges = sharded_ranges(value)
        if ranges:
            out[key] = flat_tensor(value.metadata().size.numel(),
                                   {r: fn(t) for r, t in ranges.items()})
        elif isinstance(value, torch.Tensor):
            out[key] = fn(value)
        else:
            out[key] = value
    return out


def host_items(items: dict) -> dict:
    """``items`` with every tensor on the host: device tensors and ShardedTensor ranges copied
    (in key order, the same on every rank); host tensors and other values as they are."""
    return _each_tensor(items, _host)


def host_targets(items: dict) -> tuple[dict, Callable[[], None]]:
    """Host tensors to read ``items``' device tensors into, and the function that copies them
    onto the device once read. Host tensors and other values are read in place."""
    pairs: list[tuple[torch.Tensor, torch.Tensor]] = []

    def twin(tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` itself on the host, else an empty host tensor to read it into."""
        if tensor.device.type == "cpu":
            return tensor
        mirror = torch.empty(tensor.shape, dtype=tensor.dtype)
        pairs.append((tensor, mirror))
        return mirror

    host = _each_tensor(items, twin)

    def copy_back() -> None:
        """Every host tensor read copied into its device tensor."""
        with torch.no_grad():
            for device_tensor, mirror in pairs:
                device_tensor.copy_(mirror)

    return host, copy_back


def _host(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach() if tensor.device.type == "cpu" else tensor.detach().cpu()
