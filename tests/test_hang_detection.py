"""The harness's hang detection (tests/watch.py, tests/distributed.py): a stuck rank or command
is declared hung once it has used no CPU for ``stall_s`` seconds, with its Python stacks in the
failure; a slow one that keeps computing, itself or in a child process, is left to finish.

``STALL_S`` is 2 s here (60 s in the suite) to keep this file cheap; every slow case computes
for 1.5 x that, so a detector that went by the clock would kill it. The pool's safety bound is
60 s: if stall detection failed, the message would name that bound instead of the stall.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from ranks import hang_detection
import watch
from distributed import RankFailed, Ranks

STALL_S = 2.0
SLOW_S = 1.5 * STALL_S


@pytest.fixture(scope="module")
def pool():
    with Ranks(2, stall_s=STALL_S, after_error_s=STALL_S, safety_s=60) as ranks:
        yield ranks


def test_a_pool_keeps_its_ranks_and_gives_each_call_the_environment_it_found(pool):
    first = pool.run(hang_detection.pid_and_env, "set by the first call")
    second = pool.run(hang_detection.pid_and_env)
    assert [pid for pid, _ in first] == [pid for pid, _ in second]  # the same processes
    assert [found for _, found in second] == [None, None]  # the first call's change undone


def test_a_rank_slow_but_busy_is_not_hung(pool):
    """Rank 1 computes for 1.5 x STALL_S itself, then waits as long for a busy child process,
    while rank 0 waits in a barrier using no CPU: neither phase is a stall."""
    assert pool.run(hang_detection.one_rank_slow, SLOW_S) == ["done", "done"]
    assert pool.run(hang_detection.one_rank_waits_on_a_busy_child, SLOW_S) == ["done", "done"]


def test_a_rank_that_raises_fails_the_call_once_the_others_stall(pool):
    pids = [pid for pid, _ in pool.run(hang_detection.pid_and_env)]
    with pytest.raises(RankFailed) as failed:
        pool.run(hang_detection.one_rank_raises)
    message = str(failed.value)
    assert "ValueError: rank 1 gave up" in message, message
    assert "ranks [0] hung: no progress for 2 s" in message, message
    assert "in barrier" in message, message  # rank 0's stack: where it waited
    respawned = [pid for pid, _ in pool.run(hang_detection.pid_and_env)]
    assert set(respawned).isdisjoint(pids)  # a failed call takes the pool down


def test_a_stuck_rank_is_declared_hung_with_every_ranks_stack(pool):
    with pytest.raises(RankFailed) as failed:
        pool.run(hang_detection.one_rank_stuck)
    message = str(failed.value)
    assert "ranks [0, 1] hung: no progress for 2 s" in message, message
    rank0, rank1 = message.split("--- rank 0 stacks (faulthandler) ---")[1].split(
        "--- rank 1 stacks (faulthandler) ---")
    assert "in barrier" in rank0 and "in one_rank_stuck" in rank0, rank0
    assert "in wait_for_ever" in rank1 and "in one_rank_stuck" in rank1, rank1


def test_the_stall_window_counts_cpu_not_time():
    stall = watch.Stall(10)
    assert not stall.update(0.0, now=0)
    assert not stall.update(5.0, now=9)  # busy, and the window is not full yet
    assert not stall.update(5.05, now=18)  # 5.05 s of CPU since t=0, the window's start
    assert stall.update(5.05, now=19)  # from t=9 (cpu 5.0): 0.05 s in 10 s, < 1% of a core
    busy = watch.Stall(10)
    assert not any(busy.update(0.2 * t, now=t) for t in range(100))  # 20% of a core: slow
    with pytest.raises(ValueError, match="stall_s must be a positive number of seconds"):
        watch.Stall(0)


def test_a_process_that_ends_takes_nothing_from_the_meter():
    """A finished worker or one of several roots gone from /proc: the others, still working,
    must not look idle (a sum of the live processes' times would drop by the worker's)."""
    busy = subprocess.Popen([sys.executable, "-c", "import time\nend = time.process_time() + 0.5\n"
                             "while time.process_time() < end: pass\nprint('spun', flush=True)\n"
                             "time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    idle = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert busy.stdout.readline() == "spun\n"
        meter = watch.Meter([busy.pid, idle.pid])
        used = meter.total
        assert used >= 0.5
        busy.kill()
        busy.wait()  # reaped: gone from /proc
        assert meter.read() >= used
    finally:
        for proc in (busy, idle):
            proc.kill()
            proc.wait()


def _script(tmp_path, body: str) -> str:
    path = tmp_path / "job.py"
    path.write_text(textwrap.dedent(body))
    return str(path)


def _in_bash(script: str) -> list[str]:
    """bash running the script as a child (``& wait``: bash cannot exec it in its place)."""
    return ["bash", "-c", f"{sys.executable} {script} & wait $!"]


def test_a_stuck_command_is_killed_with_its_stack(tmp_path):
    script = _script(tmp_path, """
        import time

        def wait_for_ever():
            print("waiting", flush=True)
            while True:
                time.sleep(3600)

        wait_for_ever()
    """)
    with pytest.raises(watch.Hung) as hung:
        watch.run(_in_bash(script), stall_s=STALL_S, timeout=60)
    message = str(hung.value)
    assert "made no progress for 2 s" in message, message
    assert "waiting" in message, message  # its output
    assert "in wait_for_ever" in message, message  # its stack, from the grandchild


def test_a_slow_command_busy_in_a_grandchild_runs_to_the_end(tmp_path):
    script = _script(tmp_path, f"""
        import time

        end = time.monotonic() + {SLOW_S}
        while time.monotonic() < end:
            pass
        print("finished")
    """)
    done = watch.run(_in_bash(script), stall_s=STALL_S, timeout=60)
    assert done.returncode == 0 and done.stdout == "finished\n", done
