"""The updated params' all-gather, overlapped with the next forward.

As Megatron-LM's ``overlap_param_gather``: ``step()`` launches one gather per bucket and
returns; the params are then waited for where they are first used, so the gathers run while
the next forward computes the layers before them.

- **Forward:** a forward pre-hook on every module (``register_module_forward_pre_hook``, so
  the model need not be passed in) waits for the buckets holding that module's own params.
  The gathers are launched in reverse bucket order: the layout packs params in reverse
  registration order (the order backward produces their gradients), so the last bucket holds
  the first layers the forward runs, and is launched first.
- **Anything else that touches a param before its gather is waited for** (``model.
  state_dict()``, a loop over ``model.parameters()``, ``p.copy_(...)``, printing a param):
  while gathers are pending a ``TorchFunctionMode`` sees every torch call, and one whose
  tensors share storage with a pending bucket waits for that bucket first. A module that
  reads its params outside Python (``torch.compile``d, scripted) waits for every bucket.
- **zeroopt's own calls** that read or write the params (``step()``, ``clip_grad_norm_()``,
  ``state_dict()``, ``load_state_dict()``, ``eval()``/``train()``, checkpoints) finish every
  gather first (``finish``).

The hook and the guard are one per process, shared by every optimizer with gathers in flight,
and removed once none has any. By default overlap is on wherever a gather's bytes move while this rank computes (NCCL, gloo's
ring over sockets, MPI), and off over the shared-memory transport, where a gather is this rank
copying its peers' chunks itself: the same core does that copy in step() or in the forward
(bench_zero: 0.144 s per iteration blocking against 0.156 s overlapped, W = 2 on 2 cores).
Overlap is also off (each step waits for its gathers, as before)
where it cannot help or cannot be guarded: one rank, XLA (the gathers run inside the compiled
step), or when another torch function mode is active at the end of the step (the guard must
be alone on the stack to be removed safely).

Cost while gathers are pending: every torch call made from Python passes through the guard
(a dict lookup per tensor argument, a few microseconds); none once they are all waited for.
"""

from __future__ import annotations

import contextlib
import itertools
import time

import torch
from torch.overrides import TorchFunctionMode

from .comm import Collectives, Handle
from .layout import Layout


