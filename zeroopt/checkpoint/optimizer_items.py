"""A ZeroOptimizer's state as torch.distributed.checkpoint items, per param and layout-free.

Keys (``i`` is the param's state_dict index, as in torch.optim):

- ``optimizer.state.i.<name>``: state ``name`` of param ``i``, flattened in the param's element
  order: fp32 or bf16 values, or 8-bit codes with ``<name>_absmax`` (one fp32 per 256-element
  block of the param, as bitsandbytes keeps them); ``master_param`` for 16-bit params. Each rank
  writes the ranges it owns (``ranges.py``).
- params stepped whole (GaLore, APOLLO, Adafactor): their per-tensor states under the same
  prefix, in the rule's own shapes, written by their owner; their other values (step, APOLLO's
  seed) in ``optimizer.state.i.values``.
- ``optimizer.param_steps`` (torch.optim's per-param step counts, by index) and
  ``optimizer.param_groups`` (hyperparameters, counters). Checkpoints from before per-param
  counts hold ``optimizer.steps``, one per group, which loads into each group's params.

A load reads the ranges its own layout gives it, in whatever form they were saved, and converts
them into the form this optimizer keeps (``encoding.py``): 8-bit codes are copied as they
are where both are 8-bit, and decoded otherwise. The walk from pieces to saved entries is
``pieces.py``'s, shared with the state dict.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable

import torch

from ..states.blockwise import BLOCK
from . import pieces
from .ranges import flat_tensor, merge

PREFIX = "optimizer.state"
_STRIDES = "__strides__"


def save_items(opt, writes_state: bool) -> dict:
    """The optimizer's items for ``torch.distributed.checkpoint.save`` (keys in the module
    notes). Reductions in flight are harvested first, and the masters take what was written
    into 16-bit params since the last step.

    Args:
        opt: the ZeroOptimizer.
        writes_state: whether this rank writes the sharded state (``Job.writes_state``);
            if False, only the step counts and groups (another replica writes the same
            shard).

    Returns:
        ``{key: value}``: ``optimizer.param_steps`` (fp32, one per state_dict index),
        ``optimizer.param_groups`` (pickled groups without their params, and
        ``skipped_steps``), and, if ``writes_state``, each owned piece's states and master
        as flat tensors of which this rank holds its ranges (``ranges.flat_tensor``), and
        its whole params' per-tensor states and pickled other values.
    """
    opt.grads.finish()  # no reduction may be in flight while the shard is read
    opt.shard.sync_masters()  # weights written into 16-bit params since the last step
    items = {"optimizer.param_steps": opt.shard.param_steps(),
             "optimizer.param_groups": _groups_blob(opt)}
    if not writes_state:  # another replica holds the same shard and writes it
        return items
    tensors = [pieces.encoded_tensors(opt.shard, buffer) for buffer in opt.layout.buffers]
    for piece in opt.layout.pieces:
        slot = piece.slot
        region_lo = opt.layout.buffers[slot.buffer].region_offset(piece.shard_offset)
        entries = pieces.piece_entries(tensors[slot.buffer], pieces.state_names(opt.shard, slot),
                                       piece.param_offset, piece.numel, region_lo)
        for saved, (first, end, values) in entries.items():
            per = BLOCK if saved.endswith("_absmax") else 1
            items[f"{PREFIX}.{slot.index}.{saved}"] = flat_tensor(
                -(-slot.numel // per), {(first, end): values})
    for owned in opt.shard.whole.all_owned():
        saved = pieces.tensor_state(opt.shard, owned.slot.index)
        values = {k: v for k, v in saved.items() if not isinstance(v, torch.Tensor)}
        # Memory order too: a column-major GaLore basis multiplies (and rounds) differently
        values[_STRIDES] = {k: v.stride() for k, v in saved.items() if isinstance(v, torch.Tensor)}
        items[f"{PREFIX}.{owned.slot.index}.values"] = pickle.dumps(values)
        for name, value in saved.items():
            if isinstance(value, torch.Tensor):
                items[f"{PREFIX}.{owned.slot.index}.{name}"] = value
    return items


def load_targets(opt, metadata) -> tuple[dict, Callable[[dict], None]]:
    """The items this rank reads (tensors to fill, in the saved dtypes) and the function that
    puts them into the optimizer once DCP has filled them."""
    saved = metadata.state_dict_metadata
    per_group = "optimizer.param_steps" not in saved  # saved before per-param counts
    steps_key = "optimizer.steps" if per_group else "optimizer.param_steps"
    targets = {steps_key: torch.zeros(saved[steps_key].size)}
    reads = []  # (piece, state name, {saved name: (key, first, end)})
    fresh = []  # (piece, state name): params frozen when saved start afresh, as in torch.optim
    wanted: dict[str, list[tuple[int, int]]] = {}
    for piece in opt.layout.pieces:
        slot = piece.slot
        names = list(pieces.state_names(opt.shard, slot))
        if names and f"{PREFIX}.{slot.index}.{names[0]}" not in saved:
            fresh += [(piece, name) for name in names]
            continue
        if slot.buffer in opt.shard.masters and f"{PREFIX}.{slot.index}.{pieces.MASTER}" in saved:
            names.append(pieces.MASTER)
        for name in names:
            key = f"{PREFIX}.{slot.index}.{name}"
            codes = saved[key].properties.dtype == torch.uint8
            # 8-bit codes are read by whole blocks: their scale is per block
            per_block = BLOCK if codes else 1
            first, end = pieces.covering(piece.param_offset, piece.numel, per_block)
            ranges = {name: (key, first * per_block, min(end * per_block, slot.numel))}
            if codes:
                ranges[name + "_absmax"] = (key + "_absmax", first, end)
            for key_, lo, hi in ranges.values():
                wanted.setdefault(key_, []).append((lo, hi))
            reads.append((piece, name, ranges))
    local: dict[str, dict[tuple[int, int], torch.Tensor]] = {}
    for key, ranges in wanted.items():
        dtype = saved[key].properties.dtype
        local[key] = {(lo, hi): torch.empty(hi - lo, dtype=dtype, device=opt.device)
                      for lo, hi in merge(ranges)}
        targets[key] = flat_tensor(saved[key].size.numel(), local[key])
    whole = {}
    for owned in opt.shard.whole.all_owned():
        prefix = f"{PREFIX}.{owned.slot.index}."
        keys = [k for k in saved if k.startswith(prefix) and k != prefix + pieces.MASTER]
        whole[owned.slot.index] = keys
        for key in keys:
            targets[key] = None if key == prefix + "values" else torch.empty(
                saved[key].size, dtype=saved[key].properties.dtype, device=opt.device)

    def apply(loaded: dict) -> None:
        opt.shard.refresh_masters()  # from the params just loaded (a saved master then overrides)
        counts = loaded[steps_key]
        if per_group:  # one count per group: every param of the group has it
            counts = [counts[g] for g, group in enumerate(opt.param_groups)
                      for _ in group["params"]]
        opt.shard.load_param_steps(counts)
        for piece, name, ranges in reads:
            pieces.load_entries(opt.shard, piece, name, {
                saved_name: _slice(local[key], lo, hi) for saved_name, (key, lo, hi)
                in ranges.items()}, ranges[name][1])
        for piece, name in fresh:
            pieces.load_entries(opt.shard, piece, name, {name: torch.zeros(piece.numel)},
                                piece.param_offset)
        for index, keys in whole.items():
            if not keys:  # frozen when saved: it starts afresh
                opt.shard.whole.states.forget(index)
                continue
            entry = pickle.loads(loaded[f"{PREFIX}.{index}.values"])
            strides = entry.pop(_STRIDES, {})
            for key in keys:
                name = key.rsplit(".", 1)[1]
                if name != "values":
                    value = loaded[key]
                    entry[name] = torch.empty_strided(
                        value.shape, strides.get(name, value.stride()), dtype=value.dtype,
                        device=value.device).copy_(value)
            slot = next(s for s in opt.layout.slots if s.index == index)
            opt.shard.whole.states.load(index, entry, opt.param_groups[slot.group])

    return targets, apply


def _slice(parts: dict[tuple[int, int], torch.Tensor], lo: int, hi: int) -> torch.Tensor:
    for (start, end), tensor in parts.items():
        if start <= lo and hi <= end:
            return tensor[lo - start:hi - start]
    raise AssertionError("a read range outside the ranges requested")


def apply_groups(opt, blob: bytes) -> None:
    """The saved groups' hyperparameters and counters; read (and applied) before the targets
    are built, since the hyperparameters decide which states there are to read."""
    from .state_dict import apply_param_groups

    saved = pickle.loads(blob)
    apply_param_groups(opt, saved["groups"])
    opt.skipped_steps = saved["skipped_steps"]


def _groups_blob(opt) -> bytes:
    groups = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    return pickle.dumps({"groups": groups, "skipped_steps": opt.skipped_steps})
