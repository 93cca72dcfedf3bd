"""Where this process sits in the job, as the launcher that started it says.

- torchrun, the DeepSpeed launcher and torch_xla's launchers set ``RANK``, ``WORLD_SIZE``,
  ``LOCAL_RANK`` (and ``MASTER_ADDR``/``MASTER_PORT`` for the rendezvous);
- mpirun sets its own variables: Open MPI ``OMPI_COMM_WORLD_{RANK,SIZE,LOCAL_RANK,LOCAL_SIZE}``,
  MPICH and Intel MPI (Hydra) ``PMI_RANK``/``PMI_SIZE`` and ``MPI_LOCALRANKID``, PMIx launchers
  ``PMIX_RANK``.

torchrun's variables win when both are present (torchrun started under mpirun).
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Launch:
    """Where this process sits in the job.

    Attributes:
        launcher: "torchrun" (any torch.distributed launcher), "mpi", or "none" (a single
            process).
        rank: this process's rank in the job.
        world_size: the number of processes in the job.
        local_rank: its rank among the processes on this node (0 where not set).
        local_world_size: the number of processes on this node (``world_size`` where not
            set).
    """

    launcher: str  # "torchrun" (any torch.distributed launcher), "mpi", or "none"
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int


_MPI_VARIABLES = [  # (rank, size, local rank, local size), most specific first
    ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK",
     "OMPI_COMM_WORLD_LOCAL_SIZE"),
    ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"),
    ("PMIX_RANK", "PMIX_SIZE", "PMIX_LOCAL_RANK", "PMIX_LOCAL_SIZE"),
]


def detect(env=None) -> Launch:
    """Read the launcher's environment variables (see the module docstring).

    Args:
        env: a mapping of variables (default ``os.environ``).

    Returns:
        The ``Launch``: torchrun's ``RANK``/``WORLD_SIZE`` when set, else the first MPI
        launcher's, else ``Launch("none", 0, 1, 0, 1)``.

    Raises:
        ValueError: a variable that is set is not an integer.
    """
    env = os.environ if env is None else env
    if all(k in env for k in ("RANK", "WORLD_SIZE")):
        world_size = int(env["WORLD_SIZE"])
        return Launch("torchrun", int(env["RANK"]), world_size, int(env.get("LOCAL_RANK", 0)),
                      int(env.get("LOCAL_WORLD_SIZE", world_size)))
    for rank, size, local_rank, local_size in _MPI_VARIABLES:
        if rank in env and size in env:
            world_size = int(env[size])
            return Launch("mpi", int(env[rank]), world_size, int(env.get(local_rank, 0)),
                          int(env.get(local_size, world_size)))
    return Launch("none", 0, 1, 0, 1)
