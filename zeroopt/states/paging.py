"""Where paged states live: a memory-mapped file for a CPU shard (as ZeRO-Infinity's NVMe tier),
pinned host memory for an accelerator's.

The file is created in ``directory`` (``ZeroOptimizer(page_dir=...)``, default the system's temp
dir) and unlinked at once, so it vanishes with the process however it ends. Pages are brought in
ahead of use (``prefetch``: the kernel reads them asynchronously) and dropped from the process
after use (``release``: MADV_DONTNEED, which for a shared file mapping keeps the data in the file
and the page cache and only unmaps it), so the states resident in the process stay within the
window being stepped.
"""

from __future__ import annotations

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
        directory = directory or tempfile.gettempdir()
        fd, path = tempfile.mkstemp(prefix="zeroopt-states-", dir=directory)
        try:
            os.ftruncate(fd, max(nbytes, PAGE))  # sparse: zeros until written
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
        if tensor.numel():
            self._map.madvise(mmap.MADV_WILLNEED, *self._range(tensor, PAGE))

    def release(self, tensor: torch.Tensor) -> None:
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


def _address(buffer) -> int:
    import ctypes

    return ctypes.addressof(ctypes.c_char.from_buffer(buffer))


def pinned_host(sizes: dict[str, tuple[int, torch.dtype]]) -> dict[str, torch.Tensor]:
    """Page-locked host tensors, so copies to and from the device run asynchronously."""
    return {name: torch.zeros(numel, dtype=dtype, pin_memory=True)
            for name, (numel, dtype) in sizes.items()}


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()
