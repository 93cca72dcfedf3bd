"""Muon scenarios, run on every rank: zeroopt sharded against torch.optim.Muon, and a count of
the Newton-Schulz orthogonalizations each rank runs.

zeroopt trains sharded on each rank's batch; torch.optim.Muon trains unsharded on the exact
average of every rank's gradient (``training.reference_backward``, zeroopt reducing in fp64),
so both see the same gradients bit for bit and any difference is the update's. MatrixModel has
only 2-D params (Muon's domain): three bias-free Linear weights of uneven shapes, one tall
(41 x 29), one wide (5 x 41), one nearly square (29 x 37), so both sides of the iteration's
transpose run, and no size divides by the world size or the bucket. HybridModel is Muon as it
is run: ``zeroopt.muon_param_groups`` gives its hidden Linear weight and its convolution's
weight Muon, its embedding, head, norm and biases AdamW (their own lr and weight decay); the
reference is torch.optim.Muon on the matrices (the convolution's weight stepped as its
flattened 3 x 5 matrix) plus torch.optim.AdamW on the rest.
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
    "hybrid": dict(lr=2e-2, adjust_lr_fn="match_rms_adamw"),
}
ADAMW = dict(adamw_lr=3e-3, adamw_betas=(0.9, 0.95), adamw_weight_decay=0.01)  # hybrid's AdamW


class MatrixModel(nn.Module):
    """Only 2-D params: weights 29 x 37, 41 x 29 and 5 x 41."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(37, 29, bias=False)
        self.mid = nn.Linear(29, 41, bias=False)
        self.out = nn.Linear(41, 5, bias=False)

    def forward(self, x):
        return self.out(torch.tanh(self.mid(torch.tanh(self.inp(x)))))


class HybridModel(nn.Module):
    """Muon matrices: a 29 x 99 Linear weight and a (3, 1, 5) Conv1d weight; AdamW: an 11 x 37
    embedding, the 5 x 29 head, a LayerNorm and the biases."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(11, 37)
        self.conv = nn.Conv1d(1, 3, kernel_size=5)
        self.hidden = nn.Linear(99, 29)
        self.norm = nn.LayerNorm(29)
        self.lm_head = nn.Linear(29, 5, bias=False)

    def forward(self, x):
        tokens = (x[:, :4].abs() * 3).long() % 11
        h = torch.tanh(self.conv((x + self.embed(tokens).mean(1)).unsqueeze(1))).flatten(1)
        return self.lm_head(self.norm(torch.tanh(self.hidden(h))))


MODELS = {case: HybridModel if case == "hybrid" else MatrixModel for case in CASES}
MATRICES = {"hybrid": 2, **{case: 3 for case in CASES if case != "hybrid"}}


def models(case: str):
    torch.manual_seed(1234)
    model = MODELS[case]()
    return model, copy.deepcopy(model)


class TorchHybrid:
    """The unsharded reference: torch.optim.Muon on the Muon group's params (one of more than
    two dimensions through a 2-D mirror param, as its flattened matrix), torch.optim.AdamW on
    the AdamW group's."""

    def __init__(self, groups: list[dict], hp: dict):
        matrices = groups[0]["params"]
        self.matrix_ids = {id(p) for p in matrices}
        self.mirrors = [(p, nn.Parameter(p.detach().reshape(p.size(0), -1).clone()))
                        for p in matrices if p.dim() > 2]
        mirrored = {id(p) for p, _ in self.mirrors}
        self.muon = torch.optim.Muon([p for p in matrices if id(p) not in mirrored]
                                     + [m for _, m in self.mirrors], **hp)
        self.adamw = [torch.optim.AdamW(g["params"], lr=g["lr"], betas=g["betas"],
                                        eps=g["eps"], weight_decay=g["weight_decay"])
                      for g in groups[1:]]

    def step(self):
        for param, mirror in self.mirrors:
            mirror.grad = param.grad.reshape(mirror.shape)
        self.muon.step()
        with torch.no_grad():
            for param, mirror in self.mirrors:
                param.copy_(mirror.view_as(param))
        for opt in self.adamw:
            opt.step()

    def momentum_buffer(self, param):
        """torch.optim.Muon's momentum of ``param`` in its shape; None for an AdamW param."""
        if id(param) not in self.matrix_ids:
            return None
        mirror = {id(p): m for p, m in self.mirrors}.get(id(param), param)
        return self.muon.state[mirror]["momentum_buffer"].view_as(param)


def optimizers(case: str, model, ref, stage: int):
    """zeroopt's optimizer and the reference for ``case``."""
    hp = CASES[case]
    if case != "hybrid":
        return (zeroopt.ZeroOptimizer(model.parameters(), "muon", stage=stage, **EXACT, **hp),
                torch.optim.Muon(ref.parameters(), **hp))
    opt = zeroopt.ZeroOptimizer(zeroopt.muon_param_groups(model, **ADAMW), "muon", stage=stage,
                                **EXACT, **hp)
    return opt, TorchHybrid(zeroopt.muon_param_groups(ref, **ADAMW), hp)


def against_torch(case: str, stage: int) -> dict:
    """After ``STEPS`` steps: the largest relative param error and momentum-buffer error
    against torch.optim.Muon, the shapes of the matrices this rank owns, and the shapes it
    orthogonalized at each step (counted by wrapping the module's Newton-Schulz function)."""
    rank, world_size = world()
    model, ref = models(case)
    opt, ref_opt = optimizers(case, model, ref, stage)

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
            ref.zero_grad()
    finally:
        muon_module.zeropower_via_newtonschulz = original

    owned = sorted(muon_module.matrix_shape(o.param.shape)
                   for group in opt.shard.whole.owned for o in group)
    state = opt.state_dict()["state"]  # gathered: every param's momentum buffer
    twin = dict(zip(map(id, model.parameters()), ref.parameters()))
    refs = [buffer_of(ref_opt, twin[id(p)]) for g in opt.param_groups for p in g["params"]]
    buffer_err = max(((state[i]["momentum_buffer"] - b).abs().max() / b.abs().max()).item()
                     for i, b in enumerate(refs) if b is not None)
    return dict(err=max_rel_err(model, ref), buffer_err=buffer_err, owned=owned, calls=calls,
                moved=moved(model, models(case)[1]))


def moved(model, start) -> float:
    """How far training moved the params, relative to where they started (all of them)."""
    now, then = (torch.cat([p.detach().flatten() for p in m.parameters()]) for m in (model, start))
    return ((now - then).norm() / then.norm()).item()


def buffer_of(ref_opt, param):
    """The reference's momentum buffer of ``param`` (None for an AdamW param)."""
    if isinstance(ref_opt, TorchHybrid):
        return ref_opt.momentum_buffer(param)
    return ref_opt.state[param]["momentum_buffer"]


def suite() -> dict:
    """Every case at stages 1 and 2, in one set of processes."""
    return {(case, stage): against_torch(case, stage) for stage in (1, 2) for case in CASES}
