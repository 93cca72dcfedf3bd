"""The gradient harvest's one-pass kernels (``_harvest.c``), with torch's arithmetic.

Each function writes ``dst`` (fp32) from ``src`` as the torch expression it names does, bit
for bit, and returns the sum of squares of ``dst`` afterwards (a float, summed in double): the
global gradient norm's partial, taken while the data passes anyway. Where the kernels cannot
run (not contiguous fp32 CPU tensors, no compiler, ``ZEROOPT_NATIVE=0``) the torch expression
runs and None is returned: the caller then takes the norm in a pass of its own.
"""

from __future__ import annotations

import torch

from .library import Library

_LIB = Library("_harvest.c")


def scale_into(dst: torch.Tensor, src: torch.Tensor, scale: float) -> float | None:
    """``torch.mul(src, scale, out=dst)``; returns ``sum(dst**2)`` or None."""
    if _LIB.usable((dst, src)):
        return _LIB.run("zk_scale_sumsq", (dst, src), (scale,), 1)[0]
    torch.mul(src, scale, out=dst)
    return None


def scale_add_into(dst: torch.Tensor, src: torch.Tensor, scale: float) -> float | None:
    """``dst.add_(src, alpha=scale)``; returns ``sum(dst**2)`` or None."""
    if _LIB.usable((dst, src)):
        return _LIB.run("zk_scale_add_sumsq", (dst, src), (scale,), 1)[0]
    dst.add_(src, alpha=scale)
    return None


def copy_into(dst: torch.Tensor, src: torch.Tensor) -> float | None:
    """``dst.copy_(src)`` (``src`` of any dtype and layout: only contiguous fp32 takes the
    kernel); returns ``sum(dst**2)`` or None."""
    if _LIB.usable((dst, src)):
        return _LIB.run("zk_copy_sumsq", (dst, src), (), 1)[0]
    dst.copy_(src)
    return None


def add_into(dst: torch.Tensor, src: torch.Tensor) -> float | None:
    """``dst.add_(src)``; returns ``sum(dst**2)`` or None."""
    if _LIB.usable((dst, src)):
        return _LIB.run("zk_add_sumsq", (dst, src), (), 1)[0]
    dst.add_(src)
    return None


def squared_sum(t: torch.Tensor) -> float | None:
    """``sum(t**2)`` summed in double by the kernel, or None where it cannot run."""
    if _LIB.usable((t,)):
        return _LIB.run("zk_sumsq", (t, t), (), 1)[0]
    return None
