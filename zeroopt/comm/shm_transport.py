"""The shared-memory transport of one group: posting, reading and waiting (shared_memory.py
describes the protocol; shm_control.py the control blocks, the files and their lifetime).
"""

from __future__ import annotations

import contextlib
import functools
import os
import time
import warnings
from typing import Callable

import torch

from . import shm_control, shm_files
from .deadline import timed_out
from .shm_control import CODES, DTYPES, GATHER, KINDS, REDUCE, SLOTS, Files

SPINS = 64  # sched_yield rounds before a wait sleeps
PAUSE_MAX, LONG_WAIT_S, LONG_PAUSE = 1e-3, 1.0, 10e-3  # sleeps: up to 1 ms; 10 ms after 1 s
CHECK_S = 0.5  # how often a wait checks that the peers live

# The transport's own copies and sums are not the user's torch calls: torch function modes
# (param_gather.py's guard, which waits for pending buckets) must not see them, or a copy into
# a bucket would wait for that very bucket.
_NO_MODES = getattr(torch._C, "DisableTorchFunction", contextlib.nullcontext)


def _unobserved(method):
    """``method`` run with torch function modes off (see above)."""

    @functools.wraps(method)
    def run(*args, **kwargs):
        """``method(*args, **kwargs)`` with no torch function mode active."""
        with _NO_MODES():
            return method(*args, **kwargs)
    return run


class _Box:
    """A shared buffer of this rank's (an outbox, or a scratch buffer), free once every peer
    has read its latest post ``last``."""

    def __init__(self, n: int, data: torch.Tensor):
        self.n, self.data, self.last = n, data, 0


