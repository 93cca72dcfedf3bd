"""adamw_options.py's options on every rank (see test_adamw_options.py for the assertions).

Each case trains the sharded zeroopt model on this rank's batch and, alongside, unsharded
references on the average of every rank's gradient (training.train_side_by_side): the rule's
eager reference (``ReferenceOptimizer``), and where one exists an independent implementation:
pytorch_optimizer.OrthoGrad around torch.optim.AdamW, torch.optim.AdamW on gradients passed
through the AGR authors' AGR.py formula, the SPD authors' AdamSPD step and the TAM paper's
update, both written out below as their sources state them.
"""

from __future__ import annotations

import math
import os

import torch
from torch import nn

import zeroopt
from ranks.checkpoint import params_of, train
from ranks.states import LOSS_SCALE, dequantize_param
from training import (EXACT, batch, loss_of, max_rel_err, models, reference_backward,
                      train_side_by_side, world)

LR = 1e-2
DECAY = dict(weight_decay=0.1)
# case -> (rule, hyperparameters, stage); run at every world size
CASES = {
    "spd": ("adamw", dict(spd=True, weight_decay=0.5), 2),
    "orthograd": ("adamw", dict(orthograd=True, **DECAY), 2),
    "agr": ("adamw", dict(agr=True, **DECAY), 1),
    "tam": ("adamw", dict(tam=True, tam_decay_rate=0.5, **DECAY), 2),
    "dynamic_weight_decay": ("adamw", dict(dynamic_weight_decay=True, weight_decay=0.2,
                                           wd_transition_steps=2, wd_decay_factor=0.5,
                                           wd_min_ratio=0.3), 1),
    "adam_agr_orthograd_tam": ("adam", dict(agr=True, orthograd=True, tam=True,
                                            weight_decay=0.01), 2),
    "spd_cautious": ("adamw", dict(spd=True, cautious=True, weight_decay=0.5), 2),
}
# combinations with each other and with cautious, adopt and grams; run at W = 2
ADOPT = dict(adopt=True, eps=1e-6, betas=(0.9, 0.9999))
COMBINATIONS = {
    "orthograd_adopt": ("adamw", dict(orthograd=True, **ADOPT, **DECAY), 2),
    "tam_grams": ("adamw", dict(tam=True, grams=True, **DECAY), 2),
    "agr_orthograd_grams_maximize": ("adam", dict(agr=True, orthograd=True, grams=True,
                                                  maximize=True), 1),
    "tam_adopt": ("adam", dict(tam=True, **ADOPT, weight_decay=0.01), 2),
    "spd_adopt": ("adamw", dict(spd=True, **ADOPT, weight_decay=0.5), 2),
    "spd_grams_dynamic": ("adam", dict(spd=True, grams=True, weight_decay=0.5,
                                       dynamic_weight_decay=True, wd_transition_steps=2), 2),
    "cautious_dynamic": ("adamw", dict(cautious=True, dynamic_weight_decay=True,
                                       wd_transition_steps=2, weight_decay=0.2), 1),
    # stepped whole (one round of whole-param sums cannot do them): exact
    "agr_cautious": ("adamw", dict(agr=True, cautious=True, **DECAY), 2),
    "tam_cautious_adopt": ("adamw", dict(tam=True, cautious=True, **ADOPT, **DECAY), 2),
    "spd_orthograd": ("adamw", dict(spd=True, orthograd=True, weight_decay=0.5), 2),
}
# 8-bit states (stepped whole, moments 8-bit) against the 32-bit eager reference
EIGHT_BIT = {name: dict(CASES[name][1], state_precision="8bit", min_8bit_size=0)
             for name in ("spd", "orthograd", "agr", "tam")}
STEPS = 6


# --- independent implementations --------------------------------------------------------------


