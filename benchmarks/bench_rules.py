"""Step time of every zeroopt update rule on the same shard, and what the trust ratios cost.

    python benchmarks/bench_rules.py [--ranks 2] [--iters 10] [--rounds 3] [--out docs/BENCHMARKS.md]
    python benchmarks/bench_rules.py --ranks 1 --layers 12    # one rank, 12.6M params

Same model as bench_zero.py (24 x Linear(1024, 1024), 25.2M fp32 params, 2 ranks, gloo, CPU);
``--ranks 1 --layers 12`` steps the same 12.6M-element shard on one rank alone (its own section
of BENCHMARKS.md). All rules run one after another in one set of processes, ``--rounds`` times
round-robin; each rule keeps its lowest medians. For each rule:

- *step*: ``opt.step()`` after backward (grad-norm all-reduce, the update, the param all-gather);
- *update*: the part of it that is the rule's own work: the whole-param statistics phase
  (LAMB/LARS norms, cautious counts) with its all-reduce, and the fused update (for rules that
  step whole matrices, CAME and AdaLomo, this rank's per-matrix steps; for LOMO, which steps
  as each bucket's gradient is harvested, that update wherever it runs);
- *update vs AdamW*: that, divided by AdamW's (torch's fused kernel) from the same run;
- *GB/s*: the bytes the update must move in one pass over this rank's shard (params read and
  written, gradients read, every state read and written once: 12 B per element plus twice
  ``state_bytes()``) over the update's time; *of copy*: that against the copy bandwidth of
  the same ranks copying as many fp32 values at once (read + written bytes), the floor;
- *stats all-reduce*: the one collective that carries every param's partial sums (2 x 48
  float64 for LAMB and LARS here), timed on its own.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)
sys.path.insert(1, os.path.dirname(_HERE))  # benchmark the zeroopt of this checkout
from _common import build_model, command_line, machine_info, make_batch, write_section  # noqa: E402

RULES = [
    ("adamw", {}), ("adam", {}), ("sgd", dict(momentum=0.9)), ("nesterov", {}),
    ("lion", {}), ("lamb", {}), ("lars", {}), ("adagrad", {}), ("rmsprop", {}),
    ("ademamix", {}), ("adamw", dict(cautious=True)), ("adamw", dict(adopt=True)),
    ("adamw", dict(grams=True)), ("lion", dict(cautious=True)),
    ("schedule_free_adamw", {}), ("schedule_free_radam", dict(silent_sgd_phase=False)),
    ("schedule_free_sgd", {}), ("stable_adamw", {}), ("grokadamw", {}),
    ("adamw_anyprecision", {}), ("lomo", {}), ("adalomo", {}), ("came", {}),
    ("adamw", dict(agr=True, orthograd=True, tam=True)), ("adamw", dict(spd=True)),
    ("adamw", dict(dynamic_weight_decay=True)),
]


def _median_time(fn, iters: int) -> float:
    times = []
    for _ in range(iters):
        dist.barrier()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _bench_rule(name: str, options: dict, args) -> dict:
    import zeroopt

    rank = dist.get_rank()
    model = build_model(args.layers, args.width)
    opt = zeroopt.ZeroOptimizer(model.parameters(), name, lr=1e-4, **options)
    x, y = make_batch(args.batch, args.width, rank)
    update_time = [0.0]

    def timed(fn):
        def wrapper(*a, **k):
            start = time.perf_counter()
            out = fn(*a, **k)
            update_time[0] += time.perf_counter() - start
            return out
        return wrapper

    opt._whole_param_statistics = timed(opt._whole_param_statistics)
    # The rule's own work: its fused step, or its per-matrix step for rules that step whole
    # matrices (CAME, AdaLomo).
    rule = opt.rule.__dict__
    opt.rule = opt.shard.rule = opt.shard.whole.rule = type(opt.rule)(**{
        **rule, "fused_step": timed(rule["fused_step"]),
        "tensor_step": rule["tensor_step"] and timed(rule["tensor_step"])})
    step_times, update_times = [], []
    for i in range(args.warmup + args.iters):
        update_time[0] = 0.0  # rules that step during backward (LOMO) count that update too
        F.mse_loss(model(x), y).backward()
        opt.grads.finish()  # time the step, not the tail of backward's reduction
        dist.barrier()
        start = time.perf_counter()
        opt.step()
        if i >= args.warmup:
            step_times.append(time.perf_counter() - start)
            update_times.append(update_time[0])
        opt.zero_grad()
    label = _label(name, options)
    one_pass = 12 * opt.layout.shard_numel + 2 * opt.state_bytes()
    return dict(rule=label, step=statistics.median(step_times),
                update=statistics.median(update_times), bytes=one_pass)


def _copy_bandwidth(numel: int) -> float:
    """Bytes/s (read + written) of ``dst.copy_(src)`` of ``numel`` fp32 values, every rank
    copying at once (as every rank steps at once): the median of 10."""
    src, dst = torch.randn(numel), torch.empty(numel)
    return 8 * numel / _median_time(lambda: dst.copy_(src), 10)


def _label(name: str, options: dict) -> str:
    return name + "".join(f" {k}" for k in options)


def _selected(only: str) -> list:
    """RULES, or those whose labels ``only`` lists (comma-separated), AdamW always first (the
    ratios' base)."""
    if not only:
        return RULES
    wanted = {label.strip() for label in only.split(",")}
    return [RULES[0]] + [rule for rule in RULES[1:] if _label(*rule) in wanted]


def _worker(rank: int, args, port: int, out_path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", rank=rank, world_size=args.ranks)
    shard = sum(p.numel() for p in build_model(args.layers, args.width).parameters())
    copy = _copy_bandwidth(shard // args.ranks)
    rules = _selected(args.only)
    rows = [_bench_rule(name, options, args) for name, options in rules]
    for _ in range(args.rounds - 1):  # round-robin: each rule keeps its lowest medians
        for row, (name, options) in zip(rows, rules):
            again = _bench_rule(name, options, args)
            row.update(step=min(row["step"], again["step"]),
                       update=min(row["update"], again["update"]))
    params = 2 * args.layers  # a weight and a bias per layer
    stats = torch.zeros(2, params, dtype=torch.float64)
    allreduce = _median_time(lambda: dist.all_reduce(stats), 50)
    if rank == 0:
        torch.save(dict(rows=rows, allreduce=allreduce, params=params, copy=copy), out_path)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", default="", help="comma-separated rule labels (AdamW is "
                        "always run); with it nothing is written unless --out is given")
    parser.add_argument("--out", default="docs/BENCHMARKS.md")
    args = parser.parse_args()
    if args.only and "--out" not in sys.argv:
        args.out = ""

    import socket
    import tempfile

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out_path = os.path.join(tempfile.mkdtemp(), "rules.pt")
    started = time.perf_counter()
    mp.spawn(_worker, args=(args, port, out_path), nprocs=args.ranks)
    result = torch.load(out_path)
    adamw = result["rows"][0]["update"]

    machine = machine_info()
    lines = [
        "## Update rules: step time on the same shard"
        + ("" if args.ranks == 2 else f", {args.ranks} rank(s)"),
        "",
        f"Machine: {machine['cpu']}, {machine['cores']} cores, {machine['ram']} RAM; torch "
        f"{machine['torch']}; {machine['date']}.",
        "",
        f"Command: `{command_line()}` (total {time.perf_counter() - started:.0f} s)",
        "",
        f"Model: {args.layers} x Linear({args.width}, {args.width}), fp32, {args.ranks} ranks, "
        f"gloo, CPU, {args.threads} thread(s) per rank; median of {args.iters} steps after "
        f"{args.warmup} warm-up, the lowest of {args.rounds} rounds run round-robin.",
        "",
        f"Copy bandwidth per rank, every rank copying at once: {result['copy'] / 1e9:.1f} GB/s.",
        "",
        "| rule | step (s) | update (s) | update vs AdamW | GB/s | of copy |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in result["rows"]:
        bandwidth = row["bytes"] / row["update"]
        lines.append(f"| {row['rule']} | {row['step']:.4f} | {row['update']:.4f} | "
                     f"{row['update'] / adamw:.2f} | {bandwidth / 1e9:.1f} | "
                     f"{bandwidth / result['copy']:.2f} |")
    lines += [
        "",
        f"The whole-param statistics all-reduce (LAMB/LARS norms, cautious counts: one "
        f"collective of 2 x {result['params']} float64 for all tensors together) takes "
        f"{result['allreduce'] * 1e3:.3f} ms on its own.",
        "",
        "*step* is `opt.step()` after backward's reduction has finished (grad-norm all-reduce, "
        "update, param all-gather); *update* is the rule's own part of it (the statistics phase "
        "with its all-reduce, and the fused update; CAME and AdaLomo: this rank's per-matrix "
        "steps, each matrix on the rank that owns it; LOMO: its update as each bucket is "
        "harvested). AdamW and Adam use torch's fused kernel; the element-wise rules run "
        "zeroopt's one-pass C kernels (zeroopt/kernels/); *GB/s* counts the bytes of one pass "
        "over the shard (12 B per element and each state read and written once), so a rule at "
        "the memory floor reads about 1.00 *of copy*.",
    ]
    print("\n".join(lines))
    if args.out:
        section = "bench_rules" if args.ranks == 2 else f"bench_rules_w{args.ranks}"
        write_section(Path(args.out), section, "\n".join(lines))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
