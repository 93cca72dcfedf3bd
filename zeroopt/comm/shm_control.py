"""The control blocks of the shared-memory bucket collectives (shared_memory.py), and one
group's files: the log of this rank's, the peers' mapped, the names removed once every peer
has mapped them (shm_files.py says why).

A control block is one small /dev/shm file per rank and group, read and written as int64
words: its owner posts collectives there and logs the files it makes; peer r writes only its
own column (opened, seen, and the acknowledgements of the owner's posts).

Lifetime (``track``): a transport that is freed while some peer has not mapped all its files
(a peer may still be reading its last gather) hands its ``Files`` on to a list of retired
ones. Every ``SWEEP_S`` a collective of any transport also sweeps the others, live and retired
(mapping their peers' new files, removing the names every peer has mapped), so that one idle
or abandoned (an error mid-collective) leaves no names behind for long. At exit (atexit) this
process waits up to ``EXIT_WAIT_S`` for its live peers to map what they have not yet, then
removes its names but those a live peer may still need (that peer removes them once mapped,
or at its own exit, once this process is gone).
"""

from __future__ import annotations

import atexit
import gc
import mmap
import os
import time
import weakref

import torch

from . import shm_files

# Control block layout, in int64 words. The owner writes the header, the log and the posts;
# peer r writes only its own column: OPENED[r], SEEN[r] and ACKS[slot][r].
MAGIC = 0x7A65726F73686D31  # "zeroshm1"
HEADER = 8  # [magic, slots, world, log count, ...]
LOG_ENTRIES = 1024
SLOTS = 1024  # posts in flight at once, at most (a post waits for its slot's previous one)
POST_WORDS = 8  # [sequence, kind, file n, byte offset, numel, dtype code, -, -]
REDUCE, GATHER = 1, 2  # a post's kind
KINDS = {REDUCE: "reduce", GATHER: "gather"}
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32,
          torch.int16, torch.int8, torch.uint8, torch.bool, torch.complex64, torch.complex128]
CODES = {dtype: code for code, dtype in enumerate(DTYPES, 1)}  # a post's dtype code

class Control:
    """A rank's control block: its posts, the peers' acknowledgements, and the log of the
    files it made (see the module docstring). One mapping, read and written as int64 words
    (aligned 8-byte accesses, each whole on x86-64).

    Args:
        mapping: the block's mapping (``nbytes(world)`` bytes).
        world: the group's size.
    """

    def __init__(self, mapping: mmap.mmap, world: int):
        self.mapping, self.world = mapping, world
        self.words = memoryview(mapping).cast("q")
        self.opened = HEADER
        self.seen = self.opened + world
        self.log_at = self.seen + world
        self.posts = self.log_at + LOG_ENTRIES
        self.acks = self.posts + SLOTS * POST_WORDS

    @staticmethod
    def nbytes(world: int) -> int:
        """The block's size for a group of ``world`` ranks."""
        return 8 * (HEADER + 2 * world + LOG_ENTRIES + SLOTS * (POST_WORDS + world))

    def initialise(self, owner: int) -> None:
        """The owner's header, the magic word last (a peer reads the block once it is set);
        the owner's own columns count as having seen and opened everything."""
        w = self.words
        w[1], w[2], w[3] = SLOTS, self.world, 0
        w[self.seen + owner], w[self.opened + owner] = 1 << 62, 1
        w[0] = MAGIC

    def ready(self) -> bool:
        """Whether the owner has initialised the block for this group's size."""
        w = self.words
        if w[0] != MAGIC:
            return False
        if (w[1], w[2]) != (SLOTS, self.world):
            raise RuntimeError(f"zeroopt: a shared-memory control block of {w[1]} slots for "
                               f"{w[2]} ranks where {SLOTS} for {self.world} were expected: "
                               "every rank must run the same zeroopt")
        return True

    # -- posts ----------------------------------------------------------------------------

    def post(self, seq: int, fields: tuple[int, ...]) -> None:
        """Publish collective ``seq``: its fields first, then the sequence number."""
        base, w = self.posts + (seq % SLOTS) * POST_WORDS, self.words
        for i, value in enumerate(fields, 1):
            w[base + i] = value
        w[base] = seq

    def posted(self, seq: int) -> tuple[int, ...] | None:
        """The fields of collective ``seq``, once posted."""
        base, w = self.posts + (seq % SLOTS) * POST_WORDS, self.words
        if w[base] != seq:
            return None
        return tuple(w[base + 1:base + 6])

    def ack(self, seq: int, rank: int) -> None:
        """Peer ``rank`` has read post ``seq`` (written by that peer only)."""
        self.words[self.acks + (seq % SLOTS) * self.world + rank] = seq

    def acked(self, seq: int, rank: int) -> bool:
        """Whether peer ``rank`` has read post ``seq`` (or a later one in its slot)."""
        return self.words[self.acks + (seq % SLOTS) * self.world + rank] >= seq

    # -- the log of files, and who has mapped what --------------------------------------------

    def log_count(self) -> int:
        """Entries logged so far."""
        return self.words[3]

    def log_entry(self, i: int) -> int:
        """Entry ``i`` (a file's count)."""
        return self.words[self.log_at + i % LOG_ENTRIES]

    def log(self, n: int) -> int | None:
        """Log file ``n``; its entry's index, or None if the log is full (peers behind)."""
        count = self.words[3]
        if count - min(self.words[self.seen + r] for r in range(self.world)) >= LOG_ENTRIES:
            return None
        self.words[self.log_at + count % LOG_ENTRIES] = n
        self.words[3] = count + 1
        return count

    def mark_seen(self, rank: int, count: int) -> None:
        """Peer ``rank`` has mapped the first ``count`` logged files."""
        self.words[self.seen + rank] = count

    def seen_by_all(self, i: int) -> bool:
        """Whether every peer has mapped logged file ``i``."""
        return all(self.words[self.seen + r] > i for r in range(self.world))

    def mark_opened(self, rank: int) -> None:
        """Peer ``rank`` has mapped this block."""
        self.words[self.opened + rank] = 1

    def opened_by_all(self) -> bool:
        """Whether every peer has mapped this block."""
        return all(self.words[self.opened + r] for r in range(self.world))


