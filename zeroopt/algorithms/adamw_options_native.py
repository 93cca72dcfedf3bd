"""AdamW's fine-tuning options (adamw_options.py) on the CPU: each phase one pass per piece.

The C kernels (zeroopt/kernels/_adamw_options.c: agr, orthograd, tam; _adamw_spd.c: spd and
cautious) compute what adamw_options.py's torch path
computes, op for op with ATen's roundings and torch's own square root (_torch_sqrt.h): phase 2
bit for bit; phase 1's sums add the same products in float64 in another order (fixed chunks,
independent of the thread count). adamw_options.py decides when they run (``usable``) and keeps
its torch path for everything else (other devices, bf16, a tensor lr, no compiler).
"""

from __future__ import annotations

import math

import torch

from ..kernels import sqrt_check
from ..kernels.library import Library
from .base import ShardTensors

LIB = Library("_adamw_options.c")  # agr, orthograd, tam
SPD_LIB = Library("_adamw_spd.c")  # spd (with or without cautious)


def _library(group: dict) -> Library:
    """The kernels of the options on in ``group`` (agr/orthograd/tam take precedence, as in
    adamw_options.statistics)."""
    return LIB if group["agr"] or group["orthograd"] or group["tam"] else SPD_LIB


def usable(group: dict, shard: ShardTensors) -> bool:
    """Whether the kernels take this flat shard: a float lr, every tensor the options read
    (params, gradients, moments, and ``initial_param`` / ``tam_s`` where on) contiguous fp32 on
    the CPU, the kernels built and their square root torch's (``sqrt_check``).

    Args:
        group: the param group.
        shard: this rank's part of it.

    Returns:
        True if ``statistics`` and ``fused_step`` run the kernels.
    """
    if not shard.params or isinstance(group["lr"], torch.Tensor):
        return False
    extra = [shard.states[k] for k in ("initial_param", "tam_s") if k in shard.states]
    lib = _library(group)
    return lib.usable(shard.params, shard.grads, shard.states["exp_avg"],
                      shard.states["exp_avg_sq"], *extra) and sqrt_check.matches_torch(lib)


def adam_hyper(group: dict, t: int, decay: float) -> list[float]:
    """_adamw_options.c's read_adam: the torch path's scalars, the same expressions.

    Args:
        group: the param group; t: the step (from 1); decay: the params' factor (1 - lr wd,
            or 1).

    Returns:
        The kernels' first 12 hyperparameters.
    """
    beta1, beta2 = group["betas"]
    return [beta1, 1 - beta1, beta2, 1 - beta2, math.sqrt(1 - beta2**t), group["eps"],
            1 / (1 - beta1**t), (t - 1) ** 0.25, -group["lr"], bool(group["adopt"]),
            bool(group["grams"]), decay]


def _sign(group: dict) -> float:
    return -1.0 if group["maximize"] else 1.0


def transform_sums(group: dict, shard: ShardTensors, rows: int) -> list[list[float]]:
    """Phase 1 of agr / orthograd / tam in one pass per piece (maximize's negation applied to
    the gradients).

    Returns:
        Per piece, the ``rows`` sums adamw_options' ``_transform_sums`` takes.
    """
    moments = shard.states["exp_avg"] if group["tam"] else shard.params
    lists = [shard.grads, shard.params, moments]
    whole = spans(lists)
    if whole is None:  # a call per piece
        return LIB.each("zk_options_transform_sums", lists, [_sign(group)], outputs=rows)
    sizes = [g.numel() for g in shard.grads]
    flat = LIB.run("zk_options_transform_sums_pieces", whole,
                   [_sign(group), len(sizes)] + sizes, outputs=rows * len(sizes))
    return [flat[i:i + rows] for i in range(0, len(flat), rows)]


