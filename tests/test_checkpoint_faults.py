"""Checkpoints under faults: a full disk, and a failure on one rank only, reach every rank as
the same zeroopt.CheckpointError; nothing is left stranded and the previous checkpoint loads.

Real processes and real gloo at W = 1, 2, 3 (ranks/checkpoint_faults.py holds the rank side).
A rank left waiting in a collective after another rank's failure is a hang, which run_ranks
turns into a failure (with every rank's stack) once the ranks have stopped using CPU.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
import torch

from ranks import checkpoint_faults
from distributed import run_ranks

ONE_RANK_FAULTS = ["manifest", "hash", "rename", "load_hash"]


def _same_error_on_every_rank(seen: list[dict], what: str) -> str:
    first = seen[0]
    assert first["is_checkpoint_error"], f"{what}: rank 0 got {first['type']}: {first['message']}"
    for rank, other in enumerate(seen[1:], 1):
        assert (other["type"], other["message"]) == (first["type"], first["message"]), \
            f"{what}: rank {rank} got {other['type']}: {other['message']!r}, rank 0 " \
            f"{first['message']!r}"
    return first["message"]


def _equal(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_a_failure_on_one_rank_reaches_every_rank(tmp_path, world_size):
    """Writing the manifest (rank 0), hashing a data file (rank 1) and the swap's rename (rank
    0) each fail one save, and hashing on rank 1 fails a load: every rank raises the same
    CheckpointError naming the OS error, no staging directory is left, and the previous
    checkpoint loads bit-identical (which also shows no rank was left inside a collective)."""
    results = run_ranks(world_size, checkpoint_faults.one_rank_faults, str(tmp_path),
                        ONE_RANK_FAULTS, shared=True)
    expected = {"manifest": "No space left on device", "hash": "Input/output error",
                "rename": "Device or resource busy", "load_hash": "Input/output error"}
    for kind in ONE_RANK_FAULTS:
        seen = [r["seen"][kind] for r in results]
        message = _same_error_on_every_rank(seen, kind)
        assert expected[kind] in message, f"{kind}: {message}"
        assert str(tmp_path / "ckpt") in message, f"{kind}: the path is not named: {message}"
        for rank, (result, one) in enumerate(zip(results, seen)):
            assert one["listing"] == ["ckpt"], f"{kind}: left beside it on rank {rank}: " \
                                               f"{one['listing']}"
            assert _equal(one["loaded"], result["saved"]), f"{kind}: rank {rank} loaded " \
                                                           "other params"


@pytest.fixture
def small_disk(tmp_path):
    """A 512 KiB tmpfs: the first checkpoint (~100 KB) fits, one with a 1 MiB buffer does not."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command here to make a small filesystem")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(disk)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN): "
                    f"{mounted.stderr.strip()}")
    try:
        yield str(disk)
    finally:
        if subprocess.run(["umount", str(disk)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(disk)], capture_output=True)


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_a_full_disk_fails_the_save_on_every_rank_and_strands_nothing(small_disk, world_size):
    results = run_ranks(world_size, checkpoint_faults.disk_full, small_disk, shared=True)
    message = _same_error_on_every_rank(results, "disk full")
    assert "No space left on device" in message, message
    assert os.path.join(small_disk, "ckpt") in message, message
    for rank, result in enumerate(results):
        assert result["listing"] == ["ckpt"], f"rank {rank} sees {result['listing']}"
        assert result["free_after"] == result["free_before"], \
            f"rank {rank}: {result['free_before'] - result['free_after']} bytes stranded"
        assert _equal(result["loaded"], result["saved"]), f"rank {rank} loaded other params"
