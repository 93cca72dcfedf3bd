"""8-bit, bf16 and paged states, run on every rank (see test_states.py for the assertions).

The 8-bit comparison follows bitsandbytes' own 8-bit optimizer tests: zeroopt (8-bit, sharded)
and the 32-bit reference step on the same averaged gradients; after each step the params and the
dequantized states are compared, and the reference is then reset to zeroopt's params and
dequantized states, so each step's error is measured alone instead of compounding.
"""

from __future__ import annotations

import io

import torch

import zeroopt
from training import (EXACT, batch, loss_of, max_rel_err, models, reference_backward,
                      reference_optimizer, world)
from zeroopt.states import blockwise

# min_8bit_size below the test model's two weight matrices (1517 and 1189 elements), above the
# rest: both precisions in one model, and 8-bit params that straddle shards and buckets.
MIN_8BIT = 1000
EIGHT_BIT = {  # name -> (32-bit reference rule, hyperparameters)
    "adamw_8bit": ("adamw", dict(lr=1e-3, weight_decay=0.1)),
    "lion_8bit": ("lion", dict(lr=1e-4, weight_decay=0.1)),
    "lamb_8bit": ("lamb", dict(lr=1e-3, weight_decay=0.05)),
    "lars_8bit": ("lars", dict(lr=0.05, weight_decay=1e-3, momentum=0.9)),
    "sgd_8bit": ("sgd", dict(lr=0.05, momentum=0.9, weight_decay=1e-3)),
    "rmsprop_bnb_8bit": ("rmsprop", dict(lr=1e-4, weight_decay=1e-3)),
    "adagrad_8bit": ("adagrad", dict(lr=0.01)),  # initial 0, as bitsandbytes tests it
    "ademamix_8bit": ("ademamix", dict(lr=1e-3, alpha=5.0, alpha_warmup=20,
                                       beta3_warmup=20)),
}
PAGED = ("paged_adamw_32bit", "paged_adamw_8bit", "paged_lion_32bit", "paged_lion_8bit",
         "paged_ademamix_32bit", "paged_ademamix_8bit")
OPTIONS = dict(EXACT, min_8bit_size=MIN_8BIT)
# bitsandbytes' tolerances hold for its tests' gradients (randn * 0.01); the test model's are
# ~10x larger, so the 8-bit comparison scales its loss down to the same size.
LOSS_SCALE = 0.1


def saved_states(opt) -> dict[int, dict[str, torch.Tensor]]:
    """Every param's states as fp32 values (8-bit codes dequantized), from state_dict()."""
    return saved_states_from(opt.state_dict(), opt.rule.nonnegative_states)


def dequantize_param(codes: torch.Tensor, absmax: torch.Tensor, signed: bool) -> torch.Tensor:
    flat = codes.reshape(-1)
    padded = torch.cat([flat, flat.new_zeros(-flat.numel() % blockwise.BLOCK)])
    return blockwise.dequantize(padded, absmax, signed)[:flat.numel()].view(codes.shape)


