"""Scenarios for checkpoints that reshard: save at one world size, resume at another.

Every rank trains on the step's same batch here, so the averaged gradient is the same at every
world size: the fp32 gradients are summed in fp64 (``training.EXACT``), and W equal values sum
and divide back exactly. What changes with the world size is only where each state lives, so
a resumed run must equal the uninterrupted one bit for bit, for every rule whose update does not
depend on how the params are cut: element-wise rules in any state precision (8-bit blocks belong
to one param at every world size), and rules that step a param whole on one rank. Rules with a
per-tensor norm (LAMB, LARS) sum that norm over the shard's pieces of the param, in an order that
follows the cut; they match to within fp32 rounding of the norm.
"""

from __future__ import annotations

import os

import torch

import zeroopt
from training import EXACT, batch, loss_of, models

GALORE = dict(rank=4, update_proj_gap=3, scale=0.25, proj_type="std")
APOLLO = dict(rank=4, update_proj_gap=3, scale=1.0, proj="random", scale_type="channel",
              proj_type="std")

# case -> (optimizer name, hyperparameters, projected-group options or None, exact?)
CASES = {
    "adamw": ("adamw", dict(lr=1e-2, weight_decay=0.1), None, True),
    "adamw_bf16_model": ("adamw", dict(lr=1e-2), None, True),  # fp32 masters of bf16 params
    "adam_bf16_states": ("adam", dict(lr=1e-2, state_precision="bf16"), None, True),
    "sgd_momentum": ("sgd", dict(lr=1e-2, momentum=0.9, weight_decay=0.01), None, True),
    "adagrad": ("adagrad", dict(lr=1e-2), None, True),
    "rmsprop_centered": ("rmsprop", dict(lr=1e-3, centered=True, momentum=0.5), None, True),
    "lion": ("lion", dict(lr=1e-3, weight_decay=0.1), None, True),
    "ademamix": ("ademamix", dict(lr=1e-2), None, True),
    "schedule_free_adamw": ("schedule_free_adamw", dict(lr=1e-2), None, True),
    "adamw_8bit": ("adamw_8bit", dict(lr=1e-2, min_8bit_size=0), None, True),
    "paged_adamw_8bit": ("paged_adamw_8bit", dict(lr=1e-2, min_8bit_size=0), None, True),
    "paged_lion_32bit": ("paged_lion_32bit", dict(lr=1e-3), None, True),
    "lamb": ("lamb", dict(lr=1e-2, weight_decay=0.01), None, False),
    "galore_adamw": ("galore_adamw", dict(lr=1e-2, weight_decay=0.1), GALORE, True),
    "galore_adamw_8bit": ("galore_adamw_8bit", dict(lr=1e-2, min_8bit_size=0), GALORE, True),
    "apollo_adamw": ("apollo_adamw", dict(lr=1e-2), APOLLO, True),
    "adafactor": ("adafactor", dict(lr=1e-2, beta1=0.9), None, True),
}
SAVED_AT, TOTAL = 4, 7  # galore/apollo refresh their projections at steps 3 and 6


def build(case: str, seed: int = 0, shard_size: int | None = None):
    """A fresh model and optimizer for ``case``; ``seed`` != 0 perturbs the model first, so a
    load that missed a param would show."""
    name, hp, projected, _ = CASES[case]
    model, _ = models(torch.bfloat16 if case.endswith("bf16_model") else torch.float32)
    if seed:
        torch.manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
    params = zeroopt.galore_param_groups(model, "all-linear", **projected) if projected \
        else model.parameters()
    opt = zeroopt.ZeroOptimizer(params, name, stage=2, shard_size=shard_size, **EXACT, **hp)
    return model, opt


def train(model, opt, steps: range) -> None:
    for t in steps:
        loss_of(model, *batch(t, 0)).backward()  # the same batch on every rank
        opt.step()
        opt.zero_grad()


def params_of(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def save_partway(cases: list[str], root: str,
                 shard_size: int | None = None) -> dict[str, list[torch.Tensor]]:
    """On each rank: the uninterrupted run's final params, and a checkpoint SAVED_AT steps in."""
    finals = {}
    for case in cases:
        model, opt = build(case, shard_size=shard_size)
        train(model, opt, range(1, TOTAL + 1))
        finals[case] = params_of(model)
        model, opt = build(case, shard_size=shard_size)
        train(model, opt, range(1, SAVED_AT + 1))
        zeroopt.save_checkpoint(os.path.join(root, case), model, opt, step=SAVED_AT)
    return finals


def resume(cases: list[str], root: str) -> dict[str, list[torch.Tensor]]:
    """On each rank: load the checkpoint into a different-looking model and finish the run."""
    finals = {}
    for case in cases:
        model, opt = build(case, seed=99)
        extras = zeroopt.load_checkpoint(os.path.join(root, case), model, opt)
        assert extras == {"step": SAVED_AT}, extras
        train(model, opt, range(SAVED_AT + 1, TOTAL + 1))
        finals[case] = params_of(model)
    return finals


MPI_CASES = ["adamw", "adamw_8bit", "galore_adamw"]


def save_partway_under_mpi() -> dict[str, list[torch.Tensor]]:
    """``save_partway`` for distributed.mpi_ranks (no arguments there): the directory comes
    from ZEROOPT_TEST_CHECKPOINTS. DCP gets a gloo group bootstrapped over MPI."""
    return save_partway(MPI_CASES, os.environ["ZEROOPT_TEST_CHECKPOINTS"])


def extras_round_trip(root: str) -> dict:
    """Each rank saves its own rank as an extra; every rank loads rank 0's."""
    import torch.distributed as dist

    model, opt = build("adamw")
    train(model, opt, range(1, 2))
    zeroopt.save_checkpoint(root, model, opt, saved_by=dist.get_rank())
    return zeroopt.load_checkpoint(root, model, opt)
