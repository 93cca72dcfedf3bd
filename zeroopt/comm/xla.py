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
``xm.reduce_scatter``. Here every collective gets an explicit channel id (a counter per replica
device, drawn by the replica's thread and by autograd's worker thread for its device alike; the
same sequence on every rank since every rank issues the same collectives in the same order; reset
at each ``torch_xla.sync()`` so every step's graph is the same and compiles once) with
``use_global_device_ids`` over the one group of all replicas. Each collective's input is
computed from the previous collective's result (``_after``: plus a -0.0 derived from it), so
that each replica runs them in the order issued: XLA:CPU's thunk executor runs the thunks of a
graph concurrently wherever no buffer links them, and the replicas' graphs differ, so without
that link one replica entered an all-gather while the others waited in the reduce-scatter
before it (W = 4). An optimization barrier does not order them: it links values, not the
buffers the executor sees. xm's own chain, its all-reduce token, is dropped before each
collective: torch_xla 2.9 makes each new token ``token * result[0]``, so an inf result (an
overflowing gradient) turned every later collective's input into nan, the params' all-gather of
a skipped step included. Reduce-scatters also leave no token behind (dropping one at sync
blocks with the GIL held). ``xm.all_reduce`` takes no channel id, so all-reduce is a
reduce-scatter plus an all-gather; ``xm.rendezvous`` (all-gathers without channel ids) is not
used.

Thread replicas share one process, one GIL and one PJRT client; four things keep a
multi-step run from deadlocking there (each seen at W = 3 before it was fixed):

- host reads are graphs of their own (``_host_read``): ``step()`` makes none (only when params
  frozen at construction get gradients, and the layout grows), but checkpoints and
  ``all_gather_object`` do, and neither the collective chain nor xm's all-reduce token links
  such a small graph to the step's collectives, which would otherwise run in both graphs;
- ``cpu_replicas_environment`` selects PJRT's synchronous CPU client: with the asynchronous
  one a replica that drops a tensor could block in the release of a buffer a running graph
  holds, while holding the GIL, and that graph waits in a collective for a replica that needs
  the GIL;
- ``mark_step()`` waits for the graph on thread replicas, so no replica traces ahead while
  its last graph runs;
- every ``XlaCollectives`` keeps one live tensor on its device: torch_xla 2.9 makes a sync
  with no live tensor on a replica's device lock device 0, which replica 0 holds while its
  graph waits in a collective for this one.

``ZEROOPT_XLA_TRACE=1`` prints every collective's channel, per rank, to debug a stall.

On TPU / GPU each replica is a process and its collectives meet by the compiled program, so
``channel_ids`` is off by default there (``XlaCollectives(channel_ids=True)`` forces it); the
chain, the dropped token and the step's one graph are the same. None of that has run on a TPU
here (no TPU in CI).

One more limit on CPU: torch_xla runs each replica's graph on its own thread pool, of
``XLA_THREAD_POOL_SIZE`` threads (default: the number of CPUs), and a replica blocked in a
collective holds its thread; with more replicas than threads the last ones never start and the
others abort in the rendezvous. ``cpu_replicas_environment(n)`` sets the pool to at least ``n``
(and ``PJRT_DEVICE=CPU``, ``CPU_NUM_DEVICES=n``); it must be in the environment before torch_xla
starts its runtime.

This module imports without torch_xla; ``xla_collectives()`` says what to install when it is
missing.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import threading
from typing import Any

import torch

from .base import Collectives, Done, Handle

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


def cpu_replicas_environment(replicas: int, environ=None) -> dict:
    """Set (in ``environ``, default ``os.environ``) what ``replicas`` communicating XLA:CPU
    replicas in one process need, before torch_xla starts; returns ``environ``."""
    environ = os.environ if environ is None else environ
    if replicas < 1:
        raise ValueError(f"replicas must be positive, got {replicas}")
    environ["PJRT_DEVICE"] = "CPU"
    environ["CPU_NUM_DEVICES"] = str(replicas)
    # With PJRT's asynchronous CPU client a replica thread that drops a lazy tensor can block
    # in the release of a buffer a running graph still holds (~DeviceData -> ReleaseBuffer)
    # while holding the GIL, and that graph waits in a collective for a replica that needs
    # the GIL: a deadlock (most runs at W = 3). With the synchronous client none was seen.
    environ.setdefault("PJRT_CPU_ASYNC_CLIENT", "0")
    pool = int(environ.get("XLA_THREAD_POOL_SIZE") or 0)
    environ["XLA_THREAD_POOL_SIZE"] = str(max(pool, replicas, os.cpu_count() or 1))
    return environ


def xla_available() -> bool:
    """Whether torch_xla imports here (installed, and built for this torch)."""
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


def mark_step(wait: bool | None = None) -> None:
    """The step boundary: run the traced graph (the whole update, collectives included) and
    start the next one. Put it once after ``opt.step()`` (and ``zero_grad()``) per iteration;
    anything that reads a value on the host (``.item()``, ``bool(t)``, ``.cpu()``) in between
    cuts the graph there.

    Args:
        wait (bool | None): wait for the graph to finish. Default None: wait only where the
            replicas are threads of one process (XLA:CPU, see the module notes), so that no
            replica traces ahead, holding the GIL, while its graph still runs. On TPU/GPU
            (a process per replica) the graph runs asynchronously.
    """
    torch_xla, _, xr = _import_xla()
    if wait is None:
        wait = _thread_replicas(xr)
    torch_xla.sync(wait=wait)


def _thread_replicas(xr) -> bool:
    """Whether this process runs several replicas as threads (XLA:CPU, CPU_NUM_DEVICES > 1)."""
    return xr.device_type() == "CPU" and int(xr.world_size()) > 1


def _check_cpu_pool(replicas: int) -> None:
    """Fail now, with the fix, rather than in an aborting rendezvous (see the module notes)."""
    pool = int(os.environ.get("XLA_THREAD_POOL_SIZE") or 0) or (os.cpu_count() or 1)
    if pool < replicas:
        raise RuntimeError(
            f"zeroopt: {replicas} XLA:CPU replicas need XLA_THREAD_POOL_SIZE >= {replicas} (it "
            f"is {pool}; the default is the number of CPUs): each replica blocked in a "
            "collective holds one of its threads. Set it before torch_xla starts, e.g. with "
            "zeroopt.comm.xla.cpu_replicas_environment(n) or launchers/xla_spawn.py")


_HOST_READ_WAIT_S = 1800.0  # torch.distributed's default timeout: a replica that never comes
_host_read_barriers: dict[int, threading.Barrier] = {}
_host_read_barriers_lock = threading.Lock()


def _meet_before_host_read(world_size: int) -> None:
    """Thread replicas: wait here, in Python, until every replica reaches the same host read.

    XLA:CPU aborts the whole process when a replica is 10 s late to a collective (the limit is
    XLA's own, with no flag on CPU); before a host read a replica may still be compiling or
    running a large graph the others have finished (the first step, an evaluation), so they
    meet here first, where waiting has no such limit, and then run the read's small graph
    together."""
    with _host_read_barriers_lock:
        barrier = _host_read_barriers.setdefault(world_size, threading.Barrier(world_size))
    try:
        barrier.wait(timeout=_HOST_READ_WAIT_S)
    except threading.BrokenBarrierError:
        raise RuntimeError(
            f"zeroopt: a host read on XLA:CPU replicas waited {_HOST_READ_WAIT_S:.0f} s for "
            f"the other replicas of {world_size}: one of them stopped (an error in its "
            "thread) or took another path (every replica must make the same host reads)") \
            from None


class _Channels:
    """The next channel id of each replica, by its XLA device ("xla:0", "xla:1", ...).

    A graph's channel ids must follow from its shape alone: torch_xla's graph cache key leaves
    them out, so a graph traced with other ids than an earlier graph of the same shape runs the
    earlier one's executable, with the earlier ids. Were those ids to depend on anything else,
    a replica whose graph is new (one replica's gradient overflowed: another op) would compile
    the ids it traced while the others reran old ones, and they would wait on different
    channels (seen at W = 3 after a barrier had taken ids mid-step). So each step's graph
    numbers its collectives from 1 in the order issued (``take``, reset at each sync), and
    each host read's graph numbers its own from 1 (``XlaCollectives._host_read``), leaving
    the step's numbering alone.

    Keyed by device, not by thread: a replica issues collectives from its own thread and from
    autograd's worker thread for its device (the gradient hooks), and both must draw from one
    sequence."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._next: dict[str, int] = {}
        self.last: dict[str, torch.Tensor] = {}  # a piece of each replica's latest result

    def take(self, device: str, xm) -> int:
        """The next channel id (int, from 1) of replica ``device`` ("xla:N"); the first one
        since a sync also schedules ``reset`` for the end of this step (``xm`` registers it)."""
        with self._lock:
            channel = self._next.get(device)
            if channel is None:  # first since the last sync: restart at the next one
                xm.add_step_closure(self.reset, args=(device,))
                channel = 1
            self._next[device] = channel + 1
            return channel

    def reset(self, device: str) -> None:
        """Forget ``device``'s channel count and latest result: the next step starts at 1."""
        with self._lock:
            self._next.pop(device, None)
            self.last.pop(device, None)


_channels = _Channels()


class XlaCollectives(Collectives):
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
        self._mode = threading.local()  # host_read: inside _host_read (per thread)
        if xr.device_type() == "CPU" and self.world_size > 1:
            _check_cpu_pool(self.world_size)
            # torch_xla 2.9: a sync on a replica with no live tensor on its device locks
            # device 0 instead of its own; while replica 0 runs a collective waiting for this
            # one, that is a deadlock. One live tensor on our device keeps every sync here.
            self._anchor = torch.zeros(1, device=self.device)

    # -- the raw collectives ---------------------------------------------------------------

    def _channel(self, device: str) -> dict:
        """Keyword arguments that pin one collective's rendezvous: a channel id over the one
        group of all replicas where the replicas are threads (``channel_ids``), else none.
        The first of a step also schedules ``_Channels.reset`` for its sync."""
        if getattr(self._mode, "host_read", False):  # its own graph: numbered from 1
            self._mode.host_channel += 1
            channel = self._mode.host_channel
        else:  # back to 1 after each sync, so that every step traces the same graph
            channel = _channels.take(device, self._xm)
        if not self.channel_ids:
            return dict(groups=None, channel_id=None, use_global_device_ids=None)
        return dict(groups=[list(range(self.world_size))], channel_id=channel,
                    use_global_device_ids=True)

    @contextlib.contextmanager
    def _host_read(self):
        """Collectives whose results the host reads at once, in a small graph of their own.

        A host read runs the graph of the tensor read, and everything it links to runs in
        that graph; whatever the step's later graph also needs of it runs there again. Two
        links would pull the step's collectives into such a small graph (and run them twice,
        on some replicas only when their live tensors differ: a deadlock): the chain of
        ``_in_order`` and xm's all-reduce token. So inside this block collectives are not
        chained, and the token is dropped after it too (the step's later collectives do not
        link to it). Their channels are numbered from 1 in each such graph, apart from the
        step's: see ``_Channels``."""
        XLAC = self._torch_xla._XLAC
        if self.channel_ids and self.world_size > 1:
            _meet_before_host_read(self.world_size)
        self._mode.host_read, self._mode.host_channel = True, 0
        try:
            yield
        finally:
            self._mode.host_read = False
            XLAC._set_all_reduce_token(XLAC._xla_get_default_device(), None)

    def _in_order(self, run, tensor: torch.Tensor) -> torch.Tensor:
        """``run(tensor, **self._channel(...))``, after this replica's previous collective.

        XLA runs the independent ops of one graph in any order, concurrently on CPU, and the
        replicas' graphs differ (each updates its own chunk; a rank may own no element of a
        bucket), so two replicas could enter the same graph's collectives in different orders
        and wait for each other for ever. Taking this input from the previous collective's
        result (``_after``) chains them: every replica runs its collectives in the order it
        issued them, the same order everywhere.

        xm's own chain, its all-reduce token, is dropped before each collective, so that
        each one adds a fresh zero token to its input: torch_xla 2.9 makes the next token
        ``token * result[0]``, which an inf result (an overflowing gradient) turns into nan,
        and that nan into every later collective's input (the params' all-gather of a step
        ``skip_nonfinite`` skips included). ``_after`` ignores inf and nan."""
        XLAC = self._torch_xla._XLAC
        device = XLAC._xla_get_default_device()
        XLAC._set_all_reduce_token(device, None)
        if getattr(self._mode, "host_read", False):  # unchained, and not chained after
            return run(tensor, **self._channel(device))
        previous = _channels.last.get(device)
        if previous is not None:
            tensor = _after(previous, tensor)
        channel = self._channel(device)
        if _tracing():  # ZEROOPT_XLA_TRACE=1: which collective got which channel, where
            import traceback

            where = [f"{f.name}:{f.lineno}" for f in traceback.extract_stack()[-7:-3]]
            print(f"zeroopt.xla: rank {self.rank} channel {channel['channel_id']} "
                  f"shape {list(tensor.shape)} from {where}", flush=True)
        out = run(tensor, **channel)
        _channels.last[device] = out.reshape(-1)[:1]
        return out

    def _reduce_scatter(self, flat: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """``flat`` (1-D, numel divisible by world_size) reduced over ranks; returns this
        rank's chunk, a new tensor."""
        return self._in_order(self._untokened_reduce_scatter(op), flat)

    def _untokened_reduce_scatter(self, op: str):
        """xm.reduce_scatter without keeping its new all-reduce token. xm threads a token
        through every reduce-scatter of a replica and ``torch_xla.sync()`` drops it
        afterwards; with replicas as threads, dropping it waits for the graph just launched
        while holding the GIL, and that graph waits in a collective for the other replicas,
        which need the GIL to launch theirs: a deadlock (seen at W=2 within a few steps).
        The chain of ``_in_order`` orders the collectives instead."""
        XLAC = self._torch_xla._XLAC

        def run(t: torch.Tensor, groups, channel_id, use_global_device_ids) -> torch.Tensor:
            """This rank's chunk of ``t`` (1-D) reduced by ``op``, on channel ``channel_id``."""
            token = XLAC._get_all_reduce_token(XLAC._xla_get_default_device())
            out, _ = XLAC._xla_reduce_scatter(op, t, token, 1.0, 0, self.world_size,
                                              groups or [], True, channel_id,
                                              use_global_device_ids)
            return out

        return run

    def _all_gather(self, chunk: torch.Tensor) -> torch.Tensor:
        """Every rank's 1-D ``chunk``, concatenated in rank order (a new tensor)."""
        return self._in_order(lambda t, **channel: self._xm.all_gather(
            t, 0, pin_layout=False, **channel), chunk)

    def _all_reduced(self, tensor: torch.Tensor, op: str) -> torch.Tensor:
        """``tensor`` reduced over ranks, as a new tensor of its shape."""
        if op not in _REDUCE_TYPES:
            raise ValueError(f"all_reduce op must be one of {_REDUCE_TYPES}, got {op!r}")
        if self.world_size == 1:
            return tensor.clone()
        flat = tensor.reshape(-1)
        n = flat.numel()
        padded = -(-max(n, 1) // self.world_size) * self.world_size
        if padded != n:
            flat = torch.cat([flat, flat.new_zeros(padded - n)])
        total = self._all_gather(self._reduce_scatter(flat, op))
        return total[:n].view(tensor.shape)

    # -- base.Collectives --------------------------------------------------------------------

    lazy = True

    def host_all_reduce(self, values: torch.Tensor, device: torch.device,
                        op: str = "sum") -> torch.Tensor:
        """``values`` (small, CPU) reduced over the replicas and read back, in a graph of its
        own that holds only this collective (``_host_read``)."""
        if self.world_size == 1:
            return values.clone()
        with self._host_read():
            return self._all_reduced(values.to(device), op).cpu()

    def reduce_bucket(self, bucket: torch.Tensor) -> Handle:
        """A reduce-scatter, copied into chunk ``rank``; returns ``Done()`` (see
        ``Collectives.reduce_bucket``)."""
        # Lazy, like every XLA op: the reduction runs with the step's graph, so there is
        # nothing to wait for here (the handle is already done).
        if self.world_size > 1:
            mine = self._reduce_scatter(bucket)
            bucket.chunk(self.world_size)[self.rank].copy_(mine)
        return Done()

    def gather_bucket(self, bucket: torch.Tensor) -> Handle:
        """An all-gather of chunk ``rank``, copied into ``bucket``; lazy like every XLA op,
        so it returns ``Done()`` (see ``Collectives.gather_bucket``)."""
        if self.world_size > 1:
            bucket.copy_(self._all_gather(bucket.chunk(self.world_size)[self.rank]))
        return Done()

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> None:
        """See ``Collectives.all_reduce``; a bool tensor is reduced as int32 (so "sum" and
        "max" act as any, "min" as all).

        Raises:
            ValueError: ``op`` is not "sum", "max" or "min".
        """
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
        with self._host_read():
            sizes = self._all_gather(size).cpu().tolist()
        longest = max(sizes)
        data = torch.zeros(longest, dtype=torch.uint8)
        data[:len(payload)] = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
        with self._host_read():
            gathered = self._all_gather(data.to(self.device)).cpu()
        return [pickle.loads(gathered[r * longest:r * longest + n].numpy().tobytes())
                for r, n in enumerate(sizes)]

    def barrier(self) -> None:
        """Every replica reaches this point: a one-element all-reduce, read on the host."""
        if self.world_size == 1:
            return
        flag = torch.ones(1, dtype=torch.int32, device=self.device)
        with self._host_read():
            got = int(self._all_reduced(flag, "sum").cpu()[0])
        if got != self.world_size:
            raise RuntimeError(f"zeroopt: XLA barrier counted {got} of {self.world_size} "
                               "replicas")


__all__ = ["XlaCollectives", "cpu_replicas_environment", "mark_step", "xla_available", "xla_collectives", "xla_device"]


def _after(previous: torch.Tensor, tensor: torch.Tensor) -> torch.Tensor:
    """``tensor``'s values, bit for bit, computed from ``previous`` (a one-element tensor) too:
    plus -0.0 derived from it (x + -0.0 is x for every x, -0.0 included; XLA folds neither the
    product of a variable by 0 nor its sum with -0.0, since inf and nan make them no-ops only
    after ``nan_to_num``). The link is a buffer the executor sees, so it orders the two."""
    zero = torch.nan_to_num(previous.float(), 0.0, 0.0, 0.0).abs().mul(0).neg()
    if tensor.is_floating_point():
        return tensor + zero.to(tensor.dtype)
    return (tensor.to(torch.float64) + zero).to(tensor.dtype)  # integers exact up to 2**53


def _tracing() -> bool:
    """ZEROOPT_XLA_TRACE, read when used (a test or a debugging session may set it late)."""
    return os.environ.get("ZEROOPT_XLA_TRACE", "") not in ("", "0")
