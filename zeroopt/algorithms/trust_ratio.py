"""Per-tensor trust ratios (LAMB, LARS) from whole-param norms.

The norms are of whole params even when a param straddles ranks: each rank sums the squares of
its pieces per param (``partial_squares``), the optimizer all-reduces every group's sums in one
collective, and ``ratios`` turns the totals into one ratio per param. DeepSpeed computes the
ratio on each rank's flat chunk instead, which is a different optimizer (tests/test_trust_ratio.py
shows the difference).
"""

from __future__ import annotations

import re

import torch

from .base import ShardTensors


def partial_squares(shard: ShardTensors, *tensor_lists: list[torch.Tensor]) -> torch.Tensor:
    """``[len(tensor_lists), num_params]``: this rank's sum of squares of each param's pieces."""
    rows = []
    for tensors in tensor_lists:
        norms = torch._foreach_norm(tensors) if tensors else []
        rows.append(shard.per_param([n.square() for n in norms]))
    return torch.stack(rows)


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
