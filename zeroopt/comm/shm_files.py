"""The /dev/shm files of the shared-memory bucket collectives (shared_memory.py): making them,
mapping a peer's, the control block's layout, when the names go, and whether a peer lives.

**Names.** ``/dev/shm/zeroopt-<token>-r<rank>-<n>``: ``token`` is drawn by rank 0 of the first
shared-memory group this process joins and agreed in that group's construction gather,
``rank`` is this process's rank in that group, ``n`` counts the files this process made (a
control block is ``...-c<group token>``). All of one process's files share the prefix
``zeroopt-<token>-r<rank>``, which its peers learn at construction.

**When the names go.** A name is needed only until every peer has mapped the file: a mapping
outlives the name, and the memory goes when the last process holding it unmaps it or exits.
So a file's creation is logged in its creator's control block (``Control.log``); each peer maps
the files it finds logged (at its next bucket collective) and the last one to map a file
removes its name (the creator checks too, later). At exit a creator waits up to 2 s for its
live peers to map what they have not yet, then removes its names but those a live peer may
still need (that peer removes them once mapped, or at its own exit once this one is gone:
shm_transport.py); a dead peer's files are removed by the rank that finds it dead
(``remove_all``). So a normal run, and a run whose ranks leave with ``os._exit`` after their
last collective, leave nothing. A job killed as a whole (every rank at once, a crashed node)
leaves the files made after the peers' last collective: usually none, at worst (killed during
construction) the buffers; ``rm -f /dev/shm/zeroopt-*`` while no job runs removes them.
"""

from __future__ import annotations

import itertools
import mmap
import os
import weakref

import torch

DIRECTORY = "/dev/shm"

_state = {"pid": os.getpid(), "prefix": None}
_count = itertools.count(1)
_created: set[str] = set()  # names this process made (removed at exit if still there)
_live: dict[int, tuple[int, int]] = {}  # storage address -> (file n, bytes) of ours


def _forked() -> None:  # a forked child makes files of its own, under another prefix
    _state.update(pid=os.getpid(), prefix=None)
    _created.clear()
    _live.clear()


os.register_at_fork(after_in_child=_forked)


def prefix() -> str | None:
    """This process's file prefix (None until it joins its first shared-memory group)."""
    return _state["prefix"]


def set_prefix(token: str, rank: int) -> str:
    """Fix this process's prefix at its first group (later groups keep it); returns it."""
    if _state["prefix"] is None:
        _state["prefix"] = f"zeroopt-{token}-r{rank}"
    return _state["prefix"]


def path(owner_prefix: str, name) -> str:
    """The path of file ``name`` (a count, or "c<token>") of the process with that prefix."""
    return f"{DIRECTORY}/{owner_prefix}-{name}"


def free_bytes() -> int:
    """Bytes free in /dev/shm (0 where it cannot be read)."""
    try:
        st = os.statvfs(DIRECTORY)
        return st.f_bavail * st.f_frsize
    except OSError:
        return 0


