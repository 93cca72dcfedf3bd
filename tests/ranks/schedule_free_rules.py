"""Scenarios for schedule_free_radam and schedule_free_sgd, run on every rank.

zeroopt trains sharded on each rank's batch; schedulefree's RAdamScheduleFree / SGDScheduleFree
and zeroopt's eager ReferenceOptimizer train unsharded on the exact average of every rank's
gradient (``training.reference_backward``, zeroopt reducing in fp64), so all three see the same
gradients bit for bit. Midway, and again later, all switch to eval mode (the params move to the
average x, which is compared), then back to train mode and train on.
"""

from __future__ import annotations

import os

import torch

import zeroopt
from training import EXACT, batch, loss_of, max_rel_err, models, reference_backward, world

STEPS = 8
EVAL_AFTER = (3, 7)  # eval() then train() after these steps (RAdam: one SGD, one Adam phase)

# case -> (zeroopt name, hyperparameters for zeroopt and the package alike)
CASES = {
    # silent SGD phase (the default): steps 1-4 at beta2=0.999 move nothing, 5-8 are Adam's
    "radam": ("schedule_free_radam", dict(lr=1e-2, weight_decay=0.05)),
    # SGD phase at lr (steps 1-4), a warmup-weighted average (r, weight_lr_power)
    "radam_sgd_phase": ("schedule_free_radam", dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-6,
                                                    weight_decay=0.05, silent_sgd_phase=False,
                                                    r=1.0, weight_lr_power=1.0)),
    "sgd": ("schedule_free_sgd", dict(lr=0.05, weight_decay=0.05, warmup_steps=3)),
    "sgd_momentum": ("schedule_free_sgd", dict(lr=0.02, momentum=0.7, weight_decay=0.01,
                                               r=0.5)),
}


def package_optimizer(name: str, params, hp: dict):
    """schedulefree's class for ``name``, in train mode (it starts in eval mode)."""
    import schedulefree

    cls = {"schedule_free_radam": schedulefree.RAdamScheduleFree,
           "schedule_free_sgd": schedulefree.SGDScheduleFree}[name]
    opt = cls(params, **hp)
    opt.train()
    return opt


def side_by_side(case: str, stage: int) -> dict:
    """The largest relative error against the package and against the eager reference, over
    the training point after every step and the evaluation point at each eval()."""
    name, hp = CASES[case]
    rank, world_size = world()
    model, package_model = models()
    _, eager_model = models()
    opt = zeroopt.ZeroOptimizer(model.parameters(), name, stage=stage, **EXACT, **hp)
    references = [(package_model, package_optimizer(name, package_model.parameters(), hp)),
                  (eager_model, zeroopt.ReferenceOptimizer(eager_model.parameters(), name, **hp))]
    errors = {"package": 0.0, "eager": 0.0, "package_eval": 0.0, "eager_eval": 0.0}
    evaluated = []
    for step in range(1, STEPS + 1):
        loss_of(model, *batch(step, rank)).backward()
        opt.step()
        opt.zero_grad()
        for ref, ref_opt in references:
            reference_backward(ref, step, world_size)
            ref_opt.step()
            ref_opt.zero_grad()
        for key, (ref, _) in zip(("package", "eager"), references):
            errors[key] = max(errors[key], max_rel_err(model, ref))
        if step in EVAL_AFTER:
            training_point = [p.detach().clone() for p in model.parameters()]
            for o in (opt, *(ref_opt for _, ref_opt in references)):
                o.eval()
            moved = max((p.detach() - q).abs().max().item()
                        for p, q in zip(model.parameters(), training_point))
            evaluated.append(moved)
            for key, (ref, _) in zip(("package_eval", "eager_eval"), references):
                errors[key] = max(errors[key], max_rel_err(model, ref))
            for o in (opt, *(ref_opt for _, ref_opt in references)):
                o.train()
    errors["eval_moved"] = evaluated  # eval() really moved the params (x != y)
    return errors


def suite(root: str | None = None, checkpoint: str | None = None) -> dict:
    """Every case at both stages, at this world size, in one set of processes (spawning is
    the slow part); with ``checkpoint`` "save" or "resume", also ``save_partway(root)`` or
    ``resume(root)``, under the key "checkpoint"."""
    out = {(case, stage): side_by_side(case, stage) for stage in (1, 2) for case in CASES}
    if checkpoint is not None:
        out["checkpoint"] = {"save": save_partway, "resume": resume}[checkpoint](root)
    return out


# --- checkpoints: saved at one world size, resumed at another ---------------------------------

SAVED_AT, TOTAL = 5, 8  # RAdam: saved just after its first Adam step
CHECKPOINT_CASES = ("radam", "sgd")  # one per rule: checkpoints are the slow part


def _build(case: str, seed: int = 0):
    name, hp = CASES[case]
    model, _ = models()
    if seed:  # a load that missed a param would show
        torch.manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
    return model, zeroopt.ZeroOptimizer(model.parameters(), name, stage=2, **EXACT, **hp)


def _train(model, opt, steps: range) -> None:
    for t in steps:
        loss_of(model, *batch(t, 0)).backward()  # the same batch on every rank: the average
        opt.step()                               # gradient does not depend on the world size
        opt.zero_grad()


def _params(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def save_partway(root: str) -> dict:
    """The uninterrupted run (eval() at SAVED_AT, as the package asks before saving, then
    train() and on): its eval-point and final params; and a checkpoint saved in eval mode."""
    out = {}
    for case in CHECKPOINT_CASES:
        model, opt = _build(case)
        _train(model, opt, range(1, SAVED_AT + 1))
        opt.eval()
        evaluated = _params(model)
        zeroopt.save_checkpoint(os.path.join(root, case), model, opt, step=SAVED_AT)
        opt.train()
        _train(model, opt, range(SAVED_AT + 1, TOTAL + 1))
        out[case] = {"eval": evaluated, "final": _params(model)}
    return out


def resume(root: str) -> dict:
    """Load each checkpoint into a different-looking model: the eval-point params, then
    train() and the rest of the run's final params."""
    out = {}
    for case in CHECKPOINT_CASES:
        model, opt = _build(case, seed=99)
        assert zeroopt.load_checkpoint(os.path.join(root, case), model, opt) == \
            {"step": SAVED_AT}
        evaluated = _params(model)
        opt.train()
        _train(model, opt, range(SAVED_AT + 1, TOTAL + 1))
        out[case] = {"eval": evaluated, "final": _params(model)}
    return out