class Files:
    """One group's files, from this rank's side: its own control block and the files it
    logs there, the peers' blocks and files as it maps them, and the names to remove.

    Args:
        rank: this rank's place in the group.
        prefixes: every rank's file prefix (shm_files.py), by rank.
        pids: every rank's (pid, start time) (``shm_files.alive``), by rank.
        block_name: the control blocks' name after the prefix (the same for every rank).
    """

    def __init__(self, rank: int, prefixes: list[str], pids: list[tuple], block_name: str):
        self.rank, self.world, self.prefixes, self.pids = rank, len(prefixes), prefixes, pids
        self.block_name = block_name
        _, mapping = shm_files.create(Control.nbytes(self.world), "a control block", block_name)
        self.mine = Control(mapping, self.world)
        self.mine.initialise(rank)
        self.block_named = True
        self.peers: list[Control | None] = [None] * self.world
        self.maps: list[dict[int, torch.Tensor]] = [{} for _ in range(self.world)]
        self.logged = [0] * self.world  # peers' log entries mapped so far
        self.own_due: list[tuple[int, int]] = []  # (log index, n): my names to remove
        self.peer_due: list[tuple[int, int, int]] = []  # (peer, log index, n): theirs
        self.backlog: list[int] = []  # files not yet logged (the log was full)

    def dead(self) -> list[int]:
        """The peers whose processes have died."""
        return [j for j in range(self.world)
                if j != self.rank and not shm_files.alive(*self.pids[j])]

    def open_peers(self) -> bool:
        """Map every peer's control block now (construction: they all exist by then);
        whether every one was there (else the ranks do not share /dev/shm)."""
        return all(self.peer(j) is not None for j in range(self.world) if j != self.rank)

    def close(self) -> None:
        """Remove this rank's control block's name (the group will not use it)."""
        shm_files.remove(shm_files.path(self.prefixes[self.rank], self.block_name))

    def log(self, n: int) -> None:
        """Log this rank's new file ``n`` (later, if the log is full)."""
        i = None if self.backlog else self.mine.log(n)
        if i is None:
            self.backlog.append(n)
        else:
            self.own_due.append((i, n))

    def peer(self, j: int) -> Control | None:
        """Peer ``j``'s control block, mapped on first use (None until it exists)."""
        block = self.peers[j]
        if block is None:
            where = shm_files.path(self.prefixes[j], self.block_name)
            mapping = shm_files.open_peer(where)
            if mapping is None:
                return None
            block = Control(mapping, self.world)
            if not block.ready():
                return None
            block.mark_opened(self.rank)
            self.peers[j] = block
            if block.opened_by_all():
                shm_files.remove(where)
        return block

    def sync(self, j: int) -> None:
        """Map the files peer ``j`` has logged since last time; remove the names every peer
        has mapped."""
        block = self.peer(j)
        if block is not None and block.log_count() > self.logged[j]:
            count = block.log_count()
            for i in range(self.logged[j], count):
                n = block.log_entry(i)
                mapping = shm_files.open_peer(shm_files.path(self.prefixes[j], n))
                if mapping is not None:  # None: freed before we looked; never posted then
                    self.maps[j][n] = torch.frombuffer(mapping, dtype=torch.uint8)
                self.peer_due.append((j, i, n))
            self.logged[j] = count
            block.mark_seen(self.rank, count)
        if self.peer_due:
            self.peer_due = [(k, i, n) for k, i, n in self.peer_due
                             if not _removed(self.peers[k].seen_by_all(i), self.prefixes[k], n)]

    def sweep(self) -> None:
        """Map the peers' new files, log what waited, remove the names every peer has
        mapped (the last one to map a file removes it too; this catches a race of two)."""
        for j in range(self.world):
            if j != self.rank:
                self.sync(j)
        while self.backlog and (i := self.mine.log(self.backlog[0])) is not None:
            self.own_due.append((i, self.backlog.pop(0)))
        mine = self.prefixes[self.rank]
        if self.own_due:
            self.own_due = [(i, n) for i, n in self.own_due
                            if not _removed(self.mine.seen_by_all(i), mine, n)]
        if self.block_named and self.mine.opened_by_all():
            shm_files.remove(shm_files.path(mine, self.block_name))
            self.block_named = False

    def unseen(self) -> set[str]:
        """The names of this rank's files some peer has not mapped yet (and still there)."""
        mine = self.prefixes[self.rank]
        names = {shm_files.path(mine, n) for _, n in self.own_due}
        names |= {shm_files.path(mine, n) for n in self.backlog}
        if self.block_named:
            names.add(shm_files.path(mine, self.block_name))
        return {name for name in names if shm_files.named(name)}

    def view(self, j: int, n: int, offset: int, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """``numel`` elements of ``dtype`` at ``offset`` bytes into peer ``j``'s file ``n``.

        Raises:
            RuntimeError: the file's name is gone before this rank mapped it.
        """
        maps = self.maps[j]
        if n not in maps:
            self.sync(j)
        if n not in maps:  # not logged yet (the log was full), or another group's
            where = shm_files.path(self.prefixes[j], n)
            mapping = shm_files.open_peer(where)
            if mapping is None:
                raise RuntimeError(
                    f"zeroopt: a peer's shared-memory file {where} is gone: a buffer one "
                    "Collectives object allocated was used by another after every peer had "
                    "mapped it, or /dev/shm was cleaned while the job ran")
            maps[n] = torch.frombuffer(mapping, dtype=torch.uint8)
        return maps[n][offset:offset + numel * dtype.itemsize].view(dtype)


def _removed(seen_by_all: bool, owner_prefix: str, n: int) -> bool:
    if seen_by_all:
        shm_files.remove(shm_files.path(owner_prefix, n))
    return seen_by_all


# -- the files' lifetime ---------------------------------------------------------------------

EXIT_WAIT_S = 2.0
SWEEP_S = 0.1  # how often a launch also sweeps the other transports' files

_live: weakref.WeakSet = weakref.WeakSet()  # every transport's Files, while it or its retiree lives
_retired: list[Files] = []  # freed transports' files that some live peer has not mapped
_swept = [0.0]  # when the others were last swept


def _forked() -> None:  # a forked child (a DataLoader worker) takes no part in the groups
    _live.clear()
    _retired.clear()


os.register_at_fork(after_in_child=_forked)


def track(owner, files: Files) -> None:
    """Sweep ``files`` with the others, and retire them when ``owner`` (their transport) is
    freed with names some peer has not mapped yet."""
    _live.add(files)
    weakref.finalize(owner, _retire, files).atexit = False


def _retire(files: Files) -> None:
    if files.unseen():
        _retired.append(files)


def sweep_others() -> None:
    """At most every ``SWEEP_S``: sweep every group's files; drop the retired ones every peer
    has mapped (or whose peer died: their names and the dead peer's are removed)."""
    if time.monotonic() - _swept[0] < SWEEP_S:
        return
    _swept[0] = time.monotonic()
    for files in list(_live):
        if files not in _retired:
            files.sweep()
    for files in list(_retired):
        dead = files.dead()
        if not dead:
            files.sweep()
        if dead or not files.unseen():
            for j in dead:
                shm_files.remove_all(files.prefixes[j])
            for name in files.unseen():
                shm_files.remove(name)
            _retired.remove(files)


@atexit.register
def leave() -> None:
    """Remove this process's names, as at exit (see the module docstring); registered with
    atexit, and for a process that leaves with ``os._exit`` to call first (a test harness's
    ranks). Waits up to ``EXIT_WAIT_S`` for live peers; calling it again is harmless."""
    # Free what only the cycle collector would (an optimizer and its buffers) while the
    # interpreter still runs: their finalizers remove names and retire transports before
    # the choice below. It also spares torch the same collection during finalization, where
    # a gloo worker thread that still releases a tensor cannot take the GIL and aborts the
    # process ("terminate called without an active exception"; seen in ~1 exit in 4).
    gc.collect()
    groups = list(_live)
    deadline = time.monotonic() + EXIT_WAIT_S
    while time.monotonic() < deadline:
        waiting = [f for f in groups if f.unseen() and not f.dead()]
        if not waiting:
            break
        for files in waiting:
            files.sweep()
        time.sleep(1e-3)
    keep: set[str] = set()
    for files in groups:
        dead = files.dead()
        for j in dead:
            shm_files.remove_all(files.prefixes[j])
        if not dead:
            keep |= files.unseen()
    shm_files.remove_created(keep)
