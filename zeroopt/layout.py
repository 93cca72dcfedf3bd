"""Where every element lives: flat buffers, buckets, and the slice of each param a rank owns.

Trainable params of one dtype are packed, in reverse registration order (roughly the order
backward produces their gradients), into one contiguous flat buffer; the model's params become
views into it. The buffer is cut into buckets, and every bucket is padded to a multiple of
``world_size * pad_multiple`` and split into ``world_size`` equal chunks: rank r owns chunk r of
every bucket. So each bucket's gradient reduction and param gather is one equal-chunk
collective, and a param may straddle chunk (shard) boundaries freely.

Params are also split by their *state kind* (state precision, paged or not; see
``zeroopt.states``): one flat buffer per (dtype, device, kind), so each buffer's part of the shard
keeps its states in one form. Params with 8-bit state start on a 256-element boundary and take a
whole number of blocks, so each quantization block belongs to one param (the blocks are then
those bitsandbytes would give the param alone) and to one rank, at every world size.

A rank's *shard* is its chunks of all buckets, laid end to end. Optimizer state, fp32 master
weights and the averaged gradient live in shard space; the ``ShardPiece`` map says which part of
which param each stretch of the shard belongs to. Params that a rule steps whole (GaLore,
Adafactor: a kind with ``whole``) are never cut: in their buckets every param goes whole to one
rank, largest first, to the rank with the fewest elements in that bucket (ties: the least
placement cost so far, the rule's ``placement_cost``, by default a thin SVD's m n min(m, n) per
matrix), and each rank's params sit end to end in its chunk, padded to the largest chunk. The
collectives stay equal-chunk reduce-scatters and all-gathers, each rank gets whole gradients of
the matrices it owns, and the SVDs are spread over the ranks. Such a bucket is closed once it
holds at least ``world_size`` times its largest param, so the padding stays below one param per
rank even when a matrix is larger than ``bucket_numel`` (a single matrix larger than all the
rest together still goes to one rank; the other ranks' chunks are padding, which that bucket's
collectives carry).

Ranges are named for what they index:

- buffer offsets (``start``) index a flat buffer,
- param offsets index one flattened param,
- shard offsets index this rank's shard.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, NamedTuple

import torch

from .algorithms.base import thin_svd_cost

DEFAULT_BUCKET_NUMEL = 4_000_000  # gloo on CPU moves 4M-element buckets at full speed
DEFAULT_PAD_MULTIPLE = 256  # chunks stay multiples of 256 elements: quantization blocks never straddle ranks


@dataclass(eq=False)
class ParamSlot:
    """One trainable param's place in a flat buffer.

    Attributes:
        param: the model's param; once ``Layout.allocate_param_buffers`` has run, a view of
            its buffer's ``data``.
        index: its position in the optimizer's ``param_groups`` order, counted over all
            groups: its key in ``state_dict()["state"]``, as in torch.optim.
        group: the index of its param group.
        buffer: the index of its ``FlatBuffer`` in ``Layout.buffers``.
        bucket: the index of its ``Bucket`` in ``Layout.buckets``.
        start: buffer offset (elements) of its first element.
        numel: its number of elements.
        extent: ``numel`` rounded up to its state kind's ``block_numel`` (256 for 8-bit
            states, else 1): the elements it takes in the buffer. The padding after its
            ``numel`` elements stays zero.
    """

    param: torch.nn.Parameter
    index: int  # position in the optimizer's param_groups order (the state_dict key)
    group: int
    buffer: int
    bucket: int
    start: int  # buffer offset of the param's first element
    numel: int
    extent: int  # numel, rounded up to its kind's block: the padding after it stays zero

    @property
    def end(self) -> int:
        """Buffer offset one past the param's last element: ``start + numel`` (its padding
        not included)."""
        return self.start + self.numel


@dataclass(eq=False)
class Bucket:
    """A contiguous range of one buffer that is reduced and gathered as one collective.

    As the buckets of Megatron-LM's ``param_and_grad_buffer`` under its distributed
    optimizer: padded to a multiple of the data-parallel size, each rank owning one equal,
    contiguous chunk of it (here chunk r belongs to rank r).

    Attributes:
        index: its position in ``Layout.buckets``, the order buckets are launched in.
        buffer: the index of the ``FlatBuffer`` it is a range of.
        start: buffer offset (elements) of its first element.
        numel: its length in elements, padding included: a multiple of
            ``world_size * pad_multiple``.
        world_size: the number of equal chunks it is split into.
        slots: its params, in buffer order.
        shard_offset: shard offset (elements) where its owned chunk sits in a rank's shard
            (the same on every rank).
        gaps: buffer ranges ``[lo, hi)`` that no param nor its padding occupies (the
            bucket's padding; for whole params, the end of each rank's chunk): they stay
            zero.
    """

    index: int
    buffer: int
    start: int
    numel: int  # padded: a multiple of world_size * pad_multiple
    world_size: int
    slots: list[ParamSlot] = field(default_factory=list)
    shard_offset: int = 0  # where the owned chunk sits in the owning rank's shard
    # buffer ranges [lo, hi) no param (nor its padding) occupies: they stay zero
    gaps: list[tuple[int, int]] = field(default_factory=list)

    @property
    def chunk_numel(self) -> int:
        """Elements in each rank's chunk: ``numel // world_size``."""
        return self.numel // self.world_size

    def owned_range(self, rank: int) -> tuple[int, int]:
        """Buffer offsets [lo, hi) of the chunk that ``rank`` owns."""
        lo = self.start + rank * self.chunk_numel
        return lo, lo + self.chunk_numel