class AgrAdamW(torch.optim.AdamW):
    """The AGR authors' AdamW_AGR.py: torch's AdamW on g - g |g| / sum|g| (AGR.py)."""

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    grad = p.grad
                    grad_sum = grad.abs().sum(dim=tuple(range(grad.dim())), keepdim=True)
                    p.grad = grad - grad * (grad.abs() / grad_sum)
        return super().step(closure)


class AdamSPD(torch.optim.Optimizer):
    """Selective Projection Decay as Tian et al. 2024 (Algorithm 1) and their adamSPD.py
    state it: Adam's step to x~; c = -<g, x - x0>; where c < 0, r = hardtanh((||x~ - x0|| -
    ||x - x0||) / ||x~ - x0||, 0, 1) and x <- x~ - lambda r (x~ - x0). x0: the params at
    construction."""

    def __init__(self, params, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        for group in self.param_groups:
            group["pre"] = [p.detach().clone() for p in group["params"]]

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p, pre in zip(group["params"], group["pre"]):
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state.update(step=0, exp_avg=torch.zeros_like(p),
                                 exp_avg_sq=torch.zeros_like(p))
                state["step"] += 1
                t, grad = state["step"], p.grad
                state["exp_avg"].mul_(beta1).add_(grad, alpha=1 - beta1)
                state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                denom = (state["exp_avg_sq"].sqrt() / math.sqrt(1 - beta2**t)).add_(group["eps"])
                new_p = p - (group["lr"] / (1 - beta1**t)) * state["exp_avg"] / denom
                condition = -torch.sum(grad * (p - pre))
                if condition < 0.0:
                    curr, prev = torch.norm(new_p - pre), torch.norm(p - pre)
                    ratio = nn.functional.hardtanh((curr - prev) / curr, 0.0, 1.0)
                    new_p = new_p - group["weight_decay"] * ratio * (new_p - pre)
                p.copy_(new_p)


class TamAdamW(torch.optim.Optimizer):
    """Torque-Aware Momentum (Malviya et al. 2024) inside AdamW, as the paper states the
    damping: s <- gamma s + (1 - gamma) cos(m_{t-1}, g_t), d = (1 + s) / 2, the gradient
    entering m times (d + eps); AdamW otherwise (EMA, bias corrections, decoupled decay)."""

    def __init__(self, params, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 tam_decay_rate=0.9):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      tam_decay_rate=tam_decay_rate))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            (beta1, beta2), eps, gamma = group["betas"], group["eps"], group["tam_decay_rate"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state.update(step=0, s=0.0, m=torch.zeros_like(p), v=torch.zeros_like(p))
                state["step"] += 1
                t, g, m, v = state["step"], p.grad, state["m"], state["v"]
                cos = (nn.functional.normalize(m.reshape(-1).double(), dim=0)
                       @ nn.functional.normalize(g.reshape(-1).double(), dim=0)).item()
                state["s"] = gamma * state["s"] + (1 - gamma) * cos
                d = (1 + state["s"]) / 2
                p.mul_(1 - group["lr"] * group["weight_decay"])
                m.mul_(beta1).add_(g * (d + eps), alpha=1 - beta1)
                v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                denom = v.sqrt() / math.sqrt(1 - beta2**t) + eps
                p.addcdiv_(m, denom, value=-group["lr"] / (1 - beta1**t))


def independent(case: str, params, hp: dict):
    """The independent implementation a case is also held to, or None."""
    if case == "orthograd":
        import pytorch_optimizer

        return pytorch_optimizer.OrthoGrad(torch.optim.AdamW(params, lr=LR, **DECAY))
    if case == "agr":
        return AgrAdamW(params, lr=LR, **DECAY)
    if case == "spd":
        return AdamSPD(params, lr=LR, weight_decay=hp["weight_decay"])
    if case == "tam":
        return TamAdamW(params, lr=LR, weight_decay=0.1, tam_decay_rate=hp["tam_decay_rate"])
    return None


# --- a LoRA-shaped model ----------------------------------------------------------------------


class LoraLinear(nn.Module):
    """A frozen Linear plus PEFT's LoRA matrices (``lora_A.default.weight`` (r, in),
    ``lora_B.default.weight`` (out, r)), as peft names them."""

    def __init__(self, fan_in: int, fan_out: int, rank: int):
        super().__init__()
        self.base = nn.Linear(fan_in, fan_out).requires_grad_(False)
        self.lora_A = nn.ModuleDict({"default": nn.Linear(fan_in, rank, bias=False)})
        self.lora_B = nn.ModuleDict({"default": nn.Linear(rank, fan_out, bias=False)})
        nn.init.zeros_(self.lora_B["default"].weight)  # LoRA's start: B = 0

    def forward(self, x):
        return self.base(x) + self.lora_B["default"](self.lora_A["default"](x))


class LoraModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = LoraLinear(37, 41, 3)
        self.out = LoraLinear(41, 5, 2)

    def forward(self, x):
        return self.out(torch.tanh(self.inp(x)))


def lora_models():
    torch.manual_seed(4321)
    model, ref = LoraModel(), LoraModel()
    ref.load_state_dict(model.state_dict())
    return model, ref


# --- scenarios --------------------------------------------------------------------------------


def against_references(rule: str, hp: dict, stage: int, case: str) -> dict:
    model, ref = models()
    _, other = models()
    opt = zeroopt.ZeroOptimizer(model.parameters(), rule, stage=stage, **EXACT, lr=LR, **hp)
    references = [(ref, zeroopt.ReferenceOptimizer(ref.parameters(), rule, lr=LR, **hp))]
    theirs = independent(case, other.parameters(), hp)
    if theirs is not None:
        references.append((other, theirs))
    train_side_by_side(model, opt, references, range(STEPS))
    return {"eager": max_rel_err(model, ref),
            "independent": max_rel_err(model, other) if theirs is not None else None,
            "whole": opt.rule.whole_tensors(opt.param_groups[0]),
            "ranks_per_param": ranks_per_param(opt)}


def ranks_per_param(opt) -> list[int]:
    """How many ranks hold a piece of each param (more than one: it straddles them)."""
    owners: dict[int, set] = {}
    for r in range(world()[1]):
        for piece in opt.layout.pieces_of(r):
            owners.setdefault(piece.slot.index, set()).add(r)
    return [len(owners[i]) for i in sorted(owners)]


def alora(stage: int) -> dict:
    """A LoRA-shaped model, named params, alora=True, against the eager reference."""
    model, ref = lora_models()
    opt = zeroopt.ZeroOptimizer(model.named_parameters(), "adamw", stage=stage, **EXACT, lr=LR,
                                alora=True, alora_eta=3.0, weight_decay=0.0)
    ref_opt = zeroopt.ReferenceOptimizer(ref.named_parameters(), "adamw", lr=LR, alora=True,
                                         alora_eta=3.0, weight_decay=0.0)
    train_side_by_side(model, opt, [(ref, ref_opt)], range(STEPS))
    moved = max((a - b).abs().max().item()
                for a, b in zip(model.parameters(), lora_models()[0].parameters()))
    return {"eager": max_rel_err(model, ref), "ranks_per_param": ranks_per_param(opt),
            "moved": moved}


def eight_bit(case: str, steps: int = 8) -> dict:
    """bitsandbytes' measure (ranks/states.py): 8-bit zeroopt and the 32-bit eager reference
    from the same point each step; params outside atol 1e-5 / rtol 1e-3, and the dequantized
    moments' mean absolute error."""
    rank, world_size = world()
    rule, hp = "adamw", EIGHT_BIT[case]
    model, ref = models()
    opt = zeroopt.ZeroOptimizer(model.parameters(), rule, stage=2, **EXACT, lr=LR, **hp)
    ref_opt = zeroopt.ReferenceOptimizer(ref.parameters(), rule, lr=LR, **hp)
    params, ref_params = list(model.parameters()), list(ref.parameters())
    worst = {"params_not_close": 0, "state_mean_abs_err": 0.0, "state_max_abs": 0.0,
             "eight_bit_states": 0}
    for step in range(steps):
        (loss_of(model, *batch(step, rank)) * LOSS_SCALE).backward()
        opt.step()
        opt.zero_grad()
        reference_backward(ref, step, world_size, scale=LOSS_SCALE)
        ref_opt.step()
        ref_opt.zero_grad()
        worst["params_not_close"] = max(worst["params_not_close"], sum(
            int((~torch.isclose(p.detach(), q.detach(), atol=1e-5, rtol=1e-3)).sum())
            for p, q in zip(params, ref_params)))
        saved = opt.state_dict()["state"]
        with torch.no_grad():
            for index, q in enumerate(ref_params):
                entry = saved[index]
                for name, theirs in ref_opt.state[q].items():
                    if not isinstance(theirs, torch.Tensor) or name not in entry:
                        continue
                    ours = entry[name]
                    if ours.dtype == torch.uint8:
                        ours = dequantize_param(ours, entry[name + "_absmax"],
                                                name not in opt.rule.nonnegative_states)
                        err = (ours.float() - theirs).abs().mean().item()
                        worst["state_mean_abs_err"] = max(worst["state_mean_abs_err"], err)
                        worst["state_max_abs"] = max(worst["state_max_abs"],
                                                     theirs.abs().max().item())
                        worst["eight_bit_states"] += 1
                    theirs.copy_(ours.float())  # reset: the next step starts where zeroopt is
                q.copy_(params[index])
    return worst


def suite(combinations: bool = False) -> dict:
    """Every case at this world size, in one set of processes."""
    out = {}
    for case, (rule, hp, stage) in {**CASES, **(COMBINATIONS if combinations else {})}.items():
        out[case] = against_references(rule, hp, stage, case)
    for stage in (1, 2):
        out["alora", stage] = alora(stage)
    for case in EIGHT_BIT:
        out["8bit", case] = eight_bit(case)
    return out


# --- checkpoints that reshard ----------------------------------------------------------------

CHECKPOINTS = {  # case -> (hyperparameters, LoRA model?)
    "spd_cautious": (dict(spd=True, cautious=True, weight_decay=0.5), False),
    "agr_orthograd_tam": (dict(agr=True, orthograd=True, tam=True, **DECAY), False),
    "tam_8bit": (dict(tam=True, state_precision="8bit", min_8bit_size=0, **DECAY), False),
    "alora_spd": (dict(alora=True, spd=True, weight_decay=0.5), True),
}
SAVED_AT, TOTAL = 3, 6


def _build(case: str, seed: int = 0):
    hp, lora = CHECKPOINTS[case]
    model = lora_models()[0] if lora else models()[0]
    if seed:  # a different-looking model: a load that missed a param would show
        torch.manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
    params = model.named_parameters() if lora else model.parameters()
    return model, zeroopt.ZeroOptimizer(params, "adamw", stage=2, **EXACT, lr=LR, **hp)


def save_partway(root: str) -> dict:
    """The uninterrupted runs' final params, and a checkpoint SAVED_AT steps in."""
    finals = {}
    for case in CHECKPOINTS:
        model, opt = _build(case)
        train(model, opt, range(1, TOTAL + 1))
        finals[case] = params_of(model)
        model, opt = _build(case)
        train(model, opt, range(1, SAVED_AT + 1))
        zeroopt.save_checkpoint(os.path.join(root, case), model, opt, step=SAVED_AT)
    return finals


def resume(root: str) -> dict:
    finals = {}
    for case in CHECKPOINTS:
        model, opt = _build(case, seed=99)
        zeroopt.load_checkpoint(os.path.join(root, case), model, opt)
        train(model, opt, range(SAVED_AT + 1, TOTAL + 1))
        finals[case] = params_of(model)
    return finals
