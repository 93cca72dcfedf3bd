"""Shared helpers for the benchmarks: the model, the timing loop, process launching, reporting.

Nothing here knows about a particular optimizer; the contenders live in the bench scripts.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import resource
import shlex
import socket
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

# --------------------------------------------------------------------------------------------
# Model and data


def build_model(layers: int, width: int, seed: int = 0) -> nn.Sequential:
    """`layers` x Linear(width, width) with a ReLU between them; identical on every rank."""
    torch.manual_seed(seed)
    mods: list[nn.Module] = []
    for i in range(layers):
        mods.append(nn.Linear(width, width))
        if i < layers - 1:
            mods.append(nn.ReLU())
    return nn.Sequential(*mods)


def make_batch(batch: int, width: int, rank: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed random (input, target) batch; each rank gets its own shard of the data."""
    g = torch.Generator().manual_seed(seed * 1000 + 1 + rank)
    return torch.randn(batch, width, generator=g), torch.randn(batch, width, generator=g)


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def tensor_bytes(tensors) -> int:
    """Bytes held by `tensors`, counting each distinct storage once."""
    seen, total = set(), 0
    for t in tensors:
        if not isinstance(t, torch.Tensor):
            continue
        key = (t.untyped_storage().data_ptr(), t.device)
        if key in seen:
            continue
        seen.add(key)
        total += t.untyped_storage().nbytes()
    return total


def optim_state_tensors(optimizer: torch.optim.Optimizer):
    """Every tensor in a torch.optim optimizer's `state` dict (exp_avg, exp_avg_sq, step...)."""
    for per_param in optimizer.state.values():
        yield from (v for v in per_param.values() if isinstance(v, torch.Tensor))


# --------------------------------------------------------------------------------------------
# What a contender hands back to the harness


@dataclass
class Runner:
    """One contender, set up on one rank.

    step():        forward + backward + optimizer step + zero_grad for one batch; returns the loss.
    state_bytes(): {"moments": bytes, "extra": bytes} of optimizer state held by this rank, read
                   after training (state is created lazily). "extra" is state beyond what the
                   update rule needs (e.g. an fp32 master copy of fp32 params).
    """

    step: Callable[[], torch.Tensor]
    state_bytes: Callable[[], dict]
    info: str = ""
    # Optional: {phase: [seconds per iteration, every iteration run]}, where a contender can
    # say where its time went (bench_zero's breakdown).
    phases: Callable[[], dict[str, list[float]]] | None = None


@dataclass
class Config:
    ranks: int = 2
    warmup: int = 3
    iters: int = 10
    threads: int = 1
    layers: int = 24
    width: int = 1024
    batch: int = 32
    lr: float = 1e-3
    seed: int = 0
    ds_optimizer: str = "torch"  # "torch": torch.optim.AdamW as client optimizer; "deepspeed": its own


def time_steps(runner: Runner, cfg: Config) -> tuple[list[float], list[float]]:
    """Run warmup + timed iterations, each bracketed by barriers. Returns (times, losses)."""
    times, losses = [], []
    for i in range(cfg.warmup + cfg.iters):
        dist.barrier()
        t0 = time.perf_counter()
        loss = runner.step()
        dist.barrier()
        elapsed = time.perf_counter() - t0
        losses.append(float(loss))
        if i >= cfg.warmup:
            times.append(elapsed)
    return times, losses


# --------------------------------------------------------------------------------------------
# Launching: each contender runs in its own fresh set of `ranks` processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, setup: Callable, cfg: Config, port: int, out_path: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(cfg.ranks),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(cfg.threads)
    dist.init_process_group("gloo", rank=rank, world_size=cfg.ranks)
    try:
        model = build_model(cfg.layers, cfg.width, cfg.seed)
        x, y = make_batch(cfg.batch, cfg.width, rank, cfg.seed)
        runner = setup(model, x, y, cfg)
        times, losses = time_steps(runner, cfg)
        result = dict(rank=rank, times=times, losses=losses, info=runner.info,
                      params=num_params(model), **runner.state_bytes())
        if runner.phases is not None:
            result["phases"] = {k: v[cfg.warmup:] for k, v in runner.phases().items()}
        gathered = [None] * cfg.ranks
        dist.all_gather_object(gathered, result)
        if rank == 0:
            Path(out_path).write_text(json.dumps(gathered))
    finally:
        dist.destroy_process_group()


