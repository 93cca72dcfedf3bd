"""An unchanged DeepSpeed config on every rank of a real gloo job (test_deepspeed_config.py holds
the assertions): configs/ds_zero2_adamw.json with zeroopt (a config dict, and the launcher's
args.deepspeed_config), with DeepSpeed alone (its own ZeRO-2 and FusedAdam), and the plain
ZeroOptimizer loop it maps to; a DeepSpeed Muon section likewise."""

from __future__ import annotations

import argparse
import copy
import json
import logging
from pathlib import Path

import torch

import zeroopt
from ranks.deepspeed import dataset, identical, join_deepspeed, loss_of, micro_step, mlp, rel_err

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "ds_zero2_adamw.json"
# What plan() maps the config's optimizer and zero_optimization to, written out by hand.
MAPPED = dict(stage=2, lr=0.001, betas=(0.8, 0.999), eps=1e-8, weight_decay=3e-7,
              bucket_numel=500_000_000)
WARMUP = dict(warmup_min_lr=0, warmup_max_lr=0.001, warmup_num_steps=1000)
MUON = {"train_micro_batch_size_per_gpu": 4, "gradient_clipping": 0.0, "steps_per_print": 10**9,
        "optimizer": {"type": "Muon", "params": {"lr": 0.02, "momentum": 0.9,
                                                  "weight_decay": 0.01, "adam_lr": 0.003}},
        "zero_optimization": {"stage": 2, "reduce_bucket_size": 200}}


class Records(logging.Handler):
    """The "zeroopt" logger's INFO records on this rank."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def suite(deepspeed_alone: bool = False) -> dict:
    """Every W = 2 case; ``deepspeed_alone`` adds DeepSpeed's own run of the config (its
    FusedAdam CPU op is compiled on a machine's first use, ~2 minutes: the slow tier)."""
    rank = join_deepspeed()
    config = json.loads(CONFIG.read_text())
    logger, records = logging.getLogger("zeroopt"), Records()
    logger.addHandler(records)
    logger.setLevel(logging.INFO)
    out = zero2_adamw(config, deepspeed_alone)
    out["info"] = [m for m in records.messages if "ignored" in m]
    logger.removeHandler(records)
    out["launcher"] = launcher_path(rank, out.pop("batches"), out.pop("module"))
    out["muon"] = muon(rank)
    return out


def zero2_adamw(config: dict, deepspeed_alone: bool) -> dict:
    """The config with zeroopt through its data loader; then a plain ZeroOptimizer loop with
    MAPPED, DeepSpeed's WarmupLR and clip_grad_norm_(1.0) on the batches zeroopt's loader gave
    (2 micro-batches a step, the loss divided by 2 as engine.backward divides it); with
    ``deepspeed_alone``, also the config with DeepSpeed alone (``deepspeed_alone_run``)."""
    from deepspeed.runtime.lr_schedules import WarmupLR

    ours, opt, loader, _ = zeroopt.deepspeed.initialize(
        model=mlp(), config=copy.deepcopy(config), training_data=dataset())
    # Each loader read to its end: a loader left mid-epoch shuts its workers down by timeout.
    batches = list(loader)
    lrs = stepped_lrs(ours, batches)
    out = deepspeed_alone_run(ours.module, config) if deepspeed_alone else {}
    plain = mlp()
    plain_opt = zeroopt.ZeroOptimizer(plain.parameters(), "adamw", **MAPPED)
    sched = WarmupLR(plain_opt, **WARMUP)
    for i, batch in enumerate(batches):
        (loss_of(plain, batch) / 2).backward()
        if i % 2 == 1:
            plain_opt.clip_grad_norm_(1.0)
            plain_opt.step()
            plain_opt.zero_grad()
            sched.step()
    group = opt.param_groups[0]
    return {**out, "identical_to_mapped": identical(ours.module, plain),
            "moved": rel_err(plain, mlp()), "lr": lrs,
            "steps": (ours.global_steps, len(batches)),
            "ids": [b[2].tolist() for b in batches],
            "optimizer": type(ours.optimizer).__name__,
            "settings": {"rule": opt.rule.name, "stage": opt.stage,
                         "bucket_numel": opt.layout.bucket_numel,
                         **{k: group[k] for k in ("betas", "eps", "weight_decay")}},
            "deepspeed_zero_stage": ours.zero_optimization_stage(),
            "batches": batches, "module": ours.module}


