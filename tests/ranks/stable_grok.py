"""stable_adamw and grokadamw on every rank (see test_stable_grok.py for the assertions).

Each rank trains zeroopt sharded on its own batch; alongside, the reference package's class
(optimi.StableAdamW, grokadamw.GrokAdamW) and zeroopt's eager ReferenceOptimizer train unsharded
on the exact average of every rank's gradient (training.reference_backward with EXACT). Buckets
are small, so params straddle shards and buckets at every world size.
"""

from __future__ import annotations

import copy
import os
import warnings

import torch

import zeroopt
from ranks.states import LOSS_SCALE, saved_states_from
from ranks.trust_ratio import ChunkwiseReference
from training import (EXACT, batch, loss_of, max_rel_err, models, reference_backward,
                      reference_optimizer, train_side_by_side, world)

OPTIONS = dict(EXACT, bucket_numel=300)  # ~10 buckets for the ~3,000-param model
STEPS = 6
# case -> (rule, hyperparameters, extra keys of the one param group)
CASES = {
    "stable_adamw": ("stable_adamw", dict(lr=3e-3, weight_decay=0.1), {}),
    "stable_adamw_decouple_lr": ("stable_adamw", dict(lr=3e-3, betas=(0.9, 0.999),
                                                      weight_decay=0.05, decouple_lr=True,
                                                      max_lr=6e-3), {}),
    "grokadamw": ("grokadamw", dict(lr=1e-3, weight_decay=0.1, gradient_clipping=0.5), {}),
    # the grokking signal from the group's losses, changed every step (see signal_at)
    "grokadamw_signal": ("grokadamw", dict(lr=1e-3, weight_decay=0.1, gamma=0.2,
                                           grokking_signal_decay_rate=2.0),
                         dict(train_loss=0.5, eval_loss=0.9)),
    # gamma 0 and no clipping: the element-wise path, no statistics
    "grokadamw_elementwise": ("grokadamw", dict(lr=1e-3, weight_decay=0.1, gamma=0.0,
                                                gradient_clipping=0.0), {}),
}


# Stages 1 and 2 differ in how gradients arrive, not in the rule: the variants run at stage 2.
STAGES = {"stable_adamw_decouple_lr": (2,), "grokadamw_signal": (2,),
          "grokadamw_elementwise": (2,)}


def signal_at(step: int) -> dict:
    return dict(train_loss=0.5 - 0.02 * step, eval_loss=0.9 + 0.05 * step)


def _groups(model, extra: dict):
    return [{"params": list(model.parameters()), **extra}]


def against_references(case: str, stage: int) -> dict:
    """zeroopt against the package's class and against the eager reference, STEPS steps."""
    rank, world_size = world()
    name, hp, extra = CASES[case]
    model, ref = models()
    _, eager = models()
    opt = zeroopt.ZeroOptimizer(_groups(model, extra), name, stage=stage, **OPTIONS, **hp)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # optimi: a "high" weight decay with decouple_lr
        ref_opt = reference_optimizer(name, _groups(ref, extra), hp)
    eager_opt = zeroopt.ReferenceOptimizer(_groups(eager, extra), name, **hp)
    assert type(ref_opt).__module__.split(".")[0] in ("optimi", "grokadamw"), type(ref_opt)
    for step in range(STEPS):
        if extra:
            for o in (opt, ref_opt, eager_opt):
                o.param_groups[0].update(signal_at(step))
        loss_of(model, *batch(step, rank)).backward()
        opt.step()
        opt.zero_grad()
        for m, o in ((ref, ref_opt), (eager, eager_opt)):
            reference_backward(m, step, world_size)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # grokadamw: torch.cuda.amp.autocast()
                o.step()
            o.zero_grad()
    owners: dict[int, set] = {}  # param -> the ranks holding a piece of it
    for r in range(world_size):
        for piece in opt.layout.pieces_of(r):
            owners.setdefault(piece.slot.index, set()).add(r)
    straddling = [i for i, ranks in owners.items() if len(ranks) > 1]
    return {"package": max_rel_err(model, ref), "eager": max_rel_err(model, eager),
            "moved": max((a - b).abs().max().item()
                         for a, b in zip(model.parameters(), models()[1].parameters())),
            "straddling_params": len(straddling)}


