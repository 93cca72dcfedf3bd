"""torch.optim's training-loop patterns, on every rank: zeroopt sharded against torch.optim
(or the rule's eager reference) unsharded, doing the same thing.

The reference sees what torch.optim would see without data parallelism on the averaged
gradient: the mean over ranks (summed exactly in fp64, as zeroopt's ``reduce_dtype=float64``),
where a rank that did not use a param contributes zeros, and ``grad = None`` for a param that no
rank used. Each function returns the largest relative error over the params (or facts to
assert on).
"""

from __future__ import annotations

import copy
import os
import tempfile

import torch
from torch import nn

import zeroopt
from training import BUCKET, EXACT, max_rel_err, reference_optimizer, world


class Heads(nn.Module):
    """A trunk and three heads; each forward uses the heads it is told to."""

    def __init__(self):
        super().__init__()
        self.trunk = nn.Linear(37, 41)
        self.a = nn.Linear(41, 5)
        self.b = nn.Linear(41, 5)
        self.c = nn.Linear(41, 5, bias=False)

    def forward(self, x, heads: str = "a"):
        h = torch.tanh(self.trunk(x))
        return sum(getattr(self, name)(h) for name in heads)


def heads_models(dtype=torch.float32):
    torch.manual_seed(2024)
    model = Heads().to(dtype)
    return model, copy.deepcopy(model).float()


