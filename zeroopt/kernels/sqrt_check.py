"""Whether a kernel library's square roots are torch's, bit for bit (_torch_sqrt.h).

A kernel that takes a square root reproduces torch's foreach path only if its root is the one
torch.sqrt computes on the CPU: MKL's vmsSqrt where torch is built with MKL (not correctly
rounded: one ulp off for ~15% of inputs on an AMD EPYC), else the hardware's. _torch_sqrt.h
picks the same function torch uses; ``matches_torch`` checks, once per library, that it did,
and a rule whose library fails the check keeps its torch path.
"""

from __future__ import annotations

import torch

from .library import Library

_CHECKED: dict[str, bool] = {}


def _probe() -> torch.Tensor:
    """Inputs where MKL's root and the correctly rounded one differ: random values over many
    scales, subnormals, zeros, infinity and a negative (MKL's NaN is +NaN, the hardware's
    -NaN), at an odd length (vector tails)."""
    generator = torch.Generator().manual_seed(0)
    values = torch.rand(4093, generator=generator) * torch.logspace(-40, 38, 4093).float()
    specials = torch.tensor([0.0, -0.0, float("inf"), 1e-45, 3e-39, 1.0, 4.0, 2.0, -1.0])
    return torch.cat([values, specials])


def matches_torch(lib: Library) -> bool:
    """Whether ``lib``'s ``zk_torch_sqrt`` (every C source that includes _torch_sqrt.h has
    it) computes torch.sqrt's roots bit for bit; checked once per library, and False when the
    library is not available.

    Args:
        lib: a ``Library`` whose source includes _torch_sqrt.h.

    Returns:
        True if the library is available and its roots are torch's.
    """
    key = str(lib.source)
    if key not in _CHECKED:
        ok = lib.available()
        if ok:
            x = _probe()
            out = torch.empty_like(x)
            lib.run("zk_torch_sqrt", [out, x])
            ok = torch.equal(out.view(torch.int32), torch.sqrt(x).view(torch.int32))
        _CHECKED[key] = ok
    return _CHECKED[key]
