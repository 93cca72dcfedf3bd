"""How long zeroopt waits for a collective: ``timeout=`` on ZeroOptimizer and init_distributed.

A rank that hangs or dies leaves the others waiting in their next collective. torch.distributed
gives up after the process group's timeout (30 minutes by default: ``init_process_group(
timeout=...)``); MPI never does. With ``timeout=`` set, every wait zeroopt makes (a bucket's
reduce or gather, a ring's step, an all-reduce, a broadcast, the construction check) gives up
after that many seconds with ``CollectiveTimeout``, which says which rank was being waited on
where that is known. The bound is per wait: a collective that keeps making progress (a ring
whose steps each finish in time) is not cut short.
"""

from __future__ import annotations

import datetime
import math
import numbers
import threading
import time
from typing import Callable


class CollectiveTimeout(RuntimeError):
    """A collective did not finish within the ``timeout=`` the optimizer was given."""


def seconds(timeout) -> float | None:
    """``timeout`` as seconds.

    Args:
        timeout: None (no bound of zeroopt's own), a positive number of seconds, or a
            ``datetime.timedelta``.

    Returns:
        The timeout in seconds, or None.

    Raises:
        TypeError: not None, a number or a timedelta.
        ValueError: not positive and finite.
    """
    if timeout is None:
        return None
    if isinstance(timeout, datetime.timedelta):
        value = timeout.total_seconds()
    elif isinstance(timeout, numbers.Real) and not isinstance(timeout, bool):
        value = float(timeout)
    else:
        raise TypeError(f"timeout must be None, a number of seconds or a datetime.timedelta, "
                        f"got {timeout!r} ({type(timeout).__name__})")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r} (None "
                         "waits as long as the process group does)")
    return value


def timed_out(timeout: float, what: str, peer: int | None = None) -> CollectiveTimeout:
    """The error for a wait that ran out.

    Args:
        timeout: the timeout, in seconds.
        what: the collective waited for, in words.
        peer: the rank waited on (its number in the job), if known.

    Returns:
        The ``CollectiveTimeout`` to raise; its message names the timeout, the collective,
        the rank, and what to do.
    """
    who = (f"rank {peer} (or a rank it waits on) may be hung or dead" if peer is not None
           else "another rank may be hung or dead")
    return CollectiveTimeout(
        f"zeroopt: a collective ({what}) did not finish within {timeout:g} s (timeout="
        f"{timeout:g}): {who}, or have stopped making the optimizer's calls (every rank must "
        "run the same backward, step(), clip_grad_norm_() and state_dict() calls). Look for an "
        "error on that rank; if it is only slow (a long first step, a checkpoint written by "
        "one rank), pass a larger timeout=.")


def poll_until(done: Callable[[], bool], timeout: float, what: str,
               peer: int | None = None) -> None:
    """Call ``done()`` until it returns True, for at most ``timeout`` seconds (MPI's waits
    take no timeout, and torch's Work.wait(timeout) is not honoured by every gloo collective,
    so requests are tested until a deadline).

    Args:
        done: tests the requests without blocking.
        timeout: seconds.
        what, peer: as ``timed_out`` takes them, for the error.

    Raises:
        CollectiveTimeout: ``done()`` was still False after ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    pause = 0.0
    while not done():
        if time.monotonic() > deadline:
            raise timed_out(timeout, what, peer)
        # Spin briefly (a message is usually moments away), then back off to 1 ms.
        time.sleep(pause)
        pause = min(1e-3, pause * 2 or 1e-5)


def wait_in_thread(wait: Callable[[], object], timeout: float, what: str,
                   peer: int | None = None) -> None:
    """Run ``wait()`` (a blocking wait that takes no timeout and has no working test) on a
    helper thread, for at most ``timeout`` seconds. A wait that runs out leaves its thread
    blocked (a daemon: it does not hold up the exit).

    Args:
        wait: the blocking wait.
        timeout: seconds.
        what, peer: as ``timed_out`` takes them, for the error.

    Raises:
        CollectiveTimeout: ``wait()`` had not returned after ``timeout`` seconds.
        Exception: what ``wait()`` raised.
    """
    done, failed = threading.Event(), []

    def run() -> None:
        try:
            wait()
        except BaseException as error:  # noqa: BLE001 - raised on the caller's thread
            failed.append(error)
        finally:
            done.set()

    threading.Thread(target=run, name="zeroopt-wait", daemon=True).start()
    if not done.wait(timeout):
        raise timed_out(timeout, what, peer)
    if failed:
        raise failed[0]
