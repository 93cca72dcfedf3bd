"""What agreeing on the step's inputs costs: which params have gradients, and the grad norm.

    python benchmarks/bench_step_inputs.py [--ranks 2] [--iters 20] [--out docs/BENCHMARKS.md]

Same model as bench_zero.py (24 x Linear(1024, 1024), 25.2M fp32 params, gloo, CPU). Per rank,
after each backward, in one set of processes:

- *norm only*: what a step agreed on before per-param flags: this rank's sum of squares and
  one 1-element fp64 all-reduce (the non-finite check's norm);
- *settle*: ``zeroopt.step_inputs.settle``: the same norm plus one fp64 flag per bucket and per
  param in the same all-reduce, the scan for gradients assigned by hand, and the flags read back;
- *iteration*: forward + backward + ``opt.step()`` + ``zero_grad()``, with the optimizer's own
  settle inside.

The difference between the first two, as a share of an iteration, is what the torch.optim
semantics (params without gradients are not stepped) cost per step.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)
sys.path.insert(1, os.path.dirname(_HERE))  # benchmark the zeroopt of this checkout
from _common import build_model, command_line, machine_info, make_batch, publish  # noqa: E402


def _timed(fn) -> float:
    dist.barrier()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _worker(rank: int, args, port: int, out_path: str) -> None:
    import zeroopt
    from zeroopt.step_inputs import finish_norm, local_norm_part, settle

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", rank=rank, world_size=args.ranks)
    model = build_model(args.layers, args.width)
    opt = zeroopt.ZeroOptimizer(model.parameters(), "adamw", stage=args.stage, lr=1e-4)
    x, y = make_batch(args.batch, args.width, rank)
    no_frozen = torch.zeros(0, dtype=torch.float64)

    def norm_only():
        total = local_norm_part(opt.grads.shard, 2.0)
        opt.comm.all_reduce(total)
        finish_norm(total, 2.0)

    times = {"norm only": [], "settle": [], "iteration": []}
    for i in range(args.warmup + args.iters):
        F.mse_loss(model(x), y).backward()
        opt.grads.finish()  # backward's reductions are not what is timed
        spent = {"norm only": _timed(norm_only),
                 "settle": _timed(lambda: settle(opt.grads, opt.comm, 2.0, no_frozen))}
        opt.zero_grad()

        def iteration():
            F.mse_loss(model(x), y).backward()
            opt.step()
            opt.zero_grad()

        spent["iteration"] = _timed(iteration)
        if i >= args.warmup:
            for key, value in spent.items():
                times[key].append(value)
    if rank == 0:
        torch.save({k: statistics.median(v) for k, v in times.items()}
                   | {"slots": len(opt.layout.slots), "buckets": len(opt.layout.buckets)},
                   out_path)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--stage", type=int, default=2)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="docs/BENCHMARKS.md")
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out_path = os.path.join(tempfile.mkdtemp(), "step_inputs.pt")
    started = time.perf_counter()
    mp.spawn(_worker, args=(args, port, out_path), nprocs=args.ranks)
    r = torch.load(out_path)
    machine = machine_info()
    extra = r["settle"] - r["norm only"]
    lines = [
        "## Agreeing on the step's inputs: the cost of torch.optim's semantics",
        "",
        f"Machine: {machine['cpu']}, {machine['cores']} cores, {machine['ram']} RAM; torch "
        f"{machine['torch']}; {machine['date']}.",
        "",
        f"Command: `{command_line()}` (total {time.perf_counter() - started:.0f} s)",
        "",
        f"Model: {args.layers} x Linear({args.width}, {args.width}), fp32, AdamW, stage "
        f"{args.stage}, {args.ranks} ranks, gloo, CPU, {args.threads} thread(s) per rank; "
        f"medians of {args.iters} steps after {args.warmup} warm-up, rank 0. The flags: "
        f"{r['slots']} params + {r['buckets']} buckets, as fp64 beside the norm.",
        "",
        "| what | ms | share of an iteration |",
        "|---|---:|---:|",
        f"| norm only (before: one 1-element all-reduce) | {r['norm only'] * 1e3:.3f} | "
        f"{r['norm only'] / r['iteration']:.2%} |",
        f"| settle (norm + per-param and per-bucket flags, one all-reduce) | "
        f"{r['settle'] * 1e3:.3f} | {r['settle'] / r['iteration']:.2%} |",
        f"| **what the flags add** | **{extra * 1e3:.3f}** | **{extra / r['iteration']:.2%}** |",
        f"| iteration (forward + backward + step) | {r['iteration'] * 1e3:.1f} | 100% |",
        "",
        "Params without a gradient on any rank are not stepped (torch.optim's `grad is None`), "
        "so every rank must know which params have one: their flags ride in the all-reduce "
        "of the grad norm that the non-finite check makes anyway (`zeroopt/step_inputs.py`).",
    ]
    publish("\n".join(lines), args.out, "bench_step_inputs")


if __name__ == "__main__":
    main()
