"""Optimizer state in and out of the shards, per param and in each param's shape.

The saved form does not depend on the layout (world size, bucket size): it is what torch.optim
saves (``{"state": {index: {"step": ..., "exp_avg": ...}}, "param_groups": [...]}``), plus
``master_param`` for 16-bit params and a ``"zeroopt"`` entry naming the rule. 8-bit states are
saved as they are kept, in bitsandbytes' per-param form: uint8 codes in the param's shape under
the state's name, and ``<name>_absmax`` with one fp32 per 256-element block of the param; bf16
states as bf16. A state loads into any precision (``encoding.py`` converts). So a state saved
at one world size loads at another; ``torch_interop.py`` turns it into torch.optim's and back.
The walk from the shard's pieces to each param's saved form is ``pieces.py``'s.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from . import encoding, pieces

if TYPE_CHECKING:
    from ..optimizer import ZeroOptimizer

FORMAT_VERSION = 1
# Hyperparameters that decided the layout when the optimizer was built; a loaded state is
# converted to them (8-bit <-> 32-bit), never the other way.
_LAYOUT_OPTIONS = ("state_precision", "min_8bit_size", "paged", "block_size")


def _gather_full(opt: ZeroOptimizer, tensor: torch.Tensor, buffer, per: int = 1) -> torch.Tensor:
    """Every rank's chunks of a region-space tensor of ``buffer`` (one entry per ``per``
    elements, as 8-bit absmax per block), assembled into the buffer's flat shape (likewise
    scaled)."""
    full = torch.zeros(buffer.numel // per, dtype=tensor.dtype, device=opt.device)
    handles = []
    for bucket in buffer.buckets:
        at, n, start = (buffer.region_offset(bucket.shard_offset) // per,
                        bucket.chunk_numel // per, bucket.start // per)
        full[start + opt.comm.rank * n:start + (opt.comm.rank + 1) * n].copy_(tensor[at:at + n])
        handles.append(opt.comm.gather_bucket(full[start:start + bucket.numel // per]))
    for handle in handles:
        handle.wait()
    return full


def gather_state_dict(opt: ZeroOptimizer) -> dict:
    """The full optimizer state, per param and in its shape, as torch.optim's
    ``Optimizer.state_dict()`` lays it out (what ``ZeroOptimizer.state_dict()`` returns).

    A collective: every rank must call it, and every rank gets the whole dict (each buffer's
    states and masters are all-gathered bucket by bucket, whole params' per-tensor states
    with ``all_gather_object``). Reductions in flight are harvested first, and the masters
    take what was written into 16-bit params since the last step (``Shard.sync_masters``).

    Args:
        opt: the ``ZeroOptimizer``.

    Returns:
        ``{"state": {index: entry}, "param_groups": [...], "zeroopt": {"optimizer": the
        rule's name, "version": FORMAT_VERSION}}``, with an entry for every trainable param
        of the layout: ``"step"`` (fp32, 0-d) and each of its group's states in the param's
        shape (8-bit ones as uint8 codes, with ``<name>_absmax``: one fp32 per 256-element
        block), ``"master_param"`` for 16-bit params, and whole params' per-tensor states as
        their rule keeps them. The groups hold their hyperparameters and, under
        ``"params"``, their params' state indices, as torch.optim saves them.
    """
    opt.grads.finish()  # collectives must not interleave with a pending reduction
    opt.shard.sync_masters()
    state: dict[int, dict] = {}
    steps = opt.shard.param_steps()
    for buffer in opt.layout.buffers:
        full = {saved: (_gather_full(opt, tensor, buffer, per), per)
                for saved, (tensor, per) in pieces.encoded_tensors(opt.shard, buffer).items()}
        for slot in opt.layout.slots:
            if slot.buffer != buffer.index:
                continue
            entry = {"step": steps[slot.index].clone()}
            names = pieces.state_names(opt.shard, slot)
            for saved, (_, _, values) in pieces.piece_entries(full, names, 0, slot.numel,
                                                              slot.start).items():
                # 8-bit absmax: one per block of the param, as bitsandbytes keeps it
                entry[saved] = values.clone() if saved.endswith("_absmax") \
                    else values.view(slot.param.shape).clone()
            state[slot.index] = entry
    for index, saved in _gather_tensor_states(opt).items():
        state[index].update(saved)
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
    """Load a state dict into ``opt`` (what ``ZeroOptimizer.load_state_dict()`` does).

    It takes what ``gather_state_dict`` returned, at any world size, bucket size or state
    precision (each state is converted into the form this optimizer keeps: ``encoding.py``),
    or a torch.optim optimizer's state dict (converted by ``torch_interop.from_torch``). The
    saved groups' hyperparameters are taken, except the layout's options
    (``state_precision``, ``min_8bit_size``, ``paged``, ``block_size``), which stay as
    constructed. As in torch.optim, a param the dict has no state for starts afresh (zero
    states, step 0). Each rank reads the pieces it owns from the dict, so every rank is
    given the whole dict.

    Args:
        opt: the ``ZeroOptimizer`` to load into.
        state_dict: the dict to load.

    Raises:
        ValueError: it is not an optimizer state dict, was saved by another rule, has another
            number of groups or other group sizes, lacks a param's state or has one of another shape
            or a malformed encoding, its hyperparameters need states this optimizer was built
            without, or a whole param's per-tensor state does not load. The rule's
            ``validate`` may also refuse the hyperparameters.
    """
    from .torch_interop import from_torch, is_torch_state_dict

    if is_torch_state_dict(state_dict):  # saved by torch.optim (AdamW, SGD, ...)
        state_dict = from_torch(opt, state_dict)
    _check_compatible(opt, state_dict)
    # Masters from the params as they are now (a model loaded just before, as Accelerate's
    # load_state does), so the next step does not take that load for a later write; a saved
    # master then overrides (as load_checkpoint does).
    opt.shard.refresh_masters()
    apply_param_groups(opt, state_dict["param_groups"])
    saved_state = state_dict["state"]
    if not saved_state:  # a fresh optimizer's state: nothing to load
        return
    for owned in opt.shard.whole.all_owned():
        if owned.slot.index not in saved_state:  # no state saved: it starts afresh
            opt.shard.whole.states.forget(owned.slot.index)
            continue
        entry = {k: v for k, v in saved_state[owned.slot.index].items() if k != "master_param"}
        try:
            opt.shard.whole.states.load(owned.slot.index, entry,
                                   opt.param_groups[owned.slot.group])
        except ValueError as error:
            raise ValueError(f"cannot load this optimizer state: param {owned.slot.index}: "
                             f"{error}") from None
    opt.shard.load_param_steps({slot.index: float(saved_state.get(slot.index, {"step": 0})["step"])
                          for slot in opt.layout.slots})
    for piece in opt.layout.pieces:
        # As torch.optim: a param the dict has no state for starts afresh (zero states, step
        # 0; its initial values are set at its first step).
        names = pieces.state_names(opt.shard, piece.slot)
        saved = saved_state.get(piece.slot.index) or {
            name: torch.zeros(piece.slot.param.shape) for name in names}
        has_master = piece.slot.buffer in opt.shard.masters and pieces.MASTER in saved
        for name in (*names, pieces.MASTER) if has_master else names:
            pieces.load_entries(opt.shard, piece, name, saved, 0)


def apply_param_groups(opt: ZeroOptimizer, saved_groups: list[dict]) -> None:
    """Take the saved groups' hyperparameters (the layout's options stay as constructed)."""
    for group, saved in zip(opt.param_groups, saved_groups):
        update = {k: v for k, v in saved.items() if k != "params"}
        for name in _LAYOUT_OPTIONS:  # the layout is built; these stay as constructed
            update[name] = group[name]
        group.update(update)
        opt.rule.validate(group)
    missing = set(opt.rule.state_names(opt.param_groups)) - set(opt.shard.scratch)
    if missing:
        raise ValueError(f"cannot load this optimizer state: its hyperparameters need the states "
                         f"{sorted(missing)}, which this optimizer was built without; build it "
                         f"with the hyperparameters the state was saved with")
    opt.shard.rebuild_windows()  # the groups' hyperparameters may have changed


def _gather_tensor_states(opt: ZeroOptimizer) -> dict[int, dict]:
    """The per-tensor states of whole params (each on its owner), from every rank."""
    mine = {}
    for owned in opt.shard.whole.all_owned():
        saved = pieces.tensor_state(opt.shard, owned.slot.index)
        if saved:
            saved["step"] = torch.tensor(float(saved["step"]))
            mine[owned.slot.index] = {k: v.cpu() if isinstance(v, torch.Tensor) else v
                                      for k, v in saved.items()}
    merged = {}
    for part in opt.comm.all_gather_object(mine):
        merged.update(part)
    return {index: {k: v.to(opt.device) if isinstance(v, torch.Tensor) else v
                    for k, v in saved.items()} for index, saved in merged.items()}


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
            continue  # never stepped there: it starts afresh, as in torch.optim
        entry = state[slot.index]
        names = pieces.state_names(opt.shard, slot)
        for name in ("step", *names):
            if name not in entry:
                fail(f"param {slot.index} has no {name!r} (it has {sorted(entry)}); was it "
                     f"saved by another optimizer?")
        for name in names:
            if tuple(entry[name].shape) != tuple(slot.param.shape):
                fail(f"param {slot.index}'s {name!r} has shape {list(entry[name].shape)}, "
                     f"the param has shape {list(slot.param.shape)}")
            why = encoding.check_saved(entry, name, slot.numel)
            if why:
                fail(f"param {slot.index}'s {name!r}: {why}")
