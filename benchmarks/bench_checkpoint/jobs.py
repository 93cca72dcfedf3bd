"""The jobs of bench_checkpoint.py: the W=2 save/load job and the W=1 (resharding) load job, each
spawned in fresh processes, and a round that runs both for every contender."""

from __future__ import annotations

import json
import os
import shutil
import statistics
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# benchmarks/ is on sys.path (bench_checkpoint/__main__.py puts it there), as for the other benchmarks
from _common import _busy_cpu_s, _free_port, build_model, make_batch, num_params, wait_for_idle

from .contenders import BATCH, CONTENDERS, TRAIN_STEPS, WIDTH, DeepSpeedSide, ds_universal_convert
from .measure import compare, dir_bytes, instrument_fsync, timed

# --------------------------------------------------------------------------------------------
# Workers


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:400]}"


def _init(rank: int, world: int, port: int, threads: int) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    instrument_fsync()


def _gather(obj):
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def worker_w2(rank: int, task: dict) -> None:
    """Train 2 steps at W=2, save `reps` times, perturb, load `reps` times, check the state."""
    _init(rank, task["world"], task["port"], task["threads"])
    try:
        model = build_model(task["layers"], WIDTH)
        x, y = make_batch(BATCH, WIDTH, rank)
        side = CONTENDERS[task["name"]][1](model, x, y)
        for _ in range(TRAIN_STEPS):
            side.step()
        saved = side.fingerprint()
        saves, loads, path = [], [], None
        for i in range(task["reps"]):
            prev, path = path, os.path.join(task["dir"], f"{task['name']}-{i}")
            saves.append(timed(lambda: side.save(path)))
            dist.barrier()
            if rank == 0 and prev is not None:
                shutil.rmtree(prev)
        nbytes, nfiles = dir_bytes(path) if rank == 0 else (0, 0)
        side.step()  # the state in memory now differs from the saved one
        moved = side.fingerprint()
        for _ in range(task["reps"]):
            loads.append(timed(lambda: side.load(path)))
        loaded = side.fingerprint()
        per_rank = _gather(dict(saves=saves, loads=loads))
        if rank == 0:
            result = dict(per_rank=per_rank, path=path, bytes=nbytes, files=nfiles, saved_fp=saved,
                          moved=compare(moved, saved), loaded=compare(loaded, saved),
                          info=getattr(side, "info", ""), params=num_params(model))
            Path(task["out"]).write_text(json.dumps(result))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def worker_w1(rank: int, task: dict) -> None:
    """Load the W=2 checkpoint at W=1, `reps` times, into a fresh model and optimizer."""
    _init(rank, 1, task["port"], task["threads"])
    result: dict = {}
    try:
        name, path = task["name"], task["path"]
        x, y = make_batch(BATCH, WIDTH, 0)
        if name.startswith("ds"):
            if task["try_plain"]:
                # A plain load of the W=2 checkpoint at W=1, to record what DeepSpeed does.
                side = CONTENDERS[name][1](build_model(task["layers"], WIDTH, seed=1), x, y)
                try:
                    side.load(path)
                    result["plain"] = dict(loaded=True, fp=side.fingerprint())
                except Exception as exc:  # noqa: BLE001 - recorded, not hidden
                    traceback.print_exc()
                    result["plain"] = dict(loaded=False, error=_short(exc))
                del side
            t0 = time.perf_counter()
            try:
                universal = ds_universal_convert(path, DeepSpeedSide.TAG)
            except Exception as exc:  # noqa: BLE001
                traceback.print_exc()
                result["convert_error"] = _short(exc)
                Path(task["out"]).write_text(json.dumps(result))
                return
            result["convert_s"] = time.perf_counter() - t0
            result["universal_bytes"], result["universal_files"] = dir_bytes(universal)
            side = CONTENDERS[name][1](build_model(task["layers"], WIDTH, seed=1), x, y, universal=True)
            tag = os.path.basename(universal)
            load = lambda: side.load(path, tag=tag)  # noqa: E731
        else:
            side = CONTENDERS[name][1](build_model(task["layers"], WIDTH, seed=1), x, y)
            load = lambda: side.load(path)  # noqa: E731
        loads = []
        try:
            for _ in range(task["reps"]):
                loads.append(timed(load))
            result["fp"] = side.fingerprint()
        except Exception as exc:  # noqa: BLE001
            traceback.print_exc()
            result["error"] = _short(exc)
        result["loads"] = loads
        Path(task["out"]).write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def spawn(fn, task: dict, nprocs: int) -> dict:
    """Run `fn` on `nprocs` fresh processes; its JSON result, or the error; other cores' use."""
    with tempfile.TemporaryDirectory() as tmp:
        task = dict(task, out=os.path.join(tmp, "result.json"), port=_free_port())
        t0, (busy0, ours0) = time.perf_counter(), _busy_cpu_s()
        try:
            mp.spawn(fn, args=(task,), nprocs=nprocs)
            result = json.loads(Path(task["out"]).read_text())
        except Exception as exc:  # noqa: BLE001 - one failure must not stop the others
            traceback.print_exc()
            lines = [ln for ln in str(exc).splitlines() if ln.strip()]
            error = lines[-1] if lines else repr(exc)
            if os.path.isfile(task["out"]):  # rank 0 wrote every figure, then a process died
                result = json.loads(Path(task["out"]).read_text())
                result["exit_error"] = error
            else:
                result = dict(error=error)
        wall, (busy1, ours1) = time.perf_counter() - t0, _busy_cpu_s()
    result["wall_s"] = wall
    result["other_cores"] = max(0.0, ((busy1 - busy0) - (ours1 - ours0)) / wall)
    return result


