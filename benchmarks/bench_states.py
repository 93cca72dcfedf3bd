"""8-bit and paged optimizer states: step time and state bytes per rank, against bitsandbytes.

    python benchmarks/bench_states.py [--threads 1,2] [--iters 7] [--rounds 2] [--quick]

Model: 12 x nn.Linear(1024, 1024) with ReLU between (12.6M params: one rank's shard of
bench_zero's 25M model at W=2). Every weight has >= 4096 elements; the 12 biases (1024 each,
0.1% of the params) are under bitsandbytes' min_8bit_size and keep 32-bit states everywhere.

1. Step time, W=1 (no process group), in this process, per thread count: backward of a cheap
   loss, then `opt.step()` alone timed with perf_counter; best and median after warm-up. zeroopt
   adamw / adamw_8bit / paged_adamw_32bit / paged_adamw_8bit, against bitsandbytes AdamW8bit
   and PagedAdamW8bit and torch.optim.AdamW (fused, foreach). Ratios against bitsandbytes
   AdamW8bit and zeroopt adamw from the same run; where zeroopt's 8-bit step goes (cProfile).
2. Optimizer-state bytes per rank per param at W=1 and W=2 (gloo ranks, torch.multiprocessing
   spawn): `state_bytes()` (wherever the state lives) and `device_state_bytes()` (kept on the
   compute device), against bitsandbytes AdamW8bit unsharded (the sum of its state tensors).

Writes its section of docs/BENCHMARKS.md (`--out ''` only prints). About two minutes.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import resource
import statistics
import sys
import tempfile
import time
import warnings
from contextlib import nullcontext
from importlib import metadata
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)  # for _common
sys.path.insert(1, os.path.dirname(_HERE))  # benchmark the zeroopt of this checkout
import zeroopt  # noqa: E402
from _common import (_busy_cpu_s, _free_port, build_model, command_line, machine_info,  # noqa: E402
                     num_params, optim_state_tensors, tensor_bytes, wait_for_idle, write_section)

LAYERS, WIDTH, BATCH, LR = 12, 1024, 8, 1e-3
ANCHOR, BASE32 = "bnb AdamW8bit", "zeroopt adamw"

# --------------------------------------------------------------------------------------------
# Contenders: label -> function(model) -> optimizer


def _zeroopt(name):
    return lambda model: zeroopt.ZeroOptimizer(model.parameters(), optimizer=name, lr=LR)


def _bnb(cls_name):
    def make(model):
        import bitsandbytes as bnb
        return getattr(bnb.optim, cls_name)(model.parameters(), lr=LR)  # min_8bit_size 4096
    return make


def _torch(**kw):
    return lambda model: torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.01, **kw)


CONTENDERS = {
    "zeroopt adamw": _zeroopt("adamw"),
    "zeroopt adamw_8bit": _zeroopt("adamw_8bit"),
    "zeroopt paged_adamw_32bit": _zeroopt("paged_adamw_32bit"),
    "zeroopt paged_adamw_8bit": _zeroopt("paged_adamw_8bit"),
    "bnb AdamW8bit": _bnb("AdamW8bit"),
    "bnb PagedAdamW8bit": _bnb("PagedAdamW8bit"),
    "torch AdamW fused=True": _torch(fused=True),
    "torch AdamW foreach=True": _torch(foreach=True),
}

# --------------------------------------------------------------------------------------------
# 1. Step time


def _iterations(make, threads: int, n: int, dtype=torch.float32, around=None):
    """Yield (optimizer, seconds of opt.step()) for n iterations of backward + step;
    ``around(i)``, if given, is a context manager put around step i (a profiler)."""
    torch.set_num_threads(threads)
    model = build_model(LAYERS, WIDTH).to(dtype)
    x = torch.randn(BATCH, WIDTH, generator=torch.Generator().manual_seed(1)).to(dtype)
    opt = make(model)
    for i in range(n):
        model(x).float().square().mean().backward()  # the hooks of zeroopt take the grads here
        with around(i) if around else nullcontext():
            t0 = time.perf_counter()
            opt.step()
            seconds = time.perf_counter() - t0
        yield opt, seconds
        opt.zero_grad(set_to_none=True)


def time_step(make, threads: int, warmup: int, iters: int) -> dict:
    """best/median seconds of opt.step(), warnings raised, and cores busy elsewhere meanwhile."""
    busy0, self0, t0 = _busy_cpu_s()[0], _self_cpu_s(), time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.simplefilter("ignore", DeprecationWarning)  # bitsandbytes' import-time ones
        times = [dt for _, dt in _iterations(make, threads, warmup + iters)][warmup:]
    wall = time.perf_counter() - t0
    elsewhere = ((_busy_cpu_s()[0] - busy0) - (_self_cpu_s() - self0)) / wall
    notes = sorted({str(w.message).split(". ")[0] for w in caught})
    return dict(best=min(times), median=statistics.median(times), other=max(0.0, elsewhere),
                note="; ".join(notes))


def _self_cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def copy_bandwidth(threads: int, numel: int, iters: int = 7) -> float:
    """The machine's copy bandwidth (bytes/s: read + written) with ``threads`` threads: the
    median ``dst.copy_(src)`` of ``numel`` fp32 values, the floor a step's bandwidth is held
    to."""
    torch.set_num_threads(threads)
    src, dst = torch.randn(numel), torch.empty(numel)
    dst.copy_(src)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t0)
    return 8 * numel / statistics.median(times)


def step_bytes(label: str) -> int:
    """The bytes one AdamW step must move, passing over memory once: params read and written
    (8 B each), gradients read (4 B), each moment read and written: 8 B in fp32, 2 B in 8-bit
    plus 2 x 4 B of absmax per 256 values (params under min_8bit_size keep fp32 moments)."""
    total = 0
    for p in build_model(LAYERS, WIDTH).parameters():
        eight_bit = "8bit" in label and p.numel() >= 4096
        total += p.numel() * (12 + (2 * (2 + 8 / 256) if eight_bit else 16))
    return int(total)


def step_times(threads: int, args) -> dict[str, dict]:
    """Every contender, `rounds` times round-robin; each keeps its round of lowest median;
    ``"copy"`` holds the copy bandwidth measured in the same run."""
    best: dict[str, dict] = {"copy": {"bandwidth": 0.0}}
    for _ in range(args.rounds):
        if args.wait_idle:
            wait_for_idle(args.wait_idle)
        bandwidth = copy_bandwidth(threads, num_params(build_model(LAYERS, WIDTH)))
        best["copy"]["bandwidth"] = max(best["copy"]["bandwidth"], bandwidth)
        for label, make in CONTENDERS.items():
            if args.wait_idle:
                wait_for_idle(args.wait_idle)
            try:
                r = time_step(make, threads, args.warmup, args.iters)
            except Exception as exc:  # noqa: BLE001 - a contender that fails is a table row
                r = dict(error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:150]}")
            print(f"  {threads} thread(s) {label:<28} " + (r["error"] if "error" in r else
                  f"best {r['best']:.4f} s, median {r['median']:.4f} s, other {r['other']:.2f}"),
                  flush=True)
            prev = best.get(label)
            if prev is None or "error" in prev or ("error" not in r and r["median"] < prev["median"]):
                best[label] = r
    return best


def profile_8bit(threads: int = 1, warmup: int = 2, iters: int = 5, top: int = 6):
    """[(function, ms per step)] of zeroopt adamw_8bit's step() under cProfile, by own time."""
    prof = cProfile.Profile()
    for _ in _iterations(_zeroopt("adamw_8bit"), threads, warmup + iters,
                         around=lambda i: prof if i >= warmup else nullcontext()):
        pass
    rows = [(fn.strip("<>") if file == "~" else f"{Path(file).stem}.{fn}", own / iters * 1e3)
            for (file, _, fn), (_, _, own, _, _) in pstats.Stats(prof).stats.items()]
    return sorted(rows, key=lambda row: -row[1])[:top]


