"""``save_checkpoint`` / ``load_checkpoint``: the model and a ZeroOptimizer's sharded state,
written by every rank in parallel with torch.distributed.checkpoint, and read back at any
world size (or with another bucket size, state precision or shard_size).

    zeroopt.save_checkpoint("ckpt/step_1000", model, opt, step=1000, scheduler=sched.state_dict())
    extras = zeroopt.load_checkpoint("ckpt/step_1000", model, opt)   # {"step": 1000, ...}

Both are collectives: call them on every rank. The model's entries are saved once (DCP spreads
the replicated tensors over the ranks); the optimizer's per-param state is saved flat, each
rank its own ranges (``optimizer_items.py``). Saves are atomic and loads verified
(``directory.py``); a checkpoint from another model or optimizer is refused with the first
difference named (``compat.py``). A failure on any rank, a full disk say, is raised on every rank
as the same CheckpointError (``errors.py``), and a failed save leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import warnings

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from . import compat, directory, errors
from .errors import CheckpointError
from .job import job_for
from .optimizer_items import apply_groups, load_targets, save_items


def save_checkpoint(path: str, model: torch.nn.Module | None, optimizer, **extra) -> None:
    """Save ``model`` (or None) and ``optimizer`` (a ZeroOptimizer, or None) to the directory
    ``path``, replacing what is there only once the new checkpoint is complete.

    Args:
        path: the checkpoint's directory; the save writes beside it, in ``<path>.tmp-<id>``.
        model, optimizer: what to save; either may be None.
        extra: picklable values (a step count, a scheduler's state); rank 0's are saved.
    Raises:
        CheckpointError: the same on every rank, if any rank's part fails (a full disk, a
            failing rename): it names the OS error and ``path``. The staging directory is
            removed by then, and ``path`` is as it was before the save.
    """
    job = _job(optimizer)
    if optimizer is not None:
        optimizer.finish_param_gather()  # the model's params hold the stepped values
    items = {} if model is None else {f"model.{k}": v for k, v in model.state_dict().items()}
    if optimizer is not None:
        items.update(save_items(optimizer, job.writes_state))
    if job.rank == 0:  # DCP would otherwise write whichever rank's copy balances the files
        items["extra"] = pickle.dumps(extra)
    staging = None
    try:
        staging = directory.staging_dir(path, job)
        with _quiet(), _dcp_errors("writing the tensors", job):
            job.save(items, errors.Writer(staging))
        directory.write_manifest(staging, job, {"world_size": job.world_size,
                                                **compat.describe(model, optimizer)})
        directory.publish(staging, path, job)
    except CheckpointError as error:  # raised on every rank alike: clean up, say where
        directory.discard(staging, job)
        raise CheckpointError(f"checkpoint {os.path.abspath(path)} was not saved: {error}. "
                              "Its directory is as it was before this save") from error


@torch.no_grad()
def load_checkpoint(path: str, model: torch.nn.Module | None, optimizer) -> dict:
    """Load a checkpoint that ``save_checkpoint`` wrote, at this job's world size, into
    ``model`` and ``optimizer`` (either may be None).

    Returns:
        the saved extras (rank 0's at the save).
    Raises:
        FileNotFoundError: there is no checkpoint at ``path``.
        CheckpointError: it is damaged, unreadable, or from another model or optimizer; the
            same on every rank, and raised before anything is loaded.
    """
    job = _job(optimizer)

    def check() -> tuple[str, dict]:
        """This rank's checkpoint directory and manifest, checked against the model and
        optimizer (raises CheckpointError / FileNotFoundError)."""
        where = directory.resolve(path)
        manifest = directory.read_manifest(where)
        compat.check_matches(where, manifest, model, optimizer)
        return where, manifest

    path, manifest = job.run(f"reading checkpoint {path}", check,
                             keep=(CheckpointError, FileNotFoundError))
    directory.verify(path, manifest, job)
    reader = dcp.FileSystemReader(path)
    metadata = job.run(f"reading checkpoint {path}'s metadata", reader.read_metadata)

    def read(items: dict) -> dict:
        """``items`` filled from the checkpoint (``job.load``), DCP's errors made agreed."""
        with _quiet(), _dcp_errors(f"reading checkpoint {path}", job):
            return job.load(items, reader)

    if optimizer is not None:
        optimizer.finish_param_gather()  # no gather may land on the loaded params
        optimizer.grads.finish()
        optimizer.grads.zero()
        # The groups first: their hyperparameters decide which states there are to read.
        apply_groups(optimizer, read({"optimizer.param_groups": None})["optimizer.param_groups"])
    items = {"extra": None}
    if model is not None:
        items.update({f"model.{k}": v for k, v in model.state_dict().items()})
    apply = None
    if optimizer is not None:
        def targets() -> tuple:
            """The optimizer's tensors to read and the function applying them
            (``load_targets``)."""
            try:
                return load_targets(optimizer, metadata)
            except KeyError as missing:
                raise CheckpointError(f"checkpoint {path} has no {missing} for this optimizer: "
                                      "it was saved with other hyperparameters (states "
                                      "differ)") from None

        found, apply = job.run("matching the optimizer's states", targets)
        items.update(found)
    read(items)
    if apply is not None:
        apply(items)
        optimizer.publish_params()  # masters of 16-bit params -> the model's params
    return pickle.loads(items["extra"])


@contextlib.contextmanager
def _dcp_errors(what: str, job):
    """DCP's CheckpointException (a BaseException, the same on every rank) as a
    CheckpointError."""
    try:
        yield
    except CheckpointException as error:
        raise errors.from_dcp(what, error, job.world_size) from error


@contextlib.contextmanager
def _quiet():
    """DCP's notices that are not news here: ShardedTensor's deprecation (it is what DCP reads
    for uneven ranges), "no process group: single process" (that is the intent), and the
    TypedStorage deprecation that DCP's own file writer triggers (torch 2.9)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*ShardedTensor", FutureWarning)
        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        warnings.filterwarnings("ignore", "TypedStorage is deprecated", UserWarning)
        yield


def _job(optimizer):
    return job_for(optimizer.comm if optimizer is not None else _default_comm())


def _default_comm():
    import torch.distributed as dist

    from ..comm import SingleRank, TorchDistributed

    return TorchDistributed(None) if dist.is_initialized() else SingleRank()


__all__ = ["CheckpointError", "load_checkpoint", "save_checkpoint"]
