"""Bucket collectives through shared memory, for the ranks of one host (gloo, CPU tensors).

Why: gloo moves buckets over loopback TCP, and on CPU the cores that compute also copy the
bytes through the kernel's sockets, so overlap cannot hide the cost. Here a rank reads its
peers' chunks straight from their memory: a reduce is W-1 adds, a gather W-1 copies.

When: ``ZEROOPT_BUCKET_COLLECTIVES`` unset ("auto") picks it for a gloo group of W > 1 whose
ranks are all on this host (hostname, boot id, process namespace and /dev/shm instance
compared), on x86-64, with /dev/shm writable and ``AUTO_MIN_FREE`` free on every rank; the
ring (ring.py) otherwise. "shared_memory" forces it (an error naming the reason where it
cannot work), "ring" forces the ring. The group decides at its first bucket collective or
``allocate`` (``Choice``), in two small gathers and a barrier (which the optimizer's
``timeout`` bounds, after its construction check has seen every rank there): that first call
is a collective of the whole group. CUDA tensors take the ring.

How (shm_transport.py): ``allocate`` puts the flat param buffers and gradient staging buffers
in /dev/shm files (shm_files.py), which the peers map. Each rank has a small control block
(shm_control.py) where it posts "collective s is at (file, offset, numel, dtype)";
collectives are numbered in launch order, the same on every rank (the callers guarantee it).

- reduce: post the bucket. Waiting: for each peer j in the order r+1, r+2, ..., r-1, once j
  has posted s, read j's chunk ``rank`` from j's file and acknowledge it in j's block (each
  rank writes only its own column there). Chunk r becomes x_r + (x_{r-1} + (... + (x_{r+2} +
  x_{r+1}))), the ring's order of additions (ring.py), so the result is the ring's bit for bit
  at every W and dtype. Then wait until every peer has acknowledged reading this rank's post,
  so the buffer may be overwritten. A bucket not inside an allocated buffer goes through a
  shared scratch buffer (its other chunks copied there).
- gather: at launch copy this rank's chunk into the bucket's shared *outbox* (after every
  peer has read the outbox's previous post) and post it; waiting copies each peer's outbox
  chunk into the bucket and acknowledges it. An outbox, not the live params: the owner writes
  its params at the next step, and a peer may read late (gathers overlap the next forward).

Handles may be waited in any order and more than once; ``is_completed()`` moves a handle on
without blocking, and a blocking wait moves every pending handle on. Waiting spins with
``sched_yield`` briefly, then sleeps with a growing pause up to 1 ms (10 ms after a second:
two ranks on two cores, a busy spin would take the peer's core, and a long wait should look
idle to a hang detector). With ``timeout`` set it raises ``CollectiveTimeout`` when nothing has
moved for that long; every 0.5 s it checks the peers' processes, and a dead one raises a
RuntimeError naming it (and its files are removed). shm_files.py says when the files' names
go, and what a crashed job leaves in /dev/shm.

Measured (benchmarks/bench_zero.py, 24 x Linear(1024, 1024), 25.2M fp32 params, W=2 on a
2-core AMD EPYC, 1 thread per rank, idle; ``ZEROOPT_BUCKET_COLLECTIVES=ring`` then unset, one
after the other, fastest of 2 rounds): zeroopt stage 1 went from 0.217 to 0.143 s per
iteration and stage 2 from 0.208 to 0.134 s (0.97x/0.93x DDP with fused AdamW in the same run
before, 0.60x/0.56x after). In stage 1's breakdown backward went from 110 to 68 ms (the
TCP copies no longer take the cores backward computes on), the reduction wait from 13.6 to
9.1 ms and the gather wait from 28.2 to 4.8 ms; the step's collectives alone ("communication
only") from 86 to 21 ms, against 132-139 ms for compute alone: the iteration is within 1.1x
of that floor.

Why it is correct: data is written, then the post's sequence number (or an acknowledgement);
x86-64 cores see one core's stores in the order they were made (TSO), and each int64 word is
written whole, so a peer that reads the number reads the data after it. Elsewhere "auto"
keeps the ring.
"""
from __future__ import annotations

import os
import platform
import secrets
import socket

from . import shm_files
from .shm_transport import SharedMemory

AUTO_MIN_FREE = 1 << 30  # "auto" wants this much free in /dev/shm (docker's 64 MiB: the ring)
_X86 = {"x86_64", "amd64", "AMD64", "x64"}  # 64-bit: each int64 word is stored whole


class Choice:
    """``ZEROOPT_BUCKET_COLLECTIVES`` for one group, and its shared-memory transport, joined at
    the group's first bucket collective or ``allocate`` (not at construction: by then the
    optimizer has checked that every rank is there, and its ``timeout`` bounds the gathers).
    Shared by the copies ``with_timeout`` makes.

    Args:
        choice: the variable's value ("auto" where unset).
    """

    def __init__(self, choice: str):
        self.choice, self.shm, self.undecided = choice, None, True

    @property
    def joined(self) -> bool:
        """Whether the group's buckets go through shared memory (decided, and yes)."""
        return self.shm is not None

    def sweep(self) -> None:
        """After a collective of the whole group (the peers have logged the files they made
        before it): map the peers' new files, so that their names can go (shm_files.py)
        without waiting for the next bucket collective, which may never come."""
        if self.shm is not None:
            self.shm.files.sweep()

    def transport(self, comm, bucket=None) -> SharedMemory | None:
        """The transport, joined on first use (``join``; a collective then), if it takes
        ``bucket`` (any, where None).

        Raises:
            ValueError, RuntimeError: as ``join``, on every call while it cannot join.
        """
        if self.undecided:
            self.shm = join(comm, self.choice)
            self.undecided = False
        if self.shm is None or (bucket is not None and not self.shm.takes(bucket)):
            return None
        return self.shm


