"""Muon under ZeRO: zeroopt against torch.optim.Muon + DDP and DeepSpeed's ZeRO-1/2 Muon.

    python benchmarks/bench_muon.py [--rounds 3] [--wait-idle 120] [--hybrid] [--out '']

One model for all: `--blocks` (6) residual blocks of bias-free Linear(d, d), Linear(d, f),
Linear(f, d) (d=256, f=1024: 18 matrices, 3.54M params), MSE on `--rows` (512) random rows per
rank; `--hybrid` adds an embedding, RMSNorms and a head (cross-entropy), those on AdamW.
At W = 1 and 2 (gloo, CPU, 1 thread a rank, fresh processes per contender): `ddp`
(torch.optim.Muon on every rank, DDP), `ds1`/`ds2` (DeepSpeed's Muon, ZeRO-1/2 with
`reduce_scatter: false`), `zeroopt1`/`zeroopt2` (ZeroOptimizer "muon"), all with lr 0.02,
momentum 0.95, nesterov, weight decay 0.1, lr x sqrt(max(1, rows/cols)), no clipping. Reports
the step time, the same forward + backward alone, Newton-Schulz calls and seconds per rank,
and Muon state bytes per rank per Muon param (NOTES says how). Writes its section of
docs/BENCHMARKS.md. About 2 minutes a round on 2 idle cores.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)  # for _common
sys.path.insert(1, os.path.dirname(_HERE))  # benchmark the zeroopt of this checkout
from _common import (command_line, machine_info, optim_state_tensors, publish,  # noqa: E402
                     tensor_bytes, wait_for_idle)

LR, ADAMW_LR, MOMENTUM, WEIGHT_DECAY, VOCAB = 0.02, 1e-3, 0.95, 0.1, 2048
NS = {"calls": 0, "seconds": 0.0}  # Newton-Schulz calls in this rank, and the time in them

# --------------------------------------------------------------------------------------------
# Model


class Stack(nn.Module):
    """`blocks` x (h + proj(h), then h + down(relu(up(h)))); with `hybrid`, an RMSNorm before
    each, between an embedding and an RMSNorm + output head."""

    def __init__(self, blocks: int, d: int, f: int, hybrid: bool):
        super().__init__()
        norm = (lambda: nn.RMSNorm(d)) if hybrid else nn.Identity
        self.hybrid = hybrid
        self.embed = nn.Embedding(VOCAB, d) if hybrid else None
        self.blocks = nn.ModuleList(nn.ModuleDict(dict(
            norm1=norm(), proj=nn.Linear(d, d, bias=False), norm2=norm(),
            up=nn.Linear(d, f, bias=False), down=nn.Linear(f, d, bias=False)))
            for _ in range(blocks))
        self.norm = nn.RMSNorm(d) if hybrid else None
        self.lm_head = nn.Linear(d, VOCAB, bias=False) if hybrid else None

    def forward(self, x):
        h = self.embed(x) if self.hybrid else x
        for b in self.blocks:
            h = h + b["proj"](b["norm1"](h))
            h = h + b["down"](F.relu(b["up"](b["norm2"](h))))
        return self.lm_head(self.norm(h)) if self.hybrid else h


def is_muon_matrix(name: str, p: torch.Tensor) -> bool:
    """DeepSpeed's own tagging rule (deepspeed.set_optimizer_flags), used for every contender."""
    return p.dim() >= 2 and not any(k in name.lower() for k in ("embed", "lm_head"))


def build(args, rank: int):
    torch.manual_seed(0)
    model = Stack(args.blocks, args.width, args.ffn, args.hybrid)
    g = torch.Generator().manual_seed(1 + rank)
    if args.hybrid:
        x = torch.randint(VOCAB, (args.rows,), generator=g)
        y = torch.randint(VOCAB, (args.rows,), generator=g)
        return model, x, y, F.cross_entropy
    x, y = torch.randn(args.rows, args.width, generator=g), torch.randn(args.rows, args.width, generator=g)
    return model, x, y, F.mse_loss


def counted(fn):
    """`fn`, adding its calls and seconds to NS."""
    def wrapper(*a, **k):
        t0 = time.perf_counter()
        out = fn(*a, **k)
        NS["calls"] += 1
        NS["seconds"] += time.perf_counter() - t0
        return out
    return wrapper


# --------------------------------------------------------------------------------------------
# Contenders: each builds its optimizer on one rank; returns (step() -> loss, state() -> dict)