class ParamGather:
    """The param buckets' all-gathers of the latest step, and where they are waited for.

    Args:
        layout: the optimizer's ``Layout`` (its buckets and the params in them).
        comm: the ``Collectives`` whose ``gather_bucket`` fills the buckets.
        overlap: True to return from ``start`` with the gathers in flight (see the module
            notes); False to wait for them there; None: True unless a gather is this rank's
            own copy (``comm.gathers_by_copy``: shared memory), where there is nothing to
            overlap: the same core copies either way (bench_zero measured it no faster).

    Attributes:
        overlap: whether ``start`` leaves the gathers in flight.
        waits_in_forward: buckets waited for by the forward pre-hook or the guard (not by
            zeroopt's own calls) since the optimizer was built.
        wait_seconds: seconds spent blocked waiting for gathers since construction.
    """

    def __init__(self, layout: Layout, comm: Collectives, overlap: bool | None):
        self.layout, self.comm = layout, comm
        if overlap is None:
            overlap = not comm.gathers_by_copy
        self.overlap = overlap and comm.world_size > 1 and comm.backend != "xla"
        self.waits_in_forward = 0
        self.wait_seconds = 0.0
        self._pending: dict[int, Handle] = {}  # bucket index -> its gather, in launch order
        self._bucket_of: dict[int, int] = {}  # id(param) -> bucket index
        self._storages: dict[int, int] = {}  # storage address -> buffer index

    @property
    def pending(self) -> bool:
        """Whether some bucket's gather has not been waited for."""
        return bool(self._pending)

    def start(self, wait: bool = False) -> None:
        """Launch every bucket's gather (this rank's chunks must be in the buffers). A
        collective: every rank calls it.

        Args:
            wait: wait for the gathers here even when overlapping (default False).
        """
        self.finish()
        overlap = self.overlap and not wait
        order = reversed(self.layout.buckets) if overlap else self.layout.buckets
        for bucket in order:
            self._pending[bucket.index] = self.comm.gather_bucket(self.layout.bucket_view(bucket))
        if not overlap or not _WATCH.can_watch():
            self.finish()
            return
        self._bucket_of = {id(slot.param): slot.bucket for slot in self.layout.slots}
        self._storages = {_storage_address(buffer.data): buffer.index
                          for buffer in self.layout.buffers}
        _WATCH.add(self)

    def finish(self) -> None:
        """Wait for every pending gather: afterwards the model holds the stepped params."""
        for b in list(self._pending):
            self._wait(b)
        _WATCH.discard(self)

    # -- where the waits happen ---------------------------------------------------------

    def _wait(self, b: int) -> None:
        """Wait for bucket ``b``'s gather, and first for every gather launched before it.
        Every rank then waits in launch order, whatever order its forward touches the
        buckets in: a ring (W > 2) moves on only while its rank waits on it, so two ranks
        waiting on different rings would wait for each other forever."""
        if b not in self._pending:
            return
        started = time.perf_counter()
        with _WATCH.quiet():
            for earlier in list(self._pending):
                self._pending.pop(earlier).wait()
                if earlier == b:
                    break
        self.wait_seconds += time.perf_counter() - started

    def before_forward(self, module: torch.nn.Module) -> None:
        """Wait for the pending buckets holding ``module``'s own params (all of them for a
        module that reads its params outside Python), and let the others progress."""
        if _reads_params_outside_python(module):
            self.finish()
            return
        for param in module.parameters(recurse=False):
            b = self._bucket_of.get(id(param))
            if b in self._pending:
                self.waits_in_forward += 1
                self._wait(b)
        with _WATCH.quiet():
            for handle in list(self._pending.values()):  # lets a ring move on (W > 2)
                handle.is_completed()

    def wait_for_tensors(self, tensors) -> None:
        """Wait for the pending buckets that any of ``tensors`` shares memory with (a param,
        a view of one, a flat buffer)."""
        for t in tensors:
            b = self._bucket_of.get(id(t))
            if b is not None:
                if b in self._pending:
                    self.waits_in_forward += 1
                    self._wait(b)
                continue
            try:
                buffer = self._storages.get(_storage_address(t))
            except (RuntimeError, NotImplementedError):  # no storage (meta, lazy, sparse)
                continue
            if buffer is not None:
                lo, hi = _element_span(t)
                for bucket in self.layout.buffers[buffer].buckets:
                    if bucket.index in self._pending and \
                            bucket.start < hi and lo < bucket.start + bucket.numel:
                        self.waits_in_forward += 1
                        self._wait(bucket.index)


class _Watch:
    """The process's gathers in flight (of every optimizer), the one forward pre-hook and the
    one guard mode that wait for them; both are removed once nothing is pending."""

    def __init__(self):
        self.gathers: list[ParamGather] = []
        self.hook = None
        self.guard: _Guard | None = None
        self.waiting = False  # inside a wait: the collectives' own torch calls pass

    @contextlib.contextmanager
    def quiet(self):
        """The guard lets every call through (the collectives' own copies into the buckets
        being waited for must not wait for them again)."""
        previous, self.waiting = self.waiting, True
        try:
            yield
        finally:
            self.waiting = previous

    def can_watch(self) -> bool:
        """Whether the guard is, or can be put, alone on torch's function-mode stack."""
        depth = _function_mode_depth()
        return depth == 0 or (depth == 1 and self.guard is not None and _top_mode_is(self.guard))

    def add(self, gather: ParamGather) -> None:
        """Watch ``gather``'s pending buckets: install the hook and push the guard if they
        are not there yet (``can_watch`` must have said True)."""
        if gather not in self.gathers:
            self.gathers.append(gather)
        if self.hook is None:
            self.hook = torch.nn.modules.module.register_module_forward_pre_hook(
                self.before_forward)
        if self.guard is None:
            self.guard = _Guard(self)
            self.guard.__enter__()

    def discard(self, gather: ParamGather) -> None:
        """Stop watching ``gather`` (it has nothing pending); stand down if nothing is."""
        if gather in self.gathers:
            self.gathers.remove(gather)
        self.stand_down()

    def before_forward(self, module: torch.nn.Module, args) -> None:
        """The forward pre-hook: every watched gather waits for ``module``'s buckets
        (``ParamGather.before_forward``); ``args`` (the module's inputs) are not read."""
        for gather in list(self.gathers):
            gather.before_forward(module)
            if not gather.pending and gather in self.gathers:
                self.gathers.remove(gather)
        self.stand_down()

    def wait_for_tensors(self, args, kwargs) -> None:
        """The guard's wait: the pending buckets that the tensors among a torch call's
        ``args`` and ``kwargs`` touch, of every watched gather."""
        tensors = list(_tensors_in(args, kwargs))
        for gather in self.gathers:
            if gather.pending:
                gather.wait_for_tensors(tensors)

    def stand_down(self) -> None:
        """Nothing pending: remove the guard when it is on top of the mode stack (else it
        stays, inert, until the next chance: the next module call), then the hook."""
        if self.gathers:
            return
        if self.guard is not None and _top_mode_is(self.guard) and _function_mode_depth() == 1:
            _pop_function_mode()
            self.guard = None
        if self.guard is None and self.hook is not None:
            self.hook.remove()
            self.hook = None


