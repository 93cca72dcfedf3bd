"""How gradients get from backward into this rank's fp32 gradient shard.

``BucketedReducer`` (the default): a hook on every param copies its gradient into its bucket's
staging buffer as soon as autograd has accumulated it, and frees ``param.grad``. A full bucket is
reduced across ranks right away, asynchronously, while backward goes on with the earlier layers.
Buckets are always launched in bucket order (a bucket whose params got no gradient on this rank
is launched, with zeros, at the end of backward), so every rank issues the same collectives in
the same order. When the reduction is harvested, this rank's chunk, divided by the world size,
is written (or, when accumulating, added) into the shard.

- stage 1 keeps every bucket's staging buffer for the life of the optimizer (a full-size
  gradient buffer, as data parallelism has);
- stage 2 takes staging buffers from a small pool and gives each back once its bucket is
  harvested, so gradient memory is the shard plus at most ``max_staged_buckets`` (3) buckets;
- with one data-parallel rank (and fp32 reduction) the staging buffers are the shard itself:
  the reduction is the identity, so there is nothing to copy and nothing to free.

The harvest (and, on one rank, the staging copy) also takes the sum of squares of what it
writes, in the same pass (kernels/harvest.py): the global gradient norm that clipping and the
non-finite check need then costs no pass of its own (``squared_norm``).

Gradient accumulation: each synchronised backward adds its averaged gradient into the shard;
inside ``no_sync()`` backward only accumulates into the staging buffers, and the next
synchronised backward reduces the sum once (stage 2 then holds full staging buffers until it).

For a model already wrapped in DistributedDataParallel, whose ``param.grad`` is already
averaged, ``ddp_gradients.LocalGradients`` takes this module's place.
"""

from __future__ import annotations

from contextlib import contextmanager
import time
from functools import partial
from operator import or_

import torch

from .comm import Collectives, Handle
from .kernels import harvest
from .layout import Bucket, Layout, ParamSlot
from .shard_sums import ShardSums


