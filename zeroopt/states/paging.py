"""Where paged states live: a memory-mapped file for a CPU shard (as ZeRO-Infinity's NVMe tier),
pinned host memory for an accelerator's.

The file is created in ``directory`` (``ZeroOptimizer(page_dir=...)``, default the system's temp
dir) and unlinked at once, so it vanishes with the process however it ends. Its space is
reserved when it is made (``reserve``), so a disk too small is an error at construction, not a
SIGBUS in the first step. Pages are brought in ahead of use (``prefetch``: the kernel reads them
asynchronously) and dropped from the process after use (``release``: MADV_DONTNEED, which for a
shared file mapping keeps the data in the file and the page cache and only unmaps it), so the
states resident in the process stay within the window being stepped.
"""

from __future__ import annotations

import errno
import mmap
import os
import tempfile

import torch

PAGE = mmap.PAGESIZE
_ALIGN = 64  # tensors in the file start on cache lines
# A read fault on a file mapping maps the cached pages of the whole aligned 64 KiB around it
# (Linux's fault-around), so releases round out to it: else those neighbours stay resident.
FAULT_AROUND = 64 * 1024


class MappedFile:
    """One file of tensors, laid out at construction."""

    def __init__(self, sizes: dict[str, tuple[int, torch.dtype]], directory: str | None = None):
        offsets, nbytes = {}, 0
        for name, (numel, dtype) in sizes.items():
            offsets[name] = nbytes
            nbytes += -(-numel * _itemsize(dtype) // _ALIGN) * _ALIGN
        default, directory = directory is None, directory or tempfile.gettempdir()
        fd, path = tempfile.mkstemp(prefix="zeroopt-states-", dir=directory)
        try:
            reserve(fd, max(nbytes, PAGE), directory, default)
            self._map = mmap.mmap(fd, max(nbytes, PAGE), mmap.MAP_SHARED)
        finally:
            os.close(fd)
            os.unlink(path)
        self.nbytes = nbytes
        self.tensors = {name: torch.frombuffer(self._map, dtype=dtype, count=numel,
                                               offset=offsets[name]) if numel else
                        torch.zeros(0, dtype=dtype)
                        for name, (numel, dtype) in sizes.items()}
        self._base = _address(self._map)

    def _range(self, tensor: torch.Tensor, align: int) -> tuple[int, int]:
        """(start, length) of the ``align``-aligned byte range of the file that covers
        ``tensor`` (a view of one of ours)."""
        lo = tensor.data_ptr() - self._base
        hi = lo + tensor.numel() * tensor.element_size()
        lo = lo // align * align
        return lo, min(-(-hi // align) * align, len(self._map)) - lo

    def prefetch(self, tensor: torch.Tensor) -> None:
        """Ask the kernel to read in the pages under ``tensor`` ahead of use
        (``madvise(MADV_WILLNEED)``).

        Args:
            tensor: a view of one of this file's tensors; empty ones are ignored.
        """
        if tensor.numel():
            self._map.madvise(mmap.MADV_WILLNEED, *self._range(tensor, PAGE))

    def release(self, tensor: torch.Tensor) -> None:
        """Drop the pages under ``tensor`` from the process (``madvise(MADV_DONTNEED)``); the
        file keeps their contents. The range is widened to whole ``FAULT_AROUND`` (64 KiB)
        blocks.

        Args:
            tensor: a view of one of this file's tensors; empty ones are ignored.
        """
        if tensor.numel():
            self._map.madvise(mmap.MADV_DONTNEED, *self._range(tensor, FAULT_AROUND))

    def resident_bytes(self) -> int:
        """Bytes of this mapping resident in the process (Rss in /proc/self/smaps)."""
        start = format(self._base, "x")
        with open("/proc/self/smaps") as smaps:
            inside = False
            for line in smaps:
                if "-" in line.split(" ", 1)[0]:
                    inside = line.split("-", 1)[0].lstrip("0") == start.lstrip("0")
                elif inside and line.startswith("Rss:"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError("the states' mapping is not in /proc/self/smaps")


def reserve(fd: int, nbytes: int, directory: str, default: bool = False) -> None:
    """Give the file ``fd`` (in ``directory``) ``nbytes`` of disk space now, zero-filled.

    A sparse file is allocated page by page as the states are first written, and a mapped
    page the file system then has no room for kills the process with SIGBUS, with no Python
    error. So the space is reserved here: posix_fallocate, or writing zeros where the file
    system (or the platform) does not support it. ``default``: ``directory`` is the temp dir,
    not the user's choice (the message says so).

    Args:
        fd: the open file.
        nbytes: its size.
        directory: where it is (named in the error).
        default: whether ``directory`` is the default temp dir.

    Raises:
        OSError: ENOSPC (or EDQUOT, EFBIG), naming ``directory`` and the bytes needed, if they
            do not fit.
    """
    full = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
    try:
        try:
            os.posix_fallocate(fd, 0, nbytes)
            return
        except AttributeError:  # no posix_fallocate on this platform (macOS)
            pass
        except OSError as error:  # EOPNOTSUPP, EINVAL: write the zeros instead
            if error.errno in full:
                raise
        zeros = bytes(min(nbytes, 1 << 20))
        for offset in range(0, nbytes, len(zeros)):
            os.pwrite(fd, zeros[:nbytes - offset], offset)
    except OSError as error:
        if error.errno not in full:
            raise
        stat = os.statvfs(directory)
        raise OSError(error.errno, (
            f"zeroopt: page_dir {directory!r}{' (the default: the temp dir)' if default else ''}"
            f" has no room for this rank's paged states: this "
            f"file of them needs {nbytes} bytes ({nbytes / 2**20:.2f} MiB), and "
            f"{stat.f_bavail * stat.f_frsize} bytes are free there. Pass page_dir= a "
            "directory with room for every rank's paged states on that disk, or page fewer "
            "states (paged=False in some param groups)")) from error


def _address(buffer) -> int:
    import ctypes

    return ctypes.addressof(ctypes.c_char.from_buffer(buffer))


def pinned_host(sizes: dict[str, tuple[int, torch.dtype]]) -> dict[str, torch.Tensor]:
    """Page-locked host tensors, so copies to and from the device run asynchronously."""
    return {name: torch.zeros(numel, dtype=dtype, pin_memory=True)
            for name, (numel, dtype) in sizes.items()}


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()
