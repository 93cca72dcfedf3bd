"""Rank-side scenarios for tests/test_hang_detection.py: a rank stuck for ever, a rank slow but
busy (itself, or in a child process it waits for), a rank that raises while the others wait."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import torch.distributed as dist


def spin(seconds: float) -> int:
    """Busy for ``seconds`` of wall time (pure Python: the CPU time grows all along)."""
    end, n = time.monotonic() + seconds, 0
    while time.monotonic() < end:
        n += 1
    return n


def wait_for_ever() -> None:
    while True:
        time.sleep(3600)


def one_rank_stuck() -> None:
    """Rank 1 sleeps for ever; rank 0 waits for it in a barrier."""
    if dist.get_rank() == 1:
        wait_for_ever()
    dist.barrier()


def one_rank_slow(seconds: float) -> str:
    """Rank 1 computes for ``seconds`` before the barrier that rank 0 waits in."""
    if dist.get_rank() == 1:
        spin(seconds)
    dist.barrier()
    return "done"


def one_rank_waits_on_a_busy_child(seconds: float) -> str:
    """Rank 1 waits for a child process (a compiler, say) that computes for ``seconds``: the
    rank itself uses no CPU, its process tree does."""
    if dist.get_rank() == 1:
        code = (f"import time\nend = time.monotonic() + {seconds}\n"
                "while time.monotonic() < end: pass")
        subprocess.run([sys.executable, "-c", code], check=True)
    dist.barrier()
    return "done"


def one_rank_raises() -> None:
    """Rank 1 raises before the barrier rank 0 waits in."""
    if dist.get_rank() == 1:
        raise ValueError("rank 1 gave up")
    dist.barrier()


def pid_and_env(set_name: str | None = None) -> tuple[int, str | None]:
    """This rank's pid and ZEROOPT_TEST_MARK as the call found it; then sets it, if asked."""
    found = os.environ.get("ZEROOPT_TEST_MARK")
    if set_name is not None:
        os.environ["ZEROOPT_TEST_MARK"] = set_name
    return os.getpid(), found
