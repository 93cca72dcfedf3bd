"""Scenarios on every rank for what goes wrong or is unusual: ranks that disagree, a NaN gradient,
params unused on some ranks, gradient memory, unusual clipping norms."""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
from torch import nn

import zeroopt
from training import BUCKET, EXACT, batch, loss_of, max_rel_err, models, reference_backward, world


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


def nonfinite_gradient_skips_the_step(stage: int) -> dict:
    """A NaN in one rank's gradient: every rank skips the step and leaves params and states as
    they were; training then goes on."""
    rank, world_size = world()
    model, _ = models()
    opt = zeroopt.ZeroOptimizer(model.parameters(), "adamw", stage=stage, bucket_numel=BUCKET)
    loss_of(model, *batch(0, rank)).backward()
    opt.step()
    opt.zero_grad()
    before = [p.detach().clone() for p in model.parameters()]
    states_before = opt.state_dict()["state"]
    x, y = batch(1, rank)
    if rank == world_size - 1:
        x[0, 0] = float("nan")
    loss_of(model, x, y).backward()
    opt.step()
    opt.zero_grad()
    unchanged = all(torch.equal(a, b) for a, b in zip(model.parameters(), before))
    states_after = opt.state_dict()["state"]
    states_unchanged = all(torch.equal(states_before[i][k], states_after[i][k])
                           for i in states_before for k in states_before[i])
    skipped = (opt.skipped_steps, opt.last_step_skipped)
    loss_of(model, *batch(2, rank)).backward()
    opt.step()
    moved = not all(torch.equal(a, b) for a, b in zip(model.parameters(), before))
    return {"unchanged": unchanged, "states_unchanged": states_unchanged, "skipped": skipped,
            "moved_after": moved, "finite": all(torch.isfinite(p).all() for p in model.parameters())}


def gradient_memory(stage: int) -> dict:
    """Bytes of gradient staging (memory outside the shard) after backward and after step."""
    rank, _ = world()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(37, 12), *[nn.Linear(12, 12) for _ in range(10)],
                          nn.Linear(12, 5))
    opt = zeroopt.ZeroOptimizer(model.parameters(), "adamw", stage=stage, bucket_numel=150)
    seen = []
    for step in range(2):
        loss_of(model, *batch(step, rank)).backward()
        seen.append(opt.grads.staging_bytes())
        opt.step()
        seen.append(opt.grads.staging_bytes())
        opt.zero_grad()
    buckets = opt.layout.buckets
    return {"peak": max(seen), "buckets": len(buckets),
            "largest_bucket_bytes": 4 * max(b.numel for b in buckets),
            "all_buckets_bytes": 4 * sum(b.numel for b in buckets),
            "grads_left": sum(p.grad is not None for p in model.parameters())}


class BranchModel(nn.Module):
    """A model whose ``branch`` layer only some ranks use: its gradient is zero elsewhere."""

    def __init__(self):
        super().__init__()
        self.trunk = nn.Linear(37, 23)
        self.branch = nn.Linear(23, 23)
        self.head = nn.Linear(23, 5)

    def forward(self, x, use_branch: bool):
        h = torch.tanh(self.trunk(x))
        return self.head(self.branch(h) if use_branch else h)


def unused_params_on_some_ranks(stage: int) -> float:
    """Ranks of odd index skip ``branch``: zeroopt averages their zero gradient in, as
    DistributedDataParallel does, and the buckets still reduce in the same order everywhere."""
    rank, world_size = world()
    torch.manual_seed(5)
    model = BranchModel()
    ref = copy.deepcopy(model)
    opt = zeroopt.ZeroOptimizer(model.parameters(), "sgd", stage=stage, bucket_numel=300,
                                reduce_dtype=torch.float64, lr=0.1, momentum=0.9)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    for step in range(3):
        x, y = batch(step, rank)
        nn.functional.mse_loss(model(x, rank % 2 == 0), y).backward()
        opt.step()
        opt.zero_grad()
        for r in range(world_size):
            x, y = batch(step, r)
            (nn.functional.mse_loss(ref(x, r % 2 == 0), y) / world_size).backward()
        ref_opt.step()
        ref_opt.zero_grad()
    return max_rel_err(model, ref)


def clip_norm_types(stage: int) -> dict:
    """clip_grad_norm_ with the inf norm and a fractional p: the global norm against the exact
    (fp64) norm of the whole unsharded model's averaged gradient. (torch's own fp32 result is
    itself ~4e-7 off at p = 1.5.)"""
    rank, world_size = world()
    out = {}
    for norm_type in (float("inf"), 1.5):
        model, ref = models()
        opt = zeroopt.ZeroOptimizer(model.parameters(), "sgd", stage=stage, **EXACT, lr=0.1)
        loss_of(model, *batch(0, rank)).backward()
        norm = opt.clip_grad_norm_(0.01, norm_type=norm_type)
        reference_backward(ref, 0, world_size)
        grads = torch.cat([p.grad.double().reshape(-1) for p in ref.parameters()])
        exact = torch.linalg.vector_norm(grads, norm_type).item()
        out[norm_type] = abs(norm.item() - exact) / exact
    return out


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
