"""Compressed gradient reduction (ZeRO++'s qgZ): being written for issue 19."""

from __future__ import annotations

from .base import Collectives

KINDS = ("int8", "int4")


def compressed(comm: Collectives, kind: str) -> Collectives:
    """``comm`` whose gradient reduction is blockwise quantized (issue 19, in progress)."""
    if kind not in KINDS:
        raise ValueError(f"grad_compression must be one of {KINDS} or None, got {kind!r}")
    raise NotImplementedError("grad_compression is being built (issue 19)")
