"""Whether a kernel library's square roots are torch's, bit for bit (_torch_sqrt.h).

A kernel that takes a square root reproduces torch's foreach path only if its root is the one
torch.sqrt computes on the CPU: MKL's vmsSqrt where torch is built with MKL (not correctly
rounded: one ulp off for ~20% of inputs on an AMD EPYC), else the hardware's. _torch_sqrt.h
can compute MKL's root inline (the arithmetic of MKL's SSE kernel), call MKL, or take the
hardware's; ``matches_torch`` picks, once per library, the first of these, in that order of
speed, whose roots are torch's on a probe, and a rule whose library matches none keeps its
torch path.
"""

from __future__ import annotations

import weakref

import torch

from .library import Library

# _torch_sqrt.h's modes, fastest first: MKL's SSE arithmetic inline, MKL's function, sqrtf
MKL_SSE, MKL, HARDWARE = 3, 2, 1
_MODES = (MKL_SSE, MKL, HARDWARE)
_CHOSEN: "weakref.WeakKeyDictionary[Library, int]" = weakref.WeakKeyDictionary()


def _probe() -> torch.Tensor:
    """Inputs where MKL's root and the correctly rounded one differ: random values over every
    binade, the ends of MKL's own range and past them, subnormals, zeros, infinity, NaN and
    negatives (MKL's NaN is +NaN, the hardware's -NaN), at an odd length (vector tails)."""
    generator = torch.Generator().manual_seed(0)
    values = torch.rand(8191, generator=generator) * torch.logspace(-45, 38, 8191).float()
    bits = torch.tensor([0x7F7FF000, 0x7F7FF001, 0x7F7FFFFF, 0x0C800000, 0x0C7FFFFF,
                         0x00800000, 0x007FFFFF, 1], dtype=torch.int32).view(torch.float32)
    specials = torch.tensor([0.0, -0.0, float("inf"), float("nan"), 1.0, 4.0, 2.0, -1.0,
                             -1e-40, float("-inf")])
    return torch.cat([values, bits, specials, values[:13]])


def matches_torch(lib: Library) -> bool:
    """Whether ``lib``'s roots (every C source that includes _torch_sqrt.h has its kernels
    take them one way) can be torch.sqrt's bit for bit: tries the ways fastest first and
    leaves the library on the first that matches. Checked once per ``Library``.

    Args:
        lib: a ``Library`` whose source includes _torch_sqrt.h.

    Returns:
        True if the library is available and one of its ways matches torch; False otherwise
        (then the library is left on its default way, and the caller keeps its torch path).
    """
    return way(lib) != 0


def way(lib: Library) -> int:
    """The way ``matches_torch`` left ``lib`` on: ``MKL_SSE``, ``MKL`` or ``HARDWARE``, or 0
    where none matches torch (or the library is not available). Checked once per ``Library``.
    """
    if lib not in _CHOSEN:
        chosen = 0
        if lib.available():
            x = _probe()
            want = torch.sqrt(x).view(torch.int32)
            out = torch.empty_like(x)
            for mode in _MODES:
                runs = lib.run("zk_torch_sqrt", [out, x], [mode], outputs=1)[0]
                if runs and torch.equal(out.view(torch.int32), want):
                    chosen = mode
                    break
            else:
                lib.run("zk_torch_sqrt", [out, x], [0])  # back to the default way
        _CHOSEN[lib] = chosen
    return _CHOSEN[lib]
