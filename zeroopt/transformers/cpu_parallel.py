"""A torchrun job on CPU that the Trainer would run as one process per rank.

Transformers runs data-parallel on CPU only with ``use_cpu=True``: without it, under torchrun,
``TrainingArguments`` reports ``ParallelMode.NOT_PARALLEL`` and ``world_size`` 1 while the
process group has W ranks, so every rank trains on all the data, counts W times the steps per
epoch and writes the checkpoint files, while the ZeroOptimizer shards and averages across all W.
``make_data_parallel`` detects that and sets the arguments up as ``use_cpu=True`` would have.
"""

from __future__ import annotations

import functools
import logging
import os

import torch.distributed as dist

log = logging.getLogger("zeroopt")


def launched_world_size() -> int:
    """The job's process count: the default process group's size, else torchrun's (or any
    launcher's) ``WORLD_SIZE``, else 1."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def make_data_parallel(args) -> None:
    """If ``args`` (a TrainingArguments) sees one process on CPU in a job of several, set them
    up again with ``use_cpu=True`` (in place), so the Trainer splits the data across the ranks
    and only rank 0 writes what one process writes; log one line saying so.

    Raises:
        ValueError: the arguments need it but this transformers version sets up its devices
            otherwise (the message names the flag to set).
    """
    world_size = launched_world_size()
    if args.use_cpu or world_size <= 1 or args.world_size > 1 or args.device.type != "cpu":
        return
    setup = getattr(type(args), "_setup_devices", None)
    if not isinstance(setup, functools.cached_property):
        raise ValueError(f"this job has {world_size} processes, but on CPU TrainingArguments "
                         f"sees one unless use_cpu=True: every rank would train on all the "
                         f"data. Set TrainingArguments(..., use_cpu=True) (--use_cpu)")
    args.use_cpu = True
    vars(args).pop("_setup_devices", None)  # the next read of args.device sets them up again
    if args.device.type != "cpu" or args.world_size != world_size:
        raise ValueError(f"this job has {world_size} processes but TrainingArguments with "
                         f"use_cpu=True sees {args.world_size}; launch with torchrun so both "
                         f"agree")
    log.info("zeroopt: %d CPU processes: running the Trainer data-parallel as use_cpu=True "
             "does (without it Transformers trains each rank on all the data)", world_size)