# --------------------------------------------------------------------------------------------
# 2. State bytes per rank

BYTES_ROWS = {  # label -> (zeroopt optimizer name, model dtype, target bytes/param at W)
    "zeroopt adamw": ("adamw", torch.float32, lambda w: 8 / w),
    "zeroopt adamw_8bit": ("adamw_8bit", torch.float32, lambda w: 2.03 / w),
    "zeroopt paged_adamw_32bit": ("paged_adamw_32bit", torch.float32, lambda w: 8 / w),
    "zeroopt paged_adamw_8bit": ("paged_adamw_8bit", torch.float32, lambda w: 2.03 / w),
    "zeroopt adamw_8bit, bf16 model": ("adamw_8bit", torch.bfloat16, lambda w: (2.03 + 4) / w),
}


def zeroopt_bytes() -> dict[str, tuple[int, int]]:
    """label -> (state_bytes, device_state_bytes) on this rank, after one step."""
    out = {}
    for label, (name, dtype, _) in BYTES_ROWS.items():
        opt, _ = next(_iterations(_zeroopt(name), 1, 1, dtype))
        out[label] = (opt.state_bytes(), opt.device_state_bytes())
    return out


def _bytes_rank(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        Path(out_dir, f"{rank}.json").write_text(json.dumps(zeroopt_bytes()))
    finally:
        dist.destroy_process_group()


def bytes_per_rank(world: int) -> dict[str, tuple[int, int]]:
    """zeroopt_bytes() at this world size, the largest over ranks."""
    if world == 1:
        return zeroopt_bytes()
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_bytes_rank, args=(world, _free_port(), tmp), nprocs=world)
        ranks = [json.loads(Path(tmp, f"{r}.json").read_text()) for r in range(world)]
    return {label: tuple(max(r[label][i] for r in ranks) for i in range(2)) for label in ranks[0]}