@dataclass(eq=False)
class FlatBuffer:
    """The packed params of one dtype, and the range of the shard their chunks occupy.

    Attributes:
        index: its position in ``Layout.buffers``.
        dtype: its params' dtype (and that of ``data``).
        device: its params' device.
        kind: how its params' states are kept (a ``zeroopt.states.StateKind``: precision,
            paged, block size, whole), or None when the layout was given no ``kind_of``.
        numel: its length in elements: the sum of its buckets' (padded) ``numel``.
        data: the 1-D tensor of ``numel`` elements its params are views of; None until
            ``Layout.allocate_param_buffers``.
        buckets: its buckets, in buffer order.
        shard_offset: shard offset (elements) where its buckets' chunks begin in a rank's
            shard.
        shard_numel: elements of the shard its chunks take: the sum of its buckets'
            ``chunk_numel``.
    """

    index: int
    dtype: torch.dtype
    device: torch.device
    kind: object = None  # how its states are kept (a zeroopt.states.StateKind), or None
    numel: int = 0
    data: torch.Tensor | None = None
    buckets: list[Bucket] = field(default_factory=list)
    shard_offset: int = 0
    shard_numel: int = 0

    def region_offset(self, shard_offset: int) -> int:
        """The *region offset* of shard offset ``shard_offset``: where it sits in this
        buffer's part of the shard (its states, its masters)."""
        return shard_offset - self.shard_offset


class Run(NamedTuple):
    """A maximal stretch of this rank's shard in one bucket's chunk and one param group."""

    group: int
    bucket: Bucket
    shard_offset: int
    numel: int


@dataclass(frozen=True)
class ShardPiece:
    """The part of one param that this rank owns: ``numel`` elements starting at
    ``param_offset`` of the flattened param, stored at ``shard_offset`` of the shard.

    Attributes:
        slot: the param's ``ParamSlot``.
        param_offset: param offset (elements into the flattened param) of its first element.
        shard_offset: shard offset of that element.
        numel: its length in elements (from ``Layout.pieces_of(padded=True)``, the param's
            padding included).
    """

    slot: ParamSlot
    param_offset: int
    shard_offset: int
    numel: int

    @property
    def buffer_start(self) -> int:
        """Buffer offset of the piece's first element: ``slot.start + param_offset``."""
        return self.slot.start + self.param_offset