def _busy_cpu_s() -> tuple[float, float]:
    """(CPU seconds the whole machine has been busy, CPU seconds used by our reaped children)."""
    busy = float("nan")
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = fields[3] + fields[4]  # idle + iowait
        busy = (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        pass
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return busy, ru.ru_utime + ru.ru_stime


def run_contender(setup: Callable, cfg: Config) -> dict:
    """Spawn cfg.ranks processes running `setup`'s contender; return the summary or the error.

    Also measures `other_cores`: the mean number of cores kept busy by processes other than
    this contender's during its run (0 on an otherwise idle machine).
    """
    with tempfile.TemporaryDirectory() as tmp:
        out_path = os.path.join(tmp, "result.json")
        t0, (busy0, ours0) = time.perf_counter(), _busy_cpu_s()
        try:
            mp.spawn(_worker, args=(setup, cfg, _free_port(), out_path), nprocs=cfg.ranks)
        except Exception as exc:  # a contender that fails must not stop the others
            msg = str(exc).strip().splitlines()
            tail = [line for line in msg if line.strip()][-1] if msg else repr(exc)
            traceback.print_exc()
            return dict(error=tail, wall_s=time.perf_counter() - t0)
        wall, (busy1, ours1) = time.perf_counter() - t0, _busy_cpu_s()
        per_rank = json.loads(Path(out_path).read_text())
    result = summarize(per_rank, wall)
    result["other_cores"] = max(0.0, ((busy1 - busy0) - (ours1 - ours0)) / wall)
    return result


def wait_for_idle(max_wait_s: float, threshold: float = 0.3, sample_s: float = 2.0) -> float:
    """Wait (up to max_wait_s) until other processes use under `threshold` cores; return that use."""
    t0 = time.perf_counter()
    while True:
        busy0, _ = _busy_cpu_s()
        time.sleep(sample_s)
        used = (_busy_cpu_s()[0] - busy0) / sample_s
        waited = time.perf_counter() - t0
        if used < threshold or waited >= max_wait_s:
            if waited > 1.5 * sample_s:
                print(f"   waited {waited:.0f} s for idle cores ({used:.2f} busy elsewhere now)", flush=True)
            return used


def run_all(setups: dict[str, Callable], cfg: Config, rounds: int = 1,
            wait_idle_s: float = 0.0) -> dict[str, dict]:
    """Run every contender `rounds` times, round-robin; keep each one's fastest round.

    Other work on the machine only ever slows a round down, so the fastest round is the one
    least disturbed. The 1-minute load average before each run is recorded to show how busy the
    machine was.
    """
    best: dict[str, dict] = {}
    for rnd in range(rounds):
        for name, setup in setups.items():
            print(f"== {name} (round {rnd + 1}/{rounds})", flush=True)
            if wait_idle_s > 0:
                wait_for_idle(wait_idle_s)
            r = run_contender(setup, cfg)
            if "error" in r:
                print(f"   FAILED: {r['error']}", flush=True)
            else:
                print(f"   {r['median_s']:.3f} s/iter (median), state {mib(r['moments'])} + "
                      f"{mib(r['extra'])} MiB/rank, loss {r['loss_first']:.4f} -> {r['loss_last']:.4f}, "
                      f"{r['wall_s']:.0f} s, other work on {r['other_cores']:.2f} cores", flush=True)
            prev = best.get(name)
            if prev is None or "error" in prev or ("error" not in r and r["median_s"] < prev["median_s"]):
                best[name] = r
    return best


def summarize(per_rank: list[dict], wall_s: float) -> dict:
    r0 = per_rank[0]
    # Per-iteration time is the slowest rank's (they are within barrier jitter of each other).
    iter_times = [max(ts) for ts in zip(*(r["times"] for r in per_rank))]
    # Phases: each rank's median, averaged over the ranks.
    phases = {k: statistics.fmean(statistics.median(r["phases"][k]) for r in per_rank)
              for k in r0["phases"]} if "phases" in r0 else None
    return dict(
        phases=phases,
        median_s=statistics.median(iter_times),
        mean_s=statistics.fmean(iter_times),
        moments=max(r["moments"] for r in per_rank),
        extra=max(r["extra"] for r in per_rank),
        loss_first=r0["losses"][0],
        loss_last=r0["losses"][-1],
        params=r0["params"],
        info=r0["info"],
        wall_s=wall_s,
    )


# --------------------------------------------------------------------------------------------
# Reporting


def machine_info() -> dict:
    cpu = platform.processor() or "unknown"
    try:
        text = Path("/proc/cpuinfo").read_text()
        m = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
        cpu = m.group(1).strip() if m else cpu
    except OSError:
        pass
    ram = "unknown"
    try:
        kb = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1))
        ram = f"{kb / 2**20:.1f} GiB"
    except (OSError, AttributeError):
        pass

    def version(pkg: str) -> str:
        try:
            return metadata.version(pkg)
        except metadata.PackageNotFoundError:
            return "not installed"

    return dict(cpu=cpu, cores=os.cpu_count(), ram=ram, python=platform.python_version(),
                torch=torch.__version__, deepspeed=version("deepspeed"),
                date=datetime.datetime.now().strftime("%Y-%m-%d %H:%M"))


def mib(nbytes: float) -> str:
    return f"{nbytes / 2**20:.1f}"


def write_section(path: Path, name: str, body: str, title: str = "# Benchmarks") -> None:
    """Replace the `<!-- name:start -->...<!-- name:end -->` section of `path` (or append it)."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{body.rstrip()}\n{end}"
    text = path.read_text() if path.exists() else f"{title}\n\n"
    if start in text and end in text:
        before, rest = text.split(start, 1)
        text = before + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def publish(report: str, out: str, name: str, lead: str = "\n") -> None:
    """Print `report` (after `lead`) and, unless `out` is '', write it as section `name` of `out`."""
    print(lead + report)
    if out:
        write_section(Path(out), name, report)
        print(f"\nwrote {out}")


def command_line() -> str:
    return shlex.join(["python"] + sys.argv)