def stepped_lrs(engine, batches: list) -> list[float]:
    """Train ``engine`` on ``batches`` (one micro-step each); the LR of each optimizer step."""
    lrs = []
    for batch in batches:
        steps = engine.global_steps
        micro_step(engine, batch)
        if engine.global_steps > steps:  # an optimizer step happened
            lrs.append(engine.get_lr()[0])
    return lrs


def deepspeed_alone_run(module, config: dict) -> dict:
    """DeepSpeed alone on the same config (deepspeed.initialize builds its FusedAdam and its
    ZeRO-2), through its own data loader: its samples, LRs, and its params against
    ``module``'s (zeroopt's run)."""
    import deepspeed

    model = mlp()
    theirs, their_opt, their_loader, _ = deepspeed.initialize(
        model=model, model_parameters=model.parameters(), config=copy.deepcopy(config),
        training_data=dataset())
    their_batches = list(their_loader)
    return {"their_lr": stepped_lrs(theirs, their_batches),
            "rel_err_vs_deepspeed": rel_err(module, theirs.module),
            "their_steps": theirs.global_steps,
            "their_ids": [b[2].tolist() for b in their_batches],
            "their_optimizer": (type(their_opt).__name__,
                                type(getattr(their_opt, "optimizer", their_opt)).__name__),
            "their_zero_stage": theirs.zero_optimization_stage()}


def launcher_path(rank: int, batches: list, reference) -> dict:
    """The same config as DeepSpeed's launcher hands it over (args.deepspeed_config, a JSON
    path), trained on the same batches: bit-identical to the config-dict run."""
    args = argparse.Namespace(deepspeed_config=str(CONFIG), local_rank=rank)
    engine, opt, _, _ = zeroopt.deepspeed.initialize(args=args, model=mlp())
    for batch in batches:
        micro_step(engine, batch)
    return {"identical": identical(engine.module, reference), "stage": opt.stage,
            "args_untouched": args.deepspeed_config == str(CONFIG)}


def muon(rank: int) -> dict:
    """DeepSpeed's Muon section: the matrices get zeroopt's muon with the section's lr,
    momentum and weight_decay; the biases its AdamW half (adam_lr, MuonWithAuxAdam's betas
    (0.9, 0.95) and eps 1e-10, the shared weight_decay): bit-identical to a plain loop with
    ZeroOptimizer over those groups, written out by hand."""
    engine, opt, _, _ = zeroopt.deepspeed.initialize(model=mlp(), config=copy.deepcopy(MUON))
    model = mlp()
    matrices = [p for p in model.parameters() if p.dim() == 2]
    others = [p for p in model.parameters() if p.dim() < 2]
    plain = zeroopt.ZeroOptimizer(
        [{"params": matrices},
         {"params": others, "use_muon": False, "lr": 0.003, "betas": (0.9, 0.95), "eps": 1e-10,
          "weight_decay": 0.01}],
        "muon", stage=2, lr=0.02, momentum=0.9, weight_decay=0.01, bucket_numel=200)
    g = torch.Generator().manual_seed(rank)
    for _ in range(4):
        batch = (torch.randn(4, 16, generator=g), torch.randn(4, 8, generator=g), None)
        micro_step(engine, batch)
        loss_of(model, batch).backward()
        plain.step()
        plain.zero_grad()
    keys = ("use_muon", "lr", "momentum", "betas", "eps", "weight_decay")
    return {"identical": identical(engine.module, model), "moved": rel_err(model, mlp()),
            "groups": [{k: g[k] for k in keys if k in g} | {"shapes": [tuple(p.shape)
                                                                         for p in g["params"]]}
                       for g in opt.param_groups]}
