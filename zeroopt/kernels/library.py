"""One C source of element-wise kernels, loaded on first use and called on torch tensors.

Every kernel in such a source has the one signature ``kernels.h`` describes::

    void zk_NAME(int64_t n, float *const *t, const double *h, double *out, int threads)

so one wrapper calls them all: ``Library("_lion.c").run("zk_lion", [p, g, m], [lr, ...])``.
A rule's fused step asks ``usable(tensors)`` first and keeps its torch path for everything
else (GPUs, XLA, bf16, no compiler, ``ZEROOPT_NATIVE=0``).
"""

from __future__ import annotations

import ctypes
import logging
import threading
from pathlib import Path
from typing import Sequence

import torch

from . import build

log = logging.getLogger("zeroopt")

_HERE = Path(__file__).parent
_POINTERS = {}  # count -> ctypes array type of that many pointers


class Library:
    """The kernels of one C file in zeroopt/kernels/, built on first use (build.py).

    Args:
        source: the file's name, e.g. ``"_lion.c"``.
    """

    def __init__(self, source: str):
        self.source = _HERE / source
        self._lib: ctypes.CDLL | None = None
        self._tried = False
        self._lock = threading.Lock()
        self._functions: dict[str, ctypes._CFuncPtr] = {}

    def available(self) -> bool:
        """Whether the kernels can run: built (or cached) and loaded, and not turned off by
        ``ZEROOPT_NATIVE=0``. A failed build warns once and answers False from then on."""
        if not self._tried:
            with self._lock:
                if not self._tried and build.enabled():
                    try:
                        self._lib = build.build(self.source)
                    except Exception as error:  # noqa: BLE001 - any failure means: torch path
                        log.warning("zeroopt: native kernels of %s unavailable (%s); the "
                                    "torch code runs instead", self.source.name, error)
                self._tried = True
        return self._lib is not None

    def usable(self, *lists: Sequence[torch.Tensor]) -> bool:
        """Whether every tensor in ``lists`` is one the kernels take (contiguous fp32 on the
        CPU) and the kernels are available."""
        for tensors in lists:
            for t in tensors:
                if not (t.dtype is torch.float32 and t.is_cpu and t.is_contiguous()):
                    return False
        return self.available()

    def _function(self, name: str):
        fn = self._functions.get(name)
        if fn is None:
            fn = getattr(self._lib, name)
            fn.argtypes = [ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                           ctypes.c_int]
            fn.restype = None
            self._functions[name] = fn
        return fn

    def run(self, name: str, tensors: Sequence[torch.Tensor], hyper: Sequence[float] = (),
            outputs: int = 0) -> list[float] | None:
        """Call kernel ``name`` on same-length tensors.

        Args:
            name: the C function (``zk_...``).
            tensors: contiguous fp32 CPU tensors of one length, in the kernel's order.
            hyper: the hyperparameters, as numbers, in the kernel's order.
            outputs: how many partial sums the kernel returns (0: none).

        Returns:
            The ``outputs`` sums as floats, or None when ``outputs`` is 0.

        Raises:
            ValueError: the tensors' lengths differ. (Callers check ``usable`` first: a raw
                pointer into the wrong memory would not raise.)
        """
        n = tensors[0].numel()
        for t in tensors:
            if t.numel() != n:
                raise ValueError(f"{name}: tensors of {n} and {t.numel()} elements")
        array = _POINTERS.get(len(tensors))
        if array is None:
            array = _POINTERS[len(tensors)] = ctypes.c_void_p * len(tensors)
        pointers = array(*(t.data_ptr() for t in tensors))
        values = (ctypes.c_double * max(len(hyper), 1))(*map(float, hyper))
        out = (ctypes.c_double * outputs)() if outputs else None
        self._function(name)(n, pointers, values, out, torch.get_num_threads())
        return list(out) if outputs else None

    def each(self, name: str, lists: Sequence[Sequence[torch.Tensor]],
             hyper: Sequence[float] = (), outputs: int = 0) -> list[list[float] | None]:
        """``run`` on every i-th tensor of ``lists`` together (a ``ShardTensors``' parallel
        lists: params, grads, states), with the same hyperparameters.

        Returns:
            Per entry, what ``run`` returned.
        """
        return [self.run(name, tensors, hyper, outputs) for tensors in zip(*lists)]