class _Chunkwise(ChunkwiseReference):
    """The reference step on each rank's chunk of each param as a tensor of its own
    (ranks/trust_ratio.py), with the group's step count kept as the optimizer keeps it."""

    def step(self):
        self.rule.before_step(self.group)
        super().step()


def rms_per_tensor_vs_chunkwise(steps: int = 4) -> dict:
    """stable_adamw's rms of the whole param (zeroopt) against the rms of each rank's chunk
    (what stepping flat ZeRO partitions would compute), as test_trust_ratio.py does for LAMB."""
    rank, world_size = world()
    hp = CASES["stable_adamw"][1]
    model, ref = models()
    _, chunked = models()
    opt = zeroopt.ZeroOptimizer(model.parameters(), "stable_adamw", stage=2, **OPTIONS, **hp)
    chunks: dict[int, list] = {}
    for r in range(world_size):
        for piece in opt.layout.pieces_of(r):
            chunks.setdefault(piece.slot.index, []).append(
                (piece.param_offset, piece.param_offset + piece.numel))
    ref_opt = zeroopt.ReferenceOptimizer(ref.parameters(), "stable_adamw", **hp)
    chunk_opt = _Chunkwise(chunked, "stable_adamw", hp, chunks)
    train_side_by_side(model, opt, [(ref, ref_opt), (chunked, chunk_opt)], range(steps))
    return {"vs_per_tensor": max_rel_err(model, ref),
            "vs_chunkwise": max_rel_err(model, chunked),
            "straddling_params": sum(len(c) > 1 for c in chunks.values())}


def _average_backward(model, losses) -> None:
    """Give ``model`` the average of the gradients of ``losses`` (one function per rank),
    summed in fp64 as zeroopt's EXACT reduction; params no loss reaches keep no gradient."""
    total: dict = {}
    for loss in losses:
        model.zero_grad()
        loss(model).backward()
        for p in model.parameters():
            if p.grad is not None:
                total[p] = total.get(p, 0) + p.grad.double()
    model.zero_grad()
    for p, t in total.items():
        p.grad = (t * (1.0 / len(losses))).float()


def unused_branch(name: str, stage: int) -> dict:
    """A branch of the model used only in even steps (on every rank): in odd steps its params
    have no gradient anywhere and are not stepped. optimi then still counts the group's step
    (its debiasing follows the group), GrokAdamW the param's own step, and GrokAdamW's
    position i of the params after the branch drops by two."""
    from ranks.equivalence import BranchModel

    rank, world_size = world()
    hp = CASES[name][1]
    torch.manual_seed(5)
    model = BranchModel()
    ref, eager = copy.deepcopy(model), copy.deepcopy(model)
    opt = zeroopt.ZeroOptimizer(model.parameters(), name, stage=stage, **OPTIONS, **hp)
    ref_opt = reference_optimizer(name, ref.parameters(), hp)
    eager_opt = zeroopt.ReferenceOptimizer(eager.parameters(), name, **hp)

    def loss(step, r):
        x, y = batch(step, r)
        return lambda m: torch.nn.functional.mse_loss(m(x, step % 2 == 0), y)

    for step in range(STEPS):
        loss(step, rank)(model).backward()
        opt.step()
        opt.zero_grad()
        for m, o in ((ref, ref_opt), (eager, eager_opt)):
            _average_backward(m, [loss(step, r) for r in range(world_size)])
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                o.step()
            o.zero_grad()
    return {"package": max_rel_err(model, ref), "eager": max_rel_err(model, eager)}