def ddp_torch_muon(model, x, y, loss_fn, args):
    from torch.nn.parallel import DistributedDataParallel as DDP
    import torch.optim._muon as torch_muon  # torch's own module: its NS function is counted there

    torch_muon._zeropower_via_newtonschulz = counted(torch_muon._zeropower_via_newtonschulz)
    named = list(model.named_parameters())
    muon = torch.optim.Muon([p for n, p in named if is_muon_matrix(n, p)], lr=LR,
                            weight_decay=WEIGHT_DECAY, momentum=MOMENTUM)
    rest = [p for n, p in named if not is_muon_matrix(n, p)]
    opts = [muon] + ([torch.optim.AdamW(rest, lr=ADAMW_LR, weight_decay=WEIGHT_DECAY)] if rest else [])
    ddp = DDP(model)

    def step():
        loss = loss_fn(ddp(x), y)
        loss.backward()
        for opt in opts:
            opt.step()
            opt.zero_grad()
        return loss.detach()

    def state():
        return dict(muon=tensor_bytes(optim_state_tensors(muon)), extra=0,
                    total=tensor_bytes(t for o in opts for t in optim_state_tensors(o)))
    return step, state


def _deepspeed(model, x, y, loss_fn, args, stage):
    import deepspeed
    from deepspeed.runtime.zero.muon import muon_optimizer, original_muon

    # stage_1_and_2.get_flat_partition imports original_muon.muon_update at each call;
    # MuonWithAuxAdam.step (unused under ZeRO: its params are flat) holds its own reference.
    original_muon.muon_update = counted(original_muon.muon_update)
    muon_optimizer.muon_update = original_muon.muon_update
    config = {
        "train_micro_batch_size_per_gpu": args.rows,
        "gradient_accumulation_steps": 1,
        # reduce_scatter false: full gradients all-reduced, every rank holding a piece of a matrix
        # orthogonalizes all of it (DeepSpeed #7807, #8090)
        "zero_optimization": {"stage": stage, "reduce_scatter": False},
        "optimizer": {"type": "Muon", "params": {
            "muon_lr": LR, "adam_lr": ADAMW_LR, "momentum": MOMENTUM, "weight_decay": WEIGHT_DECAY,
            "betas": [0.9, 0.999], "eps": 1e-8}},
        "gradient_clipping": 0.0,  # its default, 1.0, clips the orthogonalized update
        "steps_per_print": 10**9,
    }
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                           config=config)
    zero = engine.optimizer

    def step():
        loss = loss_fn(engine(x), y)
        engine.backward(loss)
        engine.step()
        return loss.detach()

    def state():
        inner = zero.optimizer  # MuonWithAuxAdam over this rank's flat fp32 partitions
        muon_groups = [g for g in inner.param_groups if g.get("use_muon")]
        momentum = [inner.state[p]["momentum_buffer"] for g in muon_groups for p in g["params"]
                    if "momentum_buffer" in inner.state.get(p, {})]
        # DeepSpeed's staging copies of the momentum (a private attribute: read-only, measured)
        staged = [s for s, _ in getattr(zero, "_muon_pending_momentum", {}).values()]
        return dict(muon=tensor_bytes(momentum), staged=tensor_bytes(staged),
                    extra=tensor_bytes(zero.single_partition_of_fp32_groups),
                    total=tensor_bytes(optim_state_tensors(inner)))
    return step, state


def _zeroopt(model, x, y, loss_fn, args, stage):
    import zeroopt
    from zeroopt.algorithms import muon as zeroopt_muon

    zeroopt_muon.zeropower_via_newtonschulz = counted(zeroopt_muon.zeropower_via_newtonschulz)
    if args.hybrid:
        params = zeroopt.muon_param_groups(model, adamw_lr=ADAMW_LR, adamw_weight_decay=WEIGHT_DECAY)
    else:
        params = model.parameters()
    opt = zeroopt.ZeroOptimizer(params, "muon", stage=stage, lr=LR, momentum=MOMENTUM,
                                weight_decay=WEIGHT_DECAY)

    def step():
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss.detach()

    def state():
        # the Muon matrices' momentum lives with the whole params; AdamW's in the flat shard
        return dict(muon=int(opt.shard.whole.nbytes()), extra=0, total=int(opt.state_bytes()))
    return step, state