def against_32bit_with_reset(name: str, stage: int, steps: int) -> dict:
    """Worst step: params outside atol 1e-5 / rtol 1e-3, and the dequantized states' mean
    absolute error against the 32-bit states (both after one step from the same point)."""
    rank, world_size = world()
    base, hp = EIGHT_BIT.get(name) or (name, {})
    model, ref = models()
    opt = zeroopt.ZeroOptimizer(model.parameters(), name, stage=stage, **OPTIONS, **hp)
    ref_opt = reference_optimizer(base, ref.parameters(), hp)
    ref_params = list(ref.parameters())
    worst = {"params_not_close": 0, "state_mean_abs_err": 0.0, "state_max_abs": 0.0,
             "eight_bit_params": []}
    for step in range(steps):
        (loss_of(model, *batch(step, rank)) * LOSS_SCALE).backward()
        opt.step()
        opt.zero_grad()
        reference_backward(ref, step, world_size, scale=LOSS_SCALE)
        ref_opt.step()
        ref_opt.zero_grad()
        not_close = sum(int((~torch.isclose(p.detach(), q.detach(), atol=1e-5, rtol=1e-3)).sum())
                        for p, q in zip(model.parameters(), ref_params))
        worst["params_not_close"] = max(worst["params_not_close"], not_close)
        raw = opt.state_dict()
        states = saved_states_from(raw, opt.rule.nonnegative_states)
        raw = raw["state"]
        with torch.no_grad():
            for index, p in enumerate(ref_params):
                for state_name, ours in states[index].items():
                    theirs = ref_opt.state[p][state_name]
                    if raw[index][state_name].dtype == torch.uint8:
                        err = (ours - theirs).abs().mean().item()
                        worst["state_mean_abs_err"] = max(worst["state_mean_abs_err"], err)
                        worst["state_max_abs"] = max(worst["state_max_abs"],
                                                     theirs.abs().max().item())
                    theirs.copy_(ours)  # reset: the next step starts where zeroopt is
                p.copy_(list(model.parameters())[index])
    worst["eight_bit_params"] = sorted(i for i, e in opt.state_dict()["state"].items()
                                       if any(v.dtype == torch.uint8 for v in e.values()))
    return worst


def fingerprint(name: str = "adamw_8bit", steps: int = 8) -> dict:
    """Params and saved 8-bit states after some steps: 8-bit blocks belong to params, not to
    shards, so these must be bit-identical at every world size (element-wise rules)."""
    model, _ = models()
    base, hp = EIGHT_BIT[name]
    opt = zeroopt.ZeroOptimizer(model.parameters(), name, stage=2, **OPTIONS, **hp)
    for step in range(steps):
        # Every rank the same batch: the averaged gradient is then the same at every world size.
        loss_of(model, *batch(step, 0)).backward()
        opt.step()
        opt.zero_grad()
    state = opt.state_dict()["state"]
    return {"params": [p.detach().clone() for p in model.parameters()],
            "state": {i: {k: v.clone() for k, v in e.items()} for i, e in state.items()}}


def paged_equals_unpaged(name: str, stage: int) -> dict:
    """Paged states (a memory-mapped file, small windows) against the same precision kept
    resident: the same arithmetic on the same values, so bit-identical params."""
    rank, _ = world()
    resident_name = name.removeprefix("paged_").replace("_32bit", "")
    hp = dict(lr=1e-3, weight_decay=0.1)
    if "ademamix" in name:
        hp.update(alpha=5.0, alpha_warmup=4, beta3_warmup=4)
    a, b = models()
    paged = zeroopt.ZeroOptimizer(a.parameters(), name, stage=stage, window_numel=512,
                                  **OPTIONS, **hp)
    resident = zeroopt.ZeroOptimizer(b.parameters(), resident_name, stage=stage, **OPTIONS, **hp)
    for step in range(5):
        for model, opt in ((a, paged), (b, resident)):
            loss_of(model, *batch(step, rank)).backward()
            opt.step()
            opt.zero_grad()
    return {"max_abs_diff": max((p - q).abs().max().item()
                                for p, q in zip(a.parameters(), b.parameters())),
            "paged_device_bytes": paged.device_state_bytes(),
            "window_bytes": 4 * sum(t.numel() for t in paged.shard.scratch.values()),
            "resident_device_bytes": resident.device_state_bytes(),
            "resident_state_bytes": resident.state_bytes(),
            "state_bytes_equal": paged.state_bytes() == resident.state_bytes()}


def bf16_states(stage: int) -> dict:
    """bf16 states: each step's states within bf16 rounding (2^-8 relative) of 32-bit."""
    rank, world_size = world()
    model, ref = models()
    opt = zeroopt.ZeroOptimizer(model.parameters(), "adamw", stage=stage, **OPTIONS, lr=1e-3,
                                state_precision="bf16")
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-3)
    worst = 0.0
    for step in range(10):
        loss_of(model, *batch(step, rank)).backward()
        opt.step()
        opt.zero_grad()
        reference_backward(ref, step, world_size)
        ref_opt.step()
        ref_opt.zero_grad()
        states = saved_states(opt)
        with torch.no_grad():
            for index, p in enumerate(ref.parameters()):
                for state_name, ours in states[index].items():
                    theirs = ref_opt.state[p][state_name]
                    rel = ((ours - theirs).abs() / theirs.abs().clamp_min(1e-30)).max().item()
                    worst = max(worst, rel)
                    theirs.copy_(ours)
                p.copy_(list(model.parameters())[index])
    return {"state_rel_err": worst, "params": max_rel_err(model, ref)}


