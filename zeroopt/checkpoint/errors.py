"""Checkpoint errors, and how a failure on one rank becomes the same error on every rank.

A save or load is a sequence of steps, some done by one rank (naming the staging directory,
writing the manifest, the swap), some by each rank on its share (writing tensors, hashing).
Each such step ends in an agreement (``Job.gather`` / ``Job.run``): every rank shares "ok" or
its error's text, and if any failed, every rank raises the same ``CheckpointError``, so no rank
is left waiting in a collective that the failed one will never join. DCP's own steps agree
already but raise ``CheckpointException``, a BaseException that ``except Exception`` misses,
and lose the OSError on the way (below); ``from_dcp`` turns it into a ``CheckpointError``.
"""

from __future__ import annotations

import contextlib

import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

# A step's failure as shared between ranks: (index of the kept type, or -1; message).
Report = tuple[int, str]


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be saved or loaded: a failing disk or file system, a damaged
    checkpoint, or one from another model or optimizer. Every rank raises the same one."""


def os_error_in(error: BaseException) -> OSError | None:
    """The first OSError in ``error``'s chain (itself, its cause or context), or None.
    torch.save reports a full disk as "unexpected pos 704 vs 598", with the ENOSPC only in
    the context."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, OSError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def describe(error: BaseException) -> str:
    """``error`` as one line for a message: the OSError underneath where there is one."""
    root = os_error_in(error)
    return str(root) if root is not None else f"{type(error).__name__}: {error}"


def report(error: BaseException, keep: tuple[type, ...]) -> Report:
    """What a rank shares of its failure: errors of a ``keep`` type (raised by zeroopt with a
    whole message) are passed on as they are, anything else is described."""
    for index, kind in enumerate(keep):
        if isinstance(error, kind):
            return index, str(error)
    return -1, describe(error)


def agreed(what: str, failed: list[tuple[int, Report]], world_size: int,
           keep: tuple[type, ...]) -> Exception:
    """The one error every rank raises, given each failed rank's report (lowest rank first):
    that rank's kept error as it was, or a CheckpointError saying what failed where.

    Args:
        what: the step, as in "writing the manifest".
        failed: (rank, report) of every rank whose part of the step raised.
        world_size: the job's; a single rank is not named.
        keep: the types that ``report`` passed on as they are.
    """
    rank, (kept, text) = failed[0]
    if kept >= 0:
        return keep[kept](text)
    return CheckpointError(f"{what} failed{_where(rank, [r for r, _ in failed[1:]], world_size)}"
                           f": {text}")


def from_dcp(what: str, error: CheckpointException, world_size: int) -> CheckpointError:
    """DCP's CheckpointException (the same on every rank: DCP's coordinator broadcasts it) as a
    CheckpointError naming the lowest failed rank's error."""
    failures = sorted(error.failures.items())
    if not failures:
        return CheckpointError(f"{what} failed: {error}")
    rank, (first, _) = failures[0]
    return CheckpointError(f"{what} failed{_where(rank, [r for r, _ in failures[1:]], world_size)}"
                           f": {describe(first)}")


def _where(rank: int, others: list[int], world_size: int) -> str:
    if world_size == 1:
        return ""
    return f" on rank {rank}" + (f" (and on ranks {others})" if others else "")


class Writer(dcp.FileSystemWriter):
    """DCP's FileSystemWriter, but a failure is raised as the OSError underneath it. DCP
    pickles each rank's exception to share it, and pickling drops the chain where torch.save
    keeps a full disk's ENOSPC, leaving only "unexpected pos 704 vs 598"."""

    def write_data(self, plan, planner):
        """``FileSystemWriter.write_data`` (torch.distributed.checkpoint), with a failure
        raised as the OSError underneath it.

        Args:
            plan, planner: as DCP passes them.

        Returns:
            What ``FileSystemWriter.write_data`` returns (a future of the write results).

        Raises:
            OSError: a fresh copy (errno, message, filename) of the first OSError in the
                failure's chain, raised from the failure; an error with none, as it is.
        """
        with _os_error_on_top():
            return super().write_data(plan, planner)

    def finish(self, metadata, results) -> None:
        """``FileSystemWriter.finish`` (torch.distributed.checkpoint: writes the checkpoint's
        metadata), with a failure raised as ``write_data`` raises it.

        Args:
            metadata, results: as DCP passes them.
        """
        with _os_error_on_top():
            super().finish(metadata, results)


@contextlib.contextmanager
def _os_error_on_top():
    try:
        yield
    except Exception as error:
        root = os_error_in(error)
        if root is None or root is error:
            raise
        bare = OSError(*root.args)  # a fresh one (raising root itself loops the chain);
        # OSError(errno, ...) picks the errno's own subclass
        if root.filename is not None:  # set to None, it would print as ": None"
            bare.filename = root.filename
        raise bare from error
