"""Muon scenarios, run on every rank: zeroopt sharded against torch.optim.Muon, and a count of
the Newton-Schulz orthogonalizations each rank runs.

zeroopt trains sharded on each rank's batch; torch.optim.Muon trains unsharded on the exact
average of every rank's gradient (``training.reference_backward``, zeroopt reducing in fp64),
so both see the same gradients bit for bit and any difference is the update's. The model has
only 2-D params (Muon's domain): three bias-free Linear weights of uneven shapes, one tall
(41 x 29), one wide (5 x 41), one nearly square (29 x 37), so both sides of the iteration's
transpose run, and no size divides by the world size or the bucket.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

import zeroopt
import zeroopt.algorithms.muon as muon_module
from training import EXACT, batch, loss_of, max_rel_err, reference_backward, world

STEPS = 8
# case -> hyperparameters, the same for zeroopt and torch.optim.Muon
CASES = {
    "muon": dict(lr=2e-2),  # torch's defaults otherwise: nesterov, adjust_lr_fn=None, wd 0.1
    "muon_original": dict(lr=2e-2, weight_decay=0.05, adjust_lr_fn="original", momentum=0.9,
                          nesterov=False),
    "muon_match_rms_adamw": dict(lr=1e-2, weight_decay=0.1, adjust_lr_fn="match_rms_adamw"),
}


class MatrixModel(nn.Module):
    """Only 2-D params: weights 29 x 37, 41 x 29 and 5 x 41."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(37, 29, bias=False)
        self.mid = nn.Linear(29, 41, bias=False)
        self.out = nn.Linear(41, 5, bias=False)

    def forward(self, x):
        return self.out(torch.tanh(self.mid(torch.tanh(self.inp(x)))))


def models():
    torch.manual_seed(1234)
    model = MatrixModel()
    return model, copy.deepcopy(model)


MATRICES = len(list(MatrixModel().parameters()))


def against_torch(case: str, stage: int) -> dict:
    """After ``STEPS`` steps: the largest relative param error and momentum-buffer error
    against torch.optim.Muon, the shapes of the matrices this rank owns, and the shapes it
    orthogonalized at each step (counted by wrapping the module's Newton-Schulz function)."""
    hp = CASES[case]
    rank, world_size = world()
    model, ref = models()
    opt = zeroopt.ZeroOptimizer(model.parameters(), "muon", stage=stage, **EXACT, **hp)
    ref_opt = torch.optim.Muon(ref.parameters(), **hp)

    calls: list[tuple[int, tuple]] = []
    current = [0]
    original = muon_module.zeropower_via_newtonschulz

    def counted(update, *args, **kwargs):
        calls.append((current[0], tuple(update.shape)))
        return original(update, *args, **kwargs)

    muon_module.zeropower_via_newtonschulz = counted
    try:
        for step in range(STEPS):
            current[0] = step
            loss_of(model, *batch(step, rank)).backward()
            opt.step()
            opt.zero_grad()
            reference_backward(ref, step, world_size)
            ref_opt.step()
            ref_opt.zero_grad()
    finally:
        muon_module.zeropower_via_newtonschulz = original

    owned = sorted(tuple(o.param.shape) for group in opt.shard.whole.owned for o in group)
    state = opt.state_dict()["state"]  # gathered: every param's momentum buffer
    buffer_err = max(((state[i]["momentum_buffer"] - ref_opt.state[p]["momentum_buffer"])
                      .abs().max() / ref_opt.state[p]["momentum_buffer"].abs().max()).item()
                     for i, p in enumerate(ref.parameters()))
    return dict(err=max_rel_err(model, ref), buffer_err=buffer_err, owned=owned, calls=calls,
                moved=max_rel_err(model, models()[1]))


def suite() -> dict:
    """Every case at stages 1 and 2, in one set of processes."""
    return {(case, stage): against_torch(case, stage) for stage in (1, 2) for case in CASES}
