"""Per-tensor trust ratios (LAMB, LARS) from whole-param norms.

The norms are of whole params even when a param straddles ranks: each rank sums the squares of
its pieces per param (``partial_squares``), the optimizer all-reduces every group's sums in one
collective, and ``ratios`` turns the totals into one ratio per param. DeepSpeed computes the
ratio on each rank's flat chunk instead, which is a different optimizer (tests/test_trust_ratio.py
shows the difference).

On the CPU, LAMB and LARS run each phase as one pass of C kernels (zeroopt/kernels/
_trust_ratio.c) per piece: ``LIB``, ``native`` and ``native_squares`` are what they share.
"""

from __future__ import annotations

import re

import torch

from ..kernels import sqrt_check
from ..kernels.library import Library
from .base import ShardTensors

LIB = Library("_trust_ratio.c")


def partial_squares(shard: ShardTensors, *tensor_lists: list[torch.Tensor]) -> torch.Tensor:
    """``[len(tensor_lists), num_params]``: this rank's sum of squares of each param's pieces."""
    rows = []
    for tensors in tensor_lists:
        norms = torch._foreach_norm(tensors) if tensors else []
        rows.append(shard.per_param([n.square() for n in norms]))
    return torch.stack(rows)


def native(shard: ShardTensors, root: bool = False) -> bool:
    """Whether a LAMB or LARS shard runs as the C kernels: it has pieces, and its params,
    gradients and states are all contiguous fp32 CPU tensors (``Library.usable``), and, for a
    rule that takes square roots (``root``: LAMB), the kernels' roots are torch.sqrt's
    (``sqrt_check.matches_torch``), so the kernels give the torch path's result bit for bit.

    The answer is the same in both phases of a step (the same tensors, and the library's
    availability is settled once per process), which LARS relies on: its native phase 1
    leaves the weight decay out of the gradients, for phase 2 to add.

    Args:
        shard: the group's window.
        root: whether the rule's kernels take square roots (default False).

    Returns:
        True where the kernels run.
    """
    return (bool(shard.params) and LIB.usable(shard.params, shard.grads, *shard.states.values())
            and (not root or sqrt_check.matches_torch(LIB)))


def native_squares(shard: ShardTensors, kernel: str, tensor_lists: list[list[torch.Tensor]],
                   hyper: list[float]) -> torch.Tensor:
    """Run ``kernel`` on each piece and gather the two sums of squares it returns per piece
    into ``[2, num_params]``, as ``partial_squares`` does (but each sum in double, in
    fixed-order chunks, where ``partial_squares`` squares fp32 norms).

    Args:
        shard: the group's window (``native(shard)`` was true).
        kernel: a two-output kernel of _trust_ratio.c (``zk_lamb_direction``,
            ``zk_lars_squares``).
        tensor_lists: the kernel's tensors, as parallel lists (params, grads, states).
        hyper: its hyperparameters, the same for every piece.

    Returns:
        float64 ``[2, num_params]``: this rank's sums per param.
    """
    sums = LIB.each(kernel, tensor_lists, hyper, outputs=2)
    return torch.stack([shard.per_param(torch.tensor([s[k] for s in sums], dtype=torch.float64))
                        for k in range(2)])


def excluded(group: dict, shard: ShardTensors) -> torch.Tensor:
    """Which params skip the trust ratio: all of them in a group without weight decay (the
    usual way to exclude biases and norms), and those whose name matches a pattern of
    ``exclude_from_trust_ratio``."""
    if group["weight_decay"] == 0:
        return torch.ones(shard.num_params, dtype=torch.bool)
    patterns = [re.compile(p) for p in group["exclude_from_trust_ratio"]]
    return torch.tensor([bool(name) and any(p.search(name) for p in patterns)
                         for name in shard.param_names], dtype=torch.bool)


def ratios(numerator_sq: torch.Tensor, denominator_sq: torch.Tensor, scale: float,
           skip: torch.Tensor) -> torch.Tensor:
    """``scale * ||num|| / ||den||`` per param; 1 where either norm is zero or the param is
    excluded (apex FusedLAMB's rule)."""
    num, den = numerator_sq.sqrt(), denominator_sq.sqrt()
    ratio = torch.where((num > 0) & (den > 0), scale * num / den, torch.ones_like(num))
    return torch.where(skip, torch.ones_like(ratio), ratio)


def reference_ratio(group: dict, state: dict, numerator: torch.Tensor,
                    denominator: torch.Tensor, scale: float = 1.0) -> float:
    """The same rule for one whole tensor (the eager references)."""
    name = state.get("param_name")
    if group["weight_decay"] == 0 or (name and any(
            re.search(p, name) for p in group["exclude_from_trust_ratio"])):
        return 1.0
    num, den = numerator.norm().item(), denominator.norm().item()
    return scale * num / den if num > 0 and den > 0 else 1.0


def check_exclusion(group: dict) -> None:
    """Check that a group excluding params from the trust ratio by name has the names.

    Args:
        group: the param group (its ``exclude_from_trust_ratio`` patterns).

    Raises:
        ValueError: patterns are given but the group has no ``param_names``.
    """
    if group["exclude_from_trust_ratio"] and "param_names" not in group:
        raise ValueError("exclude_from_trust_ratio matches param names: pass "
                         "model.named_parameters() (or named param groups) to the optimizer")
