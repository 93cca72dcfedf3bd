"""Hang detection for the tests' processes: a stuck process tree is told from a slow machine by
its CPU time, not by the clock.

A process that computes, however slowly (a loaded 2-core machine runs the suite at a quarter of
its idle speed), keeps adding CPU time; a deadlock (ranks each waiting in a collective for the
other, a launcher waiting for a worker that waits for a rendezvous) adds none: gloo, TCPStore
and torchrun wait in the kernel (measured: 0.01 s of CPU in 5 s for two ranks blocked in an
all_reduce). So a tree is *stalled* when, over the last ``stall_s`` seconds, all its processes
together used less than ``IDLE_SHARE`` of one core; only then is it declared hung, its Python
stacks dumped and the tree killed. ``timeout`` stays as an upper safety bound (default
``SAFETY_S``) for what CPU time cannot tell: a rank spinning in a loop for ever, or MPI, whose
waits poll.

CPU times come from ``/proc/<pid>/stat`` (Linux, as the rest of the suite), for every process
of the trees (a compiler under a rank, torchrun's workers under bash count), and ``Meter``
adds up what each used between two reads, so a process that ends takes nothing away.

``ZEROOPT_TEST_STALL_S`` (seconds, default 60) sets ``STALL_S`` for the whole suite.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections import deque

STALL_S = float(os.environ.get("ZEROOPT_TEST_STALL_S", "60"))
SAFETY_S = 1800.0  # an upper bound for runs that keep using CPU; see the module docstring
# Of one core, over the window: below it the tree is waiting, not working. A rank waiting on
# a shared-memory peer polls every 10 ms (~2% of a core: 0.01 let a deadlocked DeepSpeed
# DataLoader worker hang CI for the 30-minute safety bound); working ranks use most of one.
IDLE_SHARE = 0.05
_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


class Hung(AssertionError):
    """A watched process tree made no progress for ``stall_s`` seconds, or ran past its
    ``timeout``; the message holds the output's tail and the Python stacks."""


