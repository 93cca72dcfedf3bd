"""Scenarios for the rules that step params whole (GaLore, APOLLO, Adafactor), run on every rank.

zeroopt trains sharded on each rank's batch; the reference package (galore-torch, apollo-torch,
transformers' Adafactor) trains unsharded on the exact average of every rank's gradient
(``training.reference_backward``, with zeroopt reducing in fp64), so both see the same
gradients bit for bit, and any difference is the update's. Projected groups are built by
``zeroopt.galore_param_groups(model, "all-linear")``: the three Linear weights (41x37, 29x41,
5x29: both projection sides, and a rank above the smaller side) are projected; the biases, the
LayerNorm and a 0-d param run the plain rule.
"""

from __future__ import annotations

import contextlib
import io
import sys
import warnings

import torch

import zeroopt
from training import (EXACT, batch, loss_of, max_rel_err, models, reference_backward,
                      train_side_by_side, world)

STEPS = 8
GAP = 3  # projector refreshes at steps 0, 3 and 6: three per matrix
GALORE = dict(rank=8, update_proj_gap=GAP, scale=0.25, proj_type="std")


def _galore_torch(name: str, groups, hp: dict):
    import galore_torch

    if name == "galore_adamw":
        return galore_torch.GaLoreAdamW(groups, no_deprecation_warning=True, **hp)
    if name == "galore_adamw_8bit":
        # GaLoreAdamW8bit calls torch.cuda.synchronize() after every param, which a CPU build
        # of torch refuses; with no device there is nothing to wait for.
        if not torch.cuda.is_available():
            torch.cuda.synchronize = lambda *args, **kwargs: None
        opt = galore_torch.GaLoreAdamW8bit(groups, **hp)
        # galore-torch passes percentile_clipping=100 and block_wise=True positionally, where
        # bitsandbytes >= 0.45 now takes max_unorm and skip_zeros: they would turn on update-
        # norm clipping and skip zero params. Restore what it means (both off).
        opt.args.max_unorm, opt.args.skip_zeros = 0.0, False
        return opt
    return galore_torch.GaLoreAdafactor(groups, **hp)


def _apollo_torch(groups, hp: dict):
    import apollo_torch

    return apollo_torch.APOLLOAdamW(groups, **hp)


def reference_for(name: str, model, hp: dict, projected: dict):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if name == "adafactor":
            from transformers.optimization import Adafactor

            return Adafactor(model.parameters(), **hp)
        groups = zeroopt.galore_param_groups(model, "all-linear", **projected)
        if name.startswith("apollo"):
            return _apollo_torch(groups, hp)
        return _galore_torch(name, groups, hp)


# name -> (hyperparameters for both, projection keys of the projected group)
CASES = {
    "galore_adamw": (dict(lr=1e-2, weight_decay=0.1), GALORE),
    # rank 4, below every matrix's smaller side: galore-torch's reverse_std cannot project a
    # 5 x 29 matrix back at rank >= 5 (a shape error there; zeroopt projects it)
    "galore_adamw_reverse_std": (dict(lr=1e-2), dict(GALORE, rank=4, proj_type="reverse_std")),
    # bitsandbytes' Adam rounds differently from torch's (1e-8). At rank 4, below the rank of
    # a 6-sample gradient, the SVD's subspace is well separated, so its refresh is stable
    # under that; at rank 8 the extra singular vectors are noise, and a refresh picks any.
    "galore_adamw_8bit_32bit_states": (dict(lr=1e-2, weight_decay=0.1, min_8bit_size=10**9),
                                       dict(GALORE, rank=4)),
    "galore_adafactor": (dict(lr=1e-2, scale_parameter=False, relative_step=False,
                              weight_decay=0.05, beta1=0.9), GALORE),
    "adafactor": (dict(lr=None, scale_parameter=True, relative_step=True, warmup_init=False),
                  {}),
    "adafactor_fixed_lr": (dict(lr=1e-2, scale_parameter=False, relative_step=False,
                                beta1=0.9, weight_decay=0.01), {}),
    "apollo_adamw": (dict(lr=1e-2, weight_decay=0.1),
                     dict(rank=8, update_proj_gap=GAP, scale=1.0, proj="random",
                          scale_type="channel", proj_type="std")),
    "apollo_mini": (dict(lr=1e-2), dict(rank=1, update_proj_gap=GAP, scale=128.0,
                                        proj="random", scale_type="tensor", proj_type="std")),
}