def data(step: int, rank: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(7_000 * step + 31 * rank)
    return torch.randn(6, 37, generator=g).to(dtype), torch.randn(6, 5, generator=g)


def loss_of(model, step: int, rank: int, heads: str):
    x, y = data(step, rank, next(model.parameters()).dtype)
    return nn.functional.mse_loss(model(x, heads).float(), y)


def averaged_grads(ref, step: int, world_size: int, heads_of_rank, into=None,
                   accumulate: bool = False) -> None:
    """Set the grads of ``into`` (default ``ref``; a model with the same params) to the mean
    over ranks of each rank's gradient through ``ref`` (zeros where a rank did not use the
    param; None where no rank did), as torch.optim unsharded would take it. With
    ``accumulate``, add the mean into the grads there are, as backward does (a param that no
    rank used keeps its grad, None or the zeros ``zero_grad(set_to_none=False)`` left)."""
    params = [p for p in ref.parameters() if p.requires_grad]
    targets = [p for p in (into or ref).parameters() if p.requires_grad]
    sums: list[torch.Tensor | None] = [None] * len(params)
    for r in range(world_size):
        grads = torch.autograd.grad(loss_of(ref, step, r, heads_of_rank(step, r)), params,
                                    allow_unused=True)
        for i, g in enumerate(grads):
            if g is not None:
                sums[i] = g.double() if sums[i] is None else sums[i] + g.double()
    for p, total in zip(targets, sums):
        mean = None if total is None else (total * (1.0 / world_size)).float()
        if not accumulate:
            p.grad = mean
        elif mean is not None:
            p.grad = mean if p.grad is None else p.grad.add_(mean)


def step_side_by_side(model, opt, ref, ref_opt, step: int, heads_of_rank) -> None:
    """One step of zeroopt on this rank's batch and of the reference on the average of every
    rank's gradient; ``heads_of_rank(step, r)`` says which heads rank r uses."""
    rank, world_size = world()
    loss_of(model, step, rank, heads_of_rank(step, rank)).backward()
    opt.step()
    opt.zero_grad()
    averaged_grads(ref, step, world_size, heads_of_rank)
    ref_opt.step()
    ref_opt.zero_grad()


def both_heads(step: int, rank: int) -> str:
    return "ab"


# Which heads rank r uses at each step: head b is unused everywhere at steps 0 and 2 and used
# by rank 0 only at step 1; head c is used by every rank at step 3 only.
SCHEDULE = {0: lambda r: "a", 1: lambda r: "ab" if r == 0 else "a", 2: lambda r: "a",
            3: lambda r: "abc", 4: lambda r: "ab"}


def scheduled_heads(step: int, rank: int) -> str:
    return SCHEDULE[step](rank)


def unused_params(name: str, hp: dict, stage: int, ref_name: str | None = None) -> float:
    """Params with no gradient on any rank in some steps are not updated in those steps (no
    weight decay, no momentum) and keep their own step counts, as in torch.optim."""
    model, ref = heads_models()
    opt = zeroopt.ZeroOptimizer(model.parameters(), name, stage=stage, **EXACT, **hp)
    ref_opt = reference_optimizer(ref_name or name, ref.parameters(), hp)
    for step in SCHEDULE:
        step_side_by_side(model, opt, ref, ref_opt, step, scheduled_heads)
    return max_rel_err(model, ref)


# zero_grad(set_to_none=False) after every step but step 4's. Head b is used by rank 0 at
# step 1 and by every rank at step 5, by none at the other steps; head c by none, but it is
# given a gradient by hand after step 2, which step 2's zero_grad zeroes before any step.
# Step 6 runs no backward at all: only zeroed grads are stepped. Buckets of 200 elements put
# c.weight, head b and head a in buckets of their own, so a param stepped with a zeroed grad
# is also one in a bucket that no rank filled (all of them at step 6).
KEPT_SCHEDULE = {0: lambda r: "a", 1: lambda r: "ab" if r == 0 else "a", 2: lambda r: "a",
                 3: lambda r: "a", 4: lambda r: "a", 5: lambda r: "ab", 6: lambda r: "",
                 7: lambda r: "a"}
SET_TO_NONE_AT = 4


def zeroed_grads_kept(name: str, hp: dict, stage: int, ddp: bool = False) -> dict:
    """``zero_grad(set_to_none=False)``, as torch.optim: a param that had a gradient keeps a
    zeroed one, so it is stepped (weight decay, momentum, its step count) in the later steps
    where no rank uses it, until a ``zero_grad(set_to_none=True)``; a ``grad`` assigned by
    hand and not stepped yet is zeroed in place, and so is stepped too. With ``ddp`` (W > 1,
    stage 1) the model is wrapped in DistributedDataParallel and zeroopt takes its averaged
    ``param.grad`` (``average_grads=False``)."""
    rank, world_size = world()
    model, ref = heads_models()
    options = dict(EXACT, bucket_numel=200, **(dict(average_grads=False) if ddp else {}))
    opt = zeroopt.ZeroOptimizer(model.parameters(), name, stage=stage, **options, **hp)
    inner = model
    if ddp:
        model = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
    ref_opt = reference_optimizer(name, ref.parameters(), hp)
    heads = lambda step, r: KEPT_SCHEDULE[step](r)  # noqa: E731
    out = {}
    for step in KEPT_SCHEDULE:
        if heads(step, rank):
            loss_of(model, step, rank, heads(step, rank)).backward()
            averaged_grads(ref, step, world_size, heads, accumulate=True)
        opt.step()
        ref_opt.step()
        if step == 2:  # a gradient assigned by hand, zeroed in place before any step takes it
            for m in (inner, ref):
                m.c.weight.grad = _hand_grad(m.c.weight, step, 0)
            hand = inner.c.weight.grad
        opt.zero_grad(set_to_none=step == SET_TO_NONE_AT)
        ref_opt.zero_grad(set_to_none=step == SET_TO_NONE_AT)
        if step == 2:
            grad = inner.c.weight.grad
            out["hand_grad_zeroed_in_place"] = grad is hand and not grad.any().item()
    out["params"] = max_rel_err(inner, ref)
    return out


def freeze_and_unfreeze_later(stage: int) -> float:
    """A freeze schedule: the trunk is frozen at step 2 (it stops moving) and unfrozen at
    step 4 (it trains again), on the model and on the reference alike."""
    model, ref = heads_models()
    opt = zeroopt.ZeroOptimizer(model.parameters(), "adamw", stage=stage, **EXACT, lr=1e-2,
                                weight_decay=0.1)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.1)
    for step in range(6):
        for m in (model, ref):
            m.trunk.requires_grad_(step not in (2, 3))
        step_side_by_side(model, opt, ref, ref_opt, step, both_heads)
    return max_rel_err(model, ref)


def gradients_outside_backward(stage: int) -> dict:
    """Gradients assigned by hand (every param), mixed (head b by hand, the rest through
    backward), from torch.autograd.grad, and from a closure: each taken, averaged, stepped."""
    rank, world_size = world()
    out = {}
    for mode in ("by_hand", "mixed", "autograd_grad", "closure"):
        model, ref = heads_models()
        opt = zeroopt.ZeroOptimizer(model.parameters(), "adamw", stage=stage, **EXACT, lr=1e-2,
                                    weight_decay=0.1)
        ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.1)
        for step in range(4):
            heads = "ab"
            if mode == "by_hand":
                for p in model.parameters():
                    p.grad = _hand_grad(p, step, rank)
            elif mode == "mixed":
                loss_of(model, step, rank, "a").backward()
                for p in model.b.parameters():
                    p.grad = _hand_grad(p, step, rank)
            elif mode == "autograd_grad":
                params = list(model.parameters())
                grads = torch.autograd.grad(loss_of(model, step, rank, heads), params,
                                            allow_unused=True)
                for p, g in zip(params, grads):
                    p.grad = g
            if mode == "closure":
                def closure():
                    opt.zero_grad()
                    loss = loss_of(model, step, rank, heads)
                    loss.backward()
                    return loss

                returned = opt.step(closure)
                out["closure_loss"] = returned.item()
            else:
                opt.step()
            opt.zero_grad()
            _reference_grads(ref, mode, step, world_size, heads)
            ref_opt.step()
            ref_opt.zero_grad()
        out[mode] = max_rel_err(model, ref)
    return out