def join(comm, choice: str) -> SharedMemory | None:
    """The shared-memory transport for ``comm``'s group, if ``choice`` asks for it and it can
    be used. A collective over the group (two gathers and a barrier) unless ``choice`` rules
    shared memory out at once: every rank calls it.

    Args:
        comm: the group's ``TorchDistributed`` (its rank, world size, backend and
            ``all_gather_object``).
        choice: ``ZEROOPT_BUCKET_COLLECTIVES``: "auto" (used when the backend is gloo, W > 1,
            every rank is on this host, the machine is x86-64 and /dev/shm is writable with
            ``AUTO_MIN_FREE`` bytes free on every rank), "shared_memory" (used, or an error),
            anything else (not used).

    Returns:
        A ``SharedMemory``, or None.

    Raises:
        ValueError: "shared_memory" on a backend other than gloo.
        RuntimeError: "shared_memory" where it cannot work (the message says why).
    """
    forced = choice == "shared_memory"
    if not forced and (choice != "auto" or comm.backend != "gloo" or comm.world_size == 1):
        return None
    if comm.backend != "gloo":
        raise ValueError(f"ZEROOPT_BUCKET_COLLECTIVES=shared_memory runs the bucket "
                         f"collectives of gloo groups (CPU); this group's backend is "
                         f"{comm.backend}: unset it")
    facts = comm.all_gather_object(_facts())
    why = refusals(facts, forced)
    if why:
        if forced:
            raise RuntimeError("ZEROOPT_BUCKET_COLLECTIVES=shared_memory cannot work here: "
                               + "; ".join(why) + ". Unset it (auto then picks the ring) or "
                               "set ZEROOPT_BUCKET_COLLECTIVES=ring")
        return None
    token = facts[0]["token"]
    prefixes = [f["prefix"] or f"zeroopt-{token}-r{r}" for r, f in enumerate(facts)]
    shm_files.set_prefix(token, comm.rank)
    shm = SharedMemory(comm.rank, [f["rank"] for f in facts],
                       [(f["pid"], f["start"]) for f in facts], prefixes, token)
    # Once every rank's control block exists (the barrier), map them all, which proves that
    # the ranks share /dev/shm (a second gather says so everywhere) and lets the names go.
    comm.barrier()
    seen = comm.all_gather_object(shm.files.open_peers())
    if all(seen):
        return shm
    shm.files.close()
    if forced:
        raise RuntimeError("ZEROOPT_BUCKET_COLLECTIVES=shared_memory cannot work here: rank(s) "
                           f"{', '.join(str(f['rank']) for f, s in zip(facts, seen) if not s)} "
                           f"cannot see the other ranks' files in {shm_files.DIRECTORY}. Unset "
                           "it (auto then picks the ring) or set ZEROOPT_BUCKET_COLLECTIVES=ring")
    return None


def _facts() -> dict:
    """What decides whether the ranks can share memory, and how to reach this one."""
    import torch.distributed as dist

    try:
        boot = open("/proc/sys/kernel/random/boot_id").read().strip()
    except OSError:
        boot = None
    try:
        pidns = os.readlink("/proc/self/ns/pid")
    except OSError:
        pidns = None
    try:  # the tmpfs instance: the same device number for every process that sees it
        device = os.stat(shm_files.DIRECTORY).st_dev
        writable = os.access(shm_files.DIRECTORY, os.W_OK)
    except OSError:
        device, writable = None, False
    return {"host": socket.gethostname(), "boot": boot, "pidns": pidns, "shm": device,
            "writable": writable, "free": shm_files.free_bytes(), "machine": platform.machine(),
            "pid": os.getpid(), "start": shm_files.start_time(os.getpid()),
            "rank": dist.get_rank(), "prefix": shm_files.prefix(), "token": secrets.token_hex(6)}


def refusals(facts: list[dict], forced: bool) -> list[str]:
    """Why the ranks cannot share memory.

    Args:
        facts: every rank's facts, by rank (``host``, ``boot``, ``pidns``, ``shm``: /dev/shm's
            device number, ``writable``, ``free``: bytes free there, ``machine``, ``rank``).
        forced: ``ZEROOPT_BUCKET_COLLECTIVES=shared_memory`` (no minimum free space).

    Returns:
        One sentence per reason, naming the ranks; empty when they can.
    """
    first, why = facts[0], []

    def ranks(test) -> str:
        return ", ".join(str(f["rank"]) for f in facts if test(f))

    checks = [
        (lambda f: f["machine"] not in _X86, "rank(s) {} are not x86-64 (the transport relies "
         "on x86-64's ordered stores)"),
        (lambda f: any(f[k] != first[k] for k in ("host", "boot", "pidns", "shm")),
         f"rank(s) {{}} are not on rank {first['rank']}'s host (hostname {first['host']!r}, "
         "the same boot, process namespace and /dev/shm)"),
        (lambda f: not f["writable"] or f["shm"] is None,
         f"{shm_files.DIRECTORY} is not writable on rank(s) {{}}"),
    ]
    if not forced:
        checks.append((lambda f: f["free"] < AUTO_MIN_FREE, f"{shm_files.DIRECTORY} has under "
                       f"{AUTO_MIN_FREE >> 20} MiB free on rank(s) {{}}"))
    for test, message in checks:
        if ranks(test):
            why.append(message.format(ranks(test)))
    return why


__all__ = ["AUTO_MIN_FREE", "Choice", "SharedMemory", "join", "refusals"]
