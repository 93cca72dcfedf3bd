"""Training scenarios that run on every rank: zeroopt sharded against an unsharded reference.

Each rank trains the zeroopt model on its own batch; alongside, it trains a reference model
unsharded on every rank's batch (``training.reference_backward``). The functions return the
largest relative error ``max|zeroopt - reference| / max|reference|`` over the params, or
facts to assert on, so that the test process can check them (and print them).
"""

from __future__ import annotations

import copy
import io

import torch
from torch import nn

import zeroopt
from training import (BUCKET, EXACT, batch, loss_of, max_rel_err, models, reference_backward,
                      reference_optimizer, train_side_by_side, world)


def equivalence(name: str, hp: dict, stage: int, steps: int = 6,
                eager_reference: bool = False, options: dict = EXACT, ddp: bool = False) -> float:
    """Plain training: zeroopt vs torch.optim (or the rule's eager reference). With ``ddp``,
    the model is wrapped in DistributedDataParallel, which averages the gradients, and zeroopt
    runs with average_grads=False: it must not average them again."""
    rank, world_size = world()
    model, ref = models()
    opt = zeroopt.ZeroOptimizer(model.parameters(), name, stage=stage, **options, **hp)
    if ddp and world_size > 1:
        model = torch.nn.parallel.DistributedDataParallel(model)
    ref_opt = (zeroopt.ReferenceOptimizer(ref.parameters(), name, **hp) if eager_reference
               else reference_optimizer(name, ref.parameters(), hp))
    train_side_by_side(model, opt, [(ref, ref_opt)], range(steps))
    if opt.rule.to_eval:  # schedule-free: compare where it evaluates, too
        train_err = max_rel_err(model, ref)
        opt.eval()
        ref_opt.eval()
        return max(train_err, max_rel_err(model, ref))
    return max_rel_err(model, ref)


def param_groups_frozen_clip_schedule(stage: int) -> dict:
    """Two groups (no decay and a higher lr for biases/norms), a frozen layer, gradient
    clipping by the global norm, and an LR schedule driving param_groups."""
    rank, world_size = world()
    model, ref = models()

    def groups(m):
        m.inp.requires_grad_(False)
        decay = [p for n, p in m.named_parameters() if p.ndim >= 2]
        no_decay = [p for n, p in m.named_parameters() if p.ndim < 2]
        return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0, "lr": 2e-2}]

    opt = zeroopt.ZeroOptimizer(groups(model), "adamw", stage=stage, **EXACT, lr=1e-2, weight_decay=0.1)
    ref_opt = torch.optim.AdamW(groups(ref), lr=1e-2, weight_decay=0.1)
    warm = lambda s: min(1.0, (s + 1) / 3)  # noqa: E731
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warm)
    ref_sched = torch.optim.lr_scheduler.LambdaLR(ref_opt, warm)
    frozen_before = model.inp.weight.detach().clone()
    norm_err = 0.0
    for step in range(6):
        loss_of(model, *batch(step, rank)).backward()
        norm = opt.clip_grad_norm_(0.05)
        opt.step()
        opt.zero_grad()
        sched.step()
        reference_backward(ref, step, world_size)
        ref_norm = torch.nn.utils.clip_grad_norm_([p for p in ref.parameters() if p.requires_grad],
                                                  0.05)
        norm_err = max(norm_err, abs(norm.item() - ref_norm.item()) / ref_norm.item())
        ref_opt.step()
        ref_opt.zero_grad()
        ref_sched.step()
    return {"params": max_rel_err(model, ref), "norm": norm_err,
            "frozen_unchanged": bool(torch.equal(model.inp.weight, frozen_before)),
            "lr": opt.param_groups[1]["lr"], "ref_lr": ref_opt.param_groups[1]["lr"]}