def bnb_bytes() -> int:
    """bitsandbytes AdamW8bit's state after one step: every tensor of its state, unsharded."""
    opt, _ = next(_iterations(_bnb("AdamW8bit"), 1, 1))
    return tensor_bytes(optim_state_tensors(opt))


# --------------------------------------------------------------------------------------------
# Report


def _ratio(a: dict, b: dict | None) -> str:
    return f"{a['median'] / b['median']:.2f}" if b and "median" in b else "n/a"


def time_table(threads: int, rows: dict[str, dict]) -> list[str]:
    copy = rows["copy"]["bandwidth"]
    lines = [f"Step time, {threads} thread(s); copy bandwidth {copy / 1e9:.1f} GB/s:", "",
             f"| contender | best s | median s | vs {ANCHOR} | vs {BASE32} | GB/s | of copy "
             "| cores busy elsewhere | notes |", "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for label, r in rows.items():
        if label == "copy":
            continue
        if "error" in r:
            lines.append(f"| {label} | failed: {r['error'].replace('|', '/')} ||||||||")
            continue
        bandwidth = step_bytes(label) / r["median"]
        lines.append(f"| {label} | {r['best']:.4f} | {r['median']:.4f} | "
                     f"{_ratio(r, rows.get(ANCHOR))} | {_ratio(r, rows.get(BASE32))} | "
                     f"{bandwidth / 1e9:.1f} | {bandwidth / copy:.2f} | "
                     f"{r['other']:.2f} | {r['note'].replace('|', '/')} |")
    ours, anchor = rows.get("zeroopt adamw_8bit", {}), rows.get(ANCHOR, {})
    if "median" in ours and "median" in anchor:
        lines += ["", f"zeroopt adamw_8bit's step is {anchor['median'] / ours['median']:.1f}x "
                      f"faster than {ANCHOR}'s (median; the target is at least 10x)."]
    return lines + [""]


def _cell(nbytes: int, params: int) -> str:
    return f"{nbytes / params:.3f} ({nbytes / 2**20:.1f})"


def bytes_table(per_world: dict[int, dict], anchor: int, params: int) -> list[str]:
    worlds = sorted(per_world)
    head = " | ".join(f"W={w} state | W={w} on device | W={w} target" for w in worlds)
    lines = [f"| contender | {head} | state vs {ANCHOR} at W={', '.join(map(str, worlds))} |",
             "|---|" + "---:|" * (3 * len(worlds) + 1)]
    for label, (_, _, target) in BYTES_ROWS.items():
        cells = []
        for w in worlds:
            state, device = per_world[w][label]
            cells += [_cell(state, params), _cell(device, params), f"{target(w):.3f}"]
        vs = ", ".join(f"{per_world[w][label][0] / anchor:.2f}" for w in worlds)
        lines.append(f"| {label} | {' | '.join(cells)} | {vs} |")
    same = f"{_cell(anchor, params)} | {_cell(anchor, params)} | 2.030"
    return lines + [f"| {ANCHOR} (unsharded) | {' | '.join(same for _ in worlds)} | "
                    f"{', '.join('1.00' for _ in worlds)} |"]


def render(times: dict, per_world: dict, anchor: int, profile: list, args, runtime: float) -> str:
    m = machine_info()
    try:
        bnb_version = metadata.version("bitsandbytes")
    except metadata.PackageNotFoundError:
        bnb_version = "not installed"
    model = build_model(LAYERS, WIDTH)
    params = num_params(model)
    small = sum(p.numel() for p in model.parameters() if p.numel() < 4096)
    lines = [
        "## 8-bit and paged states", "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['ram']} RAM; Python {m['python']}, torch "
        f"{m['torch']}, bitsandbytes {bnb_version} (CPU backend); {m['date']}.", "",
        f"Command: `{command_line()}` (total {runtime:.0f} s)", "",
        f"Model: {LAYERS} x Linear({WIDTH}, {WIDTH}) + ReLU, {params / 1e6:.2f}M fp32 params; "
        f"{small} of them ({100 * small / params:.2f}%: the biases, under min_8bit_size 4096) keep "
        "32-bit states in every 8-bit contender, bitsandbytes' included. AdamW lr=1e-3, "
        "weight_decay 0.01, W=1 (no process group). Only `opt.step()` is timed, after a backward "
        f"of a cheap loss (batch {BATCH}); {args.warmup} warm-up + {args.iters} timed steps"
        + (f", the lowest-median of {args.rounds} rounds run round-robin." if args.rounds > 1
           else "."), "",
    ]
    for threads, rows in times.items():
        lines += time_table(threads, rows)
    lines += [
        "*GB/s*: the bytes an AdamW step must move in one pass over memory (params read and "
        "written, gradients read, each moment read and written: 28 B per param in fp32, 16.06 B "
        "in 8-bit) over the median step; *of copy*: that against the copy bandwidth measured in "
        "the same run (`dst.copy_(src)` of as many fp32 values, read + written bytes), the floor "
        "of a memory-bound step. zeroopt's `step()` also agrees on the global gradient norm "
        "(`skip_nonfinite`) and publishes the params; on one rank backward stages the gradients "
        "straight into the shard and the norm's sum of squares is taken in that copy, so neither "
        "costs the step a pass. torch's and bitsandbytes' steps read `param.grad` directly. bitsandbytes' paged optimizers fall "
        "back to unpaged states on CPU (its warning is in *notes*). *cores busy elsewhere*: "
        "mean cores used by other processes while that contender ran (0 = idle machine).", "",
        "Where zeroopt adamw_8bit's step goes (cProfile, 1 thread, own time per step):", "",
        "| function | ms/step |", "|---|---:|",
        *[f"| `{name}` | {ms:.1f} |" for name, ms in profile], "",
        "Optimizer-state bytes per rank per model param (MiB per rank in brackets; the largest "
        "over ranks):", "",
        *bytes_table(per_world, anchor, params), "",
        "*state*: `ZeroOptimizer.state_bytes()`, the state the rank holds wherever it lives (8-bit "
        "codes + fp32 absmax per 256 values, 32-bit states of the small params, fp32 masters of a "
        "16-bit model). *on device*: `device_state_bytes()`, what stays on the compute device "
        "between steps: non-paged states, masters, and the fp32 windows the paged or 8-bit states "
        "are decoded into (2 x 256K x 4 bytes, the default CPU window). Paged CPU states live in "
        "an unlinked mmap file (page cache). *target*: 8/W (fp32 m, v), 2.03/W (two 8-bit "
        "moments: 2 + 2 x 4/256), (2.03 + 4)/W with an fp32 master of a bf16 model; the small "
        f"32-bit params add {8 * small / params:.3f}/W. {ANCHOR}: all of `optimizer.state` "
        "(codes, absmax, its two 256-entry qmaps per param, `step`), every rank holding all of it.",
    ]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", default="1,2", help="comma-separated torch thread counts")
    p.add_argument("--iters", type=int, default=7, help="timed steps per contender")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=1, help="round-robin rounds; lowest median kept")
    p.add_argument("--wait-idle", type=float, default=0, metavar="S",
                   help="before each contender, wait up to S s for other processes to leave the cores")
    p.add_argument("--quick", action="store_true", help="1 warm-up, 3 timed steps, 1 thread")
    p.add_argument("--out", default="docs/BENCHMARKS.md", help="markdown file to update ('' to skip)")
    args = p.parse_args()
    if args.quick:
        args.warmup, args.iters, args.rounds, args.threads = 1, 3, 1, "1"

    t0 = time.perf_counter()
    times = {n: step_times(n, args) for n in map(int, args.threads.split(","))}
    profile = profile_8bit()
    per_world = {w: bytes_per_rank(w) for w in (1, 2)}
    anchor = bnb_bytes()
    report = render(times, per_world, anchor, profile, args, time.perf_counter() - t0)
    print("\n" + report)
    if args.out:
        write_section(Path(args.out), "bench_states", report)
        print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
