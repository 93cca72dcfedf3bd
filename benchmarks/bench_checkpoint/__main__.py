"""Checkpointing a ZeRO-sharded AdamW: zeroopt against DeepSpeed ZeRO-1/2 and torch's ZeroRedundancyOptimizer.

    python benchmarks/bench_checkpoint [--rounds 3] [--reps 5] [--wait-idle 30] [--out docs/BENCHMARKS.md]

Model: 24 x nn.Linear(1024, 1024) with ReLU between (25.2M fp32 params, bench_zero.py's), MSE
loss on a fixed random batch per rank, AdamW(lr=1e-3), trained 2 steps at W=2 (gloo, CPU, one
thread per rank) so that every AdamW state exists. Then, per contender, in fresh processes:

1. W=2: save the model + optimizer ``--reps`` times (each to a fresh directory), train one more
   step (so the state in memory differs from the saved one), load ``--reps`` times; every save
   and load has a barrier before and after and counts the slowest rank. The state after the
   loads must equal the saved one (float64 sums of every param, exp_avg, exp_avg_sq, and step).
2. W=1: a fresh single-rank job (gloo, world size 1) loads the W=2 checkpoint ``--reps`` times
   into a fresh model and optimizer, and its state is checked against the saved one:
   - zeroopt: ``load_checkpoint`` directly (it reshards);
   - DeepSpeed: first a plain ``engine.load_checkpoint`` of the W=2 checkpoint (what happens is
     recorded), then DeepSpeed's route: ``deepspeed.checkpoint.ds_to_universal`` (run in-process,
     ``--inject_missing_state``, since a plain nn.Module has no universal-checkpoint info) and
     ``load_checkpoint`` with ``"checkpoint": {"load_universal": true}``;
   - torch ZeroRedundancyOptimizer: ``torch.load`` + ``load_state_dict`` of the W=2 consolidated
     dict; whatever happens (error, or loaded and right or wrong) is recorded.

Contenders: ``zeroopt1`` (zeroopt.save_checkpoint / load_checkpoint, stage 1), ``ds1`` / ``ds2``
(DeepSpeed ZeRO-1 / 2, ``engine.save_checkpoint`` / ``load_checkpoint``, torch.optim.AdamW as
client optimizer as in bench_zero.py), ``torch_zero`` (DDP + ZeroRedundancyOptimizer:
``consolidate_state_dict(to=0)`` + ``torch.save`` on rank 0 / every rank ``torch.load`` +
``load_state_dict``). Checkpoints go to a temporary directory on the same filesystem (``--dir``)
and are read back while still in the page cache, for every contender alike.

For zeroopt the time spent computing sha256 (manifest at save, verification at load) and in
``fsync`` is measured on its own by wrapping those calls; the same ``fsync`` wrapper runs in the
other contenders' processes.

Medians are over every save/load of every round (``--rounds`` rounds run round-robin, each
contender in fresh processes; ``--wait-idle S`` waits up to S seconds for idle cores before each
job, as in bench_zero.py).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

_BENCHMARKS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _BENCHMARKS)  # for _common and this package (run as a directory)
sys.path.insert(1, os.path.dirname(_BENCHMARKS))  # benchmark the zeroopt of this checkout
from _common import command_line, machine_info, publish  # noqa: E402
from bench_checkpoint.contenders import CONTENDERS, LAYERS  # noqa: E402
from bench_checkpoint.jobs import run_round  # noqa: E402
from bench_checkpoint.report import render  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--reps", type=int, default=3, help="saves and loads per job")
    p.add_argument("--rounds", type=int, default=2, help="rounds, round-robin; medians pool them all")
    p.add_argument("--layers", type=int, default=LAYERS,
                   help="Linear(1024, 1024) layers (smaller: a quick check)")
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS per rank")
    p.add_argument("--wait-idle", type=float, default=0, metavar="S",
                   help="before each job, wait up to S seconds for other processes to leave the cores")
    p.add_argument("--only", default=",".join(CONTENDERS),
                   help=f"comma-separated subset of: {', '.join(CONTENDERS)}")
    p.add_argument("--dir", default=None, help="where to write the checkpoints (default: a temp dir)")
    p.add_argument("--out", default="docs/BENCHMARKS.md", help="markdown file to update ('' to skip)")
    p.add_argument("--json", default="", metavar="PATH", help="also keep the raw results in PATH")
    p.add_argument("--render-from", default="", metavar="PATH",
                   help="no run: render the results that --json kept (with their command)")
    args = p.parse_args()

    if args.render_from:
        saved = json.loads(Path(args.render_from).read_text())
        report = render(saved["results"], argparse.Namespace(**saved["args"]), saved["machine"],
                        saved["runtime_s"], saved["command"])
        publish(report, args.out, "bench_checkpoint", lead="")
        return

    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONTENDERS]
    if unknown:
        p.error(f"unknown contender(s) {unknown}; choose from {list(CONTENDERS)}")
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

    root = tempfile.mkdtemp(prefix="bench_checkpoint-", dir=args.dir)
    t0 = time.perf_counter()
    results: dict = {}
    try:
        for rnd in range(args.rounds):
            run_round(names, args, root, rnd, results)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    runtime = time.perf_counter() - t0

    machine = machine_info()
    if args.json:
        Path(args.json).write_text(json.dumps(dict(results=results, args=vars(args), machine=machine,
                                                   runtime_s=runtime, command=command_line())))
    report = render(results, args, machine, runtime, command_line())
    publish(report, args.out, "bench_checkpoint")


if __name__ == "__main__":
    main()
