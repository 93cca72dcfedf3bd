"""Optimizer state in and out of the shards, per param and in each param's shape.

The saved form does not depend on the layout (world size, bucket size): it is what torch.optim
saves (``{"state": {index: {"step": ..., "exp_avg": ...}}, "param_groups": [...]}``), plus
``master_param`` for 16-bit params and a ``"zeroopt"`` entry naming the rule. So a state saved
at one world size loads at another, and a later issue can export it to torch.optim as it is.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .optimizer import ZeroOptimizer

FORMAT_VERSION = 1


def _gather_full(opt: ZeroOptimizer, shard: torch.Tensor, buffer, base: int = 0) -> torch.Tensor:
    """Every rank's chunks of a shard-space tensor (whose element 0 sits at shard offset
    ``base``), assembled into ``buffer``'s flat shape."""
    full = torch.zeros(buffer.numel, dtype=shard.dtype, device=shard.device)
    handles = []
    for bucket in buffer.buckets:
        at = bucket.shard_offset - base
        opt.layout.owned_view(full, bucket).copy_(shard[at:at + bucket.chunk_numel])
        handles.append(opt.comm.gather_bucket(full[bucket.start:bucket.start + bucket.numel]))
    for handle in handles:
        handle.wait()
    return full


def gather_state_dict(opt: ZeroOptimizer) -> dict:
    opt.grads.finish()  # collectives must not interleave with a pending reduction
    state: dict[int, dict] = {}
    for buffer in opt.layout.buffers:
        full = {name: _gather_full(opt, s, buffer) for name, s in opt._states.items()}
        if buffer.index in opt._masters:  # a master covers only its buffer's part of the shard
            full["master_param"] = _gather_full(opt, opt._masters[buffer.index], buffer,
                                                base=buffer.shard_offset)
        for slot in opt.layout.slots:
            if slot.buffer != buffer.index:
                continue
            entry = {"step": opt._steps[slot.group].clone()}
            keep = (*opt.rule.states(opt.param_groups[slot.group]), "master_param")
            for name, flat in full.items():
                if name in keep:
                    entry[name] = flat[slot.start:slot.end].view(slot.param.shape).clone()
            state[slot.index] = entry
    groups, index = [], 0
    for group in opt.param_groups:
        saved = {k: v for k, v in group.items() if k != "params"}
        saved["params"] = list(range(index, index + len(group["params"])))
        index += len(group["params"])
        groups.append(saved)
    return {"state": state, "param_groups": groups,
            "zeroopt": {"optimizer": opt.rule.name, "version": FORMAT_VERSION}}


@torch.no_grad()
def load_state_dict(opt: ZeroOptimizer, state_dict: dict) -> None:
    _check_compatible(opt, state_dict)
    for group, saved in zip(opt.param_groups, state_dict["param_groups"]):
        group.update({k: v for k, v in saved.items() if k != "params"})
        opt.rule.validate(group)
    missing = set(opt.rule.state_names(opt.param_groups)) - set(opt._states)
    if missing:
        raise ValueError(f"cannot load this optimizer state: its hyperparameters need the states "
                         f"{sorted(missing)}, which this optimizer was built without; build it "
                         f"with the hyperparameters the state was saved with")
    opt._shards = opt._shard_tensors_per_group()  # the groups' hyperparameters may have changed
    saved_state = state_dict["state"]
    if not saved_state:  # a fresh optimizer's state: nothing to load
        return
    for slot in opt.layout.slots:
        opt._steps[slot.group].fill_(float(saved_state[slot.index]["step"]))
    for piece in opt.layout.pieces:
        saved = saved_state[piece.slot.index]
        lo, hi = piece.param_offset, piece.param_offset + piece.numel
        at = slice(piece.shard_offset, piece.shard_offset + piece.numel)
        for name in opt.rule.states(opt.param_groups[piece.slot.group]):
            opt._states[name][at].copy_(saved[name].reshape(-1)[lo:hi])
        buffer = opt.layout.buffers[piece.slot.buffer]
        if buffer.index in opt._masters and "master_param" in saved:
            offset = piece.shard_offset - buffer.shard_offset
            opt._masters[buffer.index][offset:offset + piece.numel].copy_(
                saved["master_param"].reshape(-1)[lo:hi])


def _check_compatible(opt: ZeroOptimizer, state_dict: dict) -> None:
    def fail(why: str) -> None:
        raise ValueError(f"cannot load this optimizer state: {why}")

    if not isinstance(state_dict, dict) or "state" not in state_dict \
            or "param_groups" not in state_dict:
        fail("it is not an optimizer state dict (expected the keys 'state' and 'param_groups')")
    saved_rule = state_dict.get("zeroopt", {}).get("optimizer")
    if saved_rule is not None and saved_rule != opt.rule.name:
        fail(f"it was saved by optimizer {saved_rule!r}, and this one is {opt.rule.name!r}")
    groups = state_dict["param_groups"]
    if len(groups) != len(opt.param_groups):
        fail(f"it has {len(groups)} param groups, this optimizer has {len(opt.param_groups)}")
    for g, (saved, group) in enumerate(zip(groups, opt.param_groups)):
        if len(saved["params"]) != len(group["params"]):
            fail(f"param group {g} has {len(saved['params'])} params there and "
                 f"{len(group['params'])} here")
    state = state_dict["state"]
    if not state:
        return
    for slot in sorted(opt.layout.slots, key=lambda s: s.index):  # report the first mismatch
        if slot.index not in state:
            fail(f"it has no state for param {slot.index} (shape {list(slot.param.shape)})")
        entry = state[slot.index]
        names = opt.rule.states(opt.param_groups[slot.group])
        for name in ("step", *names):
            if name not in entry:
                fail(f"param {slot.index} has no {name!r} (it has {sorted(entry)}); was it "
                     f"saved by another optimizer?")
        for name in names:
            if tuple(entry[name].shape) != tuple(slot.param.shape):
                fail(f"param {slot.index}'s {name!r} has shape {list(entry[name].shape)}, "
                     f"the param has shape {list(slot.param.shape)}")
