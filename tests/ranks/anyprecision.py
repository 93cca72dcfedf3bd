"""adamw_anyprecision scenarios, run on every rank: zeroopt sharded against its eager reference
(torchdistx's AnyPrecisionAdamW transcribed literally), the accuracy of fp32 masters against
torchdistx's Kahan summation on bf16 params, and a checkpoint saved at W=3 resumed at W=2.

zeroopt trains sharded on each rank's batch; the reference trains unsharded on the exact average
of every rank's gradient (``training.reference_backward``, zeroopt reducing in fp64), so both see
the same gradients bit for bit.
"""

from __future__ import annotations

import os

import torch

import zeroopt
from ranks.checkpoint import SAVED_AT, TOTAL, params_of, train
from training import EXACT, max_rel_err, models, train_side_by_side

STEPS = 6
BF16 = torch.bfloat16
# case -> hyperparameters
CASES = {
    # torchdistx's defaults: fp32 momentum, bf16 variance (stored 32-bit, holding bf16 values)
    "torchdistx_dtypes": dict(lr=1e-2, weight_decay=0.1),
    "bf16_states": dict(lr=1e-2, weight_decay=0.1, momentum_dtype=BF16, variance_dtype=BF16),
    "transformers_dtypes": dict(lr=1e-2, momentum_dtype=torch.float32,
                                variance_dtype=torch.float32),
    "fp16_momentum_by_name": dict(lr=1e-2, weight_decay=0.1, momentum_dtype="float16",
                                  variance_dtype="bfloat16"),
}
RESHARDED = CASES["bf16_states"]


def against_reference(case: str, stage: int) -> dict:
    """Largest relative param error after ``STEPS`` steps against the eager reference, how far
    the params moved, and the states as stored (dtype) and whether each holds only values of
    its dtype."""
    hp = CASES[case]
    model, ref = models()
    opt = zeroopt.ZeroOptimizer(model.parameters(), "adamw_anyprecision", stage=stage, **EXACT,
                                **hp)
    train_side_by_side(model, opt, [(ref, zeroopt.ReferenceOptimizer(
        ref.parameters(), "adamw_anyprecision", **hp))], range(STEPS))
    states = opt.state_dict()["state"]
    group = opt.param_groups[0]
    stored, exact = {}, {}
    for name, key in (("exp_avg", "momentum_dtype"), ("exp_avg_sq", "variance_dtype")):
        dtype = getattr(torch, group[key]) if isinstance(group[key], str) else group[key]
        stored[name] = {str(s[name].dtype) for s in states.values()}
        exact[name] = all(torch.equal(s[name].float(), s[name].to(dtype).float())
                          for s in states.values())
    return dict(err=max_rel_err(model, ref), moved=max_rel_err(model, models()[1]),
                stored=stored, in_dtype=exact, precision=group["state_precision"])


def _grads(step: int, model) -> list[torch.Tensor]:
    """Gradients that do not depend on the params (the same on every rank), in their dtype."""
    g = torch.Generator().manual_seed(step)
    return [torch.randn(p.shape, generator=g).mul_(0.01).to(p.dtype) for p in model.parameters()]