def projection_sums(group: dict, shard: ShardTensors, t: int, rows: int) -> list[list[float]]:
    """Phase 1 of spd (with or without cautious) in one pass per piece: moments, direction
    (over the gradients), cautious mask and count.

    Returns:
        Per piece, the ``rows`` sums adamw_options' ``_projection_sums`` takes.
    """
    return SPD_LIB.each("zk_options_projection_sums",
                    [shard.params, shard.grads, shard.states["exp_avg"],
                     shard.states["exp_avg_sq"], shard.states["initial_param"]],
                    adam_hyper(group, t, 1.0) + [_sign(group), bool(group["cautious"])],
                    outputs=rows)


def transform_step(group: dict, shard: ShardTensors, t: int, wd: float, decoupled: bool,
                   scalars: dict) -> None:
    """agr, orthograd, tam and Adam's step in one pass per piece.

    Args:
        group, shard: as adamw_options' ``fused_step``; t: the step; wd: the weight decay in
            effect; decoupled: AdamW (True) or Adam's L2 term.
        scalars: per piece, ``inv_s``, ``p``, ``c``, ``cos`` (adamw_options.transform_scalars)
            and ``sums`` (the whole param's sum |g|).
    """
    decay = 1 - group["lr"] * wd if wd != 0 and decoupled else 1.0
    base = adam_hyper(group, t, decay)
    gamma, first = group["tam_decay_rate"], bool(group["adopt"] and t == 1)
    tam = shard.states["tam_s"] if group["tam"] else shard.params
    lists = [shard.params, shard.grads, shard.states["exp_avg"], shard.states["exp_avg_sq"],
             tam]
    hyper = []
    for i in range(len(shard.params)):
        inv_s = scalars["inv_s"][i]
        hyper.append(base + [
            bool(group["agr"] and inv_s), scalars["sums"][i], inv_s, bool(group["orthograd"]),
            -scalars["p"][i], scalars["c"][i], bool(group["tam"]), gamma,
            (1 - gamma) * scalars["cos"][i], wd != 0 and not decoupled, wd, first])
    whole = spans(lists)
    if whole is None:  # a call per piece
        for tensors, h in zip(zip(*lists), hyper):
            LIB.run("zk_options_transform_step", tensors, h)
        return
    pieces = [len(hyper)]
    for x, h in zip(shard.params, hyper):
        pieces += [x.numel()] + h
    LIB.run("zk_options_transform_step_pieces", whole, pieces)


def spans(lists: list[list[torch.Tensor]]) -> list[torch.Tensor] | None:
    """Each list's pieces as one tensor, where every list's pieces lie end to end in one
    buffer (a window's pieces of the flat buffers and states do): the ``_pieces`` kernels
    then take a whole window in one call.

    Args:
        lists: parallel lists of contiguous fp32 CPU tensors (``usable``'s).

    Returns:
        One 1-D view per list, over all its pieces; None where some list's pieces are not
        adjacent in one storage (or are empty).
    """
    out = []
    for pieces in lists:
        first = pieces[0]
        at = first.data_ptr()
        for t in pieces:
            if t.numel() == 0 or t.data_ptr() != at:
                return None
            at += 4 * t.numel()  # fp32
        try:  # raises where the pieces are not all in the first one's storage
            out.append(first.as_strided(((at - first.data_ptr()) // 4,), (1,)))
        except RuntimeError:
            return None
    return out


def projection_apply(shard: ShardTensors, anchors: list[torch.Tensor], steps: list[float],
                     pull: list[float]) -> bool:
    """spd's phase 2 in one pass per piece: x <- x + step u, then the pull toward x0
    (``x.lerp_(x0, k)`` where k != 0).

    Args:
        shard: the window (its gradients hold the direction u).
        anchors: x0 per piece (the params themselves without spd).
        steps, pull: per piece, the step and lerp weight.

    Returns:
        False (nothing done) where the kernels do not take these tensors.
    """
    if not SPD_LIB.usable(shard.params, shard.grads, anchors):
        return False
    for x, u, x0, step, k in zip(shard.params, shard.grads, anchors, steps, pull):
        SPD_LIB.run("zk_options_projection_apply", [x, u, x0], [step, k != 0, k])
    return True
