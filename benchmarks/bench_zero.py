"""Compare ZeRO stage 1/2 optimizers on one model: DeepSpeed, torch's ZeroRedundancyOptimizer, zeroopt.

    python benchmarks/bench_zero.py [--ranks 2] [--iters N] [--out docs/BENCHMARKS.md]

Model: 24 x nn.Linear(1024, 1024) with ReLU between (~25M fp32 params), MSE loss on a fixed
random batch per rank, AdamW(lr=1e-3, torch defaults otherwise). Every contender runs in its own
fresh set of gloo/CPU processes, one after another, so they never compete for cores.

Per contender: time per iteration (forward + backward + step + zero_grad, barrier before and
after, slowest rank, after warmup) and the optimizer-state bytes this rank holds, against the
ideal of 8 * P / W bytes (AdamW's m and v for 1/W of the params; fp32 params need no master copy).
For zeroopt also where the iteration goes (forward, backward, step, and the time blocked on
reductions and gathers), and two floor rows: compute alone and communication alone.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)  # for _common
sys.path.insert(1, os.path.dirname(_HERE))  # benchmark the zeroopt of this checkout
from _common import (Config, Runner, command_line, machine_info, mib, num_params,  # noqa: E402
                     optim_state_tensors, run_all, tensor_bytes, write_section)

# --------------------------------------------------------------------------------------------
# Contenders. Each builds its optimizer around `model` on one rank and returns a Runner.


def _deepspeed(model, x, y, cfg: Config, stage: int) -> Runner:
    import deepspeed

    ds_config = {
        "train_micro_batch_size_per_gpu": cfg.batch,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": stage},
        # torch.optim.AdamW is not on DeepSpeed's list of ZeRO-tested optimizers.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }
    if cfg.ds_optimizer == "deepspeed":
        # DeepSpeed builds its own AdamW (FusedAdam; on the CPU accelerator, a JIT-built C++ op).
        ds_config["optimizer"] = {"type": "AdamW", "params": {"lr": cfg.lr, "weight_decay": 0.01}}
        engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                               config=ds_config)
    else:
        client_opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=client_opt, config=ds_config)

    def step():
        loss = F.mse_loss(engine(x), y)
        engine.backward(loss)
        engine.step()  # steps the inner optimizer and zeroes the grads
        return loss.detach()

    def state_bytes():
        zero_opt = engine.optimizer  # DeepSpeedZeroOptimizer
        return {
            # m, v (and `step`) of the inner AdamW, which sees only this rank's flat fp32 partition.
            "moments": tensor_bytes(optim_state_tensors(zero_opt.optimizer)),
            # The flat fp32 partition the inner AdamW steps: a clone of this rank's slice of the
            # params, kept even though the params are fp32 already.
            "extra": tensor_bytes(zero_opt.single_partition_of_fp32_groups),
        }

    inner = type(engine.optimizer.optimizer)
    return Runner(step, state_bytes, f"DeepSpeed {deepspeed.__version__}, {type(engine.optimizer).__name__}"
                                     f" over {inner.__module__}.{inner.__name__}")


def ds_zero1(model, x, y, cfg):
    return _deepspeed(model, x, y, cfg, stage=1)


def ds_zero2(model, x, y, cfg):
    return _deepspeed(model, x, y, cfg, stage=2)


def torch_zero_redundancy(model, x, y, cfg: Config) -> Runner:
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel as DDP

    # The pairing torch documents: DDP all-reduces the grads (bucketed, overlapping backward),
    # ZeroRedundancyOptimizer steps this rank's params and broadcasts them to the others.
    ddp = DDP(model)
    opt = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=torch.optim.AdamW, lr=cfg.lr)

    def step():
        loss = F.mse_loss(ddp(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss.detach()

    def state_bytes():
        return {"moments": tensor_bytes(optim_state_tensors(opt.optim)), "extra": 0}

    return Runner(step, state_bytes, "DDP + ZeroRedundancyOptimizer(torch.optim.AdamW)")


def ddp_adamw(model, x, y, cfg: Config) -> Runner:
    from torch.nn.parallel import DistributedDataParallel as DDP

    ddp = DDP(model)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, fused=True)

    def step():
        loss = F.mse_loss(ddp(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss.detach()

    def state_bytes():
        return {"moments": tensor_bytes(optim_state_tensors(opt)), "extra": 0}

    return Runner(step, state_bytes, "DDP + torch.optim.AdamW(fused=True), unsharded")


PHASES = ("forward", "backward", "reduction wait", "step", "gather wait")


def _zeroopt(model, x, y, cfg: Config, stage: int, overlap: bool | None = None) -> Runner:
    import zeroopt

    # No DDP: zeroopt reduces (reduce-scatters) and averages the grads itself.
    opt = zeroopt.ZeroOptimizer(model.parameters(), optimizer="adamw", stage=stage, lr=cfg.lr,
                                overlap_param_gather=overlap)
    phases = {name: [] for name in PHASES}

    def step():
        # Wall time of each part, less the time it sat blocked on communication
        # (opt.wait_seconds()), which goes to the two wait phases wherever it happened.
        marks = [(time.perf_counter(), opt.wait_seconds())]
        loss = F.mse_loss(model(x), y)
        marks.append((time.perf_counter(), opt.wait_seconds()))
        loss.backward()
        marks.append((time.perf_counter(), opt.wait_seconds()))
        opt.step()
        opt.zero_grad()
        marks.append((time.perf_counter(), opt.wait_seconds()))
        for name, (t0, w0), (t1, w1) in zip(("forward", "backward", "step"), marks, marks[1:]):
            phases[name].append(t1 - t0 - sum(w1.values()) + sum(w0.values()))
        (_, first), (_, last) = marks[0], marks[-1]
        phases["reduction wait"].append(last["reduction"] - first["reduction"])
        phases["gather wait"].append(last["gather"] - first["gather"])
        return loss.detach()

    def state_bytes():
        return {"moments": int(opt.state_bytes()), "extra": 0}

    how = "" if overlap is None else f", overlap_param_gather={overlap}"
    return Runner(step, state_bytes, f"zeroopt {getattr(zeroopt, '__version__', '')}{how}",
                  phases=lambda: phases)


def zeroopt_stage1(model, x, y, cfg):
    return _zeroopt(model, x, y, cfg, stage=1)


def zeroopt_stage2(model, x, y, cfg):
    return _zeroopt(model, x, y, cfg, stage=2)


def zeroopt_stage1_overlapped(model, x, y, cfg):
    return _zeroopt(model, x, y, cfg, stage=1, overlap=True)


# The floor: an iteration that hid all of its communication behind compute (or the reverse)
# can beat neither of these two.

def compute_only(model, x, y, cfg: Config) -> Runner:
    """Forward, backward and a fused AdamW step over 1/W of the params: every rank computes
    what a ZeRO rank computes, and nothing is communicated."""
    shard = torch.nn.Parameter(torch.zeros(-(-num_params(model) // cfg.ranks)))
    shard.grad = torch.randn_like(shard)
    opt = torch.optim.AdamW([shard], lr=cfg.lr, fused=True)

    def step():
        loss = F.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        model.zero_grad(set_to_none=True)
        return loss.detach()

    def state_bytes():
        return {"moments": tensor_bytes(optim_state_tensors(opt)), "extra": 0}

    return Runner(step, state_bytes, "forward + backward + AdamW(fused=True) on P/W params")


def communication_only(model, x, y, cfg: Config) -> Runner:
    """zeroopt's collectives of one step on its own buckets, with nothing else running: every
    gradient bucket reduced, then every param bucket gathered."""
    import zeroopt

    opt = zeroopt.ZeroOptimizer(model.parameters(), optimizer="adamw", lr=cfg.lr)
    buckets = opt.layout.buckets
    grads = [opt.comm.allocate(b.numel, torch.float32, torch.device("cpu")) for b in buckets]
    for g in grads:
        g.normal_()

    def step():
        for handle in [opt.comm.reduce_bucket(g) for g in grads]:
            handle.wait()
        for handle in [opt.comm.gather_bucket(opt.layout.bucket_view(b)) for b in buckets]:
            handle.wait()
        return torch.zeros(())

    def state_bytes():
        return {"moments": 0, "extra": 0}

    return Runner(step, state_bytes, f"zeroopt's {len(buckets)} reduce + {len(buckets)} gather "
                                     "bucket collectives")


# name -> (label in the table, setup function)
CONTENDERS = {
    "ds1": ("DeepSpeed ZeRO-1", ds_zero1),
    "ds2": ("DeepSpeed ZeRO-2", ds_zero2),
    "torch_zero": ("torch ZeroRedundancyOptimizer + DDP", torch_zero_redundancy),
    "zeroopt1": ("zeroopt stage 1", zeroopt_stage1),
    "zeroopt2": ("zeroopt stage 2", zeroopt_stage2),
    "zeroopt1_overlap": ("zeroopt stage 1, overlap_param_gather=True",
                         zeroopt_stage1_overlapped),
    "ddp": ("DDP + AdamW fused (unsharded reference)", ddp_adamw),
    "compute": ("floor: compute only", compute_only),
    "comm": ("floor: communication only", communication_only),
}
BASELINE = "ds1"
FLOOR = ("compute", "comm")

# --------------------------------------------------------------------------------------------
# Report

NOTES = """\
How the columns are counted:
- *s/iter*: forward + backward + optimizer step + zero_grad on one batch, with a barrier before
  and after; the slowest rank's time per iteration, median over the timed iterations (after
  warmup). *vs DS-1* divides by DeepSpeed ZeRO-1's median from the same run.