def _hand_grad(p: torch.Tensor, step: int, rank: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1_000 * step + 17 * rank + p.numel())
    return torch.randn(p.shape, generator=g).to(p.dtype)


def _reference_grads(ref, mode: str, step: int, world_size: int, heads: str) -> None:
    if mode in ("autograd_grad", "closure"):
        averaged_grads(ref, step, world_size, lambda s, r: heads)
        return
    if mode == "mixed":
        averaged_grads(ref, step, world_size, lambda s, r: "a")
    by_hand = list(ref.parameters()) if mode == "by_hand" else list(ref.b.parameters())
    for p in by_hand:
        total = sum(_hand_grad(p, step, r).double() for r in range(world_size))
        p.grad = (total * (1.0 / world_size)).float()


def weights_loaded_into_a_bf16_model(stage: int) -> dict:
    """bf16 params, fp32 masters: weights loaded into the model between steps
    (``model.load_state_dict``, a model-only zeroopt checkpoint, an in-place edit) are where
    the next step starts. The masters follow torch.optim.AdamW run in fp32 on the same bf16
    gradients, with the same weights loaded."""
    rank, world_size = world()
    model, master_ref = heads_models(torch.bfloat16)
    grad_model = copy.deepcopy(model)  # bf16 replica computing the reference's gradients
    opt = zeroopt.ZeroOptimizer(model.parameters(), "adamw", stage=stage, **EXACT, lr=1e-2,
                                weight_decay=0.1)
    ref_opt = torch.optim.AdamW(master_ref.parameters(), lr=1e-2, weight_decay=0.1)
    torch.manual_seed(99)
    loaded = Heads().to(torch.bfloat16).state_dict()
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(_shared_dir(tmp), "model_only")
        for step in range(6):
            if step == 2:
                model.load_state_dict(loaded)
                master_ref.load_state_dict({k: v.float() for k, v in loaded.items()})
            if step == 3:
                zeroopt.save_checkpoint(path, model, None)
                saved = [p.detach().clone() for p in model.parameters()]
            if step == 4:
                with torch.no_grad():  # an in-place edit of part of one param
                    model.a.weight[0].fill_(0.5)
                    master_ref.a.weight[0].fill_(0.5)
            if step == 5:
                zeroopt.load_checkpoint(path, model, None)
                with torch.no_grad():
                    for p, s in zip(master_ref.parameters(), saved):
                        p.copy_(s.float())
            loss_of(model, step, rank, "ab").backward()
            opt.step()
            opt.zero_grad()
            with torch.no_grad():
                for g, p in zip(grad_model.parameters(), master_ref.parameters()):
                    g.copy_(p)
            averaged_grads(grad_model, step, world_size, lambda s, r: "ab", into=master_ref)
            ref_opt.step()
            ref_opt.zero_grad()
    masters = opt.state_dict()["state"]
    out["master"] = max(((masters[i]["master_param"] - p.detach()).abs().max()
                         / p.detach().abs().max()).item()
                        for i, p in enumerate(master_ref.parameters()))
    return out


def _shared_dir(tmp: str) -> str:
    """One directory every rank sees: rank 0's temporary directory, sent to the others."""
    if not torch.distributed.is_initialized():
        return tmp
    box = [tmp]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def rebuilt_optimizers(stage: int) -> dict:
    """An optimizer built again over the same params takes over (a notebook cell run twice,
    a rebuild after a state_dict round trip): the newest trains as torch.optim; the old one
    refuses to step, with a message that says why."""
    rank, _ = world()
    model, ref = heads_models()
    first = zeroopt.ZeroOptimizer(model.parameters(), "adamw", stage=stage, **EXACT, lr=1e-2)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)

    def train(opt, steps):
        for step in steps:
            step_side_by_side(model, opt, ref, ref_opt, step, both_heads)

    train(first, range(2))
    saved = first.state_dict()
    second = zeroopt.ZeroOptimizer(model.parameters(), "adamw", stage=stage, **EXACT, lr=1e-2)
    second.load_state_dict(saved)
    train(second, range(2, 4))
    third = zeroopt.ZeroOptimizer(model.parameters(), "adamw", stage=stage, **EXACT, lr=1e-2)
    third.load_state_dict(second.state_dict())  # the old one's state still reads
    train(third, range(4, 6))
    loss_of(model, 6, rank, "ab").backward()
    try:
        first.step()
        old_error = "no error"
    except RuntimeError as error:
        old_error = str(error)
    return {"params": max_rel_err(model, ref), "old_error": old_error}


