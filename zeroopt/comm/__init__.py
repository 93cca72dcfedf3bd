"""Collectives: one small interface (``base.Collectives``) and its backends.

``collectives_for`` picks them for an optimizer: a process group passed in is used as it is;
otherwise the backend the user named (``backend=`` or ``ZEROOPT_BACKEND``) or the one that
follows the params' device, joined from the launcher's environment (``environment.py``):

    nccl, gloo, hccl   torch.distributed (torch_dist.py); hccl through torch_npu
    xla                torch_xla's collectives inside the traced step (xla.py)
    mpi                mpi4py, under mpirun without torchrun (mpi.py)

``split(collectives, shard_size)`` makes sharding and replication groups (hierarchical.py).
``timeout=`` bounds every wait (deadline.py): ``with_timeout``.
"""

from __future__ import annotations

import copy

import torch

from . import backends, environment
from .base import Collectives, Done, Handle, SingleRank
from .compression import compressed
from .deadline import CollectiveTimeout, seconds
from .hierarchical import Hierarchical, split
from .torch_dist import TorchDistributed


def with_timeout(comm: Collectives, timeout) -> Collectives:
    """``comm`` whose waits each give up after ``timeout`` with ``CollectiveTimeout``.

    Args:
        comm: collectives (any backend but xla).
        timeout: seconds (a number or a ``datetime.timedelta``), or None for the backend's own
            bound (torch.distributed: the process group's timeout; MPI: none).

    Returns:
        A copy of ``comm`` (sharing its groups and its ring counters) with that timeout;
        ``comm`` itself if it has that timeout already.

    Raises:
        TypeError, ValueError: an invalid timeout (``deadline.seconds``).
        ValueError: a timeout on xla, whose collectives run inside the compiled graph, where
            zeroopt cannot bound them.
    """
    timeout = seconds(timeout)
    if timeout is not None and comm.backend == "xla":
        raise ValueError("timeout= bounds zeroopt's waits on gloo, nccl, hccl and mpi; on xla "
                         "the collectives run inside the compiled graph, where it cannot bound "
                         "them: leave timeout=None (torch_xla's own timeouts apply)")
    if comm.timeout == timeout:
        return comm
    comm = copy.copy(comm)
    if isinstance(comm, Hierarchical):
        comm.shard = with_timeout(comm.shard, timeout)
        comm.replicas = with_timeout(comm.replicas, timeout)
    comm.timeout = timeout
    return comm


def collectives_for(device: torch.device, process_group=None,
                    backend: str | None = None, timeout=None) -> Collectives:
    """The collectives for params on ``device``. ``process_group`` may be one group, or a
    (sharding group, replication group) pair as FSDP's hybrid sharding takes it. ``timeout``:
    as ``with_timeout`` (a group passed in keeps its own timeout for torch's own calls)."""
    seconds(timeout)  # an invalid one is refused before anything connects
    if process_group is not None:
        return with_timeout(_given(process_group, backend), timeout)
    return connect(device, backend, timeout)


def _given(process_group, backend: str | None) -> Collectives:
    if backend is not None:
        raise ValueError("pass process_group or backend, not both: a process group "
                         "already has its backend")
    if isinstance(process_group, (tuple, list)):
        if len(process_group) != 2:
            raise ValueError("process_group=(sharding_group, replication_group) takes two "
                             f"groups, got {len(process_group)}")
        return Hierarchical(TorchDistributed(process_group[0]),
                            TorchDistributed(process_group[1]))
    return TorchDistributed(process_group)


def connect(device: torch.device, backend: str | None = None, timeout=None) -> Collectives:
    """The whole job's collectives for ``device``, joined from the launcher's environment if
    this process has not joined yet; a single rank when nothing launched a job. ``timeout``:
    as ``with_timeout``; a process group made here also gets it as its own (below)."""
    return with_timeout(_connect(device, backend, seconds(timeout)), timeout)