def _metadata_calls() -> frozenset:
    """Torch calls that read or set a tensor's metadata, never its elements: the training
    loop makes them on every param between a step and the next forward (``zero_grad()`` sets
    ``p.grad = None``; a loop checks ``p.requires_grad``), and they need not wait."""
    calls = set()
    for name in ("grad", "requires_grad", "shape", "dtype", "device", "is_leaf", "grad_fn",
                 "layout", "ndim", "names", "is_cuda", "is_sparse", "is_quantized", "is_meta",
                 "itemsize", "nbytes", "_version", "_base", "_post_accumulate_grad_hooks",
                 "_backward_hooks"):
        attribute = getattr(torch.Tensor, name, None)
        calls.update(getattr(attribute, accessor) for accessor in ("__get__", "__set__",
                                                                    "__delete__")
                     if hasattr(attribute, accessor))
    for name in ("size", "dim", "numel", "stride", "element_size", "is_contiguous",
                 "requires_grad_", "register_hook", "register_post_accumulate_grad_hook",
                 "storage_offset", "get_device", "is_floating_point", "is_complex",
                 "__hash__", "__len__"):
        if hasattr(torch.Tensor, name):
            calls.add(getattr(torch.Tensor, name))
    return frozenset(calls)


_METADATA_CALLS = _metadata_calls()


class _Guard(TorchFunctionMode):
    """Every torch call that may read or write elements waits first for the pending buckets
    its tensors touch."""

    def __init__(self, watch: _Watch):
        super().__init__()
        self.watch = watch

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.watch.gathers and not self.watch.waiting and func not in _METADATA_CALLS:
            self.watch.wait_for_tensors(args, kwargs)
        return func(*args, **kwargs)


def _tensors_in(args, kwargs):
    """The tensors among a call's arguments, and in lists and tuples of them."""
    for value in itertools.chain(args, kwargs.values()):
        if isinstance(value, torch.Tensor):
            yield value
        elif isinstance(value, (list, tuple)):
            yield from (v for v in value if isinstance(v, torch.Tensor))


def _storage_address(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _element_span(t: torch.Tensor) -> tuple[int, int]:
    """The storage elements [lo, hi) that ``t`` can reach."""
    lo = t.storage_offset()
    if t.numel() == 0:
        return lo, lo
    return lo, lo + 1 + sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride()))


def _reads_params_outside_python(module: torch.nn.Module) -> bool:
    """A compiled or scripted module reads its params where no torch function mode sees."""
    return isinstance(module, torch.jit.ScriptModule) or \
        type(module).__name__ == "OptimizedModule"


# torch has no public way to look at or edit the function-mode stack out of order: these
# three functions are the only places zeroopt touches it.
def _function_mode_depth() -> int:
    return torch._C._len_torch_function_stack()


def _top_mode_is(mode: TorchFunctionMode) -> bool:
    depth = _function_mode_depth()
    return depth > 0 and torch._C._get_function_stack_at(depth - 1) is mode


def _pop_function_mode() -> None:
    torch._C._pop_torch_function_stack()


_WATCH = _Watch()