def eight_bit_against_32bit(name: str, hp: dict, steps: int = 10) -> dict:
    """8-bit states (the two weight matrices, over min_8bit_size=1000) against the 32-bit
    reference step, measured as bitsandbytes' tests measure it (ranks/states.py): each step from
    the same point, the reference reset to zeroopt's params and dequantized states after."""
    rank, world_size = world()
    model, ref = models()
    opt = zeroopt.ZeroOptimizer(model.parameters(), name, stage=2, state_precision="8bit",
                                min_8bit_size=1000, **OPTIONS, **hp)
    ref_opt = zeroopt.ReferenceOptimizer(ref.parameters(), name, **hp)
    ref_params = list(ref.parameters())
    worst = {"params_not_close": 0, "state_mean_abs_err": 0.0, "state_max_abs": 0.0}
    for step in range(steps):
        (loss_of(model, *batch(step, rank)) * LOSS_SCALE).backward()
        opt.step()
        opt.zero_grad()
        reference_backward(ref, step, world_size, scale=LOSS_SCALE)
        ref_opt.step()
        ref_opt.zero_grad()
        worst["params_not_close"] = max(worst["params_not_close"], sum(
            int((~torch.isclose(p.detach(), q.detach(), atol=1e-5, rtol=1e-3)).sum())
            for p, q in zip(model.parameters(), ref_params)))
        raw = opt.state_dict()
        states = saved_states_from(raw, opt.rule.nonnegative_states)
        with torch.no_grad():
            for index, p in enumerate(ref_params):
                for state_name, ours in states[index].items():
                    theirs = ref_opt.state[p][state_name]
                    if raw["state"][index][state_name].dtype == torch.uint8:
                        worst["state_mean_abs_err"] = max(worst["state_mean_abs_err"],
                                                          (ours - theirs).abs().mean().item())
                        worst["state_max_abs"] = max(worst["state_max_abs"],
                                                     theirs.abs().max().item())
                    theirs.copy_(ours)
                p.copy_(list(model.parameters())[index])
    worst["eight_bit_params"] = sorted(i for i, e in opt.state_dict()["state"].items()
                                       if any(v.dtype == torch.uint8 for v in e.values()))
    return worst


# -- a checkpoint saved at W=3, resumed at W=2 ---------------------------------------------

RESHARDED = {"stable_adamw": CASES["stable_adamw"][:2], "grokadamw": CASES["grokadamw"][:2]}
SAVED_AT, TOTAL = 3, 6


def _train_same_batch(model, opt, steps) -> None:
    for t in steps:
        loss_of(model, *batch(t, 0)).backward()  # every rank the same batch: the same average
        opt.step()
        opt.zero_grad()


def _build(case: str, seed: int = 0):
    name, hp = RESHARDED[case]
    model, _ = models()
    if seed:  # a load that missed a param would show
        torch.manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
    return model, zeroopt.ZeroOptimizer(model.parameters(), name, stage=2, **OPTIONS, **hp)


def save_partway(root: str) -> dict:
    """The uninterrupted run's final params; a checkpoint SAVED_AT steps in."""
    finals = {}
    for case in RESHARDED:
        model, opt = _build(case)
        _train_same_batch(model, opt, range(1, TOTAL + 1))
        finals[case] = [p.detach().clone() for p in model.parameters()]
        model, opt = _build(case)
        _train_same_batch(model, opt, range(1, SAVED_AT + 1))
        zeroopt.save_checkpoint(os.path.join(root, case), model, opt, step=SAVED_AT)
    return finals


def resume(root: str) -> dict:
    finals = {}
    for case in RESHARDED:
        model, opt = _build(case, seed=99)
        assert zeroopt.load_checkpoint(os.path.join(root, case), model, opt) == \
            {"step": SAVED_AT}
        _train_same_batch(model, opt, range(SAVED_AT + 1, TOTAL + 1))
        finals[case] = [p.detach().clone() for p in model.parameters()]
    return finals


def suite(root: str, save: bool, load: bool) -> dict:
    """Every scenario of this world size in one set of processes."""
    out = {}
    for case in CASES:
        for stage in STAGES.get(case, (1, 2)):
            out[case, stage] = against_references(case, stage)
    for name in ("stable_adamw", "grokadamw"):
        out["unused_branch", name] = unused_branch(name, stage=2)
    _, world_size = world()
    if world_size == 3:  # the whole-tensor rms, against the rms of each rank's chunk
        out["chunkwise"] = rms_per_tensor_vs_chunkwise()
    if world_size == 2:
        for name in ("stable_adamw", "grokadamw"):
            out["8bit", name] = eight_bit_against_32bit(name, dict(lr=1e-3, weight_decay=0.1))
    if save:
        out["saved"] = save_partway(root)
    if load:
        out["resumed"] = resume(root)
    return out
