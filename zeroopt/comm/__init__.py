"""Collectives: one small interface (``base.Collectives``) and its backends.

``collectives_for`` picks them for an optimizer: a process group passed in is used as it is;
otherwise the backend the user named (``backend=`` or ``ZEROOPT_BACKEND``) or the one that
follows the params' device, joined from the launcher's environment (``environment.py``):

    nccl, gloo, hccl   torch.distributed (torch_dist.py); hccl through torch_npu
    xla                torch_xla's collectives inside the traced step (xla.py)
    mpi                mpi4py, under mpirun without torchrun (mpi.py)

``split(collectives, shard_size)`` makes sharding and replication groups (hierarchical.py).
"""

from __future__ import annotations

import torch

from . import backends, environment
from .base import Collectives, Done, Handle, SingleRank
from .hierarchical import Hierarchical, split
from .torch_dist import TorchDistributed


def collectives_for(device: torch.device, process_group=None,
                    backend: str | None = None) -> Collectives:
    """The collectives for params on ``device``. ``process_group`` may be one group, or a
    (sharding group, replication group) pair as FSDP's hybrid sharding takes it."""
    if process_group is not None:
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
    return connect(device, backend)


def connect(device: torch.device, backend: str | None = None) -> Collectives:
    """The whole job's collectives for ``device``, joined from the launcher's environment if
    this process has not joined yet; a single rank when nothing launched a job."""
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

    init_process_group(name, launch)
    return TorchDistributed(None)


def init_distributed(backend: str | None = None) -> tuple[Collectives, torch.device]:
    """For a training script: join the job this process was launched into (torchrun, mpirun,
    the DeepSpeed launcher, or none: a single rank) and return its collectives and the device
    this rank computes on. The backend follows the hardware unless named."""
    name = backends.requested_backend(backend)
    if name is not None:
        backends.check_installed(name)
    launch = environment.detect()
    device = local_device(name, launch)
    return connect(device, name), device


def local_device(backend: str | None, launch: environment.Launch) -> torch.device:
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


__all__ = ["Collectives", "Done", "Handle", "Hierarchical", "SingleRank", "TorchDistributed",
           "collectives_for", "connect", "init_distributed", "local_device", "shutdown"]
