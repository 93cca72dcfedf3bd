"""Rank-side scenarios for checkpoints under faults (tests/test_checkpoint_faults.py).

Each rank saves a first checkpoint, then a fault makes a second save (or a load) fail, and the
rank records what it saw: the error's type and message, what is left beside the checkpoint, and
the params the first checkpoint still loads. Faults are real where the machine allows it (a full
tmpfs, which the test mounts); a failure on one rank only is a function of this process
patched to raise the OSError a real disk would, so no collective is mocked: every other rank
runs the real code and must learn of the failure through it.
"""

from __future__ import annotations

import contextlib
import errno
import os

import torch

from ranks import checkpoint
import zeroopt
from training import world
from zeroopt.checkpoint import directory

# fault -> which rank it strikes (clipped to the last rank at W = 1)
FAULT_RANK = {"manifest": 0, "hash": 1, "rename": 0, "load_hash": 1}


def _first_save(path: str):
    model, opt = checkpoint.build("adamw")
    checkpoint.train(model, opt, range(1, 3))
    zeroopt.save_checkpoint(path, model, opt, step=2)
    return model, opt, checkpoint.params_of(model)


def _loads_back(path: str) -> list[torch.Tensor]:
    """The params a fresh, perturbed model gets from ``path`` (a collective: checks too that
    no rank was left behind in one)."""
    model, opt = checkpoint.build("adamw", seed=7)
    assert zeroopt.load_checkpoint(path, model, opt) == {"step": 2}
    return checkpoint.params_of(model)


def _outcome(call) -> dict:
    try:
        call()
    except Exception as error:  # noqa: BLE001 - what reached this rank is the result
        return {"type": type(error).__name__, "message": str(error),
                "is_checkpoint_error": isinstance(error, zeroopt.CheckpointError)}
    return {"type": None, "message": "", "is_checkpoint_error": False}


@contextlib.contextmanager
def _fault(kind: str, path: str):
    """Make one step of a save or load raise on this rank, as a failing disk would."""
    rank, size = world()
    if rank != min(FAULT_RANK[kind], size - 1):
        yield
        return
    path = os.path.abspath(path)
    if kind == "manifest":  # the manifest's file cannot be written (a full or failing disk)
        def failing_open(file, mode="r", *args, **kwargs):
            if str(file).endswith(".part"):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(file))
            return open(file, mode, *args, **kwargs)

        directory.open = failing_open  # shadows the builtin in that module only
        undo = lambda: delattr(directory, "open")  # noqa: E731
    elif kind in ("hash", "load_hash"):  # reading a data file back fails
        facts = directory._file_facts

        def failing_facts(file):
            if file.endswith(".distcp"):
                raise OSError(errno.EIO, os.strerror(errno.EIO), file)
            return facts(file)

        directory._file_facts = failing_facts
        undo = lambda: setattr(directory, "_file_facts", facts)  # noqa: E731
    else:  # "rename": the swap's second rename (staging -> path) fails once, after
        # path -> .old; putting the previous checkpoint back then succeeds
        rename, failed = os.rename, []

        def failing_rename(src, dst):
            if os.path.abspath(dst) == path and not failed:
                failed.append(dst)
                raise OSError(errno.EBUSY, os.strerror(errno.EBUSY), str(dst))
            return rename(src, dst)

        os.rename = failing_rename
        undo = lambda: setattr(os, "rename", rename)  # noqa: E731
    try:
        yield
    finally:
        undo()


def one_rank_faults(root: str, faults: list[str]) -> dict:
    """Save once; then for each fault, a save (or for "load_hash", a load) that fails on one
    rank. Returns, per fault, what reached this rank, the listing beside the checkpoint and the
    params loaded afterwards; and the params the first save held."""
    path = os.path.join(root, "ckpt")
    model, opt, saved = _first_save(path)
    checkpoint.train(model, opt, range(3, 4))  # the second save would hold other values
    seen = {}
    for kind in faults:
        with _fault(kind, path):
            if kind == "load_hash":
                other, other_opt = checkpoint.build("adamw", seed=7)
                outcome = _outcome(lambda: zeroopt.load_checkpoint(path, other, other_opt))
            else:
                outcome = _outcome(lambda: zeroopt.save_checkpoint(path, model, opt, step=3))
        seen[kind] = {**outcome, "listing": sorted(os.listdir(root)),
                      "loaded": _loads_back(path)}
    return {"saved": saved, "seen": seen}


def disk_full(disk: str) -> dict:
    """Save a small checkpoint onto the small tmpfs ``disk``, then a larger one that cannot fit
    (the model gains a 1 MiB buffer). Returns what reached this rank, the listing, the free
    bytes before and after the failed save, and the params loaded afterwards."""
    path = os.path.join(disk, "ckpt")
    model, opt, saved = _first_save(path)
    model.register_buffer("big", torch.randn(1 << 18))
    free_before = _free_bytes(disk)
    outcome = _outcome(lambda: zeroopt.save_checkpoint(path, model, opt, step=3))
    return {**outcome, "saved": saved, "listing": sorted(os.listdir(disk)),
            "free_before": free_before, "free_after": _free_bytes(disk),
            "loaded": _loads_back(path)}


def _free_bytes(path: str) -> int:
    stats = os.statvfs(path)
    return stats.f_bavail * stats.f_frsize