def accumulation(stage: int, use_no_sync: bool, accum: int = 3) -> float:
    """Gradient accumulation over ``accum`` micro-batches per step."""
    rank, world_size = world()
    model, ref = models()
    opt = zeroopt.ZeroOptimizer(model.parameters(), "adamw", stage=stage, **EXACT, lr=1e-2)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    for step in range(4):
        for micro in range(accum):
            loss = loss_of(model, *batch(step, rank, micro)) / accum
            if use_no_sync and micro < accum - 1:
                with opt.no_sync():
                    loss.backward()
            else:
                loss.backward()
            reference_backward(ref, step, world_size, micro, accum)
        opt.step()
        opt.zero_grad()
        ref_opt.step()
        ref_opt.zero_grad()
    return max_rel_err(model, ref)


def bf16_masters(stage: int) -> dict:
    """bf16 model params, fp32 masters: the masters follow torch.optim.AdamW run in fp32 on the
    same bf16 gradients, and the model holds the masters rounded to bf16."""
    rank, world_size = world()
    model, master_ref = models(torch.bfloat16)
    grad_model = copy.deepcopy(model)  # bf16 replica that computes the reference's gradients
    opt = zeroopt.ZeroOptimizer(model.parameters(), "adamw", stage=stage, **EXACT, lr=1e-2)
    ref_opt = torch.optim.AdamW(master_ref.parameters(), lr=1e-2)
    for step in range(5):
        loss_of(model, *batch(step, rank)).backward()
        opt.step()
        opt.zero_grad()
        sums = [torch.zeros_like(p, dtype=torch.float64) for p in master_ref.parameters()]
        for r in range(world_size):
            grad_model.zero_grad()
            loss_of(grad_model, *batch(step, r)).backward()
            for s, p in zip(sums, grad_model.parameters()):
                s += p.grad.double()
        for p, s in zip(master_ref.parameters(), sums):
            p.grad = (s * (1.0 / world_size)).float()
        ref_opt.step()
        with torch.no_grad():
            for g, p in zip(grad_model.parameters(), master_ref.parameters()):
                g.copy_(p)
    masters = opt.state_dict()["state"]
    master_err = max(((masters[i]["master_param"] - p.detach()).abs().max()
                      / p.detach().abs().max()).item()
                     for i, p in enumerate(master_ref.parameters()))
    rounded = all(torch.equal(p, masters[i]["master_param"].to(torch.bfloat16))
                  for i, p in enumerate(model.parameters()))
    return {"master": master_err, "model_is_rounded_master": rounded,
            "dtype": str(next(model.parameters()).dtype)}


def save_load_continues_identically(name: str, hp: dict, stage: int) -> bool:
    """Save after 3 steps, load into a fresh model and optimizer, continue 3 steps: the params
    equal (bit for bit) those of the run that never stopped."""
    rank, _ = world()
    model, _ = models()
    opt = zeroopt.ZeroOptimizer(model.parameters(), name, stage=stage, bucket_numel=BUCKET, **hp)

    def train(m, o, steps):
        for step in steps:
            loss_of(m, *batch(step, rank)).backward()
            o.step()
            o.zero_grad()

    train(model, opt, range(3))
    blob = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, blob)
    train(model, opt, range(3, 6))

    blob.seek(0)
    saved = torch.load(blob)
    resumed, _ = models()
    resumed.load_state_dict(saved["model"])
    resumed_opt = zeroopt.ZeroOptimizer(resumed.parameters(), name, stage=stage,
                                        bucket_numel=BUCKET, **hp)
    resumed_opt.load_state_dict(saved["opt"])
    train(resumed, resumed_opt, range(3, 6))
    return all(torch.equal(a, b) for a, b in zip(model.parameters(), resumed.parameters()))


def wrapped_matches_direct(stage: int) -> float:
    rank, _ = world()
    a, _ = models()
    b = copy.deepcopy(a)
    groups = lambda m: [{"params": [m.inp.weight, m.mid.weight]},  # noqa: E731
                        {"params": [p for n, p in m.named_parameters()
                                    if n not in ("inp.weight", "mid.weight")],
                         "weight_decay": 0.0}]
    direct = zeroopt.ZeroOptimizer(groups(a), "sgd", stage=stage, lr=0.05, momentum=0.9,
                                   weight_decay=1e-3, nesterov=True)
    wrapped = zeroopt.wrap(torch.optim.SGD(groups(b), lr=0.05, momentum=0.9, weight_decay=1e-3,
                                           nesterov=True), stage=stage)
    for step in range(4):
        for m, o in ((a, direct), (b, wrapped)):
            loss_of(m, *batch(step, rank)).backward()
            o.step()
            o.zero_grad()
    return max_rel_err(a, b)


