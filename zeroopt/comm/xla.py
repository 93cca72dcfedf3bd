"""Collectives on XLA devices (torch_xla), traced into the step's graph.

Every collective here is a ``torch_xla.core.xla_model`` op (reduce_scatter, all_gather): it adds
a node to the lazy graph and runs when the graph does, at the step boundary (``mark_step()``,
i.e. ``torch_xla.sync()``). So a whole training step - backward, the gradient reduce-scatters,
the fused update, the param all-gathers - compiles to one XLA program, and the handles returned
by ``reduce_bucket`` / ``gather_bucket`` have nothing to wait for (``base.Done``): the result is
already the (lazy) value the rest of the graph reads.

Replicas on CPU (PJRT_DEVICE=CPU): torch_xla 2.9 has no cross-process collectives on XLA:CPU, so
the only multi-replica set-up that communicates is one process with ``CPU_NUM_DEVICES=N`` devices
and one Python thread per device (what ``xmp.spawn`` / ``torch_xla.launch`` do on CPU; see
``launchers/xla_spawn.py``). There the collectives of the threads meet in XLA:CPU's in-process
rendezvous, keyed by an op id that is the collective's ``channel_id`` when it has one and
otherwise the unique id of the compiled HLO module. Each thread traces and compiles its own copy
of the graph (two threads missing the compilation cache together compile twice; and a graph that
slices "this rank's chunk" differs per rank anyway), so without channel ids the op ids differ and
every collective waits for the others until XLA aborts ("Expected 2 threads to join the
rendezvous, but only 1 of them arrived"): the stall seen with ``xmp.spawn`` and plain
``xm.reduce_scatter``. Here every collective gets an explicit channel id (a per-thread counter,
the same sequence on every rank since every rank issues the same collectives in the same order,
reset at each ``torch_xla.sync()`` so every step's graph is the same and compiles once) with
``use_global_device_ids`` over the one group of all replicas. ``xm.all_reduce`` takes no channel
id, so all-reduce is a reduce-scatter plus an all-gather; ``xm.rendezvous`` (all-gathers without
channel ids) is not used.

On TPU / GPU each process compiles for all its replicas and the plain ``xm`` collectives work;
``channel_ids`` is then off by default (``XlaCollectives(channel_ids=True)`` forces it).

This module imports without torch_xla; ``xla_collectives()`` says what to install when it is
missing.
"""

from __future__ import annotations

import pickle
import threading
from typing import Any

import torch

from .base import Done, Handle

_INSTALL_HINT = (
    "zeroopt's XLA backend needs torch_xla: pip install torch_xla=={version} (the version of "
    "the installed torch), then choose the device with PJRT_DEVICE=CPU|TPU|CUDA")

_REDUCE_TYPES = ("sum", "max", "min")


def _import_xla():
    try:
        import torch_xla  # noqa: F401
        import torch_xla.core.xla_model as xm
        import torch_xla.runtime as xr
    except ImportError as error:  # torch_xla absent, or built for another torch
        version = torch.__version__.split("+")[0]
        raise ImportError(_INSTALL_HINT.format(version=version) + f" ({error})") from error
    return torch_xla, xm, xr


def xla_available() -> bool:
    try:
        _import_xla()
    except ImportError:
        return False
    return True


def xla_collectives(channel_ids: bool | None = None) -> "XlaCollectives":
    """The collectives of this replica (thread or process) on its XLA device.

    Raises ImportError naming what to install when torch_xla is not there."""
    _import_xla()
    return XlaCollectives(channel_ids=channel_ids)


def xla_device() -> torch.device:
    """This replica's XLA device."""
    torch_xla, _, _ = _import_xla()
    return torch_xla.device()


def mark_step(wait: bool = False) -> None:
    """The step boundary: run the traced graph (the whole update, collectives included) and
    start the next one. Put it once after ``opt.step()`` (and ``zero_grad()``) per iteration;
    anything that reads a value on the host (``.item()``, ``bool(t)``, ``.cpu()``) in between
    cuts the graph there."""
    torch_xla, _, _ = _import_xla()
    torch_xla.sync(wait=wait)


class _Channels(threading.local):
    """Per replica thread: the next channel id, and whether a reset is queued for the next
    sync."""

    def __init__(self) -> None:
        self.next = 1
        self.reset_queued = False


_channels = _Channels()


def _reset_channels() -> None:
    _channels.next = 1
    _channels.reset_queued = False