# --------------------------------------------------------------------------------------------
# Driver


def slowest(per_rank: list[dict], key: str) -> list[dict]:
    """Per call: the slowest rank's time, with the largest hash/fsync time over the ranks."""
    out = []
    for calls in zip(*(r[key] for r in per_rank)):
        out.append(dict(s=max(c["s"] for c in calls), hash_s=max(c["hash_s"] for c in calls),
                        dcp_s=max(c["dcp_s"] for c in calls),
                        fsync_s=max(c["fsync_s"] for c in calls),
                        fsync_n=sum(c["fsync_n"] for c in calls),
                        hash_bytes=sum(c["hash_bytes"] for c in calls)))
    return out


def run_round(names, args, root, rnd, results):
    for name in names:
        acc = results.setdefault(name, dict(saves=[], loads=[], w1_loads=[], convert_s=[], other=[],
                                            failures=[]))
        print(f"== {name} (round {rnd + 1}/{args.rounds}): W={args.ranks} save/load", flush=True)
        if args.wait_idle > 0:
            wait_for_idle(args.wait_idle)
        task = dict(name=name, world=args.ranks, threads=args.threads, reps=args.reps, dir=root,
                    layers=args.layers)
        r2 = spawn(worker_w2, task, args.ranks)
        acc["other"].append(r2["other_cores"])
        if "error" in r2:
            print(f"   FAILED: {r2['error']}", flush=True)
            acc.setdefault("error", r2["error"])
            acc["failures"].append(f"round {rnd + 1}, W={args.ranks} job: {r2['error']} (no results)")
            continue
        if "exit_error" in r2:
            acc["failures"].append(f"round {rnd + 1}, W={args.ranks} job: {r2['exit_error']} after it "
                                   "had written all its results (kept)")
        acc["saves"] += slowest(r2["per_rank"], "saves")
        acc["loads"] += slowest(r2["per_rank"], "loads")
        for k in ("bytes", "files", "info", "params", "moved", "loaded"):
            acc[k] = r2[k]
        acc.setdefault("saved_fps", []).append(r2["saved_fp"])
        print(f"   save {statistics.median(c['s'] for c in acc['saves']):.3f} s, load "
              f"{statistics.median(c['s'] for c in acc['loads']):.3f} s (medians so far), "
              f"{r2['bytes'] / 2**20:.1f} MiB in {r2['files']} files; state after load equals saved: "
              f"{r2['loaded']}; other work on {r2['other_cores']:.2f} cores", flush=True)

        print(f"== {name} (round {rnd + 1}/{args.rounds}): W=1 load of the W={args.ranks} checkpoint",
              flush=True)
        if args.wait_idle > 0:
            wait_for_idle(args.wait_idle)
        r1 = spawn(worker_w1, dict(task, path=r2["path"], try_plain="plain_w1" not in acc), 1)
        if "exit_error" in r1 or ("error" in r1 and "loads" not in r1):  # the job, not a load, failed
            acc["failures"].append(f"round {rnd + 1}, W=1 job: {r1.get('exit_error') or r1['error']}")
        shutil.rmtree(r2["path"], ignore_errors=True)
        acc["other"].append(r1["other_cores"])
        if "plain" in r1:
            plain = r1["plain"]
            if plain["loaded"]:
                plain["check"] = compare(plain.get("fp"), r2["saved_fp"])
                plain.pop("fp", None)
            acc["plain_w1"] = plain
            print(f"   plain load at W=1: {plain}", flush=True)
        for k in ("convert_error", "error"):
            if k in r1:
                acc[f"w1_{k}"] = r1[k]
                print(f"   W=1 {k}: {r1[k]}", flush=True)
        if "convert_s" in r1:
            acc["convert_s"].append(r1["convert_s"])
            acc["universal_bytes"] = r1["universal_bytes"]
        acc["w1_loads"] += r1.get("loads", [])
        if "fp" in r1:
            acc["w1_check"] = compare(r1["fp"], r2["saved_fp"])
        elif "w1_check" not in acc and not r1.get("loads"):
            acc["w1_check"] = None
        if r1.get("loads"):
            print(f"   W=1 load {statistics.median(c['s'] for c in r1['loads']):.3f} s"
                  + (f" after a {r1['convert_s']:.2f} s conversion" if "convert_s" in r1 else "")
                  + f"; state equals saved: {acc.get('w1_check')}", flush=True)
