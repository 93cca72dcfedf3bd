"""Scenarios on every rank for input that must be refused: ranks that disagree on the params or
the settings (the NaN gradient, params unused on some ranks, gradient memory and unusual clipping
norms are in ranks/equivalence.py, whose suite runs them)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

import zeroopt
from training import models, world


def mismatched_params(kind: str) -> str:
    """Rank 1 builds a different model; every rank must get the same clear error (no hang)."""
    rank, _ = world()
    model, _ = models()
    params = list(model.parameters())
    if rank == 1 and kind == "shape":
        params[2] = torch.nn.Parameter(torch.zeros(29, 40))
    if rank == 1 and kind == "count":
        params = params[:-1]
    if rank == 1 and kind == "dtype":
        params[0] = torch.nn.Parameter(params[0].detach().double())
    try:
        zeroopt.ZeroOptimizer(params, "adamw", stage=1)
    except RuntimeError as error:
        return str(error)
    return "no error"


def mismatched_settings() -> str:
    rank, _ = world()
    model, _ = models()
    try:
        zeroopt.ZeroOptimizer(model.parameters(), "adamw", stage=1 + rank % 2)
    except RuntimeError as error:
        return str(error)
    return "no error"


def _disagreeing_optimizer(case: str, differs: bool, page_dir: str):
    """The optimizer one rank builds for ``case``; ``differs`` on the last rank only."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 8))
    first, rest = list(model[0].parameters()), [*model[1].parameters(), *model[2].parameters()]
    if case == "state_precision":  # the states' layout differs (gloo aborted)
        groups = [{"params": first}, {"params": rest, "state_precision": "8bit" if differs
                                      else "32bit"}]
        return zeroopt.ZeroOptimizer(groups, "adamw")
    if case == "min_8bit_size":  # which params are 8-bit differs (a hang)
        groups = [{"params": first}, {"params": rest, "min_8bit_size": 16 if differs else 4096}]
        return zeroopt.ZeroOptimizer(groups, "adamw_8bit")
    if case == "galore_rank":  # projected (whole params) on one rank only (a hang)
        weights = [p for p in model.parameters() if p.dim() == 2]
        biases = [p for p in model.parameters() if p.dim() == 1]
        projected = {"params": weights, **({"rank": 4} if differs else {})}
        return zeroopt.ZeroOptimizer([{"params": biases}, projected], "galore_adamw")
    if case == "skip_nonfinite":  # one rank would skip a step the others take (a hang)
        return zeroopt.ZeroOptimizer(model.parameters(), skip_nonfinite=not differs)
    if case == "lr":  # silent: each rank would step its shard with its own lr
        return zeroopt.ZeroOptimizer([{"params": first}, {"params": rest,
                                                          "lr": 0.002 if differs else 0.001}])
    if case == "betas":
        return zeroopt.ZeroOptimizer(model.parameters(),
                                     betas=(0.9, 0.99) if differs else (0.9, 0.999))
    if case == "weight_decay":
        return zeroopt.ZeroOptimizer(model.parameters(), weight_decay=0.1 if differs else 0.0)
    if case == "order":  # same shapes, another order: silent without names
        named = list(model.named_parameters())
        if differs:
            named = named[2:4] + named[0:2] + named[4:]
        return zeroopt.ZeroOptimizer(named, "adamw")
    if case == "invalid_lr":  # invalid on one rank only: that rank's check must not strand
        return zeroopt.ZeroOptimizer([{"params": first}, {"params": rest,  # the others
                                                          "lr": -1.0 if differs else 0.001}])
    if case == "page_dir":  # a problem only one rank can see
        return zeroopt.ZeroOptimizer(model.parameters(), "paged_adamw_32bit",
                                     page_dir=page_dir + ("/missing" if differs else ""))
    raise ValueError(case)


def disagreements(cases: list[str], page_dir: str) -> dict[str, str]:
    """Each case's error on this rank: the last rank builds its optimizer differently. Every
    rank must raise, after the same one collective, so the cases run one after another."""
    rank, world_size = world()
    errors = {}
    for case in cases:
        try:
            _disagreeing_optimizer(case, rank == world_size - 1, page_dir)
            errors[case] = "no error"
        except (RuntimeError, ValueError) as error:
            errors[case] = f"{type(error).__name__}: {error}"
    return errors


def disagreement_in_one_sharding_group() -> str:
    """W=4 with (sharding, replication) groups [[0, 1], [2, 3]] and [[0, 2], [1, 3]]: rank 3's
    bucket size differs, which only group [2, 3] sees; ranks 0 and 1 must learn of it in the
    second check, not wait there for ranks that have raised."""
    rank, _ = world()
    shard, _ = dist.new_subgroups_by_enumeration([[0, 1], [2, 3]])
    replica, _ = dist.new_subgroups_by_enumeration([[0, 2], [1, 3]])
    model = nn.Linear(8, 8)
    try:
        zeroopt.ZeroOptimizer(model.parameters(), process_group=(shard, replica),
                              bucket_numel=800 if rank == 3 else 700)
    except RuntimeError as error:
        return str(error)
    return "no error"