class BucketedReducer:
    """Gradients reduced in buckets during backward, into this rank's fp32 gradient shard.

    As DistributedDataParallel's reducer, a hook on every param
    (``register_post_accumulate_grad_hook``) stages its gradient into its bucket, and a full
    bucket is reduced asynchronously while backward goes on; unlike DDP, each rank keeps only
    its own chunk of a reduced bucket, averaged (the module notes say how).

    Args:
        layout: the ``Layout`` whose buckets it reduces; a hook goes on every slot's param.
        comm: the ``Collectives`` that reduce the buckets (``reduce_bucket``).
        keep_staging: True (stage 1): every bucket keeps its staging buffer for the
            reducer's life; False (stage 2): staging buffers come from a pool and are given
            back once their bucket is harvested.
        reduce_dtype: the dtype gradients are staged and reduced in.
        device: where the staging buffers and the shard live.
        max_staged_buckets: stage 2's bound on staging buffers held at once (default 3;
            2 was 10% slower per iteration on the benchmark model). Buckets still being
            filled (inside ``no_sync()``) may exceed it.

    Attributes:
        shard: this rank's averaged gradient shard: fp32, ``layout.shard_numel`` elements.
        sync: False inside ``no_sync()``: backward launches no reduction.
        on_reduced: None, or a callable ``(bucket index) -> None`` called after each bucket
            is harvested into the shard (layerwise rules step there).
        before_launch: None, or a callable ``() -> None`` called before each reduction is
            launched (the optimizer finishes the param gathers the forward left pending, so
            every rank has run every gather before its first reduction).
        wait_seconds: seconds spent blocked waiting for reductions since construction (the
            communication that backward's compute did not hide).

    Raises:
        RuntimeError: from backward's hook (or ``take_detached``), when a param has a sparse
            gradient.
    """

    def __init__(self, layout: Layout, comm: Collectives, keep_staging: bool,
                 reduce_dtype: torch.dtype, device: torch.device,
                 max_staged_buckets: int = 3):
        self.layout, self.comm = layout, comm
        self.keep_staging = keep_staging
        # Stage 2 holds at most this many staging buffers. Measured on the benchmark model: 3
        # keeps the reductions overlapped (2 was 10% slower per iteration).
        self.max_staged_buckets = max_staged_buckets
        self.reduce_dtype, self.device = reduce_dtype, device
        self.shard = torch.zeros(layout.shard_numel, dtype=torch.float32, device=device)
        # One data-parallel rank: each bucket is staged straight into its slice of the shard.
        self.in_place = comm.data_parallel_size == 1 and reduce_dtype == torch.float32
        self.sync = True
        n = len(layout.buckets)
        self._staging: list[torch.Tensor | None] = [None] * n
        self._written: list[set[ParamSlot]] = [set() for _ in range(n)]  # staged, not launched
        self._staged_late: set[int] = set()  # buckets staged since the last synced backward
        self._arrived = [0] * n  # gradients seen in the current backward pass
        self._work: list[Handle | None] = [None] * n
        self._shard_filled = [False] * n
        # Sums of squares of what the shard holds, as the harvest (or, in place, the staging
        # copy) writes it: the global norm's partial (squared_norm).
        self._sums = ShardSums(layout)
        self._next_launch = 0
        self._pool: list[torch.Tensor] = []  # stage 2: free staging buffers
        self._largest_bucket = max(bucket.numel for bucket in layout.buckets)
        self._in_backward = False
        self.on_reduced = None  # (bucket index) -> None, after a bucket is harvested
        self.before_launch = None  # () -> None, before each reduction is launched
        self.wait_seconds = 0.0
        # Per slot (layout.slots order), 1 where this rank staged a gradient for its param:
        # this step (since the last consume() or zero()), and since the last zero(); and where
        # torch.optim would hold a zeroed grad (zero(set_to_none=False)) until zero().
        self._used = bytearray(len(layout.slots))
        self._had = bytearray(len(layout.slots))
        self._kept = bytearray(len(layout.slots))
        self._hooks = [slot.param.register_post_accumulate_grad_hook(
            partial(self._on_grad, position, slot)) for position, slot in enumerate(layout.slots)]

    # -- backward ------------------------------------------------------------------------

    def _on_grad(self, position: int, slot: ParamSlot, param: torch.Tensor) -> None:
        if not self._in_backward:
            self._in_backward = True
            torch.autograd.Variable._execution_engine.queue_callback(self._on_backward_end)
        self._stage(position, slot)
        b = slot.bucket
        self._arrived[b] += 1
        if self.sync and self.launches_in_backward:
            while (self._next_launch < len(self._arrived) and self._arrived[self._next_launch]
                   == len(self.layout.buckets[self._next_launch].slots)):
                self._launch(self._next_launch)

    def _stage(self, position: int, slot: ParamSlot) -> None:
        """Move ``slot.param.grad`` into its bucket's staging buffer (added to what an earlier
        micro-step staged) and free it."""
        grad = slot.param.grad
        if grad.is_sparse:
            raise RuntimeError(
                f"zeroopt: a param of shape {list(slot.param.shape)} got a sparse gradient "
                "(nn.Embedding(sparse=True) or nn.EmbeddingBag(sparse=True)?); ZeroOptimizer "
                "shards dense gradients only. Build the module with sparse=False")
        b = slot.bucket
        if self._work[b] is not None:  # the previous pass's reduction still owns the buffer
            self._harvest(b)
        staging = self._staging_of(b)
        bucket = self.layout.buckets[b]
        view = staging[slot.start - bucket.start:slot.end - bucket.start]
        # In place, a filled chunk is the shard's accumulated gradient: add to it.
        add = slot in self._written[b] or (self.in_place and self._shard_filled[b])
        if self.in_place:  # the staged gradient is the shard's: take its norm on the way
            self._sums.set_slot(slot, (harvest.add_into if add else harvest.copy_into)(
                view, grad.reshape(-1)))
        elif add:
            view.add_(grad.reshape(-1))
        else:
            view.copy_(grad.reshape(-1))
        self._written[b].add(slot)
        if not (self._in_backward and self.sync):
            self._staged_late.add(b)
        slot.param.grad = None
        self._used[position] = self._had[position] = 1

    def take_detached(self) -> None:
        """Stage the gradients that did not come through backward's hooks: ``p.grad``
        assigned by hand, ``torch.autograd.grad`` results assigned to it. (A hook frees
        ``p.grad`` as it stages it, so whatever is still there arrived another way.)"""
        for position, slot in enumerate(self.layout.slots):
            if slot.param.grad is not None:
                self._stage(position, slot)

    def _on_backward_end(self) -> None:
        self._in_backward = False
        if self.sync and self.launches_in_backward:
            while self._next_launch < len(self._arrived):
                self._launch(self._next_launch)
        self._arrived = [0] * len(self._arrived)
        self._next_launch = 0
        if self.sync:  # (where it launches, this backward launched every bucket)
            self._staged_late.clear()

    @property
    def launches_in_backward(self) -> bool:
        """False on a lazy backend with several ranks (XLA): there backward only stages, and
        ``step()`` reduces every bucket once (``unreduced``), whatever this rank staged, so
        every replica traces the same collectives without a host read to agree on which
        buckets hold gradients (step_inputs.py). Nothing is lost: the whole step is one graph,
        which XLA schedules as it likes."""
        return not (self.comm.lazy and self.comm.world_size > 1)

    def _staging_of(self, b: int) -> torch.Tensor:
        if self._staging[b] is None:
            bucket = self.layout.buckets[b]
            numel = bucket.numel
            if self.in_place:  # one rank: its chunk is the whole bucket
                self._staging[b] = self.shard[bucket.shard_offset:bucket.shard_offset + numel]
            elif self.keep_staging:
                self._staging[b] = self.comm.allocate(numel, self.reduce_dtype, self.device)
            else:  # pooled buffers fit the largest bucket, so any one serves any bucket
                self._make_room()
                base = self._pool.pop() if self._pool else self.comm.allocate(
                    self._largest_bucket, self.reduce_dtype, self.device)
                self._staging[b] = base[:numel]
        return self._staging[b]

    def _make_room(self) -> None:
        """Stage 2: before staging one more bucket, wait for the oldest reductions until fewer
        than ``max_staged_buckets`` buffers are staged (buckets still being filled, e.g.
        under no_sync, cannot be given back and may exceed the bound)."""
        while self.staged_buckets() >= self.max_staged_buckets and not self._pool:
            in_flight = [b for b, work in enumerate(self._work) if work is not None]
            if not in_flight:
                return
            self._harvest(in_flight[0])

    def staged_buckets(self) -> int:
        """The number of buckets that hold a staging buffer now (pooled free buffers not
        counted)."""
        return sum(t is not None for t in self._staging)

    def staging_bytes(self) -> int:
        """Gradient memory outside the shard: staging buffers, in use or pooled."""
        if self.in_place:
            return 0
        staged = [t if t._base is None else t._base for t in self._staging if t is not None]
        return sum(t.numel() * t.element_size() for t in staged + self._pool)

    def _launch(self, b: int) -> None:
        if self.before_launch is not None:
            self.before_launch()
        bucket = self.layout.buckets[b]
        staging = self._staging_of(b)
        if not (self.in_place and self._shard_filled[b]):  # else: accumulated, keep it
            self._zero_unwritten(bucket, staging, self._written[b])
            if self.in_place:
                for slot in bucket.slots:
                    if slot not in self._written[b]:
                        self._sums.set_slot(slot, 0.0)
        self._written[b] = set()
        self._work[b] = self.comm.reduce_bucket(staging)
        self._next_launch = b + 1
        if not self.keep_staging:  # give finished buckets' memory back early, in order
            for earlier in range(b):
                work = self._work[earlier]
                if work is not None:
                    if not work.is_completed():
                        break
                    self._harvest(earlier)

    @staticmethod
    def _zero_unwritten(bucket: Bucket, staging: torch.Tensor, written: set) -> None:
        """Params with no gradient on this rank contribute zeros; so does the padding."""
        for slot in bucket.slots:
            start, end = slot.end if slot in written else slot.start, slot.start + slot.extent
            if start < end:
                staging[start - bucket.start:end - bucket.start].zero_()
        for lo, hi in bucket.gaps:
            staging[lo - bucket.start:hi - bucket.start].zero_()

    def _harvest(self, b: int) -> None:
        """Take bucket ``b``'s reduced chunk into the shard. Earlier buckets still in flight
        are harvested first: every rank then harvests in bucket order, whatever finished
        first, which a backend whose wait() runs further collectives relies on
        (hierarchical.py)."""
        for earlier in range(b):
            if self._work[earlier] is not None:
                self._harvest(earlier)
        self._wait(b)
        bucket = self.layout.buckets[b]
        if self.in_place:  # staged where the shard is: nothing to move
            self._sums.bucket_from_slots(b, bucket)
            self._shard_filled[b] = True
        else:
            mine = bucket_chunk(self._staging[b], self.comm)
            dst = self.shard[bucket.shard_offset:bucket.shard_offset + bucket.chunk_numel]
            scale = 1.0 / self.comm.data_parallel_size
            if self._shard_filled[b]:
                self._sums.set_bucket(b, harvest.scale_add_into(dst, mine, scale))
            else:
                self._sums.set_bucket(b, harvest.scale_into(dst, mine, scale))
                self._shard_filled[b] = True
        if not (self.keep_staging or self.in_place):
            self._pool.append(self._staging[b]._base)
            self._staging[b] = None
        if self.on_reduced is not None:
            self.on_reduced(b)

    def _wait(self, b: int) -> None:
        started = time.perf_counter()
        self._work[b].wait()
        self._work[b] = None
        self.wait_seconds += time.perf_counter() - started

    # -- step ----------------------------------------------------------------------------

    def finish(self) -> None:
        """Harvest every reduction in flight. Starts no collective: safe on one rank alone."""
        for b, work in enumerate(self._work):
            if work is not None:
                self._harvest(b)

    def staged_late(self) -> bool:
        """Whether a gradient was staged since the last synchronised backward (by hand, or
        inside ``no_sync()`` with no backward after it): what ``pending`` shows where backward
        launches its buckets."""
        return bool(self._staged_late)

    def unreduced(self) -> list[int]:
        """Buckets whose chunk of the shard holds no reduced gradient of this step yet."""
        return [b for b, filled in enumerate(self._shard_filled)
                if not filled and self._work[b] is None]

    def used(self) -> torch.Tensor:
        """fp64 flags, one per slot (``layout.slots`` order): 1 where this rank has staged a
        gradient for the param this step, or where torch.optim would hold a zeroed grad for it
        (``zero(set_to_none=False)`` after it had one): a param used on no rank gets a zero
        gradient then, and is stepped (weight decay, momentum) as torch.optim steps it."""
        flags = bytes(map(or_, self._used, self._kept)) if 1 in self._kept else self._used
        return torch.frombuffer(bytearray(flags), dtype=torch.uint8).double()

    def pending(self) -> torch.Tensor:
        """fp64 flags, one per bucket: 1 where this rank holds staged gradients that no
        reduction has taken yet (hand-assigned ones, or micro-steps run in ``no_sync()``)."""
        return torch.tensor([1.0 if written else 0.0 for written in self._written],
                            dtype=torch.float64)

    def complete(self, launch: list[int]) -> None:
        """Reduce buckets ``launch`` (every rank passes the same list; a rank with nothing
        staged in one sends zeros), harvest everything, and zero the shard's chunks of buckets
        that no reduction filled since ``zero()``."""
        self.finish()
        for b in launch:
            self._launch(b)
        self.finish()
        if not (self.keep_staging or self.launches_in_backward):  # every bucket was staged
            del self._pool[self.max_staged_buckets:]
        for b, filled in enumerate(self._shard_filled):
            if not filled:
                bucket = self.layout.buckets[b]
                self.shard[bucket.shard_offset:bucket.shard_offset + bucket.chunk_numel].zero_()
                self._shard_filled[b] = True
                self._sums.set_bucket(b, 0.0)

    def squared_norm(self) -> torch.Tensor:
        """This rank's part of the squared global 2-norm: the sum of squares of the shard, as
        a 1-element fp64 tensor, from the sums the harvest took (a bucket whose sum is unknown
        is read once here). Call after ``complete``. The sums are used once: anything that
        changes the shard afterwards (clipping) is read again at the next call."""
        return self._sums.total(self.shard)

    def carry_over(self, old: "BucketedReducer") -> None:
        """Take over this step from ``old``, the reducer of this layout before it grew (params
        unfrozen after construction were packed after the existing ones): its reduced shard,
        which the new buckets' chunks follow, and its flags. ``old`` has nothing in flight."""
        old.finish()  # (``old.layout`` is this one: it grew in place)
        filled = old.filled_buckets()
        self.wait_seconds = old.wait_seconds
        self.shard[:old.shard.numel()].copy_(old.shard)
        self._shard_filled[:len(filled)] = filled
        for mine, theirs in ((self._used, old._used), (self._had, old._had),
                             (self._kept, old._kept)):
            mine[:len(theirs)] = theirs

    def filled_buckets(self) -> list[bool]:
        """Per bucket, whether its chunk of the shard holds this step's reduced gradient."""
        return list(self._shard_filled)

    def consume(self) -> None:
        """The step has taken this step's gradients: forget them (``_forget``) and set every
        param's ``grad`` to None. Which params had a gradient since the last ``zero()`` is
        remembered, for ``zero(set_to_none=False)``."""
        self._forget()
        for slot in self.layout.slots:
            slot.param.grad = None

    def zero(self, set_to_none: bool = True) -> None:
        """The optimizer's ``zero_grad``: forget this step's gradients (``_forget``).

        Args:
            set_to_none: torch.optim's ``zero_grad`` argument. True: every param's ``grad`` is
                set to None, and no param is used until it gets a gradient again. False: as
                torch.optim, which zeroes the grads instead of dropping them, a param that had
                a gradient since the last ``zero()`` stays used (a zero gradient) in every
                later step until a ``zero(set_to_none=True)``; a ``grad`` not staged yet
                (assigned by hand) is zeroed in place, and so keeps its param used too.
        """
        if set_to_none:
            self._kept[:] = bytes(len(self._kept))
        else:
            self._kept[:] = bytes(map(or_, self._kept, self._had))
        self._had[:] = bytes(len(self._had))
        self._forget()
        for position, slot in enumerate(self.layout.slots):
            if set_to_none:
                slot.param.grad = None
            elif slot.param.grad is not None:
                slot.param.grad.zero_()
                self._kept[position] = 1

    def _forget(self) -> None:
        """Wait for reductions in flight and drop their results; clear the staged, used and
        filled flags (the next gradients overwrite the staging buffers and the shard)."""
        for b, work in enumerate(self._work):
            if work is not None:
                self._wait(b)
        self._written = [set() for _ in self._written]
        self._staged_late.clear()
        self._shard_filled = [False] * len(self._shard_filled)
        self._sums.forget()
        self._used[:] = bytes(len(self._used))

    @contextmanager
    def no_sync(self):
        """Context for gradient-accumulation micro-steps, as DistributedDataParallel's
        ``no_sync()``: inside it backward only accumulates into the staging buffers and
        launches no reduction; the next synchronised backward reduces the sum once (as does
        ``step()``, for buckets still pending). Stage 2 holds full staging buffers until
        then.

        Yields:
            None.
        """
        previous, self.sync = self.sync, False
        try:
            yield
        finally:
            self.sync = previous

    def remove_hooks(self) -> None:
        """Remove the gradient hook from every param: the reducer takes no more gradients (a
        retired optimizer, or one whose layout grew and got a new reducer)."""
        for hook in self._hooks:
            hook.remove()


def bucket_chunk(bucket: torch.Tensor, comm: Collectives) -> torch.Tensor:
    """This rank's chunk of a bucket-shaped tensor.

    Args:
        bucket: a 1-D tensor of a bucket's ``numel`` elements (a multiple of the world size).
        comm: the ``Collectives``; its ``rank`` and ``world_size`` pick the chunk.

    Returns:
        A view of chunk ``comm.rank`` of ``comm.world_size`` equal chunks.
    """
    return bucket.chunk(comm.world_size)[comm.rank]
