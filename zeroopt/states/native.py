"""The native CPU path of 8-bit blockwise quantization (``_blockwise.c``), loaded with ctypes.

The C file is compiled at first use with the system's C compiler into the kernels' cache
(zeroopt/kernels/build.py says how: keyed by the source, its headers, the flags and the
compiler's view of this CPU; written atomically).

The kernels use torch.get_num_threads() threads (OpenMP, in torch's own thread pool; see
``build.openmp_flags``); one thread when torch has one.

``ZEROOPT_NATIVE=0`` turns them off. If the build fails, ``available()`` is False, one warning
says why, and blockwise.py uses its torch implementation (exact too, slower).
"""

from __future__ import annotations

import ctypes
import logging
import threading
from functools import lru_cache
from pathlib import Path

import torch

from ..kernels import build

log = logging.getLogger("zeroopt")

SOURCE = Path(__file__).with_name("_blockwise.c")
FLAGS = build.FLAGS  # the kernels' (kernels/build.py): no -ffast-math, no FMA contraction

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False


def _compile(cc: str, flags: list[str], predefined: str) -> Path:
    """The shared library for these flags, from the cache or compiled into it."""
    return build.compile_source(SOURCE, cc, flags, predefined)


def _build() -> ctypes.CDLL:
    cc = build.compiler()
    predefined = build.predefined_macros(cc)
    openmp = build.openmp_flags(predefined)
    try:
        path = _compile(cc, FLAGS + openmp, predefined)
    except RuntimeError:
        if not openmp:
            raise
        path = _compile(cc, FLAGS, predefined)  # no OpenMP library: single-threaded kernels
    return _load(path)


def _load(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.zq_quantize.argtypes = [p, i64, p, p, p, i32]
    lib.zq_dequantize.argtypes = [p, p, i64, p, p, i32]
    lib.zq_quantize.restype = lib.zq_dequantize.restype = None
    return lib


def available() -> bool:
    """Whether the native kernels can be used (built or found in the cache, and loaded)."""
    global _lib, _tried
    if not _tried:
        with _lock:
            if not _tried and build.enabled():
                try:
                    _lib = _build()
                except Exception as error:  # noqa: BLE001 - any failure means: torch path
                    log.warning("zeroopt: native 8-bit quantization unavailable (%s); 8-bit "
                                "states use the slower torch path", error)
            _tried = True
    return _lib is not None


def _key(floats: torch.Tensor) -> torch.Tensor:
    """Order-preserving unsigned keys (in int64) of fp32 values: _blockwise.c's key_of."""
    bits = floats.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    return torch.where(bits >= 1 << 31, bits ^ 0xFFFFFFFF, bits | 1 << 31)


def _unkey(keys: torch.Tensor) -> torch.Tensor:
    bits = torch.where(keys >= 1 << 31, keys ^ 1 << 31, keys ^ 0xFFFFFFFF)
    return torch.where(bits >= 1 << 31, bits - (1 << 32), bits).to(torch.int32).view(
        torch.float32)


def prefix_range(prefix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The smallest and largest float whose key has each 16-bit prefix."""
    return _unkey(prefix << 16), _unkey((prefix << 16) | 0xFFFF)


@lru_cache(maxsize=None)
def table(signed: bool) -> torch.Tensor:
    """zq_quantize's lookup table (65536 int32, layout in _blockwise.c), built from the torch
    reference itself: torch.bucketize counts the midpoints strictly below a value."""
    from .blockwise import midpoints

    mid = midpoints(signed)
    nan_code = int(torch.bucketize(torch.tensor([float("nan")]), mid))
    lo, hi = (int(_key(torch.tensor([end]))) >> 16 for end in (-1.0, 1.0))
    prefix = torch.arange(lo, hi + 1)
    # values are clamped to [-1, 1] first: the end prefixes' floats beyond it never occur
    smallest, largest = (f.clamp(-1, 1) for f in prefix_range(prefix))
    below = torch.bucketize(smallest, mid)
    if (torch.bucketize(largest, mid) - below).max() > 1:
        raise AssertionError("a 16-bit key prefix holds two midpoints")
    # the next midpoint up, if its key has the same prefix
    split = _key(mid)[below.clamp(max=mid.numel() - 1)]
    inside = (below < mid.numel()) & (split >> 16 == prefix)
    entries = torch.full((1 << 16,), nan_code << 16, dtype=torch.int64)  # NaN's prefixes
    entries[lo:hi + 1] = below << 16 | torch.where(inside, 0xFFFF - (split & 0xFFFF), 0)
    return entries.to(torch.int32)


@lru_cache(maxsize=None)
def _code_map(signed: bool) -> torch.Tensor:
    from .blockwise import dynamic_map  # not at the top: blockwise imports this module

    return dynamic_map(signed)


def _check(name: str, t: torch.Tensor, dtype: torch.dtype, numel: int) -> None:
    # A raw pointer into the wrong memory would not raise, it would crash or corrupt: check all.
    # (Attribute tests only: t.device costs more than the whole kernel on a small window.)
    if t.dtype is dtype and t.is_cpu and t.is_contiguous() and t.numel() == numel:
        return
    if t.numel() != numel:
        raise ValueError(f"native blockwise: {name} has {t.numel()} elements, needs {numel}")
    raise TypeError(f"native blockwise: {name} must be a contiguous CPU {dtype} tensor, got "
                    f"{'a contiguous' if t.is_contiguous() else 'a non-contiguous'} {t.dtype} "
                    f"tensor on {t.device}")


def _blocks(n: int) -> int:
    if n % 256:
        raise ValueError(f"blockwise quantization needs a multiple of 256 elements, got {n}")
    if not available():
        raise RuntimeError("native blockwise quantization is unavailable")
    return n // 256


def quantize_(values: torch.Tensor, signed: bool, codes: torch.Tensor,
              absmax: torch.Tensor) -> None:
    """Writes the codes and per-block absmax of fp32 ``values`` into ``codes``/``absmax``."""
    n = values.numel()
    blocks = _blocks(n)
    _check("values", values, torch.float32, n)
    _check("codes", codes, torch.uint8, n)
    _check("absmax", absmax, torch.float32, blocks)
    _lib.zq_quantize(values.data_ptr(), n, table(signed).data_ptr(), codes.data_ptr(),
                     absmax.data_ptr(), torch.get_num_threads())


def dequantize_(codes: torch.Tensor, absmax: torch.Tensor, signed: bool,
                out: torch.Tensor) -> None:
    """Writes the fp32 values of ``codes`` (blocks scaled by ``absmax``) into ``out``."""
    n = codes.numel()
    blocks = _blocks(n)
    _check("codes", codes, torch.uint8, n)
    _check("absmax", absmax, torch.float32, blocks)
    _check("out", out, torch.float32, n)
    _lib.zq_dequantize(codes.data_ptr(), absmax.data_ptr(), n, _code_map(signed).data_ptr(),
                       out.data_ptr(), torch.get_num_threads())