CONTENDERS = {
    "ddp": ("torch.optim.Muon + DDP", ddp_torch_muon),
    "ds1": ("DeepSpeed Muon ZeRO-1", lambda *a: _deepspeed(*a, stage=1)),
    "ds2": ("DeepSpeed Muon ZeRO-2", lambda *a: _deepspeed(*a, stage=2)),
    "zeroopt1": ("zeroopt muon stage 1", lambda *a: _zeroopt(*a, stage=1)),
    "zeroopt2": ("zeroopt muon stage 2", lambda *a: _zeroopt(*a, stage=2)),
}

# --------------------------------------------------------------------------------------------
# Running: one contender at one W, in fresh processes


def worker(rank: int, name: str, world: int, port: int, args, out_path: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model, x, y, loss_fn = build(args, rank)
        muon_params = sum(p.numel() for n, p in model.named_parameters() if is_muon_matrix(n, p))
        # The same forward + backward alone, on a copy without hooks, collectives or optimizer,
        # timed before each step (both see the same load): the part no optimizer changes
        plain = copy.deepcopy(model)
        step, state = CONTENDERS[name][1](model, x, y, loss_fn, args)
        times, fwd_bwd, calls, ns_s, losses = [], [], [], [], []
        for _ in range(args.warmup + args.iters):
            for timed in (lambda: loss_fn(plain(x), y).backward(), step):
                NS.update(calls=0, seconds=0.0)
                dist.barrier()
                t0 = time.perf_counter()
                out = timed()
                dist.barrier()
                (times if timed is step else fwd_bwd).append(time.perf_counter() - t0)
            plain.zero_grad(set_to_none=True)
            calls.append(NS["calls"])
            ns_s.append(NS["seconds"])
            losses.append(float(out))
        w = args.warmup
        result = dict(times=times[w:], fwd_bwd=fwd_bwd[w:], calls=calls[w:], ns_s=ns_s[w:],
                      losses=losses, muon_params=muon_params, **state())
        gathered = [None] * world
        dist.all_gather_object(gathered, result)
        if rank == 0:
            Path(out_path).write_text(json.dumps(gathered))
    finally:
        dist.destroy_process_group()
    # No interpreter finalization: there a gloo rank of torch 2.13 sometimes aborts after its
    # work is done ("terminate called without an active exception", examples/common.exit_now)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def busy_cpu_s() -> tuple[float, float]:
    """(CPU seconds the machine has been busy, CPU seconds of this process's reaped children)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    busy = (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return busy, ru.ru_utime + ru.ru_stime


def run(name: str, world: int, args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        t0, (busy0, ours0) = time.perf_counter(), busy_cpu_s()
        try:
            mp.spawn(worker, args=(name, world, free_port(), args, out), nprocs=world)
        except Exception as exc:  # one failing contender must not stop the others
            lines = [line for line in str(exc).splitlines() if line.strip()]
            return dict(error=lines[-1] if lines else repr(exc))
        ranks = json.loads(Path(out).read_text())
    wall, (busy1, ours1) = time.perf_counter() - t0, busy_cpu_s()
    per_step = [max(ts) for ts in zip(*(r["times"] for r in ranks))]  # the slowest rank
    return dict(median=statistics.median(per_step), wall=wall,
                fwd_bwd=statistics.median(max(ts) for ts in zip(*(r["fwd_bwd"] for r in ranks))),
                other=max(0.0, ((busy1 - busy0) - (ours1 - ours0)) / wall),
                calls=[statistics.median(r["calls"]) for r in ranks],
                ns_s=[statistics.median(r["ns_s"]) for r in ranks],
                muon=[r["muon"] for r in ranks], staged=[r.get("staged", 0) for r in ranks],
                extra=[r["extra"] for r in ranks], total=[r["total"] for r in ranks],
                muon_params=ranks[0]["muon_params"], loss=(ranks[0]["losses"][0], ranks[0]["losses"][-1]))


def run_all(names, args) -> dict:
    best: dict = {}
    for rnd in range(args.rounds):
        for world in args.worlds:
            for name in names:
                if args.wait_idle:
                    wait_for_idle(args.wait_idle)
                r = run(name, world, args)
                print(f"W={world} {name:<9} round {rnd + 1}: " + (f"FAILED {r['error']}" if "error" in r
                      else f"{r['median']:.4f} s/step ({r['fwd_bwd']:.4f} forward + backward), NS "
                      f"calls {[int(c) for c in r['calls']]} ({', '.join(f'{t:.3f}' for t in r['ns_s'])} s), loss {r['loss'][1]:.4f}, {r['wall']:.0f} s, "
                      f"other cores {r['other']:.2f}"), flush=True)
                key = (world, name)
                if key not in best or "error" in best[key] or (
                        "error" not in r and r["median"] < best[key]["median"]):
                    best[key] = r
    return best


# --------------------------------------------------------------------------------------------
# Report

NOTES = """\
- *s/step*: forward + backward + optimizer step, barriers before and after, slowest rank,
  median after warmup (which covers DeepSpeed's torch.compile of `muon_update`). *forward +
  backward alone*: the same on a copy of the model without hooks, collectives or optimizer,
  timed just before each step. *rest*: the difference (gradient averaging, update, getting the
  params to every rank). *vs DeepSpeed*: zeroopt's over DeepSpeed's, same stage and W.
- *NS calls per rank* (rank 0 / rank 1) of the {matrices} Muon matrices: DDP runs all on every
  rank, DeepSpeed every matrix with elements in the rank's flat partition (one cut by the
  boundary on both), zeroopt each once in the job. *s in NS*: seconds per step in those calls
  (DeepSpeed's `muon_update` includes its momentum update).
- *Muon state B/param*: momentum bytes on the rank holding most, over the model's Muon params
  (goal 4/W). DeepSpeed's momentum covers every whole matrix in its partition; it also keeps a
  staging copy (`_muon_pending_momentum`) and an fp32 copy of its partition of all the params
  (`single_partition_of_fp32_groups`) although they are fp32 (*staging*, *fp32 params*, per
  Muon param). zeroopt: the whole params' states (`opt.shard.whole.nbytes()`).
- Newton-Schulz: torch.optim.Muon and zeroopt in bfloat16 (torch's choice on every device; this
  CPU has AVX512-BF16); DeepSpeed's default "gram" method in fp16 where supported, else fp32, as
  here. Hence the slightly different losses. DeepSpeed's `gradient_clipping` defaults to 1.0
  here and clips the orthogonalized update: set to 0.0, as no other contender clips.
- *cores busy elsewhere*: mean cores other processes used during the run (0: idle). Each
  contender's fastest of `--rounds` rounds; compare ratios within one run.
"""


def summary(best: dict, args) -> list[str]:
    """Bullets comparing zeroopt with DeepSpeed at the largest W run (from the table's figures)."""
    world = max(args.worlds)
    ok = lambda name: (r := best.get((world, name))) is not None and "error" not in r
    lines = []
    for stage in (1, 2):
        z, d = best.get((world, f"zeroopt{stage}")), best.get((world, f"ds{stage}"))
        if ok(f"zeroopt{stage}") and ok(f"ds{stage}"):
            lines.append(
                f"- W={world}, stage {stage}: zeroopt's step {z['median']:.3f} s against DeepSpeed's "
                f"{d['median']:.3f} s, {z['median'] / d['median']:.2f}x (goal 0.6x); Newton-Schulz on "
                f"the busiest rank {max(z['ns_s']):.3f} s ({'/'.join(str(int(c)) for c in z['calls'])} "
                f"calls) against {max(d['ns_s']):.3f} s ({'/'.join(str(int(c)) for c in d['calls'])}), "
                f"{max(z['ns_s']) / max(d['ns_s']):.2f}x; the rest of the step "
                f"{z['median'] - z['fwd_bwd']:.3f} s against {d['median'] - d['fwd_bwd']:.3f} s, "
                f"{(z['median'] - z['fwd_bwd']) / (d['median'] - d['fwd_bwd']):.2f}x.")
    return lines + ([""] if lines else [])


def render(best: dict, names, args, runtime: float) -> str:
    m = machine_info()
    any_ok = next(r for r in best.values() if "error" not in r)
    n_muon = any_ok["muon_params"]
    matrices = 3 * args.blocks
    model = (f"{args.blocks} x [Linear({args.width}, {args.width}), Linear({args.width}, {args.ffn}), "
             f"Linear({args.ffn}, {args.width})] bias-free, residual ({matrices} matrices, "
             f"{n_muon / 1e6:.2f}M Muon params)")
    if args.hybrid:
        model += (f", between Embedding({VOCAB}, {args.width}) and RMSNorm + Linear({args.width}, "
                  f"{VOCAB}) head, RMSNorm before each sublayer (those on AdamW lr {ADAMW_LR}); "
                  f"cross-entropy on random tokens")
    else:
        model += "; MSE to a random target"
    lines = [
        "## Muon: zeroopt against torch.optim.Muon + DDP and DeepSpeed's ZeRO-1/2 Muon"
        + (" (hybrid: embedding, norms and head on AdamW)" if args.hybrid else ""), "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['ram']} RAM; Python {m['python']}, torch "
        f"{m['torch']}, deepspeed {m['deepspeed']}; {m['date']}.", "",
        f"Command: `{command_line()}` (total {runtime:.0f} s)", "",
        f"Model: {model}; {args.rows} rows per rank. Muon lr {LR}, momentum {MOMENTUM} "
        f"(nesterov), weight decay {WEIGHT_DECAY}, 5 Newton-Schulz steps, lr x sqrt(max(1, "
        f"rows/cols)). gloo, CPU, 1 thread per rank; {args.warmup} warmup + {args.iters} timed "
        f"steps, fastest median of {args.rounds} round(s).", "",
        "| contender | W | s/step (median) | vs DeepSpeed | forward + backward alone | rest "
        "| rest vs DeepSpeed | NS calls per rank | s in NS per rank | Muon state B/param "
        "(goal) | staging B/param | fp32 params B/param | loss first → last | cores busy "
        "elsewhere |",
        "|---|---:|---:|---:|---:|---:|---:|---|---|---:|---:|---:|---|---:|"]
    for world in args.worlds:
        for name in names:
            r = best.get((world, name))
            label = CONTENDERS[name][0]
            if r is None:
                continue
            if "error" in r:
                lines.append(f"| {label} | {world} | failed: {r['error'][:100].replace('|', '/')} "
                             "|||||||||||")
                continue
            ds = best.get((world, "ds" + name[-1])) if name.startswith("zeroopt") else None
            ds = ds if ds and "error" not in ds else None
            vs = f"{r['median'] / ds['median']:.2f}" if ds else "-"
            rest = r["median"] - r["fwd_bwd"]
            vs_rest = f"{rest / (ds['median'] - ds['fwd_bwd']):.2f}" if ds else "-"
            per = lambda key: (f"{max(r[key]) / n_muon:.2f}" if all(v is not None for v in r[key])
                               else "-")
            lines.append(
                f"| {label} | {world} | {r['median']:.4f} | {vs} | {r['fwd_bwd']:.4f} | {rest:.4f} "
                f"| {vs_rest} | "
                f"{' / '.join(str(int(c)) for c in r['calls'])} | "
                f"{' / '.join(f'{s:.3f}' for s in r['ns_s'])} | {per('muon')} ({4 / world:.0f}) | "
                f"{per('staged') if name.startswith('ds') else '-'} | "
                f"{per('extra') if name.startswith('ds') else '-'} | "
                f"{r['loss'][0]:.4f} → {r['loss'][1]:.4f} | {r['other']:.2f} |")
    lines += ["", *summary(best, args), NOTES.format(matrices=matrices)]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iters", type=int, default=8, help="timed steps per contender")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=1, help="round-robin rounds; lowest median kept")
    p.add_argument("--worlds", default="1,2", help="world sizes to run, comma-separated")
    p.add_argument("--blocks", type=int, default=6)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--ffn", type=int, default=1024)
    p.add_argument("--rows", type=int, default=512, help="rows (tokens) per rank per step")
    p.add_argument("--hybrid", action="store_true", help="add embedding, norms and head (AdamW)")
    p.add_argument("--wait-idle", type=float, default=0, metavar="S",
                   help="before each run, wait up to S s for other processes to leave the cores")
    p.add_argument("--only", default=",".join(CONTENDERS),
                   help=f"comma-separated subset of: {', '.join(CONTENDERS)}")
    p.add_argument("--out", default="docs/BENCHMARKS.md", help="markdown file to update ('' to skip)")
    args = p.parse_args()
    args.worlds = [int(w) for w in args.worlds.split(",")]
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONTENDERS]
    if unknown:
        p.error(f"unknown contender(s) {unknown}; choose from {list(CONTENDERS)}")
    os.environ["OMP_NUM_THREADS"] = "1"  # inherited by the spawned ranks
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    t0 = time.perf_counter()
    best = run_all(names, args)
    publish(render(best, names, args, time.perf_counter() - t0), args.out,
            "bench_muon_hybrid" if args.hybrid else "bench_muon")


if __name__ == "__main__":
    main()