def _zeros(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.zeros(numel, dtype=dtype, device=device)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple




class Layout:
    """Packs ``groups`` (lists of trainable params, one list per param group) into flat buffers."""

    def __init__(
        self,
        groups: list[list[tuple[int, torch.nn.Parameter]]],
        world_size: int,
        rank: int,
        bucket_numel: int = DEFAULT_BUCKET_NUMEL,
        pad_multiple: int = DEFAULT_PAD_MULTIPLE,
        kind_of=None,
        placement_cost: Callable[[torch.Size], int] = thin_svd_cost,
    ):
        """``kind_of(group, param)`` names a param's state kind; params of one kind share
        buffers, and a kind's ``block_numel`` (1 if absent) aligns and pads its params.
        ``placement_cost(shape)`` is the work of stepping a whole param of that shape (the
        rule's ``placement_cost``): whole params are spread so that the ranks' totals stay
        even."""
        self.world_size = world_size
        self.rank = rank
        self.bucket_numel, self.pad_multiple = bucket_numel, pad_multiple
        self.kind_of = kind_of or (lambda group, param: None)
        self.placement_cost = placement_cost
        self.buffers: list[FlatBuffer] = []
        self.buckets: list[Bucket] = []
        self.slots: list[ParamSlot] = []
        self._placed_cost = [0] * world_size  # per rank, over the whole-param buckets so far
        self.shard_numel = 0
        self.extend(groups)

    def extend(self, groups: list[list[tuple[int, torch.nn.Parameter]]]) -> int:
        """Pack more params (params unfrozen after construction) into new buffers after the
        existing ones: every existing buffer, bucket, slot and shard offset stays where it is.
        Returns the index of the first new buffer (``allocate_param_buffers`` takes it)."""
        first_new = len(self.buffers)
        align = self.world_size * self.pad_multiple
        # Reverse order: the last params get their gradients first in backward.
        ordered = [(g, i, p, self.kind_of(g, p)) for g, group in enumerate(groups)
                   for i, p in group][::-1]
        for key in dict.fromkeys((p.dtype, p.device, kind) for _, _, p, kind in ordered):
            dtype, device, kind = key
            buffer = FlatBuffer(len(self.buffers), dtype, device, kind)
            self.buffers.append(buffer)
            block = getattr(kind, "block_numel", 1)
            whole = getattr(kind, "whole", False)
            assert self.pad_multiple % block == 0, "blocks must not straddle chunks"
            bucket, largest = None, 0
            for group, index, param, param_kind in ordered:
                if (param.dtype, param.device, param_kind) != key:
                    continue
                if bucket is None:
                    bucket = Bucket(len(self.buckets), buffer.index, buffer.numel, 0,
                                    self.world_size)
                slot = ParamSlot(param, index, group, buffer.index, bucket.index,
                                 bucket.start + bucket.numel, param.numel(),
                                 _round_up(param.numel(), block))
                bucket.slots.append(slot)
                bucket.numel += slot.extent
                self.slots.append(slot)
                largest = max(largest, slot.extent) if whole else 0
                if bucket.numel >= max(self.bucket_numel, self.world_size * largest):
                    self._close(bucket, buffer, align, whole, self.pad_multiple)
                    bucket, largest = None, 0
            if bucket is not None:
                self._close(bucket, buffer, align, whole, self.pad_multiple)

        for buffer in self.buffers[first_new:]:
            buffer.shard_offset = self.shard_numel
            for bucket in buffer.buckets:
                bucket.shard_offset = self.shard_numel
                self.shard_numel += bucket.chunk_numel
            buffer.shard_numel = self.shard_numel - buffer.shard_offset
        self.pieces = self.pieces_of(self.rank)
        self.padded_pieces = self.pieces_of(self.rank, padded=True)
        return first_new

    def _close(self, bucket: Bucket, buffer: FlatBuffer, align: int, whole: bool,
               pad_multiple: int) -> None:
        if whole:
            self._place_whole(bucket, pad_multiple)
        bucket.numel = _round_up(bucket.numel, align)
        covered = sorted((s.start, s.start + s.extent) for s in bucket.slots)
        at = bucket.start
        for lo, hi in [*covered, (bucket.start + bucket.numel, None)]:
            if at < lo:
                bucket.gaps.append((at, lo))
            at = hi
        buffer.numel += bucket.numel
        buffer.buckets.append(bucket)
        self.buckets.append(bucket)

    def _place_whole(self, bucket: Bucket, pad_multiple: int) -> None:
        """Each param of ``bucket`` whole to one rank (see the module notes), then each rank's
        params end to end, in their packing order, in its chunk."""
        load, owner = [0] * self.world_size, {}
        for slot in sorted(bucket.slots, key=lambda s: -s.extent):
            rank = min(range(self.world_size), key=lambda r: (load[r], self._placed_cost[r], r))
            owner[slot] = rank
            load[rank] += slot.extent
            self._placed_cost[rank] += self.placement_cost(slot.param.shape)
        chunk = _round_up(max(load), pad_multiple)
        filled = [0] * self.world_size
        for slot in bucket.slots:
            rank = owner[slot]
            slot.start = bucket.start + rank * chunk + filled[rank]
            filled[rank] += slot.extent
        bucket.slots.sort(key=lambda s: s.start)
        bucket.numel = chunk * self.world_size

    def owner(self, slot: ParamSlot) -> int:
        """The rank whose chunk holds ``slot``'s first element (for a whole param, all of it)."""
        bucket = self.buckets[slot.bucket]
        return (slot.start - bucket.start) // bucket.chunk_numel

    def pieces_of(self, rank: int, padded: bool = False) -> list[ShardPiece]:
        """Every (param, range) that ``rank`` owns, in shard order; ``padded`` counts each
        param's padding as its own (so 8-bit pieces are whole blocks)."""
        pieces = []
        for bucket in self.buckets:
            lo, hi = bucket.owned_range(rank)
            for slot in bucket.slots:
                end = slot.start + slot.extent if padded else slot.end
                start, end = max(slot.start, lo), min(end, hi)
                if start < end:
                    pieces.append(ShardPiece(slot, start - slot.start,
                                             bucket.shard_offset + start - lo, end - start))
        return pieces

    def runs(self, slots: set[ParamSlot] | None = None) -> list[Run]:
        """This rank's pieces (of ``slots`` only, if given) merged into maximal runs
        ``(group, bucket, shard_offset, numel)`` that lie in one bucket's chunk and one param
        group: the tensors an element-wise update steps over, padding included: a padded param
        and its gradient are zero there, and every rule leaves a zero param with a zero
        gradient at zero."""
        runs: list[list] = []
        for piece in self.padded_pieces:
            if slots is not None and piece.slot not in slots:
                continue
            group, bucket = piece.slot.group, self.buckets[piece.slot.bucket]
            last = runs[-1] if runs else None
            if last and last[0] == group and last[1] is bucket \
                    and last[2] + last[3] == piece.shard_offset:
                last[3] += piece.numel
            else:
                runs.append([group, bucket, piece.shard_offset, piece.numel])
        return [Run(*r) for r in runs]

    def allocate_param_buffers(self, first: int = 0, allocate=None) -> None:
        """Move the params of buffers ``first`` on into their flat buffers; each param becomes
        a view of its buffer. ``allocate(numel, dtype, device)`` makes a buffer's zero-filled
        storage (default ``torch.zeros``; the optimizer passes ``Collectives.allocate``)."""
        for buffer in self.buffers[first:]:
            buffer.data = (allocate or _zeros)(buffer.numel, buffer.dtype, buffer.device)
        for slot in self.slots:
            if slot.buffer < first:
                continue
            flat = self.buffers[slot.buffer].data[slot.start:slot.end]
            flat.copy_(slot.param.detach().reshape(-1))
            slot.param.data = flat.view(slot.param.shape)

    def check_params_in_place(self) -> None:
        """Refuse params that are no longer views of their flat buffer (the model was moved
        or cast after the optimizer was built: its updates would no longer reach them). One
        param per buffer tells: ``.to()`` moves them all."""
        for buffer in self.buffers:
            slot = buffer.buckets[0].slots[0]
            try:
                moved = slot.param.untyped_storage().data_ptr() != \
                    buffer.data.untyped_storage().data_ptr()
            except RuntimeError:  # a lazy device (XLA) has no storage to compare
                continue
            if moved:
                raise RuntimeError(
                    f"a param of shape {list(slot.param.shape)} is no longer in ZeroOptimizer's "
                    "buffers: the model was moved or cast (model.to(...)) after the optimizer "
                    "was built. Move the model to its device and dtype first, then build the "
                    "optimizer")

    def bucket_view(self, bucket: Bucket) -> torch.Tensor:
        """``bucket``'s range of its flat buffer: what the params' all-gather fills.

        Args:
            bucket: one of this layout's buckets, whose buffer is allocated
                (``allocate_param_buffers``).

        Returns:
            A 1-D view of ``bucket.numel`` elements of the buffer's ``data``.
        """
        return self.buffers[bucket.buffer].data[bucket.start:bucket.start + bucket.numel]

    def owned_view(self, data: torch.Tensor, bucket: Bucket) -> torch.Tensor:
        """This rank's chunk of ``bucket`` in ``data`` (a tensor shaped like its buffer)."""
        lo, hi = bucket.owned_range(self.rank)
        return data[lo:hi]
