"""Muon's state across world sizes and formats, run on every rank (see test_muon_state.py for
the assertions): checkpoints resharded W = 3 -> 2 -> 1, resume at another world size,
bit-identity across world sizes, torch.optim.Muon's state dict both ways, ``zeroopt.wrap``,
8-bit momentum and the layerwise form; the first two also for 8-bit momentum and for a hybrid
model (``zeroopt.muon_param_groups``: Muon matrices, AdamW for the rest).

Two kinds of data:

- ``same``: every rank trains on the step's same batch (as ranks/checkpoint.py). The ranks'
  fp32 gradients are summed in fp64 (``training.EXACT``): W equal values sum and divide back
  exactly, so the averaged gradient is the same bit for bit at every world size, and so is a
  single process's (torch.optim.Muon's) gradient. What changes with W is only which rank owns
  which matrix; Muon steps each matrix whole, so nothing may change at all.
- ``global``: one global batch of ``MICRO`` micro-batches per step, each rank taking
  ``MICRO / W`` of them (accumulated locally under ``no_sync``): the data order of a real job
  resumed on fewer ranks. Each rank's micro-batch gradients are added in fp32, and how many a
  rank adds depends on W, so the averaged gradient differs in the last bits between world sizes.

The models are ranks/muon.py's: ``MatrixModel`` (bias-free Linear weights 29 x 37, 41 x 29 and
5 x 41: tall, wide and nearly square) and ``HybridModel`` (a Linear weight and a Conv1d weight
for Muon; an embedding, a head, a LayerNorm and biases for AdamW).
"""

from __future__ import annotations

import contextlib
import copy
import os

import torch

import zeroopt
from ranks.muon import ADAMW, HybridModel, MatrixModel
from ranks.states import saved_states_from
from training import EXACT, batch, loss_of, reference_backward, world

HP = dict(lr=2e-2)  # torch.optim.Muon's defaults otherwise: nesterov, weight_decay 0.1
MIN_8BIT = 1000  # the 29 x 37 and 41 x 29 matrices 8-bit, the 5 x 41 one (205) 32-bit
# case -> (model class, optimizer name, options): the matrix-only model with 32-bit and 8-bit
# momentum, and the hybrid model (ranks/muon.py) in muon_param_groups' two groups
CASES = {
    "muon": (MatrixModel, "muon", {}),
    "muon_8bit": (MatrixModel, "muon_8bit", dict(min_8bit_size=MIN_8BIT)),
    "hybrid": (HybridModel, "muon", dict(lr=2e-2, adjust_lr_fn="match_rms_adamw")),
}
SAVED_AT, RESAVED_AT, TOTAL = 2, 4, 6  # chain: save at W=3 (step 2), at W=2 (step 4), end at W=1
MICRO = 6  # micro-batches per global batch: divisible by W = 1, 2, 3
STAGES = (1, 2)


def models(seed: int = 0, model_class=MatrixModel):
    """The model, and a copy; ``seed`` != 0 perturbs the model first (a load that missed a
    param would then show)."""
    torch.manual_seed(1234)
    model = model_class()
    if seed:
        torch.manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
    return model, copy.deepcopy(model)


def build(case: str = "muon", stage: int = 2, seed: int = 0, name: str | None = None):
    """``case``'s model and ZeroOptimizer (``name`` overrides the case's optimizer name)."""
    model_class, case_name, options = CASES[case]
    model, _ = models(seed, model_class)
    params = zeroopt.muon_param_groups(model, **ADAMW) if model_class is HybridModel \
        else model.parameters()
    opt = zeroopt.ZeroOptimizer(params, name or case_name, stage=stage,
                                **{**EXACT, **HP, **options})
    return model, opt


def indexed_params(case: str) -> list[torch.Tensor]:
    """A fresh model's params in state-dict index order (group by group)."""
    model, _ = models(0, CASES[case][0])
    if CASES[case][0] is HybridModel:
        return [p for g in zeroopt.muon_param_groups(model, **ADAMW) for p in g["params"]]
    return list(model.parameters())


def train_same(model, opt, steps) -> None:
    """``steps``: every rank the step's same batch."""
    for t in steps:
        loss_of(model, *batch(t, 0)).backward()
        opt.step()
        opt.zero_grad()


def train_global(model, opt, steps) -> None:
    """``steps``: the global batch of ``MICRO`` micro-batches split over the ranks in order."""
    rank, world_size = world()
    per_rank = MICRO // world_size
    for t in steps:
        for i in range(per_rank):
            micro = rank * per_rank + i
            with opt.no_sync() if i < per_rank - 1 else contextlib.nullcontext():
                (loss_of(model, *batch(t, 0, micro)) / per_rank).backward()
        opt.step()
        opt.zero_grad()