@contextlib.contextmanager
def counting_svds():
    """Count the SVDs zeroopt runs in this process while inside: torch.linalg.svd called from
    zeroopt's own code (the reference package's SVDs are not counted)."""
    svd, calls = torch.linalg.svd, {"count": 0}

    def counted(*args, **kwargs):
        if sys._getframe(1).f_globals.get("__name__", "").startswith("zeroopt."):
            calls["count"] += 1
        return svd(*args, **kwargs)

    torch.linalg.svd = counted
    try:
        yield calls
    finally:
        torch.linalg.svd = svd


def rule_of(case: str) -> str:
    if case.startswith("adafactor"):
        return "adafactor"
    if case.startswith("apollo"):
        return "apollo_adamw"
    return "galore_adamw_8bit" if case.startswith("galore_adamw_8bit") else \
        "galore_adafactor" if case == "galore_adafactor" else "galore_adamw"


def _build(case: str, model, stage: int, options: dict = EXACT, **extra):
    name, (hp, projected) = rule_of(case), CASES[case]
    params = (model.parameters() if not projected
              else zeroopt.galore_param_groups(model, "all-linear", **projected))
    name = extra.pop("optimizer", name)
    return zeroopt.ZeroOptimizer(params, name, stage=stage, **options, **{**hp, **extra})


def against_reference(case: str, stage: int) -> dict:
    """Largest relative param error against the reference package after ``STEPS`` steps, and
    the SVDs this rank ran and the whole params it owns."""
    rank, world_size = world()
    model, ref = models()
    with counting_svds() as svds:
        opt = _build(case, model, stage)
        hp, projected = CASES[case]
        ref_opt = reference_for(rule_of(case), ref, hp, projected)
        train_side_by_side(model, opt, [(ref, ref_opt)], range(STEPS))
    owned = sorted(o.slot.index for group in opt.shard.whole.owned for o in group)
    return dict(err=max_rel_err(model, ref), svds=svds["count"], owned=owned)


def eight_bit_closeness(stage: int) -> dict:
    """8-bit GaLore (low-rank moments in 8 bits) against 32-bit GaLore, for zeroopt and for
    galore-torch's GaLoreAdamW8bit (bitsandbytes)."""
    rank, world_size = world()
    hp = dict(lr=1e-3, weight_decay=0.1, min_8bit_size=128)
    projected = dict(GALORE, rank=4)  # see galore_adamw_8bit_32bit_states
    runs = {}
    for label in ("zeroopt_8bit", "zeroopt_32bit", "galore_torch_8bit"):
        model, ref = models()
        if label.startswith("zeroopt"):
            precision = "8bit" if label.endswith("8bit") else "32bit"
            opt = zeroopt.ZeroOptimizer(zeroopt.galore_param_groups(model, "all-linear",
                                                                    **projected),
                                        "galore_adamw_8bit", stage=stage, **EXACT, **hp,
                                        state_precision=precision)
            for step in range(STEPS):
                loss_of(model, *batch(step, rank)).backward()
                opt.step()
                opt.zero_grad()
            runs[label] = model
        else:
            opt = reference_for("galore_adamw_8bit", ref, hp, projected)
            for step in range(STEPS):
                reference_backward(ref, step, world_size)
                opt.step()
                opt.zero_grad()
            runs[label] = ref
    return dict(zeroopt=max_rel_err(runs["zeroopt_8bit"], runs["zeroopt_32bit"]),
                galore_torch=max_rel_err(runs["galore_torch_8bit"], runs["zeroopt_32bit"]))