class SharedMemory:
    """The shared-memory transport of one group (``shared_memory.join`` makes it).

    Args:
        rank: this rank's place in the group.
        ranks: every rank's rank in the job (for messages).
        pids: every rank's (pid, start time) (``shm_files.alive``).
        prefixes: every rank's file prefix.
        token: the group's token (its control blocks' name).
    """

    def __init__(self, rank: int, ranks: list[int], pids: list[tuple], prefixes: list[str],
                 token: str):
        self.rank, self.world, self.ranks, self.pids = rank, len(ranks), ranks, pids
        self.prefixes = prefixes
        self.others = [(rank + i) % self.world for i in range(1, self.world)]
        self.files = Files(rank, prefixes, pids, f"c{token}")
        self.seq = 0
        self.pending: list = []  # handles not finished, in launch order
        self.outboxes: dict[tuple[int, int], _Box] = {}
        self.boxes: list[_Box] = []  # scratch buffers and outboxes of other buckets
        self.moved = 0  # counts every step any handle took (a wait's timeout restarts)
        self.warned = False
        shm_control.track(self, self.files)

    def takes(self, bucket: torch.Tensor) -> bool:
        """Whether this transport runs ``bucket``'s collectives (a non-empty CPU tensor of a
        known dtype: the same answer on every rank). Others take the ring."""
        return bucket.device.type == "cpu" and bucket.dtype in CODES and bucket.numel() > 0

    def allocate(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """A zero-filled 1-D tensor in a new shared file (``Collectives.allocate``); in
        private memory, with a warning, when /dev/shm has no room (its buckets then go
        through shared scratch buffers)."""
        if numel == 0:
            return torch.zeros(0, dtype=dtype)
        try:
            t, n = shm_files.tensor(numel, dtype, "a bucket buffer", remove_at_death=True)
        except RuntimeError as error:
            if not self.warned:
                warnings.warn(f"{error}. This buffer and later ones that do not fit are in "
                              "private memory: their buckets are copied through shared "
                              "scratch buffers", RuntimeWarning, stacklevel=3)
                self.warned = True
            return torch.zeros(numel, dtype=dtype)
        self.files.log(n)
        return t

    def reduce(self, comm, bucket: torch.Tensor) -> _Reduce:
        """Start a reduce of ``bucket`` (``Collectives.reduce_bucket``); ``comm.timeout``
        bounds its waits."""
        return _Reduce(self, comm, bucket)

    def gather(self, comm, bucket: torch.Tensor) -> _Gather:
        """Start a gather of ``bucket`` (``Collectives.gather_bucket``)."""
        return _Gather(self, comm, bucket)

    # -- posts and acknowledgements ----------------------------------------------------

    def _launch(self) -> int:
        self.files.sweep()
        shm_control.sweep_others()
        self.seq += 1
        return self.seq

    def _post(self, comm, seq: int, fields: tuple[int, ...]) -> None:
        if seq > SLOTS:  # the slot's previous post must have been read by every peer
            old = seq - SLOTS
            self._block(lambda: self._acked_by_all(old), comm,
                        "a free slot in the shared-memory control block",
                        lambda: self._first_unacked(old))
        self.files.mine.post(seq, fields)

    def _acked_by_all(self, seq: int) -> bool:
        return all(self.files.mine.acked(seq, r) for r in self.others)

    def _first_unacked(self, seq: int) -> int | None:
        return next((r for r in self.others if not self.files.mine.acked(seq, r)), None)

    def _posted(self, j: int, seq: int, kind: int, numel: int, dtype) -> tuple[int, int] | None:
        """(file, byte offset) of peer ``j``'s post ``seq``, once posted."""
        block = self.files.peer(j)
        fields = block.posted(seq) if block is not None else None
        if fields is None:
            return None
        their_kind, n, offset, their_numel, code = fields
        if (their_kind, their_numel, code) != (kind, numel, CODES[dtype]):
            theirs = DTYPES[code - 1] if 0 < code <= len(DTYPES) else code
            raise RuntimeError(
                f"zeroopt: the ranks' bucket collectives differ: collective {seq} of this "
                f"group is a {KINDS[kind]} of {numel} {dtype} elements on rank "
                f"{self.ranks[self.rank]}, a {KINDS.get(their_kind)} of {their_numel} "
                f"{theirs} elements on rank {self.ranks[j]}: every rank must launch the same "
                "bucket collectives in the same order (the same params, buckets and calls)")
        return n, offset

    def _ack(self, j: int, seq: int) -> None:
        self.files.peers[j].ack(seq, self.rank)
        self.moved += 1

    # -- shared buffers ------------------------------------------------------------------

    def _new_box(self, nbytes: int, what: str) -> _Box:
        data, n = shm_files.tensor(nbytes, torch.uint8, what)
        self.files.log(n)
        return _Box(n, data)

    def _box(self, nbytes: int) -> _Box:
        """A free pooled buffer of at least ``nbytes`` (the smallest), else a new one (free
        ones too small for it are dropped: the pool holds what is in flight at once)."""
        free = [b for b in self.boxes if self._acked_by_all(b.last)]
        fits = [b for b in free if b.data.numel() >= nbytes]
        if fits:
            return min(fits, key=lambda b: b.data.numel())
        self.boxes = [b for b in self.boxes if b not in free]
        self.boxes.append(self._new_box(nbytes, "a shared scratch buffer"))
        return self.boxes[-1]

    def _outbox(self, comm, bucket: torch.Tensor, nbytes: int) -> _Box:
        """The outbox of a param bucket (one per bucket of an allocated buffer; pooled for
        other tensors), once every peer has read its previous post."""
        if shm_files.locate(bucket) is None:
            return self._box(nbytes)
        key = (bucket.data_ptr(), nbytes)
        box = self.outboxes.get(key)
        if box is None:
            box = self.outboxes[key] = self._new_box(nbytes, "a param bucket's outbox")
        self._block(lambda: self._acked_by_all(box.last), comm,
                    "the peers' reading of this bucket's previous gather",
                    lambda: self._first_unacked(box.last))
        return box

    # -- waiting -------------------------------------------------------------------------

    def _block(self, done: Callable[[], bool], comm, what: str,
               waiting_on: Callable[[], int | None]) -> None:
        """Until ``done()``: move every pending handle on, spin with ``sched_yield``, then
        sleep (up to ``PAUSE_MAX``, ``LONG_PAUSE`` after ``LONG_WAIT_S``).

        Raises:
            CollectiveTimeout: ``comm.timeout`` seconds passed with nothing moving.
            RuntimeError: a peer's process has died.
        """
        timeout, spins, pause = comm.timeout, 0, 0.0
        start = last = time.monotonic()
        moved, check = self.moved, start + CHECK_S
        while not done():
            for handle in list(self.pending):
                handle._advance()
            now = time.monotonic()
            if self.moved != moved:
                moved, last = self.moved, now
            if now >= check:
                self._check_peers(what)
                self.files.sweep()
                check = now + CHECK_S
            if timeout is not None and now - last > timeout:
                peer = waiting_on()
                raise timed_out(timeout, what, None if peer is None else self.ranks[peer])
            if spins < SPINS:
                spins += 1
                os.sched_yield()
            else:
                time.sleep(pause)
                pause = LONG_PAUSE if now - start > LONG_WAIT_S else \
                    min(PAUSE_MAX, max(2 * pause, 2e-5))

    def _check_peers(self, what: str) -> None:
        dead = self.files.dead()
        for j in dead:
            shm_files.remove_all(self.prefixes[j])
        if dead:
            j = dead[0]
            raise RuntimeError(
                f"zeroopt: rank {self.ranks[j]} (pid {self.pids[j][0]}) has died; rank "
                f"{self.ranks[self.rank]} was waiting in {what}. Its shared-memory files "
                "are removed; look for its error (this rank cannot go on without it)")


class _Reduce:
    """A reduce in flight (a ``Handle``; see the module docstring)."""

    @_unobserved
    def __init__(self, shm: SharedMemory, comm, bucket: torch.Tensor):
        self.shm, self.comm, self.dtype, self.numel = shm, comm, bucket.dtype, bucket.numel()
        rank = shm.rank
        self.mine = bucket.chunk(shm.world)[rank]
        self.chunk = self.mine.numel()
        self.seq = shm._launch()
        where = shm_files.locate(bucket)
        if where is None:  # not in a shared buffer: the other chunks go through scratch
            box = shm._box(bucket.nbytes)
            scratch = box.data[:bucket.nbytes].view(self.dtype)
            lo, hi = rank * self.chunk, (rank + 1) * self.chunk
            scratch[:lo].copy_(bucket[:lo])
            scratch[hi:].copy_(bucket[hi:])
            box.last, where = self.seq, (box.n, 0)
        shm._post(comm, self.seq, (REDUCE, where[0], where[1], self.numel, CODES[self.dtype]))
        self.next, self.held, self.sum, self.done = 0, None, None, False
        shm.pending.append(self)

    @_unobserved
    def _advance(self) -> bool:
        if self.done:
            return True
        shm, order, seq = self.shm, self.shm.others, self.seq
        while self.next < len(order):
            j = order[self.next]
            at = shm._posted(j, seq, REDUCE, self.numel, self.dtype)
            if at is None:
                return False
            offset = at[1] + shm.rank * self.chunk * self.dtype.itemsize
            theirs = shm.files.view(j, at[0], offset, self.chunk, self.dtype)
            if len(order) == 1:
                self.mine.add_(theirs)
                shm._ack(j, seq)
            elif self.held is None and self.sum is None:  # summed with the next one
                self.held = (j, theirs)
            elif self.sum is None:
                self.sum = torch.add(theirs, self.held[1])
                shm._ack(self.held[0], seq)
                shm._ack(j, seq)
                self.held = None
            else:
                self.sum.add_(theirs)
                shm._ack(j, seq)
            self.next += 1
            if self.next == len(order) and self.sum is not None:
                self.mine.add_(self.sum)
                self.sum = None
        if not shm._acked_by_all(seq):  # the peers are still reading this rank's chunks
            return False
        self.done = True
        shm.pending.remove(self)
        return True

    def _waiting_on(self) -> int | None:
        order = self.shm.others
        return order[self.next] if self.next < len(order) else \
            self.shm._first_unacked(self.seq)

    def is_completed(self) -> bool:
        """Move on as far as the peers allow, without blocking; whether it has finished."""
        return self._advance()

    def wait(self) -> None:
        """Block until this rank's chunk holds the sum and every peer has read this rank's
        chunks (``SharedMemory._block``'s errors)."""
        if not self._advance():
            self.shm._block(self._advance, self.comm,
                            "a shared-memory reduce of a gradient bucket", self._waiting_on)


class _Gather:
    """A gather in flight (a ``Handle``; see the module docstring)."""

    @_unobserved
    def __init__(self, shm: SharedMemory, comm, bucket: torch.Tensor):
        self.shm, self.comm, self.dtype = shm, comm, bucket.dtype
        self.chunks = bucket.chunk(shm.world)
        self.chunk = self.chunks[shm.rank].numel()
        self.seq = shm._launch()
        nbytes = self.chunk * self.dtype.itemsize
        box = shm._outbox(comm, bucket, nbytes)
        box.data[:nbytes].view(self.dtype).copy_(self.chunks[shm.rank])
        box.last = self.seq
        shm._post(comm, self.seq, (GATHER, box.n, 0, self.chunk, CODES[self.dtype]))
        self.next, self.done = 0, False
        shm.pending.append(self)

    @_unobserved
    def _advance(self) -> bool:
        if self.done:
            return True
        shm, order = self.shm, self.shm.others
        while self.next < len(order):
            j = order[self.next]
            at = shm._posted(j, self.seq, GATHER, self.chunk, self.dtype)
            if at is None:
                return False
            self.chunks[j].copy_(shm.files.view(j, at[0], at[1], self.chunk, self.dtype))
            shm._ack(j, self.seq)
            self.next += 1
        self.done = True
        shm.pending.remove(self)
        return True

    def _waiting_on(self) -> int | None:
        return self.shm.others[self.next] if self.next < len(self.shm.others) else None

    def is_completed(self) -> bool:
        """Copy what the peers have posted, without blocking; whether it has finished."""
        return self._advance()

    def wait(self) -> None:
        """Block until every chunk holds its owner's (``SharedMemory._block``'s errors)."""
        if not self._advance():
            self.shm._block(self._advance, self.comm,
                            "a shared-memory all-gather of a param bucket", self._waiting_on)