def frozen_at_construction_then_unfrozen(name: str, hp: dict, stage: int) -> float:
    """Gradual unfreezing: the trunk is frozen when the optimizer is built and unfrozen after
    the first step; from its first gradient on it trains as under torch.optim (fresh state,
    its own step count), and the params trained all along go on undisturbed."""
    model, ref = heads_models()
    for m in (model, ref):
        m.trunk.requires_grad_(False)
    opt = zeroopt.ZeroOptimizer(model.parameters(), name, stage=stage, **EXACT, **hp)
    ref_opt = reference_optimizer(name, ref.parameters(), hp)
    for step in range(4):
        if step == 1:
            for m in (model, ref):
                m.trunk.requires_grad_(True)
        step_side_by_side(model, opt, ref, ref_opt, step, both_heads)
    return max_rel_err(model, ref)


def resumed_with_more_params_trainable(stage: int) -> float:
    """A checkpoint saved while the trunk was frozen, loaded into an optimizer built with the
    trunk trainable: the trunk starts afresh (it had no state), the rest resumes."""
    model, ref = heads_models()
    for m in (model, ref):
        m.trunk.requires_grad_(False)
    hp = dict(lr=0.05, momentum=0.9, weight_decay=0.01)
    opt = zeroopt.ZeroOptimizer(model.parameters(), "sgd", stage=stage, **EXACT, **hp)
    ref_opt = torch.optim.SGD(ref.parameters(), **hp)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(_shared_dir(tmp), "frozen_trunk")
        for step in range(4):
            if step == 2:
                zeroopt.save_checkpoint(path, model, opt)
                model, _ = heads_models()  # a new job: the trunk is trainable from the start
                opt = zeroopt.ZeroOptimizer(model.parameters(), "sgd", stage=stage, **EXACT,
                                            **hp)
                zeroopt.load_checkpoint(path, model, opt)
                ref.trunk.requires_grad_(True)
            step_side_by_side(model, opt, ref, ref_opt, step, both_heads)
        if torch.distributed.is_initialized():
            torch.distributed.barrier()  # rank 0's directory outlives the others' reads
    return max_rel_err(model, ref)


def suite() -> dict:
    """Every scenario at this world size, in one set of processes."""
    out = {}
    rules = {"adamw": dict(lr=1e-2, weight_decay=0.1),
             "sgd": dict(lr=0.05, momentum=0.9, weight_decay=0.01),
             "lamb": dict(lr=1e-2, weight_decay=0.01),
             "adafactor": dict(lr=1e-2, scale_parameter=False, relative_step=False),
             "paged_adamw_32bit": dict(lr=1e-2, weight_decay=0.1)}
    reference = {"paged_adamw_32bit": "adamw"}  # 32-bit paged states: torch.optim exactly
    for stage in (1, 2):
        for name, hp in rules.items():
            out["unused", name, stage] = unused_params(name, hp, stage, reference.get(name))
        out["freeze", stage] = freeze_and_unfreeze_later(stage)
        out["outside_backward", stage] = gradients_outside_backward(stage)
        out["loaded_weights", stage] = weights_loaded_into_a_bf16_model(stage)
        out["rebuilt", stage] = rebuilt_optimizers(stage)
        out["resumed_unfrozen", stage] = resumed_with_more_params_trainable(stage)
        for name in ("adamw", "lamb"):
            out["unfrozen", name, stage] = frozen_at_construction_then_unfrozen(
                name, rules[name], stage)
        for name in ("adamw", "sgd"):
            out["zeroed_kept", name, stage] = zeroed_grads_kept(name, rules[name], stage)
    if torch.distributed.is_initialized():
        for name in ("adamw", "sgd"):
            out["zeroed_kept_ddp", name] = zeroed_grads_kept(name, rules[name], 1, ddp=True)
    return out


__all__ = ["BUCKET", "suite"]