def eight_bit_fingerprint(stage: int) -> torch.Tensor:
    """8-bit GaLore's params after 8 steps with every rank on the same batch: the averaged
    gradient is then the single-rank one exactly, so the params must not depend on W."""
    model, _ = models()
    opt = zeroopt.ZeroOptimizer(zeroopt.galore_param_groups(model, "all-linear", **GALORE),
                                "galore_adamw_8bit", stage=stage, **EXACT, lr=1e-3,
                                weight_decay=0.1, min_8bit_size=128)
    for step in range(STEPS):
        loss_of(model, *batch(step, 0)).backward()
        opt.step()
        opt.zero_grad()
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def layerwise_accumulation(case: str, stage: int, accum: int = 4) -> float:
    """The "_layerwise" name with gradient accumulation (micro-steps in no_sync) against the
    plain name with the same accumulation: the same training, bit for bit."""
    rank, _ = world()
    results = []
    for layerwise in (False, True):
        model, _ = models()
        opt = _build(case, model, stage, layerwise=layerwise)
        for step in range(STEPS):
            for micro in range(accum):
                x, y = batch(step, rank, micro)
                if micro < accum - 1:
                    with opt.no_sync():
                        (loss_of(model, x, y) / accum).backward()
                else:
                    (loss_of(model, x, y) / accum).backward()
            opt.step()
            opt.zero_grad()
        results.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    return float((results[0] - results[1]).abs().max())


def resume(case: str, stage: int, **extra) -> float:
    """Save after 4 steps, load into a fresh optimizer, 4 more steps: equal to 8 straight
    (across a projector refresh, at step 6)."""
    rank, _ = world()

    def train(model, opt, steps):
        for step in steps:
            loss_of(model, *batch(step, rank)).backward()
            opt.step()
            opt.zero_grad()

    model, _ = models()
    opt = _build(case, model, stage, **extra)
    train(model, opt, range(STEPS))
    straight = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    model, _ = models()
    opt = _build(case, model, stage, **extra)
    train(model, opt, range(4))
    blob = io.BytesIO()
    torch.save((model.state_dict(), opt.state_dict()), blob)
    del opt
    model, _ = models()
    opt = _build(case, model, stage, **extra)
    blob.seek(0)
    model_state, opt_state = torch.load(blob, weights_only=False)
    model.load_state_dict(model_state)
    opt.load_state_dict(opt_state)
    train(model, opt, range(4, STEPS))
    resumed = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    return float((straight - resumed).abs().max())


def layerwise_without_no_sync_is_refused() -> str:
    rank, _ = world()
    model, _ = models()
    opt = _build("galore_adamw", model, 2, optimizer="galore_adamw_layerwise")
    try:
        for micro in range(2):
            loss_of(model, *batch(0, rank, micro)).backward()
        opt.step()
    except RuntimeError as error:
        return str(error)
    return ""


def suite() -> dict:
    out = {}
    for stage in (1, 2):
        for case in CASES:
            out["ref", case, stage] = against_reference(case, stage)
        out["8bit", stage] = eight_bit_closeness(stage)
        out["8bit_fingerprint", stage] = eight_bit_fingerprint(stage)
        for case in ("galore_adamw", "galore_adafactor", "apollo_adamw"):
            out["layerwise", case, stage] = layerwise_accumulation(case, stage)
    for case in ("galore_adamw", "galore_adamw_8bit_32bit_states", "adafactor_fixed_lr",
                 "apollo_adamw"):
        out["resume", case] = resume(case, 2)
    out["resume", "galore_adamw_8bit"] = resume("galore_adamw_8bit_32bit_states", 2,
                                                min_8bit_size=128)
    out["layerwise_refused"] = layerwise_without_no_sync_is_refused()
    return out