def kahan_accuracy(lr: float, steps: int = 40) -> dict:
    """bf16 params, gradients given by hand (independent of the params, weight decay off): the
    moments, and so the updates, are then the same for every run, and the exact result is the
    initial params plus the sum of the updates, in fp64. The error against it of zeroopt's fp32
    masters and of its bf16 model params, and of torchdistx's (the eager reference on bf16
    params): with Kahan summation (param + compensation buffer, and the param alone) and
    without. Relative to each param's largest magnitude; the worst param."""
    hp = dict(lr=lr, use_kahan_summation=True)  # torchdistx's dtypes: fp32 m, bf16 v
    runs = {}
    for label in ("zeroopt", "kahan", "plain"):
        model, _ = models(BF16)
        if label == "zeroopt":
            opt = zeroopt.ZeroOptimizer(model.parameters(), "adamw_anyprecision", stage=2,
                                        **EXACT, **hp)
        else:
            opt = zeroopt.ReferenceOptimizer(model.parameters(), "adamw_anyprecision",
                                             **{**hp, "use_kahan_summation": label == "kahan"})
        for step in range(steps):
            for p, g in zip(model.parameters(), _grads(step, model)):
                p.grad = g
            opt.step()
            opt.zero_grad()
        runs[label] = (model, opt)
    model, _ = models(BF16)
    exact = [p.detach().double().reshape(-1) for p in model.parameters()]
    # the moments in their dtypes, as every run computes them, and the updates in fp64
    m = [torch.zeros(x.numel()) for x in exact]
    v = [torch.zeros(x.numel(), dtype=BF16) for x in exact]
    for step in range(steps):
        beta1, beta2 = 0.9, 0.999
        t = torch.tensor(float(step + 1))
        step_size, correction = lr / (1 - beta1**t), (1 - beta2**t) ** 0.5
        for x, mi, vi, g in zip(exact, m, v, _grads(step, model)):
            g = g.float().reshape(-1)
            mi.mul_(beta1).add_(g, alpha=1 - beta1)
            vi.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            x -= step_size.double() * mi.double() / (vi.sqrt() / correction).add_(1e-8).double()

    def error(values) -> float:
        return max(((a.double().reshape(-1) - b).abs().max() / b.abs().max()).item()
                   for a, b in zip(values, exact))

    zero_model, zero_opt = runs["zeroopt"]
    saved = zero_opt.state_dict()["state"]
    kahan_model, kahan_opt = runs["kahan"]
    return {
        "zeroopt_master": error(saved[i]["master_param"] for i in range(len(exact))),
        "zeroopt_model": error(p.detach() for p in zero_model.parameters()),
        "model_is_rounded_master": all(
            torch.equal(p.detach().reshape(-1), saved[i]["master_param"].reshape(-1).to(BF16))
            for i, p in enumerate(zero_model.parameters())),
        "kahan_sum": error(p.detach().double() + kahan_opt.state[p]["compensation"].double()
                           for p in kahan_model.parameters()),
        "kahan_param": error(p.detach() for p in kahan_model.parameters()),
        "plain": error(p.detach() for p in runs["plain"][0].parameters()),
    }


def _build(seed: int = 0):
    model, _ = models()
    if seed:  # a different-looking model: a load that missed a param would show
        torch.manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
    return model, zeroopt.ZeroOptimizer(model.parameters(), "adamw_anyprecision", stage=2,
                                        **EXACT, **RESHARDED)


def save_partway(root: str) -> list[torch.Tensor]:
    """The uninterrupted run's final params, and a checkpoint ``SAVED_AT`` steps in (every
    rank on the same batch: the run is the same at every world size)."""
    model, opt = _build()
    train(model, opt, range(1, TOTAL + 1))
    final = params_of(model)
    model, opt = _build()
    train(model, opt, range(1, SAVED_AT + 1))
    zeroopt.save_checkpoint(os.path.join(root, "anyprecision"), model, opt, step=SAVED_AT)
    return final


def resume(root: str) -> list[torch.Tensor]:
    model, opt = _build(seed=99)
    extras = zeroopt.load_checkpoint(os.path.join(root, "anyprecision"), model, opt)
    assert extras == {"step": SAVED_AT}, extras
    train(model, opt, range(SAVED_AT + 1, TOTAL + 1))
    return params_of(model)


def suite(root: str, save: bool, load: bool) -> dict:
    """Every scenario at this world size, in one set of processes."""
    out = {("ref", case, stage): against_reference(case, stage)
           for stage in (1, 2) for case in CASES}
    for lr in (1e-2, 1e-4):
        out["kahan", lr] = kahan_accuracy(lr)
    if save:
        out["uninterrupted"] = save_partway(root)
    if load:
        out["resumed"] = resume(root)
    return out