def create(nbytes: int, what: str, name=None) -> tuple[int | str, mmap.mmap]:
    """A new zero-filled file of ``nbytes`` in /dev/shm, mapped shared.

    Args:
        nbytes: its size (> 0); reserved at once (``posix_fallocate``), so that a full
            /dev/shm is an error here, not a SIGBUS when a page is first touched.
        what: what it is for, in words, for the error.
        name: its name after the prefix (default None: the next count).

    Returns:
        (its name, the mapping).

    Raises:
        RuntimeError: /dev/shm has no room (its free space and the fixes in the message).
    """
    name = next(_count) if name is None else name
    where = path(_state["prefix"], name)
    fd = os.open(where, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    _created.add(where)
    try:
        os.posix_fallocate(fd, 0, nbytes)
        return name, mmap.mmap(fd, nbytes)
    except OSError as error:
        remove(where)
        raise RuntimeError(
            f"zeroopt: no room in {DIRECTORY} for {what} ({nbytes / 2**20:.1f} MiB; "
            f"{free_bytes() / 2**20:.1f} MiB free; {error}): enlarge it (docker run "
            "--shm-size=8g, or a bigger tmpfs), or set ZEROOPT_BUCKET_COLLECTIVES=ring") from error
    finally:
        os.close(fd)


def tensor(numel: int, dtype: torch.dtype, what: str,
           remove_at_death: bool = False) -> tuple[torch.Tensor, int]:
    """A zero-filled 1-D tensor in a new shared file (not a view: its ``_base`` is None).

    Args:
        numel, dtype: the tensor's.
        what: what it is for, in words, for ``create``'s error.
        remove_at_death: remove the name when the tensor's storage is freed (default False).
            Right for a buffer whose every post is read before its storage can go (a
            reduce's handle holds its bucket until every peer has read it), not for an
            outbox, which a peer may read after this rank has moved on.

    Returns:
        (the tensor, its file's count). ``locate`` finds it (and views of it) while it lives.

    Raises:
        RuntimeError: as ``create``.
    """
    nbytes = numel * dtype.itemsize
    n, mapping = create(nbytes, what)
    t = torch.frombuffer(mapping, dtype=dtype)  # keeps the mapping alive as long as t's storage
    address = t.untyped_storage().data_ptr()
    _live[address] = (n, nbytes)
    where = path(_state["prefix"], n) if remove_at_death else None
    weakref.finalize(mapping, _forget, address, n, where).atexit = False
    return t, n


def _forget(address: int, n: int, where: str | None) -> None:
    if _live.get(address, (None,))[0] == n:
        del _live[address]
    if where is not None and named(where):  # (not in a forked child: the parent's name)
        remove(where)


def locate(t: torch.Tensor) -> tuple[int, int] | None:
    """(file count, byte offset) of ``t`` if it lies contiguously in one of this process's
    shared files, else None."""
    if not t.is_contiguous():
        return None
    storage = t.untyped_storage()
    found = _live.get(storage.data_ptr())
    if found is None:
        return None
    offset = t.data_ptr() - storage.data_ptr()
    return (found[0], offset) if 0 <= offset and offset + t.nbytes <= found[1] else None


def open_peer(where: str) -> mmap.mmap | None:
    """Map another process's file, whole; None if its name is gone (or not made yet)."""
    try:
        fd = os.open(where, os.O_RDWR)
    except FileNotFoundError:
        return None
    try:
        size = os.fstat(fd).st_size
        return mmap.mmap(fd, size) if size else None
    finally:
        os.close(fd)


def named(where: str) -> bool:
    """Whether this process made the file ``where`` and has not removed its name."""
    return where in _created


def remove(where: str) -> None:
    """Remove a name, if it is still there."""
    _created.discard(where)
    try:
        os.unlink(where)
    except FileNotFoundError:
        pass
    except OSError:  # another user's file in a sticky /dev/shm: its creator removes it
        pass


def remove_all(owner_prefix: str) -> None:
    """Remove every file of the process with that prefix (a dead peer's)."""
    start = owner_prefix + "-"
    try:
        names = [n for n in os.listdir(DIRECTORY) if n.startswith(start)]
    except OSError:
        return
    for name in names:
        remove(f"{DIRECTORY}/{name}")


def remove_created(keep: set[str]) -> None:
    """Remove every name this process made but those in ``keep`` (at exit: shm_transport.py
    decides what a live peer may still need)."""
    if _state["pid"] == os.getpid():
        for where in list(_created - keep):
            remove(where)
        _created.intersection_update(keep)


# -- processes ------------------------------------------------------------------------------


def _stat(pid: int) -> list[str] | None:
    """/proc/<pid>/stat's fields from the state on (None where it cannot be read)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    return text[text.rindex(")") + 2:].split()


def start_time(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks after boot), or None where unknown."""
    fields = _stat(pid)
    return int(fields[19]) if fields else None


def alive(pid: int, start: int | None) -> bool:
    """Whether process ``pid``, started at ``start`` (``start_time``), still runs (a zombie
    or a later process with the same pid does not count)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    fields = _stat(pid)
    if fields is None:  # gone since kill, unless there is no /proc to read (then trust kill)
        return not os.path.exists("/proc/self")
    return fields[0] not in ("Z", "X") and (start is None or int(fields[19]) == start)