- *state MiB/rank*: bytes of the optimizer-state tensors the rank holds after training (the
  largest over ranks), counting each storage once. *m, v* is the update rule's own state;
  *extra* is state beyond it.
  - DeepSpeed: the tensors in the inner `torch.optim.AdamW`'s `state` (m, v and `step` of the
    flat fp32 partition it steps), plus, as *extra*, `single_partition_of_fp32_groups`: the fp32
    copy of this rank's partition of the params, which DeepSpeed keeps even for fp32 params.
    Gradient buffers (the averaged-gradient partition, ipg buckets) are not counted.
  - torch ZeroRedundancyOptimizer: the tensors in `optimizer.optim.state` on that rank (it
    assigns whole parameters to ranks, so a rank's share depends on how the tensors pack).
  - zeroopt: `ZeroOptimizer.state_bytes()` as reported by the library.
  - DDP + AdamW: all of `optimizer.state` (every rank holds everything).
- *ideal*: 8 * P / W bytes (m and v in fp32 for 1/W of the params; no master copy is needed
  because the params are fp32). *vs ideal* = (m, v + extra) / ideal.
- *loss*: rank 0's loss at the first and last iteration, a sanity check that every contender
  trains the same model the same way (same data, seed and hyperparameters).
- *vs DDP*: against DDP + `torch.optim.AdamW(fused=True)` of the same run. *vs floor*: against
  the larger of the two floor rows, which a perfectly overlapped iteration can beat neither of:
  *compute only* runs every rank's forward, backward and a fused AdamW step over P/W params
  with no communication at all; *communication only* runs zeroopt's reduce and gather of
  every bucket of one step (the same collectives, buckets and transport) with nothing else.
- *Where zeroopt's iteration goes*: `ZeroOptimizer.wait_seconds()` before and after each
  part. A wait is the time a rank is blocked in a collective's `wait()`, which on the shared
  memory transport includes the reading rank's own copy or sum of its peers' chunks (that work
  is done by the waiting rank, not by a background engine).
- Threads: OMP_NUM_THREADS / torch.set_num_threads per rank, given in the command line.
- DeepSpeed on CPU: `DS_ACCELERATOR=cpu`; its comm backend falls back to gloo when oneCCL is
  not installed; config `zero_optimization.stage` 1 or 2 with everything else at its defaults,
  `zero_allow_untested_optimizer: true` (needed for a client `torch.optim.AdamW`). At start-up it
  JIT-builds `deepspeed_shm_comm_op` (needs a C++ compiler; cached afterwards); ZeRO's own
  collectives still go through gloo.
"""


def _ratio(r: dict, anchor: dict | None) -> str:
    return f"{r['median_s'] / anchor['median_s']:.2f}" if anchor and "median_s" in anchor else "n/a"


def render(results: dict, cfg: Config, machine: dict, runtime_s: float, rounds: int) -> str:
    params = next((r["params"] for r in results.values() if "params" in r), 0)
    ideal = 8 * params / cfg.ranks
    base, ddp = results.get(BASELINE), results.get("ddp")
    floors = [results[n] for n in FLOOR if "median_s" in results.get(n, {})]
    floor = max(floors, key=lambda r: r["median_s"]) if len(floors) == len(FLOOR) else None
    lines = [
        "## ZeRO optimizers: time per iteration and optimizer state per rank",
        "",
        f"Machine: {machine['cpu']}, {machine['cores']} cores, {machine['ram']} RAM; "
        f"Python {machine['python']}, torch {machine['torch']}, deepspeed {machine['deepspeed']}; "
        f"{machine['date']}.",
        "",
        f"Command: `{command_line()}` (total {runtime_s:.0f} s)",
        "",
        f"Model: {cfg.layers} x Linear({cfg.width}, {cfg.width}) + ReLU, {params / 1e6:.2f}M fp32 "
        f"params, batch {cfg.batch} per rank, MSE loss, AdamW lr={cfg.lr}. {cfg.ranks} ranks, gloo, "
        f"CPU, {cfg.threads} thread(s) per rank, {cfg.warmup} warmup + {cfg.iters} timed iterations"
        + (f"; fastest of {rounds} rounds run round-robin." if rounds > 1 else "."),
        "",
        "*cores busy elsewhere*: the mean number of cores other processes used during that run "
        "(0 = the machine was idle apart from this benchmark; more means shared cores and "
        "slower, noisier times). *floor*: the larger of the two floor rows"
        + (f" ({floor['median_s']:.3f} s)" if floor else "") + ".",
        "",
        "| contender | s/iter (median) | s/iter (mean) | vs DS-1 | vs DDP | vs floor "
        "| m, v MiB/rank | extra MiB/rank | ideal MiB | vs ideal | loss first → last "
        "| cores busy elsewhere |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for name, r in results.items():
        label = CONTENDERS[name][0]
        if "error" in r:
            lines.append(f"| {label} | failed: {r['error'][:120].replace('|', '/')} ||||||||||| |")
            continue
        total = r["moments"] + r["extra"]
        state = (f"{mib(r['moments'])} | {mib(r['extra'])} | {mib(ideal)} | {total / ideal:.2f}"
                 if name not in FLOOR else "- | - | - | -")
        lines.append(
            f"| {label} | {r['median_s']:.3f} | {r['mean_s']:.3f} | {_ratio(r, base)} "
            f"| {_ratio(r, ddp)} | {_ratio(r, floor)} | {state} "
            f"| {r['loss_first']:.4f} → {r['loss_last']:.4f} | {r['other_cores']:.2f} |")
    broken = {n: r for n, r in results.items() if r.get("phases")}
    if broken:
        lines += ["", "**Where zeroopt's iteration goes** (ms; each rank's median per phase, "
                  "averaged over the ranks). *reduction wait* and *gather wait* are the time "
                  "blocked on communication (`ZeroOptimizer.wait_seconds()`), wherever it "
                  "happened; forward, backward and step are their wall time less that:", "",
                  "| contender | " + " | ".join(PHASES) + " | sum | s/iter |",
                  "|---|" + "---:|" * (len(PHASES) + 2)]
        for name, r in broken.items():
            ms = [1e3 * r["phases"][p] for p in PHASES]
            lines.append(f"| {CONTENDERS[name][0]} | " + " | ".join(f"{v:.1f}" for v in ms)
                         + f" | {sum(ms):.1f} | {1e3 * r['median_s']:.1f} |")
    lines += ["", "Implementations: " + "; ".join(
        f"{CONTENDERS[n][0]}: {r['info']}" for n, r in results.items() if r.get("info")) + ".", "",
        NOTES]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--iters", type=int, default=10, help="timed iterations per contender")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS per rank")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--ds-optimizer", choices=["torch", "deepspeed"], default="torch",
                   help="DeepSpeed's inner optimizer: torch.optim.AdamW passed in (default; the same "
                        "update code as the torch contenders) or DeepSpeed's own AdamW from the config")
    p.add_argument("--rounds", type=int, default=1,
                   help="run all contenders this many times round-robin and keep each one's fastest "
                        "round (robust to other load on the machine)")
    p.add_argument("--wait-idle", type=float, default=0, metavar="S",
                   help="before each run, wait up to S seconds for other processes to leave the cores")
    p.add_argument("--only", default=",".join(CONTENDERS),
                   help=f"comma-separated subset of: {', '.join(CONTENDERS)}")
    p.add_argument("--out", default="docs/BENCHMARKS.md", help="markdown file to update ('' to skip)")
    args = p.parse_args()

    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONTENDERS]
    if unknown:
        p.error(f"unknown contender(s) {unknown}; choose from {list(CONTENDERS)}")
    cfg = Config(ranks=args.ranks, iters=args.iters, warmup=args.warmup, threads=args.threads,
                 batch=args.batch, ds_optimizer=args.ds_optimizer)

    # Inherited by the spawned ranks (they import torch and deepspeed fresh).
    os.environ["OMP_NUM_THREADS"] = str(cfg.threads)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

    t0 = time.perf_counter()
    results = run_all({n: CONTENDERS[n][1] for n in names}, cfg, rounds=args.rounds,
                      wait_idle_s=args.wait_idle)
    runtime = time.perf_counter() - t0

    report = render(results, cfg, machine_info(), runtime, args.rounds)
    print("\n" + report)
    if args.out:
        write_section(Path(args.out), "bench_zero", report)
        print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