def save_load_8bit(stage: int) -> dict:
    """8-bit state saved and loaded continues bit-identically; loaded into a 32-bit optimizer it
    is the dequantized state; a 32-bit state loaded into an 8-bit optimizer is quantized."""
    rank, _ = world()
    hp = dict(lr=1e-3, weight_decay=0.1)

    def train(model, opt, steps, start=0):
        for step in range(start, start + steps):
            loss_of(model, *batch(step, rank)).backward()
            opt.step()
            opt.zero_grad()

    model, _ = models()
    opt = zeroopt.ZeroOptimizer(model.parameters(), "adamw_8bit", stage=stage, **OPTIONS, **hp)
    train(model, opt, 3)
    blob = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, blob)
    train(model, opt, 3, start=3)

    blob.seek(0)
    saved = torch.load(blob)
    resumed, _ = models()
    resumed.load_state_dict(saved["model"])
    resumed_opt = zeroopt.ZeroOptimizer(resumed.parameters(), "adamw_8bit", stage=stage,
                                        **OPTIONS, **hp)
    resumed_opt.load_state_dict(saved["opt"])
    train(resumed, resumed_opt, 3, start=3)
    identical = all(torch.equal(p, q) for p, q in zip(model.parameters(), resumed.parameters()))

    wide, _ = models()  # 8-bit -> 32-bit
    wide_opt = zeroopt.ZeroOptimizer(wide.parameters(), "adamw", stage=stage, **OPTIONS, **hp)
    wide_opt.load_state_dict(saved["opt"])
    as_saved = saved_states_from(saved["opt"], opt.rule.nonnegative_states)
    to_32 = all(torch.equal(saved_states(wide_opt)[i][n], v)
                for i, e in as_saved.items() for n, v in e.items())

    narrow, _ = models()  # and back: 32-bit -> 8-bit gives the codes it started from
    narrow_opt = zeroopt.ZeroOptimizer(narrow.parameters(), "adamw_8bit", stage=stage,
                                       **OPTIONS, **hp)
    narrow_opt.load_state_dict(wide_opt.state_dict())
    again = narrow_opt.state_dict()["state"]
    round_trip = max(int((again[i][n].int() - e[n].int()).abs().max())
                     for i, e in saved["opt"]["state"].items() for n in e
                     if e[n].dtype == torch.uint8)
    return {"resume_identical": identical, "to_32bit_exact": to_32,
            "round_trip_max_code_diff": round_trip}


def saved_states_from(state_dict: dict, nonnegative) -> dict:
    out = {}
    for index, entry in state_dict["state"].items():
        out[index] = {}
        for name, value in entry.items():
            if name == "step" or name.endswith("_absmax"):
                continue
            if value.dtype == torch.uint8:
                value = dequantize_param(value, entry[name + "_absmax"], name not in nonnegative)
            out[index][name] = value.float()
    return out


def suite() -> dict:
    out = {}
    for name in EIGHT_BIT:
        steps = 100 if name == "adamw_8bit" else 25
        for stage in ((1, 2) if name == "adamw_8bit" else (2,)):
            out["vs32", name, stage] = against_32bit_with_reset(name, stage, steps)
    for name in PAGED:
        out["paged", name] = paged_equals_unpaged(name, stage=2)
    out["paged", "paged_adamw_8bit", 1] = paged_equals_unpaged("paged_adamw_8bit", stage=1)
    for stage in (1, 2):
        out["bf16", stage] = bf16_states(stage)
        out["save_load", stage] = save_load_8bit(stage)
    out["fingerprint"] = fingerprint()
    return out