def params_agree_across_ranks(stage: int) -> list:
    """After training, every rank holds the same model (a checksum per rank)."""
    rank, _ = world()
    model, _ = models()
    opt = zeroopt.ZeroOptimizer(model.parameters(), "lion", stage=stage, bucket_numel=BUCKET)
    for step in range(3):
        loss_of(model, *batch(step, rank)).backward()
        opt.step()
        opt.zero_grad()
    return [p.detach().clone() for p in model.parameters()]


def trained_params(stage: int) -> list:
    """AdamW with clipping, exact (fp64) reduction: the params after 6 steps, to compare
    backends bit for bit (the average does not depend on a backend's order of summation)."""
    rank, _ = world()
    model, _ = models()
    opt = zeroopt.ZeroOptimizer(model.parameters(), "adamw", stage=stage, **EXACT,
                                **RULES["adamw"])
    for step in range(6):
        loss_of(model, *batch(step, rank)).backward()
        opt.clip_grad_norm_(0.05)
        opt.step()
        opt.zero_grad()
    return [p.detach().clone() for p in model.parameters()]


def fp32_reduction_within_bound(stage: int) -> float:
    """The default fp32 reduction: every element of this rank's averaged gradient is within
    the recursive-summation error bound of the exact average,
        |got - avg| <= (W-1) u sum_r |g_r| / W + 2 u |avg|      (u = 2**-24),
    (the sum's rounding, then the scaling by 1/W). Returns the worst ratio of error to bound."""
    rank, world_size = world()
    model, ref = models()
    opt = zeroopt.ZeroOptimizer(model.parameters(), "sgd", stage=stage, bucket_numel=BUCKET,
                                lr=0.05)
    loss_of(model, *batch(0, rank)).backward()
    opt.grads.finish()
    exact = [torch.zeros_like(p, dtype=torch.float64) for p in ref.parameters()]
    magnitude = [torch.zeros_like(e) for e in exact]
    for r in range(world_size):
        ref.zero_grad()
        loss_of(ref, *batch(0, r)).backward()
        for e, m, p in zip(exact, magnitude, ref.parameters()):
            e += p.grad.double() / world_size
            m += p.grad.double().abs() / world_size
    u, worst = 2.0**-24, 0.0
    for piece in opt.layout.pieces:
        lo, hi = piece.param_offset, piece.param_offset + piece.numel
        want = exact[piece.slot.index].reshape(-1)[lo:hi]
        scale = magnitude[piece.slot.index].reshape(-1)[lo:hi]
        got = opt.grads.shard[piece.shard_offset:piece.shard_offset + piece.numel].double()
        bound = (world_size - 1) * u * scale + 2 * u * want.abs() + 1e-300
        worst = max(worst, ((got - want).abs() / bound).max().item())
    return worst


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


