"""What the example scripts (train_gpt.py, pretrain_llama.py) share: the config and its
command-line overrides, averaging over ranks, a digest of the params, the LR schedule, and a
clean exit."""
import argparse
import hashlib
import json
import math
import os
import sys

import torch

import zeroopt

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp64": torch.float64}


def parse_config(argv, default_config, description: str, add_arguments=lambda parser: None):
    """Load --config (JSON), then let --<key> VALUE override any key in it; check the keys
    both examples have. Returns (cfg, parsed args, parser) for the script's own checks."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=str(default_config))
    known, _ = pre.parse_known_args(argv)
    with open(known.config) as f:
        cfg = json.load(f)

    parser = argparse.ArgumentParser(description=description, parents=[pre])
    add_arguments(parser)
    for key, value in cfg.items():
        kind = type(value)  # an override has the type of the config's value
        if kind is bool:
            kind = lambda s: s.lower() in ("1", "true", "yes")  # noqa: E731
        elif kind is int:
            kind = lambda s: int(float(s))  # noqa: E731  (accepts 1e3)
        parser.add_argument(f"--{key}", type=kind, default=value, metavar=type(value).__name__)
    args = parser.parse_args(argv)
    cfg = {key: getattr(args, key) for key in cfg}

    for key in ("steps", "batch_size", "grad_accum", "log_interval", "eval_batches"):
        if cfg[key] < 1:
            parser.error(f"--{key} must be at least 1, got {cfg[key]}")
    if cfg["dtype"] not in DTYPES:
        parser.error(f"--dtype must be one of {sorted(DTYPES)}, got {cfg['dtype']!r}")
    if cfg["optimizer"] not in zeroopt.available_optimizers():
        parser.error(f"--optimizer {cfg['optimizer']!r} is not in zeroopt: "
                     f"choose one of {zeroopt.available_optimizers()}")
    return cfg, args, parser


def mean_over_ranks(comm, t: torch.Tensor) -> torch.Tensor:
    """Average over ranks (SUM then divide: gloo has no AVG), in fp64 so the mean does not
    depend on the order of the sum."""
    t = t.double()
    comm.all_reduce(t)
    return t / comm.world_size


def params_digest(model) -> str:
    """SHA-256 of the params' bytes: two ranks (or runs) hold the same model iff they match."""
    digest = hashlib.sha256()
    for p in model.parameters():
        digest.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def lr_lambda(cfg):
    """Multiplier on the base lr: linear warmup, then cosine decay to min_lr_ratio."""
    warmup, total, floor = cfg["warmup_steps"], cfg["steps"], cfg["min_lr_ratio"]

    def f(step):  # step = optimizer steps taken so far
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return f


def exit_now() -> None:
    """Leave without interpreter finalization: with torch 2.13 and gloo, about 1 exit in 8
    aborted there ("terminate called without an active exception", a C++ thread destroyed
    during static destruction), after the work was done and saved. Nothing is left to run."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
