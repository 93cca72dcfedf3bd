"""Adam(W) with 8-bit blockwise states in one C call per window (``_adam8bit.c``).

The three-pass path decodes a window's m and v into fp32 scratch (native.py), steps it with
torch._fused_adam(w)_, and encodes the states back: five kernel calls and Python between them.
This kernel does all of it in one call (per thread: decode its run of blocks, step, encode; see
_adam8bit.c for why not one block at a time). Its codes, absmax and params are those of the
three-pass path bit for bit: the update is ATen's CPU kernel operation for operation, and
which multiply-adds that kernel's build fused into FMAs (in its vector body and in the scalar
tail it runs over each tensor's last elements) is found at first use by comparing the kernel
with torch's on random data (``calibrate``). Where no candidate matches (another torch build,
another CPU), ``available()`` is False and the three-pass path runs. (One bit is not matched:
with maximize=True and NaN gradients, the sign of a NaN param; see _adam8bit.c.)

The library is compiled at first use with zeroopt.kernels.build (cached like every zeroopt
kernel); ``ZEROOPT_NATIVE=0`` turns it off. It uses torch.get_num_threads() threads.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from pathlib import Path
from typing import Sequence

import torch

from ..kernels import build
from . import native

log = logging.getLogger("zeroopt")

SOURCE = Path(__file__).with_name("_adam8bit.c")
STATES = ("exp_avg", "exp_avg_sq")  # m signed, v non-negative
# Candidates for ATen's vector width and FMA choices (see _adam8bit.c): tried in this order.
_VECS = (8, 16, 4, 32)
_V_MODES = (1, 2, 0)  # V_FMA_GRAD, V_FMA_STATE, V_PLAIN
_P = ctypes.c_void_p

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False
_config: tuple[int, int] | None = None  # (mode, vec)


def bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    """Declares the kernels' signatures on ``lib``, a loaded build of ``SOURCE``, and returns
    it."""
    i64, i32 = ctypes.c_int64, ctypes.c_int
    lib.zq_adam8bit_step.argtypes = [i64, i64, _P, _P, _P, _P, _P, _P, _P, _P, _P, _P, _P, _P,
                                     _P, _P, i32, i32, i32]
    lib.zq_adam_update.argtypes = [i64, _P, _P, _P, _P, _P, i32, i32]
    lib.zq_adam8bit_step.restype = lib.zq_adam_update.restype = None
    return lib


def available() -> bool:
    """Whether the one-call kernel can be used: built (or cached), loaded, and calibrated
    against torch._fused_adam(w)_ on this machine (``calibrate``). Also needs native.py's
    tables (its kernels available). Never raises: a failure warns once and answers False."""
    global _lib, _tried, _config
    if not _tried:
        with _lock:
            if not _tried and build.enabled() and native.available():
                try:
                    lib = bind(build.build(SOURCE))
                    _config = calibrate(lib)
                    if _config is None:
                        log.warning("zeroopt: the one-call 8-bit Adam kernel does not match "
                                    "torch._fused_adamw_ on this machine; 8-bit Adam states "
                                    "take the three-pass path")
                    else:
                        _lib = lib
                except Exception as error:  # noqa: BLE001 - any failure means: three passes
                    log.warning("zeroopt: the one-call 8-bit Adam kernel is unavailable (%s); "
                                "8-bit Adam states take the three-pass path", error)
            _tried = True
    return _lib is not None


def hyper(group: dict, step: torch.Tensor, decoupled: bool) -> ctypes.Array:
    """The kernel's hyperparameters for one group's step, as the fused Adam(W) step passes
    them to torch (lr, beta1, beta2, weight_decay, eps, the step count, maximize, decoupled).

    Args:
        group: the param group (plain Adam(W): no option of variants.py or adamw_options.py).
        step: the class's step count, already advanced (a 0-d tensor).
        decoupled: AdamW (True) or Adam (False).
    """
    beta1, beta2 = group["betas"]
    values = (float(group["lr"]), beta1, beta2, group["weight_decay"], group["eps"],
              float(step.item()), bool(group["maximize"]), decoupled)
    return (ctypes.c_double * 8)(*map(float, values))


class Stretch:
    """A stretch of whole 8-bit blocks and the tensors that step it, checked once and kept as
    the kernel's raw arguments, so that a step costs one call (a window is stepped every step
    with the same tensors).

    Args:
        params, grads: the stretch's tensors in order (contiguous fp32 CPU, the same length
            each), as torch._fused_adam(w)_ would get them: each one's last elements take its
            tail arithmetic. Together a multiple of 256 elements, n.
        codes: m's and v's uint8 codes (n elements each, contiguous, CPU).
        absmax: m's and v's fp32 absmax (n / 256 each).
        scratch: two fp32 tensors of n elements the kernel may overwrite (the decoded states).

    Raises:
        ValueError: the lengths disagree.
        TypeError: a tensor is not a contiguous CPU tensor of its dtype.
    """

    def __init__(self, params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
                 codes: Sequence[torch.Tensor], absmax: Sequence[torch.Tensor],
                 scratch: Sequence[torch.Tensor]):
        offsets = [0]
        for p, g in zip(params, grads, strict=True):
            if p.numel() != g.numel():
                raise ValueError(f"a param of {p.numel()} elements with a grad of {g.numel()}")
            offsets.append(offsets[-1] + p.numel())
        n = offsets[-1]
        if (n % 256 or len(codes) != 2 or len(absmax) != 2 or len(scratch) != 2
                or any(t.numel() != n for t in (*codes, *scratch))
                or any(a.numel() != n // 256 for a in absmax)):
            raise ValueError(f"8-bit Adam step: {n} elements (a multiple of 256 needed), codes "
                             f"of {[c.numel() for c in codes]}, absmax of "
                             f"{[a.numel() for a in absmax]}, scratch of "
                             f"{[t.numel() for t in scratch]}")
        for t, dtype in [*((t, torch.float32) for t in (*params, *grads, *absmax, *scratch)),
                         *((c, torch.uint8) for c in codes)]:
            if not (t.dtype is dtype and t.is_cpu and t.is_contiguous()):
                raise TypeError(f"8-bit Adam step: a {t.dtype} tensor on {t.device} "
                                f"(contiguous: {t.is_contiguous()}) where a contiguous CPU "
                                f"{dtype} tensor is needed")
        k = len(params)
        # the tensors themselves are kept: the pointers stay valid while this object lives
        self.tensors = (*params, *grads, *codes, *absmax, *scratch)
        self.numel = n
        self._arguments = (
            n, k, (ctypes.c_int64 * (k + 1))(*offsets), (_P * k)(*(p.data_ptr() for p in params)),
            (_P * k)(*(g.data_ptr() for g in grads)), codes[0].data_ptr(),
            absmax[0].data_ptr(), codes[1].data_ptr(), absmax[1].data_ptr(),
            scratch[0].data_ptr(), scratch[1].data_ptr(), _map(True).data_ptr(),
            _map(False).data_ptr(), native.table(True).data_ptr(),
            native.table(False).data_ptr())

    def step(self, hyperparameters: ctypes.Array) -> None:
        """One Adam(W) step of the stretch, in place: m's and v's codes and absmax are
        decoded, stepped with the params and gradients, and encoded back.

        Args:
            hyperparameters: ``hyper(...)``.

        Raises:
            RuntimeError: the kernel is unavailable (call ``available()`` first).
        """
        if _lib is None:
            raise RuntimeError("the one-call 8-bit Adam kernel is unavailable")
        _lib.zq_adam8bit_step(*self._arguments, hyperparameters, _config[0], _config[1],
                              torch.get_num_threads())


def step_(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
          codes: Sequence[torch.Tensor], absmax: Sequence[torch.Tensor],
          scratch: Sequence[torch.Tensor], hyperparameters: ctypes.Array) -> None:
    """``Stretch(params, grads, codes, absmax, scratch).step(hyperparameters)``: one step of a
    stretch whose tensors are not kept (see ``Stretch`` for the arguments and errors)."""
    if not available():
        raise RuntimeError("the one-call 8-bit Adam kernel is unavailable")
    Stretch(params, grads, codes, absmax, scratch).step(hyperparameters)


def _map(signed: bool) -> torch.Tensor:
    from .blockwise import dynamic_map  # not at the top: blockwise imports native

    return dynamic_map(signed)


# -- calibration ----------------------------------------------------------------------------

_SIZES = (1, 3, 7, 8, 9, 15, 16, 17, 31, 33, 63, 65, 1000, 4099)
_CASES = [  # (decoupled, weight_decay, maximize, beta1)
    (True, 0.0, False, 0.9), (True, 0.1, True, 0.9), (False, 0.1, False, 0.9),
    (False, 0.3, True, 0.3), (True, 0.01, False, 0.3)]


def calibrate(lib: ctypes.CDLL) -> tuple[int, int] | None:
    """The ``(mode, vec)`` under which ``zq_adam_update`` reproduces torch._fused_adam(w)_ bit
    for bit on random tensors of many lengths (tails of every length), Adam and AdamW, with
    and without weight decay and maximize; None if no candidate does.

    Args:
        lib: the loaded library.
    """
    generator = torch.Generator().manual_seed(0)
    data = [_case_data(n, generator) for n in _SIZES]
    expected = {case: [_torch_step(case, tensors) for tensors in data] for case in _CASES}
    for vec in _VECS:
        for mode in (body | tail << 2 | wd << 4 for body in _V_MODES for tail in _V_MODES
                     for wd in (3, 0, 1, 2)):
            if all(torch.equal(mine, theirs)
                   for case in _CASES
                   for tensors, want in zip(data, expected[case])
                   for mine, theirs in zip(_native_step(lib, case, tensors, mode, vec), want)):
                return mode, vec
    return None


def _case_data(n: int, generator: torch.Generator) -> list[torch.Tensor]:
    def randn(scale):
        """``n`` normal values times ``scale``, from the calibration's generator."""
        return torch.randn(n, generator=generator) * scale

    return [randn(1.0), randn(0.01), randn(0.01), randn(0.01).square()]  # p, g, m, v


def _case_hyper(case, step=3.0) -> tuple[float, ...]:
    decoupled, wd, maximize, beta1 = case
    return (1e-3, beta1, 0.999, wd, 1e-8, step, maximize, decoupled)


def _torch_step(case, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    p, g, m, v = (t.clone() for t in tensors)
    lr, beta1, beta2, wd, eps, step, maximize, decoupled = _case_hyper(case)
    kernel = torch._fused_adamw_ if decoupled else torch._fused_adam_
    kernel([p], [g], [m], [v], [], [torch.tensor(step)], lr=lr, beta1=beta1, beta2=beta2,
           weight_decay=wd, eps=eps, amsgrad=False, maximize=bool(maximize))
    return [p, m, v]


def _native_step(lib, case, tensors, mode: int, vec: int) -> list[torch.Tensor]:
    p, g, m, v = (t.clone() for t in tensors)
    values = (ctypes.c_double * 8)(*map(float, _case_hyper(case)))
    lib.zq_adam_update(p.numel(), p.data_ptr(), g.data_ptr(), m.data_ptr(), v.data_ptr(),
                       values, mode, vec)
    return [p, m, v]
