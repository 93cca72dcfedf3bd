"""LOMO and AdaLomo sharded, against lomo-optim's Lomo and AdaLomo run unsharded, on every rank.

zeroopt trains sharded on each rank's batch; the reference trains unsharded as Transformers
runs it: built on the model, stepped by ``fused_backward(loss, lr)`` (its hooks update each
param during backward). Its loss is ``sum <p, g>`` over the params, where g is the exact average
of every rank's gradient (as ``training.reference_backward``, on a copy of the model: fp64 sum,
rounded once, the gradient zeroopt reduces with ``reduce_dtype=torch.float64``): its gradient
is g exactly (times AdaLomo's loss scale, a power of two, which its hooks divide out again
exactly). So both see the same gradient bit for bit, and any difference is the update's.
(A loss over the concatenated batch would average in another order: a few ulps apart.)

The model is training.OddModel with its scale a 1-element vector: lomo_optim.AdaLomo cannot
hold a 0-d param's state. The rules' own eager references run on OddModel itself (0-d scale).
"""

from __future__ import annotations

import contextlib
import copy
import os

import torch
from torch import nn

import zeroopt
from ranks.equivalence import save_load_continues_identically
from training import (EXACT, OddModel, batch, loss_of, max_rel_err, models,
                      train_side_by_side, world)

STEPS = 6
# case -> (rule, hyperparameters for zeroopt and lomo_optim alike)
CASES = {
    # clip_grad_value 0.05 clamps about a third of the gradient's elements at the first step
    "lomo": ("lomo", dict(lr=0.05, weight_decay=0.1, clip_grad_value=0.05)),
    # lomo_optim's default loss scale, 2**10 (scaled and unscaled again exactly there)
    "adalomo": ("adalomo", dict(lr=0.05, weight_decay=0.1)),
    # update normalisation active (clip_threshold 0.5; the update's RMS is about 1), eps2 = 0.1
    # among the params' RMS (0 to 1: some params' lr is eps2-scaled, others' their RMS),
    # clip_grad_value on (two thirds of the elements clamped), loss scale 1
    "adalomo_clipped": ("adalomo", dict(lr=0.02, clip_threshold=0.5, eps=(1e-30, 0.1),
                                        clip_grad_value=0.02, decay_rate=-0.5, loss_scale=1)),
}


class VectorScaleModel(OddModel):
    """training.OddModel with a 1-element vector for its 0-d scale."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor([0.75]))


def model_copies(count: int) -> list[nn.Module]:
    torch.manual_seed(1234)
    model = VectorScaleModel()
    return [model] + [copy.deepcopy(model) for _ in range(count - 1)]


@contextlib.contextmanager
def states_on_cpu():
    """lomo_optim.AdaLomo puts its states on ``.cuda()``, which a CPU build of torch refuses:
    they stay on the CPU, with the params."""
    cuda = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    try:
        yield
    finally:
        torch.Tensor.cuda = cuda


def lomo_optim_for(name: str, model: nn.Module, hp: dict):
    import lomo_optim

    with states_on_cpu():
        return (lomo_optim.AdaLomo if name == "adalomo" else lomo_optim.Lomo)(model, **hp)


class LomoReference:
    """lomo_optim's optimizer on ``ref``, fed the exact average of every rank's gradient."""

    def __init__(self, name: str, ref: nn.Module, hp: dict):
        self.ref = ref
        self.grad_model = copy.deepcopy(ref)  # before lomo_optim puts its hooks on ref
        self.opt = lomo_optim_for(name, ref, hp)
        self.lr = hp.get("lr", 1e-3)

    def backward(self, step: int, world_size: int, accum: int = 1) -> None:
        """Every rank's gradient of its ``accum`` micro-batches (each loss divided by
        ``accum``), on the copy at the reference's params, summed in fp64 as zeroopt's staging
        and reduction sum them (micro-batches first, then ranks), then averaged and rounded
        once to fp32: ``training.reference_backward``, with micro-batches."""
        params = list(self.grad_model.parameters())
        with torch.no_grad():
            for g, p in zip(params, self.ref.parameters()):
                g.copy_(p)
        total = [torch.zeros_like(p, dtype=torch.float64) for p in params]
        for r in range(world_size):
            mine = [torch.zeros_like(t) for t in total]
            for micro in range(accum):
                self.grad_model.zero_grad(set_to_none=True)
                (loss_of(self.grad_model, *batch(step, r, micro)) / accum).backward()
                for m, p in zip(mine, params):
                    m += p.grad.double()
            for t, m in zip(total, mine):
                t += m
        self.grads = [(t * (1.0 / world_size)).float() for t in total]

    def fused_backward(self) -> None:
        """lomo_optim's step: its fused backward on a loss whose gradient is the average."""
        loss = sum((p * g).sum() for p, g in zip(self.ref.parameters(), self.grads))
        self.opt.fused_backward(loss, self.lr)