class XlaCollectives:
    """``base.Collectives`` with torch_xla's collectives, for tensors on this replica's XLA
    device. Results are lazy: they are computed when the graph runs (see the module notes)."""

    backend = "xla"

    def __init__(self, channel_ids: bool | None = None):
        torch_xla, xm, xr = _import_xla()
        self._torch_xla, self._xm = torch_xla, xm
        self.rank = int(xr.global_ordinal())
        self.world_size = int(xr.world_size())
        self.device = torch_xla.device()
        if channel_ids is None:  # needed where the replicas are threads of one process
            channel_ids = xr.device_type() == "CPU"
        self.channel_ids = bool(channel_ids)

    # -- the raw collectives ---------------------------------------------------------------

    def _channel(self) -> dict:
        """Keyword arguments that pin one collective's rendezvous (CPU replicas)."""
        if not self.channel_ids:
            return {}
        if not _channels.reset_queued:  # back to 1 after the next sync: same graph every step
            self._xm.add_step_closure(_reset_channels)
            _channels.reset_queued = True
        channel = _channels.next
        _channels.next += 1
        return dict(groups=[list(range(self.world_size))], channel_id=channel,
                    use_global_device_ids=True)

    def _reduce_scatter(self, flat: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """``flat`` (1-D, numel divisible by world_size) reduced over ranks; returns this
        rank's chunk, a new tensor."""
        return self._xm.reduce_scatter(op, flat, 1.0, 0, self.world_size, **self._channel())

    def _all_gather(self, chunk: torch.Tensor) -> torch.Tensor:
        """Every rank's 1-D ``chunk``, concatenated in rank order (a new tensor)."""
        if self.channel_ids:
            return self._xm.all_gather(chunk, 0, pin_layout=False, **self._channel())
        return self._xm.all_gather(chunk, 0)

    def _all_reduced(self, tensor: torch.Tensor, op: str) -> torch.Tensor:
        """``tensor`` reduced over ranks, as a new tensor of its shape."""
        if op not in _REDUCE_TYPES:
            raise ValueError(f"all_reduce op must be one of {_REDUCE_TYPES}, got {op!r}")
        if self.world_size == 1:
            return tensor.clone()
        if not self.channel_ids:
            return self._xm.all_reduce(op, tensor)
        flat = tensor.reshape(-1)
        n = flat.numel()
        padded = -(-max(n, 1) // self.world_size) * self.world_size
        if padded != n:
            flat = torch.cat([flat, flat.new_zeros(padded - n)])
        total = self._all_gather(self._reduce_scatter(flat, op))
        return total[:n].view(tensor.shape)

    # -- base.Collectives --------------------------------------------------------------------

    def reduce_bucket(self, bucket: torch.Tensor) -> Handle:
        # Lazy, like every XLA op: the reduction runs with the step's graph, so there is
        # nothing to wait for here (the handle is already done).
        if self.world_size > 1:
            mine = self._reduce_scatter(bucket)
            bucket.chunk(self.world_size)[self.rank].copy_(mine)
        return Done()

    def gather_bucket(self, bucket: torch.Tensor) -> Handle:
        if self.world_size > 1:
            bucket.copy_(self._all_gather(bucket.chunk(self.world_size)[self.rank]))
        return Done()

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> None:
        if tensor.dtype == torch.bool:
            reduced = self._all_reduced(tensor.to(torch.int32), op) != 0
        else:
            reduced = self._all_reduced(tensor, op)
        tensor.copy_(reduced)

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> None:
        """Rank ``src``'s tensor everywhere: a sum of it and everyone else's zeros (as xm
        broadcasts); bit-exact for finite values."""
        if self.world_size == 1:
            return
        mine = tensor if self.rank == src else torch.zeros_like(tensor)
        if tensor.dtype == torch.bool:
            tensor.copy_(self._all_reduced(mine.to(torch.int32), "sum") != 0)
        else:
            tensor.copy_(self._all_reduced(mine, "sum"))

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Pickled bytes, all-gathered as uint8 tensors (two host syncs: sizes, then bytes)."""
        if self.world_size == 1:
            return [obj]
        payload = pickle.dumps(obj)
        size = torch.tensor([len(payload)], dtype=torch.int32, device=self.device)
        sizes = self._all_gather(size).cpu().tolist()  # runs the graph so far
        longest = max(sizes)
        data = torch.zeros(longest, dtype=torch.uint8)
        data[:len(payload)] = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
        gathered = self._all_gather(data.to(self.device)).cpu()
        return [pickle.loads(gathered[r * longest:r * longest + n].numpy().tobytes())
                for r, n in enumerate(sizes)]

    def barrier(self) -> None:
        """Every replica reaches this point: a one-element all-reduce, read on the host."""
        if self.world_size == 1:
            return
        flag = torch.ones(1, dtype=torch.int32, device=self.device)
        got = int(self._all_reduced(flag, "sum").cpu()[0])
        if got != self.world_size:
            raise RuntimeError(f"zeroopt: XLA barrier counted {got} of {self.world_size} "
                               "replicas")


__all__ = ["XlaCollectives", "mark_step", "xla_available", "xla_collectives", "xla_device"]