def _stat(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:  # gone (or not Linux)
        return None
    return text.rsplit(")", 1)[1].split()  # fields from 3 (state) on; comm may hold spaces


def _children() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return children
    for entry in entries:
        if entry.isdigit():
            fields = _stat(int(entry))
            if fields is not None:
                children.setdefault(int(fields[1]), []).append(int(entry))
    return children


def descendants(pid: int, children: dict[int, list[int]] | None = None) -> list[int]:
    """All live descendants of ``pid`` (children, their children, ...), from /proc."""
    children = _children() if children is None else children
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def cpu_times(pids) -> dict[int, float]:
    """CPU seconds (user + system, own and reaped children's) of each live process of the
    trees of ``pids`` (the pids and all their descendants)."""
    children = _children()
    times = {}
    for pid in {p for root in pids for p in [root, *descendants(root, children)]}:
        fields = _stat(pid)
        if fields is not None:
            times[pid] = sum(int(x) for x in fields[11:15]) / _TICK  # utime stime cutime cstime
    return times


class Meter:
    """The CPU seconds process trees have used, as a count that only grows: ``read()`` adds
    what each process used since the last read (all of it for a process new to the trees).
    A process that ends or leaves the trees takes nothing away, so a finished worker, or one
    of several roots, cannot make the others look idle."""

    def __init__(self, roots):
        self.roots, self.last, self.total = list(roots), {}, 0.0
        self.read()

    def read(self) -> float:
        now = cpu_times(self.roots)
        self.total += sum(max(0.0, t - self.last.get(pid, 0.0)) for pid, t in now.items())
        self.last = now
        return self.total


class Stall:
    """A sliding window over CPU-time samples: ``update(cpu)`` is True once the samples span
    ``stall_s`` seconds in which the CPU time grew by less than ``IDLE_SHARE * stall_s``."""

    def __init__(self, stall_s: float = STALL_S):
        if not stall_s > 0:
            raise ValueError(f"stall_s must be a positive number of seconds, got {stall_s!r}")
        self.stall_s = stall_s
        self.samples: deque[tuple[float, float]] = deque()

    def update(self, cpu: float, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        self.samples.append((now, cpu))
        while len(self.samples) > 2 and self.samples[1][0] <= now - self.stall_s:
            self.samples.popleft()  # keep one sample at or before the window's start
        start, cpu0 = self.samples[0]
        return now - start >= self.stall_s and cpu - cpu0 < IDLE_SHARE * self.stall_s

    def idle_for(self) -> float:
        """Seconds covered by the window (for messages)."""
        return self.samples[-1][0] - self.samples[0][0] if self.samples else 0.0


def _is_python(pid: int) -> bool:
    try:
        exe = os.path.basename(os.readlink(f"/proc/{pid}/exe"))
    except OSError:
        return False
    return exe.startswith("python")


def dump_python_stacks_and_kill(root: int, settle_s: float = 5.0) -> None:
    """Every Python process in ``root``'s tree gets SIGABRT, which Python started with
    PYTHONFAULTHANDLER=1 (``faulthandler_env()`` sets it) answers by writing all its threads'
    stacks to its stderr; then, after at most ``settle_s`` seconds, the whole tree and
    ``root``'s process group get SIGKILL."""
    tree = [root, *descendants(root)]
    pythons = [pid for pid in tree if _is_python(pid)]
    for pid in reversed(pythons):  # the deepest (the workers) first
        try:
            os.kill(pid, signal.SIGABRT)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + settle_s
    while time.monotonic() < deadline and any(_alive(pid) for pid in pythons):
        time.sleep(0.1)
    for pid in tree:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        os.killpg(root, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _alive(pid: int) -> bool:
    fields = _stat(pid)
    return fields is not None and fields[0] != "Z"


def faulthandler_env(base: dict | None = None, **extra: str) -> dict:
    """``base`` (default os.environ) with PYTHONFAULTHANDLER=1 and ``extra``: the environment
    for a watched command, so that its Python processes dump their stacks on a hang."""
    return {**(os.environ if base is None else base), "PYTHONFAULTHANDLER": "1", **extra}


class Watch:
    """Watches already started process trees (``roots``: pids): ``check()`` raises ``Hung``
    when they have stalled for ``stall_s`` seconds or run past ``timeout`` (from construction);
    it samples at most once a second, so it can be called in a tight polling loop."""

    def __init__(self, roots, *, timeout: float = SAFETY_S, stall_s: float = STALL_S,
                 what: str = "the command"):
        self.roots = list(roots)
        self.timeout, self.what = timeout, what
        self.stall, self.meter = Stall(stall_s), Meter(self.roots)
        self.started = self.last = time.monotonic()
        self.stall.update(self.meter.total, self.started)

    def check(self) -> None:
        now = time.monotonic()
        if now - self.last < 1.0:
            return
        self.last = now
        cpu = self.meter.read()
        if self.stall.update(cpu, now):
            self.kill()
            raise Hung(f"{self.what} made no progress for {self.stall.idle_for():.0f} s: its "
                       f"processes used {cpu - self.stall.samples[0][1]:.2f} s of CPU in that "
                       f"time, all waiting (a hang; a slow machine keeps computing). Python "
                       f"stacks (SIGABRT) are in its output.")
        if now - self.started > self.timeout:
            self.kill()
            raise Hung(f"{self.what} still ran after the safety bound of {self.timeout:.0f} s, "
                       f"using CPU (spinning?). Python stacks (SIGABRT) are in its output.")

    def kill(self) -> None:
        for root in self.roots:
            dump_python_stacks_and_kill(root)


def run(argv, *, cwd=None, env=None, merge: bool = False, timeout: float = SAFETY_S,
        stall_s: float = STALL_S) -> subprocess.CompletedProcess:
    """``subprocess.run(argv, capture_output=True, text=True)`` under a ``Watch``.

    Args:
        argv (list[str]): the command.
        cwd, env: as for subprocess.Popen; ``env`` (default os.environ) gets
            PYTHONFAULTHANDLER=1 added.
        merge (bool): stderr into stdout (default False).
        timeout (float): upper safety bound in seconds (default ``SAFETY_S``).
        stall_s (float): seconds without CPU progress that make a hang (default ``STALL_S``).

    Returns:
        subprocess.CompletedProcess with ``stdout`` and ``stderr`` as text.

    Raises:
        Hung: the command stalled or ran past ``timeout``; it and everything it started were
            killed, and the message holds the end of its output and its Python stacks.
    """
    proc = subprocess.Popen(argv, cwd=cwd, env=faulthandler_env(env), text=True,
                            stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT if merge else subprocess.PIPE,
                            start_new_session=True)  # its own group: killpg takes all of it
    out: list[str] = []
    err: list[str] = []
    readers = [threading.Thread(target=lambda s=s, b=b: b.extend(iter(s.readline, "")),
                                daemon=True)
               for s, b in ((proc.stdout, out), (proc.stderr, err)) if s is not None]
    for reader in readers:
        reader.start()
    watch = Watch([proc.pid], timeout=timeout, stall_s=stall_s, what=f"{argv}")
    try:
        while proc.poll() is None:
            time.sleep(0.2)
            watch.check()
    except Hung as hung:
        proc.wait()
        for reader in readers:
            reader.join(timeout=10)
        raise Hung(f"{hung}\n--- stdout (its end) ---\n{''.join(out)[-3000:]}\n"
                   f"--- stderr (its end: the stacks) ---\n{''.join(err)[-12000:]}") from None
    for reader in readers:
        reader.join()
    return subprocess.CompletedProcess(argv, proc.returncode, "".join(out),
                                       None if merge else "".join(err))