def params_of(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def states(opt) -> dict[int, dict[str, torch.Tensor]]:
    """Every param's saved state (a collective): index -> {name: tensor}, step counts and
    8-bit codes and absmax included."""
    return {i: {k: v.clone() for k, v in e.items() if isinstance(v, torch.Tensor)}
            for i, e in opt.state_dict()["state"].items()}


# --- 1 and 3: bit-identical at every W; the checkpoint chain W = 3 -> 2 -> 1 -------------------


def fingerprint(case: str, stage: int) -> dict:
    """Params and states after ``TOTAL`` steps of ``same`` data, and the states at the
    chain's save points."""
    model, opt = build(case, stage)
    out = {}
    for t in range(1, TOTAL + 1):
        train_same(model, opt, [t])
        if t in (SAVED_AT, RESAVED_AT):
            out[f"states_{t}"] = states(opt)
    out.update(params=params_of(model), states=states(opt))
    return out


def chain_start(root: str, case: str) -> None:
    """At W=3: ``SAVED_AT`` steps, saved to root/<case>3."""
    model, opt = build(case)
    train_same(model, opt, range(1, SAVED_AT + 1))
    zeroopt.save_checkpoint(os.path.join(root, f"{case}3"), model, opt, step=SAVED_AT)


def chain_middle(root: str, case: str) -> dict:
    """At W=2: root/<case>3 loaded into a perturbed model, trained to ``RESAVED_AT`` and saved
    to root/<case>2. Returns the states as loaded."""
    model, opt = build(case, seed=99)
    extras = zeroopt.load_checkpoint(os.path.join(root, f"{case}3"), model, opt)
    assert extras == {"step": SAVED_AT}, extras
    loaded = states(opt)
    train_same(model, opt, range(SAVED_AT + 1, RESAVED_AT + 1))
    zeroopt.save_checkpoint(os.path.join(root, f"{case}2"), model, opt, step=RESAVED_AT)
    return {"loaded": loaded}


def chain_end(root: str, case: str) -> dict:
    """At W=1: root/<case>2 loaded into a perturbed model, trained to ``TOTAL``."""
    model, opt = build(case, seed=98)
    extras = zeroopt.load_checkpoint(os.path.join(root, f"{case}2"), model, opt)
    assert extras == {"step": RESAVED_AT}, extras
    loaded = states(opt)
    train_same(model, opt, range(RESAVED_AT + 1, TOTAL + 1))
    return {"loaded": loaded, "params": params_of(model), "states": states(opt)}


# --- 2: resume at another world size, the global batch's data order ---------------------------


def global_reference(world_sizes: list[int]) -> list[torch.Tensor]:
    """torch.optim.Muon unsharded on ``global`` data, step t's gradient summed as a job of
    ``world_sizes[t - 1]`` ranks sums it: each rank's micro-batch gradients added in fp32 by
    backward, the ranks' sums added in fp64 and scaled by 1/W once (``reduce_dtype`` fp64).
    So it reproduces a sharded run at any sequence of world sizes bit for bit."""
    model, _ = models()
    opt = torch.optim.Muon(model.parameters(), **HP)
    for t, world_size in enumerate(world_sizes, start=1):
        per_rank = MICRO // world_size
        total = [torch.zeros_like(p, dtype=torch.float64) for p in model.parameters()]
        for rank in range(world_size):
            opt.zero_grad()
            for i in range(per_rank):
                (loss_of(model, *batch(t, 0, rank * per_rank + i)) / per_rank).backward()
            for sum_, p in zip(total, model.parameters()):
                sum_ += p.grad.double()
        for sum_, p in zip(total, model.parameters()):
            p.grad = (sum_ * (1.0 / world_size)).float()
        opt.step()
    return params_of(model)


def global_start(root: str) -> dict:
    """At W=3: the uninterrupted run's final params (and the single-process reference of
    them), and a checkpoint at ``SAVED_AT``."""
    model, opt = build()
    train_global(model, opt, range(1, TOTAL + 1))
    finals = params_of(model)
    model, opt = build()
    train_global(model, opt, range(1, SAVED_AT + 1))
    zeroopt.save_checkpoint(os.path.join(root, "global3"), model, opt, step=SAVED_AT)
    return {"params": finals, "reference": global_reference([3] * TOTAL)}


def global_resume(root: str) -> dict:
    """At this W: root/global3 resumed and trained to ``TOTAL``; the single-process reference
    of that (W=3 sums to ``SAVED_AT``, this W's after); and the same resume with the model alone
    loaded (fresh momentum: what a lost state gives)."""
    _, world_size = world()
    path = os.path.join(root, "global3")
    out = {"reference": global_reference([3] * SAVED_AT + [world_size] * (TOTAL - SAVED_AT))}
    for key, with_state in (("resumed", True), ("fresh_momentum", False)):
        model, opt = build(seed=97)
        zeroopt.load_checkpoint(path, model, opt if with_state else None)
        train_global(model, opt, range(SAVED_AT + 1, TOTAL + 1))
        out[key] = params_of(model)
    return out


# --- 4 and 5: torch.optim.Muon's state dict both ways; zeroopt.wrap ---------------------------

FIRST, THEN = range(1, 4), range(4, 7)
# every hyperparameter off its default, so a dropped one shows
WRAP_HP = dict(lr=1e-2, weight_decay=0.05, momentum=0.9, nesterov=False,
               ns_coefficients=(3.4, -4.7, 2.0), eps=1e-6, ns_steps=4,
               adjust_lr_fn="match_rms_adamw")


def torch_interop() -> dict:
    """zeroopt -> torch.optim.Muon (export, load, step both) and torch.optim.Muon -> zeroopt
    (its state_dict into load_state_dict, step both); with ``same`` data torch's single
    process sees the ranks' averaged gradient. Returns the export and the zeroopt -> torch
    params on rank 0 only; torch's saved state, the states as imported and the torch ->
    zeroopt params on every rank."""
    out = {}
    model, opt = build()
    train_same(model, opt, FIRST)
    exported = zeroopt.export_torch_state_dict(opt)
    switched = copy.deepcopy(model)
    train_same(model, opt, THEN)
    _, torch_side = models()
    torch_opt = torch.optim.Muon(torch_side.parameters(), **HP)
    train_same(torch_side, torch_opt, FIRST)
    # copies: state_dict() hands out the live tensors, load_state_dict keeps those it is given
    out["torch_saves"] = copy.deepcopy(torch_opt.state_dict())
    if exported is not None:
        out["exported"] = copy.deepcopy(exported)
        fresh = torch.optim.Muon(switched.parameters(), **HP)
        fresh.load_state_dict(exported)
        train_same(switched, fresh, THEN)
        out["zeroopt->torch"] = (params_of(switched), params_of(model))
    imported = copy.deepcopy(torch_side)
    opt = zeroopt.ZeroOptimizer(imported.parameters(), "muon", stage=2, **EXACT, **HP)
    opt.load_state_dict(torch_opt.state_dict())
    loaded = states(opt)
    train_same(imported, opt, THEN)
    train_same(torch_side, torch_opt, THEN)
    out["torch->zeroopt"] = (params_of(imported), params_of(torch_side))
    out["imported_states"] = loaded
    return out


def wrapped() -> dict:
    """``zeroopt.wrap(torch.optim.Muon(...))`` with every hyperparameter off its default and
    two groups, against that torch.optim.Muon stepping unsharded (``same`` data)."""
    model, ref = models()
    groups = [{"params": [model.inp.weight, model.out.weight]},
              {"params": [model.mid.weight], "lr": 3e-2, "weight_decay": 0.0}]
    ref_groups = [{"params": [ref.inp.weight, ref.out.weight]},
                  {"params": [ref.mid.weight], "lr": 3e-2, "weight_decay": 0.0}]
    torch_opt = torch.optim.Muon(groups, **WRAP_HP)
    try:
        opt = zeroopt.wrap(torch_opt, stage=2, **EXACT)
    except TypeError as error:  # until the rule says it wraps torch.optim.Muon (UpdateRule.wraps)
        return {"error": str(error)}
    ref_opt = torch.optim.Muon(ref_groups, **WRAP_HP)
    train_same(model, opt, range(1, 6))
    train_same(ref, ref_opt, range(1, 6))
    return {"groups": [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups],
            "torch_groups": [{k: v for k, v in g.items() if k != "params"}
                             for g in ref_opt.param_groups],
            "rule": opt.rule.name, "params": params_of(model), "ref_params": params_of(ref)}


# --- 6: 8-bit momentum; 7: layerwise ----------------------------------------------------------

LOSS_SCALE = 0.1  # gradients of bitsandbytes' tests' size (randn * 0.01), as ranks/states.py
HP_8BIT = dict(lr=2e-3)


def against_32bit_with_reset(stage: int, steps: int = 25) -> dict:
    """muon_8bit sharded against torch.optim.Muon (32-bit) unsharded, measured as
    bitsandbytes' tests measure 8-bit optimizers (ranks/states.py): after each step from a
    common point, the params outside atol 1e-5 / rtol 1e-3 and their mean absolute and
    relative errors, and the dequantized momentum's mean absolute and relative errors (the
    worst step of each); the reference is then reset to zeroopt's params and momentum. Also
    the momentum's saved dtypes and shapes, and this rank's state bytes in 8-bit and 32-bit."""
    rank, world_size = world()
    model, ref = models()
    opt = zeroopt.ZeroOptimizer(model.parameters(), "muon_8bit", stage=stage, **EXACT,
                                min_8bit_size=MIN_8BIT, **HP_8BIT)
    ref_opt = torch.optim.Muon(ref.parameters(), **HP_8BIT)
    worst = {"params_not_close": 0, "param_mean_abs_err": 0.0, "param_mean_rel_err": 0.0,
             "state_mean_abs_err": 0.0, "state_mean_rel_err": 0.0, "state_max_abs": 0.0}
    for step in range(steps):
        (loss_of(model, *batch(step, rank)) * LOSS_SCALE).backward()
        opt.step()
        opt.zero_grad()
        reference_backward(ref, step, world_size, scale=LOSS_SCALE)
        ref_opt.step()
        ref_opt.zero_grad()
        ours_p, theirs_p = (torch.cat([p.detach().flatten() for p in m.parameters()])
                            for m in (model, ref))
        worst["params_not_close"] = max(worst["params_not_close"], int(
            (~torch.isclose(ours_p, theirs_p, atol=1e-5, rtol=1e-3)).sum()))
        err = (ours_p - theirs_p).abs()
        worst["param_mean_abs_err"] = max(worst["param_mean_abs_err"], err.mean().item())
        worst["param_mean_rel_err"] = max(worst["param_mean_rel_err"],
                                          (err / (theirs_p.abs() + 1e-9)).mean().item())
        raw = opt.state_dict()["state"]
        decoded = saved_states_from({"state": raw}, ())
        with torch.no_grad():
            for index, (p, q) in enumerate(zip(ref.parameters(), model.parameters())):
                theirs = ref_opt.state[p]["momentum_buffer"]
                ours = decoded[index]["momentum_buffer"]
                if raw[index]["momentum_buffer"].dtype == torch.uint8:
                    err = (ours - theirs).abs()
                    worst["state_mean_abs_err"] = max(worst["state_mean_abs_err"],
                                                      err.mean().item())
                    worst["state_mean_rel_err"] = max(worst["state_mean_rel_err"], (
                        err / (theirs.abs() + 1e-9)).mean().item())
                    worst["state_max_abs"] = max(worst["state_max_abs"],
                                                 theirs.abs().max().item())
                theirs.copy_(ours)
                p.copy_(q)
    raw = opt.state_dict()["state"]
    worst["dtypes"] = {i: e["momentum_buffer"].dtype for i, e in raw.items()}
    worst["shapes"] = {i: e["momentum_buffer"].shape for i, e in raw.items()}
    worst["state_bytes"] = opt.state_bytes()
    model32, _ = models()
    opt32 = zeroopt.ZeroOptimizer(model32.parameters(), "muon", stage=stage, **EXACT,
                                  min_8bit_size=MIN_8BIT, **HP_8BIT)
    train_same(model32, opt32, range(1, 2))
    worst["state_bytes_32bit"] = opt32.state_bytes()
    return worst


def layerwise_against_muon(stage: int) -> dict:
    """muon_layerwise and muon on the same rank-dependent data: params and momenta."""
    rank, _ = world()
    out = {}
    for name in ("muon", "muon_layerwise"):
        model, opt = build(stage=stage, name=name)
        for t in range(1, TOTAL + 1):
            loss_of(model, *batch(t, rank)).backward()
            opt.step()
            opt.zero_grad()
        out[name] = {"params": params_of(model), "states": states(opt)}
    return out


# --- the suites, one set of processes per world size ------------------------------------------


# (case, stage) fingerprinted at every W: each case at stage 2, the plain one at both stages
FINGERPRINTED = [(case, s) for case in CASES for s in STAGES if s == 2 or case == "muon"]


def fingerprints() -> dict:
    return {("fingerprint", case, s): fingerprint(case, s) for case, s in FINGERPRINTED}


def at_3(root: str) -> dict:
    out = fingerprints()
    for case in CASES:
        chain_start(root, case)
    out["global_uninterrupted"] = global_start(root)
    out["torch_interop"] = torch_interop()
    return out


def at_2(root: str) -> dict:
    out = fingerprints()
    for case in CASES:
        out["chain", case] = chain_middle(root, case)
    out["global"] = global_resume(root)
    out["torch_interop"] = torch_interop()
    out["wrap"] = wrapped()
    for s in STAGES:
        out["8bit", s] = against_32bit_with_reset(s)
        out["layerwise", s] = layerwise_against_muon(s)
    return out


def at_1(root: str) -> dict:
    out = fingerprints()
    for case in CASES:
        out["chain", case] = chain_end(root, case)
    out["global"] = global_resume(root)
    for s in STAGES:
        out["8bit", s] = against_32bit_with_reset(s)
        out["layerwise", s] = layerwise_against_muon(s)
    return out