def against_lomo_optim(case: str, stage: int, accum: int = 1) -> dict:
    """Largest relative param error against lomo_optim after ``STEPS`` steps (with ``accum``
    micro-batches per step inside ``opt.no_sync()``), and whether the params moved during
    backward (before step())."""
    name, hp = CASES[case]
    rank, world_size = world()
    model, ref = model_copies(2)
    opt = zeroopt.ZeroOptimizer(model.parameters(), name, stage=stage, **EXACT, **hp)
    reference = LomoReference(name, ref, hp)
    moved = False
    for step in range(STEPS):
        before = [p.detach().clone() for p in model.parameters()]
        for micro in range(accum):
            loss = loss_of(model, *batch(step, rank, micro)) / accum
            with opt.no_sync() if micro < accum - 1 else contextlib.nullcontext():
                loss.backward()
        reference.backward(step, world_size, accum)
        moved |= any(not torch.equal(a, b) for a, b in zip(model.parameters(), before))
        opt.step()
        opt.zero_grad()
        reference.fused_backward()
    return dict(err=max_rel_err(model, ref), moved_in_backward=moved)


def against_eager_reference(name: str, hp: dict, stage: int) -> float:
    """The rule against its own ``reference_step`` (zeroopt.ReferenceOptimizer, stepped after
    backward), on training.OddModel (a 0-d param included)."""
    model, ref = models()
    opt = zeroopt.ZeroOptimizer(model.parameters(), name, stage=stage, **EXACT, **hp)
    ref_opt = zeroopt.ReferenceOptimizer(ref.parameters(), name, **hp)
    train_side_by_side(model, opt, [(ref, ref_opt)], range(STEPS))
    return max_rel_err(model, ref)


def second_reduction_is_refused() -> str:
    """Two backward passes before step(), the first outside no_sync(): refused."""
    rank, _ = world()
    model, _ = models()
    opt = zeroopt.ZeroOptimizer(model.parameters(), "lomo", stage=2, **EXACT, lr=0.05)
    try:
        for micro in range(2):
            loss_of(model, *batch(0, rank, micro)).backward()
        opt.step()
    except RuntimeError as error:
        return str(error)
    return ""


# Checkpoints that reshard: every rank trains on the same batch, so the averaged gradient is the
# same at every world size (see ranks/checkpoint.py), and a run resumed at W=2 from a checkpoint
# saved at W=3 must equal the uninterrupted W=3 run bit for bit.
CHECKPOINT_CASES = ("lomo", "adalomo")
SAVED_AT, TOTAL = 3, 6


def _checkpoint_run(case: str, steps: range, model=None, opt=None, seed: int = 0):
    name, hp = CASES[case]
    if model is None:
        model = models()[0]
        if seed:  # a load that missed a param would show
            torch.manual_seed(seed)
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(torch.randn_like(p))
        opt = zeroopt.ZeroOptimizer(model.parameters(), name, stage=2, **EXACT, **hp)
    for step in steps:
        loss_of(model, *batch(step, 0)).backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def save_partway(root: str) -> dict:
    """The uninterrupted run's final params, and a checkpoint SAVED_AT steps in."""
    finals = {}
    for case in CHECKPOINT_CASES:
        model, _ = _checkpoint_run(case, range(TOTAL))
        finals[case] = [p.detach().clone() for p in model.parameters()]
        model, opt = _checkpoint_run(case, range(SAVED_AT))
        zeroopt.save_checkpoint(os.path.join(root, case), model, opt, step=SAVED_AT)
    return finals


def resume(root: str) -> dict:
    """Load the checkpoint into a perturbed model and a fresh optimizer, and finish the run."""
    finals = {}
    for case in CHECKPOINT_CASES:
        model, opt = _checkpoint_run(case, range(0), seed=99)
        extras = zeroopt.load_checkpoint(os.path.join(root, case), model, opt)
        assert extras == {"step": SAVED_AT}, extras
        _checkpoint_run(case, range(SAVED_AT, TOTAL), model, opt)
        finals[case] = [p.detach().clone() for p in model.parameters()]
    return finals


def suite(save_to: str | None = None, resume_from: str | None = None) -> dict:
    """Every scenario at this world size, in one set of processes; with ``save_to``, save the
    resharding checkpoints there; with ``resume_from``, resume them."""
    out = {}
    for stage in (1, 2):
        for case, (name, hp) in CASES.items():
            out["lomo_optim", case, stage] = against_lomo_optim(case, stage)
            out["eager", case, stage] = against_eager_reference(name, hp, stage)
        for case in ("lomo", "adalomo"):
            name, hp = CASES[case]
            out["resume", case, stage] = save_load_continues_identically(name, hp, stage)
    for case in ("lomo", "adalomo"):
        out["accumulation", case] = against_lomo_optim(case, 2, accum=3)
    out["second_reduction"] = second_reduction_is_refused()
    if save_to is not None:
        out["checkpoint_finals"] = save_partway(save_to)
    if resume_from is not None:
        out["checkpoint_resumed"] = resume(resume_from)
    return out