RULES = {
    "adamw": dict(lr=1e-2, weight_decay=0.1),
    "adam": dict(lr=1e-2, weight_decay=0.01),
    "sgd": dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=1e-3),
    "sgd_nesterov": dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3),
    "lion": dict(lr=1e-3, weight_decay=0.1),
    "lamb": dict(lr=1e-2, weight_decay=0.05),
    "lars": dict(lr=0.5, weight_decay=1e-3, momentum=0.9),
    "nesterov": dict(lr=0.05, weight_decay=1e-3),
    "adagrad": dict(lr=0.05, lr_decay=0.01, weight_decay=1e-3, initial_accumulator_value=0.1),
    "rmsprop": dict(lr=1e-3, weight_decay=1e-3),
    "rmsprop_centered_momentum": dict(lr=1e-3, momentum=0.9, centered=True),
    "ademamix": dict(lr=1e-2, weight_decay=0.1, alpha=5.0, alpha_warmup=4, beta3_warmup=4),
    "adamw_cautious": dict(lr=1e-2, weight_decay=0.1, cautious=True),
    "adamw_adopt": dict(lr=1e-2, weight_decay=0.1, betas=(0.9, 0.9999), eps=1e-6, adopt=True),
    "adam_grams": dict(lr=1e-2, weight_decay=0.01, grams=True),
    "adamw_cautious_adopt": dict(lr=1e-2, weight_decay=0.1, eps=1e-6, adopt=True,
                                 cautious=True),
    "lion_cautious": dict(lr=1e-3, weight_decay=0.1, cautious=True),
    "schedule_free_adamw": dict(lr=1e-2, weight_decay=0.05, warmup_steps=3),
}
# Rules held to their reference packages, sharded at W = 1..3 with a resharded checkpoint, by a
# suite of their own (the tests/ file named here): not run again below.
OWN_SUITES = {
    "schedule_free_radam": "test_schedule_free_rules.py",
    "schedule_free_sgd": "test_schedule_free_rules.py",
    "stable_adamw": "test_stable_grok.py", "grokadamw": "test_stable_grok.py",
    "adamw_anyprecision": "test_anyprecision.py", "lomo": "test_lomo.py",
}
# Every other registered rule runs too, at its defaults (docs/ADDING_A_RULE.md); the rules that
# step params whole (tensor_step) are held to their reference packages in ranks/whole_tensors.py
# or their own suites.
for _rule in zeroopt.algorithms.registered_rules():
    if _rule.tensor_step is None and _rule.name not in OWN_SUITES:
        RULES.setdefault(_rule.name, {})


def rule_of(case: str) -> str:
    return case if case in zeroopt.available_optimizers() else case.split("_")[0]


def suite() -> dict:
    """Every scenario, at this world size, in one set of processes (spawning is the slow part)."""
    out = {}
    for stage in (1, 2):
        for case, hp in RULES.items():
            out["torch", case, stage] = equivalence(rule_of(case), hp, stage)
            out["eager", case, stage] = equivalence(rule_of(case), hp, stage,
                                                    eager_reference=True)
            out["resume", case, stage] = save_load_continues_identically(rule_of(case), hp,
                                                                         stage)
        out["fp32_reduction", stage] = fp32_reduction_within_bound(stage)
        out["default_reduce_sgd", stage] = equivalence("sgd", RULES["sgd"], stage,
                                                       options=dict(bucket_numel=BUCKET))
        out["groups", stage] = param_groups_frozen_clip_schedule(stage)
        out["accum_no_sync", stage] = accumulation(stage, use_no_sync=True)
        out["accum_plain", stage] = accumulation(stage, use_no_sync=False)
        out["bf16", stage] = bf16_masters(stage)
        out["wrap", stage] = wrapped_matches_direct(stage)
        out["agree", stage] = params_agree_across_ranks(stage)
        out["trained", stage] = trained_params(stage)
        out["nonfinite", stage] = nonfinite_gradient_skips_the_step(stage)
        out["grad_memory", stage] = gradient_memory(stage)
        out["unused_params", stage] = unused_params_on_some_ranks(stage)
        out["clip_norm_types", stage] = clip_norm_types(stage)
    # DDP's own all-reduce sums in fp32, so this runs SGD (linear in the gradient). DDP needs
    # torch.distributed: not under the MPI backend.
    if world()[1] == 1 or torch.distributed.is_initialized():
        out["ddp"] = equivalence("sgd", RULES["sgd"], 1, options=dict(average_grads=False),
                                 ddp=True)
    return out


def with_reduce_scatter_collectives() -> dict:
    """The NCCL-style bucket collectives (in-place reduce_scatter / all_gather into one
    tensor), run over gloo, give the same training as torch.optim."""
    import os

    os.environ["ZEROOPT_BUCKET_COLLECTIVES"] = "native"
    try:
        return {(name, stage): equivalence(name, RULES[name], stage)
                for name in ("adamw", "sgd") for stage in (1, 2)}
    finally:
        del os.environ["ZEROOPT_BUCKET_COLLECTIVES"]
