"""CAME scenarios, run on every rank: zeroopt sharded against pytorch_optimizer.CAME, and a
checkpoint saved at W=3 resumed at W=2.

zeroopt trains sharded on each rank's batch; pytorch_optimizer.CAME (and zeroopt's own eager
``ReferenceOptimizer``) train unsharded on the exact average of every rank's gradient
(``training.reference_backward``, zeroopt reducing in fp64), so all see the same gradients bit
for bit and any difference is the update's. The model (training.OddModel) has three odd-sized
Linear weights (factored moments), biases and a LayerNorm (1-D: unfactored) and a 0-d param.
"""

from __future__ import annotations

import os

import torch

import zeroopt
from ranks.checkpoint import SAVED_AT, TOTAL, params_of, train
from training import EXACT, max_rel_err, models, train_side_by_side

STEPS = 8
# case -> hyperparameters, the same for zeroopt and pytorch_optimizer.CAME
CASES = {
    "came": dict(lr=1e-2, weight_decay=0.1),  # decoupled decay
    "came_coupled_ams": dict(lr=1e-2, weight_decay=0.05, weight_decouple=False,
                             ams_bound=True),
    "came_fixed_decay_clipped": dict(lr=1e-2, weight_decay=0.01, fixed_decay=True,
                                     clip_threshold=0.05, betas=(0.8, 0.99, 0.999)),
}
RESHARDED = dict(lr=1e-2, weight_decay=0.1)


def against_reference(case: str, stage: int) -> dict:
    """Largest relative param error after ``STEPS`` steps against pytorch_optimizer.CAME and
    against the eager reference, and the whole params this rank owns."""
    from pytorch_optimizer import CAME

    hp = CASES[case]
    model, ref = models()
    _, eager = models()
    opt = zeroopt.ZeroOptimizer(model.parameters(), "came", stage=stage, **EXACT, **hp)
    train_side_by_side(model, opt, [(ref, CAME(ref.parameters(), **hp)),
                                    (eager, zeroopt.ReferenceOptimizer(eager.parameters(),
                                                                       "came", **hp))],
                       range(STEPS))
    owned = sorted(o.slot.index for group in opt.shard.whole.owned for o in group)
    return dict(package=max_rel_err(model, ref), eager=max_rel_err(model, eager), owned=owned,
                moved=max_rel_err(model, models()[1]))


def _build(seed: int = 0):
    model, _ = models()
    if seed:  # a different-looking model: a load that missed a param would show
        torch.manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
    return model, zeroopt.ZeroOptimizer(model.parameters(), "came", stage=2, **EXACT,
                                        **RESHARDED)


def save_partway(root: str) -> list[torch.Tensor]:
    """The uninterrupted run's final params, and a checkpoint ``SAVED_AT`` steps in. Every
    rank trains on the same batch (ranks.checkpoint.train), so the averaged gradient, and the
    run, is the same at every world size."""
    model, opt = _build()
    train(model, opt, range(1, TOTAL + 1))
    final = params_of(model)
    model, opt = _build()
    train(model, opt, range(1, SAVED_AT + 1))
    zeroopt.save_checkpoint(os.path.join(root, "came"), model, opt, step=SAVED_AT)
    return final


def resume(root: str) -> list[torch.Tensor]:
    model, opt = _build(seed=99)
    assert zeroopt.load_checkpoint(os.path.join(root, "came"), model, opt) == {"step": SAVED_AT}
    train(model, opt, range(SAVED_AT + 1, TOTAL + 1))
    return params_of(model)


def suite(root: str, save: bool, load: bool) -> dict:
    """Every scenario at this world size, in one set of processes: the reference comparisons
    at stages 1 and 2; with ``save``, the checkpoint for a later resume at another world size;
    with ``load``, that resume."""
    out = {("ref", case, stage): against_reference(case, stage)
           for stage in (1, 2) for case in CASES}
    if save:
        out["uninterrupted"] = save_partway(root)
    if load:
        out["resumed"] = resume(root)
    return out