def _connect(device: torch.device, backend: str | None, timeout: float | None) -> Collectives:
    import torch.distributed as dist

    name = backends.requested_backend(backend)
    launch = environment.detect()
    if name is None:
        if dist.is_available() and dist.is_initialized():
            return TorchDistributed(None)
        if launch.launcher == "none":
            return SingleRank()
        # mpirun without torchrun: MPI itself on CPU; the device's backend otherwise
        name = "mpi" if launch.launcher == "mpi" and device.type == "cpu" else \
            backends.backend_for(device)
    backends.check_usable(name, device)
    if name == "mpi":
        from . import mpi

        return mpi.world()
    if name == "xla":
        from .xla import xla_collectives

        return xla_collectives()
    if dist.is_initialized():
        if str(dist.get_backend()) == name:
            return TorchDistributed(None)
        return TorchDistributed(dist.new_group(backend=name))  # same ranks, another backend
    if launch.launcher == "none":
        return SingleRank()
    from .torch_dist import init_process_group

    init_process_group(name, launch, timeout)
    return TorchDistributed(None)


def init_distributed(backend: str | None = None,
                     timeout=None) -> tuple[Collectives, torch.device]:
    """For a training script: join the job this process was launched into (torchrun, mpirun,
    the DeepSpeed launcher, or none: a single rank) and return its collectives and the device
    this rank computes on. The backend follows the hardware unless named.

    Args:
        backend: "nccl", "gloo", "mpi", "xla", "hccl", or None (``ZEROOPT_BACKEND``, else the
            hardware's).
        timeout: seconds (or a ``datetime.timedelta``) any one wait of the returned
            collectives may take before ``CollectiveTimeout`` (a hung or dead rank then stops
            the others with an error naming it, not a hang). When this call makes the
            torch.distributed process group, it is also the group's own
            ``init_process_group(timeout=...)``, which bounds torch's own calls (and the
            rendezvous); a group that already exists keeps its own. None: torch's default
            (30 minutes), no bound on MPI.

    Returns:
        (collectives, device).

    Raises:
        ValueError: an unknown backend, or a timeout that is not positive.
        TypeError: a timeout that is not a number or a timedelta.
    """
    name = backends.requested_backend(backend)
    seconds(timeout)
    if name is not None:
        backends.check_installed(name)
    launch = environment.detect()
    device = local_device(name, launch)
    return connect(device, name, timeout), device


def local_device(backend: str | None, launch: environment.Launch) -> torch.device:
    """The device this rank works on.

    Args:
        backend: the backend named by the user, or None.
        launch: this process's place in the job (its ``local_rank`` picks the accelerator).

    Returns:
        With no backend named, ``cuda:<local_rank>`` when CUDA is available, else the CPU;
        for "xla" ``torch_xla.device()``; otherwise the backend's first device type (the
        CPU, or that accelerator at ``local_rank``).
    """
    if backend is None:
        return torch.device("cuda", launch.local_rank) if torch.cuda.is_available() \
            else torch.device("cpu")
    if backend == "xla":
        import torch_xla

        return torch_xla.device()
    if backend == "hccl":
        import torch_npu  # noqa: F401  (registers the "npu" device type)
    device_type = backends.BACKENDS[backend].devices[0]
    if device_type == "cpu":
        return torch.device("cpu")
    return torch.device(device_type, launch.local_rank)


def shutdown() -> None:
    """Leave the job cleanly: tear down torch.distributed's group and finalize MPI, if used."""
    import sys

    from .torch_dist import destroy

    destroy()
    if "mpi4py.MPI" in sys.modules:
        from mpi4py import MPI

        if MPI.Is_initialized() and not MPI.Is_finalized():
            MPI.Finalize()


__all__ = ["CollectiveTimeout", "Collectives", "Done", "Handle", "Hierarchical", "SingleRank",
           "TorchDistributed", "collectives_for", "connect", "init_distributed", "local_device",
           "shutdown", "with_timeout"]
