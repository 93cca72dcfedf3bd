"""A checkpoint directory: written aside, hashed, swapped in whole; verified before reading.

A save writes into ``<path>.tmp-<id>``; when every rank has written its files, their sizes
and sha256 go into ``zeroopt.json`` (the manifest, written last), and rank 0 swaps the new
directory in: the previous checkpoint is renamed to ``<path>.old``, the new one to ``<path>``,
then the old one is deleted. A crash before the swap leaves ``<path>`` as it was; a crash
between the two renames leaves the previous checkpoint whole in ``<path>.old``, which a load
then uses. A load checks every file against the manifest first (the ranks share the hashing),
so a truncated or altered file is named in an error instead of being read.

Each step that one rank (or each rank, on its share) does ends in an agreement (``Job.gather``
/ ``Job.run``), so a failure there, a full disk say, is raised on every rank; the save then
removes its staging directory (``discard``) and ``<path>`` stays as it was: a failed swap puts
the previous checkpoint back.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import uuid

from .errors import CheckpointError
from .job import Job

MANIFEST = "zeroopt.json"
FORMAT = "zeroopt-checkpoint"
VERSION = 1
log = logging.getLogger("zeroopt")


def staging_dir(path: str, job: Job) -> str:
    """A fresh directory beside ``path`` for this save (rank 0 names it and clears what
    interrupted saves left behind). Raises CheckpointError on every rank if rank 0 cannot."""
    path = os.path.abspath(path)

    def make() -> str | None:
        if job.rank != 0:
            return None
        parent = os.path.dirname(path)
        os.makedirs(parent, exist_ok=True)
        prefix = os.path.basename(path) + ".tmp-"
        for stale in os.listdir(parent):
            if stale.startswith(prefix):
                shutil.rmtree(os.path.join(parent, stale), ignore_errors=True)
        name = f"{path}.tmp-{uuid.uuid4().hex[:12]}"
        os.makedirs(name)
        return name

    return job.gather("making the staging directory", make)[0]


def write_manifest(staging: str, job: Job, description: dict) -> None:
    """Hash the files every rank wrote (each rank a share) and write the manifest (rank 0).
    Raises CheckpointError on every rank if any rank's part fails."""
    files = job.gather("listing the files written",
                       lambda: sorted(os.listdir(staging)) if job.rank == 0 else None)[0]
    facts = {}
    for part in job.gather("hashing the files written", lambda: {
            name: _file_facts(os.path.join(staging, name))
            for i, name in enumerate(files) if i % job.world_size == job.rank}):
        facts.update(part)

    def write() -> None:
        if job.rank != 0:
            return
        manifest = {"format": FORMAT, "version": VERSION, **description,
                    "files": {name: facts[name] for name in files}}
        target = os.path.join(staging, MANIFEST)
        with open(target + ".part", "w") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(target + ".part", target)
        _fsync_dir(staging)

    job.run("writing the manifest", write)


def publish(staging: str, path: str, job: Job) -> None:
    """Swap the finished ``staging`` directory in as ``path`` (see the module notes). Raises
    CheckpointError on every rank if the swap fails; ``path`` is then as it was."""
    path = os.path.abspath(path)
    job.run("swapping the new checkpoint in", lambda: _swap(staging, path) if job.rank == 0
            else None)


def discard(staging: str | None, job: Job) -> None:
    """After a failed save (on every rank): remove its staging directory (rank 0)."""
    if staging is not None and job.rank == 0:
        shutil.rmtree(staging, ignore_errors=True)
    job.barrier()  # the error reaches no rank before the directory is gone


def _swap(staging: str, path: str) -> None:
    old = path + ".old"
    moved = os.path.exists(path)
    if moved:
        if os.path.exists(old):  # from an earlier interrupted swap; path is newer
            shutil.rmtree(old)
        os.rename(path, old)
    try:
        os.rename(staging, path)
    except OSError:
        if moved:  # put the previous checkpoint back (should that fail, resolve() loads .old)
            with contextlib.suppress(OSError):
                os.rename(old, path)
        raise
    _fsync_dir(os.path.dirname(path))
    shutil.rmtree(old, ignore_errors=True)


def resolve(path: str) -> str:
    """The directory to load: ``path``, or ``<path>.old`` if a save was interrupted mid-swap."""
    path = os.path.abspath(path)
    if os.path.isfile(os.path.join(path, MANIFEST)):
        return path
    old = path + ".old"
    if not os.path.exists(path) and os.path.isfile(os.path.join(old, MANIFEST)):
        log.warning("zeroopt: %s is missing but %s is whole (a save was interrupted while "
                    "swapping checkpoints); loading it", path, old)
        return old
    if not os.path.exists(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    raise CheckpointError(
        f"{path} is not a zeroopt checkpoint: it has no {MANIFEST} (saves write it last, so "
        "this is not a finished zeroopt.save_checkpoint)")


def read_manifest(path: str) -> dict:
    """Read and check a checkpoint's manifest (``zeroopt.json``, which a save writes last).

    Args:
        path: the checkpoint's directory (as ``resolve`` returns it).

    Returns:
        The manifest: ``format``, ``version``, ``files`` (each file's name -> its
        ``bytes`` and ``sha256``), and what the save recorded (``world_size``,
        ``compat.describe``'s keys).

    Raises:
        CheckpointError: it cannot be read or parsed (the checkpoint is damaged), is not a
            zeroopt checkpoint manifest, or was written by a newer format version.
    """
    try:
        with open(os.path.join(path, MANIFEST)) as f:
            manifest = json.load(f)
    except (OSError, ValueError) as error:
        raise CheckpointError(f"the manifest {os.path.join(path, MANIFEST)} cannot be read "
                              f"({error}); the checkpoint is damaged") from None
    if manifest.get("format") != FORMAT or "files" not in manifest:
        raise CheckpointError(f"{os.path.join(path, MANIFEST)} is not a zeroopt checkpoint "
                              "manifest")
    if manifest.get("version", 0) > VERSION:
        raise CheckpointError(f"{path} was written by a newer zeroopt (format version "
                              f"{manifest['version']}); upgrade zeroopt to load it")
    return manifest


def verify(path: str, manifest: dict, job: Job) -> None:
    """Every file the manifest lists is there, whole and unaltered (each rank checks a share).

    Raises:
        CheckpointError: the same on every rank, naming the first bad file.
    """
    def check_share() -> list[str]:
        problems = []
        for i, (name, expected) in enumerate(sorted(manifest["files"].items())):
            if i % job.world_size != job.rank:
                continue
            file = os.path.join(path, name)
            if not os.path.isfile(file):
                problems.append(f"{file} is missing")
                continue
            try:
                facts = _file_facts(file)
            except OSError as error:
                problems.append(f"{file} cannot be read ({error})")
                continue
            if facts["bytes"] != expected["bytes"]:
                problems.append(f"{file} is truncated or overwritten: {facts['bytes']} bytes, "
                                f"the save wrote {expected['bytes']}")
            elif facts["sha256"] != expected["sha256"]:
                problems.append(f"{file} was altered after the save: its sha256 differs from "
                                "the one recorded")
        return problems

    found = sorted(p for part in job.gather(f"verifying checkpoint {path}", check_share)
                   for p in part)
    if found:
        more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
        raise CheckpointError(f"checkpoint {path} is damaged: {found[0]}{more}. Nothing was "
                              "loaded; load an earlier checkpoint")


def _file_facts(file: str) -> dict:
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        while chunk := f.read(1 << 23):
            digest.update(chunk)
    return {"bytes": os.path.getsize(file), "sha256": digest.hexdigest()}


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
