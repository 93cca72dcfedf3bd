"""Checkpointing a ZeRO-sharded AdamW: zeroopt against DeepSpeed ZeRO-1/2 and torch's ZeroRedundancyOptimizer.

    python benchmarks/bench_checkpoint.py [--rounds 3] [--reps 5] [--wait-idle 30] [--out docs/BENCHMARKS.md]

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
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)  # for _common
sys.path.insert(1, os.path.dirname(_HERE))  # benchmark the zeroopt of this checkout
from _common import (_busy_cpu_s, _free_port, build_model, command_line, machine_info,  # noqa: E402
                     make_batch, num_params, wait_for_idle, write_section)

LAYERS, WIDTH, BATCH, LR, TRAIN_STEPS = 24, 1024, 32, 1e-3, 2

# --------------------------------------------------------------------------------------------
# Instrumentation: fsync and (zeroopt) sha256 time, per rank, reset before each timed call


class Counters:
    fsync_s = 0.0
    fsync_n = 0
    hash_s = 0.0
    hash_bytes = 0
    dcp_s = 0.0

    @classmethod
    def reset(cls):
        cls.fsync_s, cls.fsync_n, cls.hash_s, cls.hash_bytes, cls.dcp_s = 0.0, 0, 0.0, 0, 0.0


def _instrument_fsync():
    real = os.fsync

    def fsync(fd):
        t0 = time.perf_counter()
        try:
            return real(fd)
        finally:
            Counters.fsync_s += time.perf_counter() - t0
            Counters.fsync_n += 1

    os.fsync = fsync


def _instrument_zeroopt_hashing():
    from zeroopt.checkpoint import directory

    real = directory._file_facts

    def file_facts(file):
        t0 = time.perf_counter()
        try:
            return real(file)
        finally:
            Counters.hash_s += time.perf_counter() - t0
            Counters.hash_bytes += os.path.getsize(file)

    directory._file_facts = file_facts

    # zeroopt calls torch.distributed.checkpoint's save/load through the module attribute.
    import torch.distributed.checkpoint as dcp

    for fname in ("save", "load"):
        def timed_dcp(*a, _real=getattr(dcp, fname), **k):
            t0 = time.perf_counter()
            try:
                return _real(*a, **k)
            finally:
                Counters.dcp_s += time.perf_counter() - t0

        setattr(dcp, fname, timed_dcp)


def timed(fn) -> dict:
    """Run the collective `fn` between barriers; this rank's seconds and counters."""
    Counters.reset()
    dist.barrier()
    t0 = time.perf_counter()
    fn()
    dist.barrier()
    return dict(s=time.perf_counter() - t0, fsync_s=Counters.fsync_s, fsync_n=Counters.fsync_n,
                hash_s=Counters.hash_s, hash_bytes=Counters.hash_bytes, dcp_s=Counters.dcp_s)


def dir_bytes(path: str) -> tuple[int, int]:
    """(bytes, files) under `path` (apparent sizes)."""
    total = files = 0
    for root, _, names in os.walk(path):
        for n in names:
            total += os.path.getsize(os.path.join(root, n))
            files += 1
    return total, files


def _sums(t: torch.Tensor) -> list[float]:
    t = t.detach().to(torch.float64)
    return [float(t.sum()), float((t * t).sum())]


def compare(fp: dict | None, ref: dict | None) -> dict:
    """How far fingerprint `fp` is from `ref`: exact, or the largest relative difference."""
    if fp is None or ref is None:
        return dict(ok=False, why="no fingerprint")
    if set(fp) != set(ref):
        return dict(ok=False, why=f"different entries ({len(fp)} vs {len(ref)})")
    worst, where = 0.0, None
    for k, vals in ref.items():
        for a, b in zip(fp[k], vals):
            d = abs(a - b) / max(abs(b), 1e-30)
            if d > worst:
                worst, where = d, k
    return dict(ok=worst < 1e-6, exact=worst == 0.0, max_rel=worst, where=where)


# --------------------------------------------------------------------------------------------
# Contenders. Each builds one rank's side around `model` and returns a Side.


class Side:
    def step(self): ...
    def save(self, path: str): ...
    def load(self, path: str): ...
    def fingerprint(self) -> dict | None:  # a collective; the dict on rank 0
        ...


def _train_step(model_fn, x, y, backward, opt_step):
    loss = F.mse_loss(model_fn(x), y)
    backward(loss)
    opt_step()
    return loss.detach()


class ZeroOptSide(Side):
    info = "zeroopt.save_checkpoint / load_checkpoint (torch.distributed.checkpoint)"

    def __init__(self, model, x, y, stage=1):
        import zeroopt

        _instrument_zeroopt_hashing()
        self.zeroopt, self.model, self.x, self.y = zeroopt, model, x, y
        self.opt = zeroopt.ZeroOptimizer(model.parameters(), optimizer="adamw", stage=stage, lr=LR)
        self.steps = 0

    def step(self):
        loss = F.mse_loss(self.model(self.x), self.y)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad()
        self.steps += 1

    def save(self, path):
        self.zeroopt.save_checkpoint(path, self.model, self.opt, step=self.steps)

    def load(self, path):
        self.steps = self.zeroopt.load_checkpoint(path, self.model, self.opt)["step"]

    def fingerprint(self):
        sd = self.opt.state_dict()  # a collective; every rank gets the whole dict
        if dist.get_rank() != 0:
            return None
        return _torch_layout_fingerprint(self.model, sd)


def _torch_layout_fingerprint(model, sd) -> dict:
    fp = {f"param.{n}": _sums(p) for n, p in model.named_parameters()}
    names = [n for n, _ in model.named_parameters()]
    for i, st in sd["state"].items():
        for key in ("exp_avg", "exp_avg_sq"):
            fp[f"{key}.{names[i]}"] = _sums(st[key])
    steps = {float(st["step"]) for st in sd["state"].values()}
    fp["step"] = [max(steps) if steps else -1.0]
    return fp


class TorchZeroSide(Side):
    info = ("DDP + ZeroRedundancyOptimizer(torch.optim.AdamW): consolidate_state_dict(to=0) + "
            "torch.save on rank 0; torch.load + load_state_dict on every rank")

    def __init__(self, model, x, y):
        from torch.distributed.optim import ZeroRedundancyOptimizer
        from torch.nn.parallel import DistributedDataParallel as DDP

        self.model, self.x, self.y = model, x, y
        self.ddp = DDP(model)
        self.opt = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=torch.optim.AdamW, lr=LR)
        self.steps = 0

    def step(self):
        loss = F.mse_loss(self.ddp(self.x), self.y)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad()
        self.steps += 1

    def save(self, path):
        self.opt.consolidate_state_dict(to=0)
        if dist.get_rank() == 0:
            os.makedirs(path, exist_ok=True)
            torch.save({"model": self.model.state_dict(), "optimizer": self.opt.state_dict(),
                        "step": self.steps}, os.path.join(path, "checkpoint.pt"))

    def load(self, path):
        sd = torch.load(os.path.join(path, "checkpoint.pt"), map_location="cpu")
        self.model.load_state_dict(sd["model"])
        self.opt.load_state_dict(sd["optimizer"])
        self.steps = sd["step"]

    def fingerprint(self):
        self.opt.consolidate_state_dict(to=0)
        if dist.get_rank() != 0:
            return None
        return _torch_layout_fingerprint(self.model, self.opt.state_dict())


class DeepSpeedSide(Side):
    TAG = "ckpt"

    def __init__(self, model, x, y, stage=1, universal=False):
        import deepspeed

        config = {
            "train_micro_batch_size_per_gpu": BATCH,
            "gradient_accumulation_steps": 1,
            "zero_optimization": {"stage": stage},
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 10**9,
        }
        if universal:
            config["checkpoint"] = {"load_universal": True}
        self.model, self.x, self.y = model, x, y
        self.engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=LR), config=config)
        self.info = (f"DeepSpeed {deepspeed.__version__} ZeRO-{stage}, engine.save_checkpoint / "
                     "load_checkpoint, torch.optim.AdamW as client optimizer")

    def step(self):
        loss = F.mse_loss(self.engine(self.x), self.y)
        self.engine.backward(loss)
        self.engine.step()

    def save(self, path):
        self.engine.save_checkpoint(path, tag=self.TAG)

    def load(self, path, tag=None):
        load_path, _ = self.engine.load_checkpoint(path, tag=tag or self.TAG)
        if load_path is None:
            raise RuntimeError(f"engine.load_checkpoint({path!r}) returned None (nothing loaded)")

    def fingerprint(self):
        from deepspeed.utils import safe_get_full_optimizer_state

        # A load replaces the inner optimizer's state tensors; DeepSpeed links the params'
        # views of them again only at the next step(). Link them now to read the loaded state.
        zero_opt = self.engine.optimizer
        if hasattr(zero_opt, "_lazy_init_hp_params_optimizer_state"):
            zero_opt._hp_optimizer_states_linked = False
            zero_opt._lazy_init_hp_params_optimizer_state()
        fp = {f"param.{n}": _sums(p) for n, p in self.model.named_parameters()}
        for n, p in self.model.named_parameters():  # each call is a collective over the dp group
            for key in ("exp_avg", "exp_avg_sq"):
                t = safe_get_full_optimizer_state(p, key)
                fp[f"{key}.{n}"] = _sums(t) if t is not None else [float("nan")] * 2
        inner = self.engine.optimizer.optimizer
        steps = {float(st["step"]) for st in inner.state.values() if "step" in st}
        fp["step"] = [max(steps) if steps else -1.0]
        return fp if dist.get_rank() == 0 else None


def ds_universal_convert(ckpt_dir: str, tag: str) -> str:
    """deepspeed.checkpoint.ds_to_universal, in-process (its worker pools are its own)."""
    from deepspeed.checkpoint import ds_to_universal

    out = os.path.join(ckpt_dir, tag + "_universal")
    args = argparse.Namespace(input_folder=os.path.join(ckpt_dir, tag), output_folder=out,
                              num_extract_workers=2, num_merge_workers=1, keep_temp_folder=False,
                              strict=True, inject_missing_state=True)
    ds_to_universal.main(args)
    return out


CONTENDERS = {
    "zeroopt1": ("zeroopt stage 1", lambda m, x, y, **kw: ZeroOptSide(m, x, y, stage=1)),
    "ds1": ("DeepSpeed ZeRO-1", lambda m, x, y, **kw: DeepSpeedSide(m, x, y, stage=1, **kw)),
    "ds2": ("DeepSpeed ZeRO-2", lambda m, x, y, **kw: DeepSpeedSide(m, x, y, stage=2, **kw)),
    "torch_zero": ("torch ZeroRedundancyOptimizer", lambda m, x, y, **kw: TorchZeroSide(m, x, y)),
}
BASE = "zeroopt1"

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
    _instrument_fsync()


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


def med(calls, key="s"):
    vals = [c[key] for c in calls]
    return statistics.median(vals) if vals else None


def best(calls, key="s"):
    return min(c[key] for c in calls) if calls else None


def fmt(v, spec=".2f", none="n/a"):
    return none if v is None else format(v, spec)


def check_text(c) -> str:
    if not c:
        return "not checked"
    if c.get("ok"):
        return "equal (bit-exact sums)" if c.get("exact") else f"equal within {c['max_rel']:.1e}"
    return f"DIFFERENT ({c.get('why') or 'max rel. diff %.2e at %s' % (c['max_rel'], c['where'])})"


NOTES = """\
How it is measured:
- *save* / *load*: one collective call on every rank, with a barrier before and after; the
  slowest rank's seconds; the median over `--reps` calls per job and all rounds. Saves go to a
  fresh directory each time; loads read the checkpoint just written (page cache warm, for every
  contender alike: these times are CPU and memory bound, not disk bound). The W=2 loads go into
  the live optimizer after one more training step; the W=1 loads into a fresh model and
  optimizer in a new single-rank job (gloo, world size 1). *state after load* compares the
  float64 sum and sum of squares of every param, `exp_avg` and `exp_avg_sq` (the optimizer's
  state gathered whole: `opt.state_dict()` for zeroopt, `consolidate_state_dict` for torch,
  `deepspeed.utils.safe_get_full_optimizer_state` for DeepSpeed) and the step count with the
  state that was saved.
- *on disk*: apparent size of every file the save wrote (DeepSpeed: the tag directory plus
  `latest` and the `zero_to_fp32.py` script it copies in).
- zeroopt *sha256* / *fsync*: seconds inside `zeroopt.checkpoint.directory._file_facts`
  (hashing, each rank a share of the files; the slowest rank's) and inside `os.fsync` (any
  caller: DCP's `FileSystemWriter(sync_files=True)` fsyncs every file it writes, zeroopt the
  manifest and the directories), by wrapping them in the benchmark's processes. The *fsync
  calls* column counts them for every contender over all ranks.
- DeepSpeed W=1: `ds_to_universal.main` with `--inject_missing_state` (a plain `nn.Module` has
  no `universal_checkpoint_info`; without it the converter stops with an assertion), 2 extract
  and 1 merge workers (2 cores), run inside the W=1 job; then `engine.load_checkpoint(dir,
  tag="ckpt_universal")` with `"checkpoint": {"load_universal": true}`. *reshard total* =
  conversion + median load.

Why the times differ (what each call does, from the code):
- zeroopt's save does more than the anchors' on purpose: DCP writes each rank's file with
  `sync_files=True` (an fsync per file, so the checkpoint is on disk when the call returns;
  DeepSpeed's `torch.save` and torch's make no fsync, their data may still be only in the page
  cache), then every byte is read back once more to sha256 it for the manifest, then the
  manifest is written and the directory swapped in. A load reads every byte twice: the sha256
  verification, then DCP's read. The sha256 column is that extra pass; it is the price of a
  load that refuses a damaged file, and it grows with the checkpoint, not with W.
- DeepSpeed ZeRO-1/2 writes 16 B/param: the module's fp32 params (rank 0) plus, per rank, its
  partition's fp32 copy (`single_partition_of_fp32_groups`, kept even for fp32 params) and
  AdamW's m and v. zeroopt and torch write 12 B/param (params, m, v).
- torch ZeroRedundancyOptimizer's save is slow because `consolidate_state_dict` sends each
  rank's state to rank 0 as a pickled object (`_broadcast_object`), then rank 0 alone
  `torch.save`s the whole dict while the other ranks wait. Its load is fast here because the
  single file is in the page cache, but every rank reads the whole file (all ranks' state)
  and keeps its own part: W times the bytes read, and every rank needs memory for the whole
  state. Its `load_state_dict` picks each param's state out of the consolidated dict by the
  param's global index, so the dict is not tied to the world size that saved it: pytorch issue
  #65650 (2021, "partition doesn't match" when resuming on another number of GPUs) does not
  happen with torch 2.13 (see the W=1 column). It sets the other ranks' entries of the dict it
  is given to None, so a dict cannot be loaded twice.
- DeepSpeed refuses a plain load at another data-parallel size; `ds_to_universal` rewrites
  the checkpoint as one file per param and state (extract with a process pool, merge, save
  the common state), a separate offline step that takes seconds and doubles the disk use.
"""


def render(results, args, machine, runtime_s, command) -> str:
    params = next((r["params"] for r in results.values() if "params" in r), 0)
    base = results.get(BASE, {})
    lines = [
        "## Checkpoints: save, load, and load at another world size",
        "",
        f"Machine: {machine['cpu']}, {machine['cores']} cores, {machine['ram']} RAM; Python "
        f"{machine['python']}, torch {machine['torch']}, deepspeed {machine['deepspeed']}; "
        f"{machine['date']}.",
        "",
        f"Command: `{command}` (total {runtime_s:.0f} s)",
        "",
        f"Model: {args.layers} x Linear({WIDTH}, {WIDTH}) + ReLU, {params / 1e6:.2f}M fp32 params "
        f"(bench_zero.py's), AdamW lr={LR}, saved after {TRAIN_STEPS} training steps at W="
        f"{args.ranks} (gloo, CPU, {args.threads} thread(s) per rank). Medians over {args.reps} "
        f"calls per job x {args.rounds} round(s) run round-robin, each job in fresh processes. "
        f"Model + AdamW state is {12 * params / 2**20:.0f} MiB of fp32 (4 B/param params + 8 B "
        "m, v).",
        "",
        "*cores busy elsewhere*: mean number of cores other processes used during this "
        "contender's jobs (0 = idle machine).",
        "",
        f"| contender | save s, W={args.ranks}: median (best) | load s, W={args.ranks}: median (best) "
        "| on disk MiB (files) "
        f"| fsync calls per save | load at W=1 of the W={args.ranks} checkpoint | W=1 load s: median (best) "
        "| state after load (W=2 / W=1) | cores busy elsewhere |",
        "|---|---:|---:|---:|---:|---|---:|---|---:|",
    ]
    for name, r in results.items():
        label = CONTENDERS[name][0]
        if not r.get("saves"):
            lines.append(f"| {label} | failed: {str(r.get('error', '?'))[:200].replace('|', '/')} "
                         "|||||||")
            continue
        w1 = med(r["w1_loads"])
        if name.startswith("ds"):
            if r["convert_s"]:
                conv = statistics.median(r["convert_s"])
                how = (f"ds_to_universal {conv:.2f} s + load_universal"
                       + (f"; reshard total {conv + w1:.2f} s" if w1 is not None else ""))
            else:
                how = f"ds_to_universal failed: {r.get('w1_convert_error', '?')}"
        elif name == "torch_zero":
            how = "torch.load + load_state_dict of the consolidated dict"
        else:
            how = "load_checkpoint directly"
        if r.get("w1_error"):
            how += f"; FAILED: {r['w1_error'][:200]}"
        fsyncs = statistics.median(c["fsync_n"] for c in r["saves"])
        lines.append(
            f"| {label} | {med(r['saves']):.3f} ({best(r['saves']):.3f}) | {med(r['loads']):.3f} "
            f"({best(r['loads']):.3f}) | "
            f"{r['bytes'] / 2**20:.1f} ({r['files']}) | {fsyncs:.0f} | {how.replace('|', '/')} | "
            f"{fmt(w1, '.3f')} ({fmt(best(r['w1_loads']), '.3f')}) | "
            f"{check_text(r.get('loaded'))} / {check_text(r.get('w1_check'))} | "
            f"{max(r['other']):.2f} |")

    # Ratios: zeroopt / each anchor.
    if base.get("saves"):
        lines += ["", "zeroopt stage 1 relative to each anchor, zeroopt ÷ anchor (below 1: zeroopt "
                  "faster or smaller); times as median ratio (ratio of the best calls):", "",
                  "| anchor | save | load (W=2) | bytes on disk | load at W=1 (resharding) |",
                  "|---|---:|---:|---:|---:|"]

        def ratio(key, r):
            return (f"{med(base[key]) / med(r[key]):.2f} "
                    f"({best(base[key]) / best(r[key]):.2f})")

        for name, r in results.items():
            if name == BASE or not r.get("saves"):
                continue
            if not (base["w1_loads"] and r["w1_loads"] and (r.get("w1_check") or {}).get("ok")):
                w1_ratio = "n/a (the anchor did not load it correctly)"
            elif name.startswith("ds") and r["convert_s"]:
                conv, w1_base = statistics.median(r["convert_s"]), med(base["w1_loads"])
                w1_ratio = (f"{w1_base / (conv + med(r['w1_loads'])):.2f} vs conversion + load; "
                            f"{ratio('w1_loads', r)} vs the load alone")
            else:
                w1_ratio = ratio("w1_loads", r)
            lines.append(f"| {CONTENDERS[name][0]} | {ratio('saves', r)} | {ratio('loads', r)} | "
                         f"{base['bytes'] / r['bytes']:.2f} | {w1_ratio} |")

        lines += ["", "Where zeroopt's time goes (slowest rank's seconds, medians of each part; "
                  "sha256 is not inside DCP's calls, most fsyncs are):", "",
                  "| zeroopt call | total | dcp.save / dcp.load | sha256 (manifest / verify) "
                  "| fsync | the rest |", "|---|---:|---:|---:|---:|---:|"]
        for label, calls in ((f"save, W={args.ranks}", base["saves"]),
                             (f"load, W={args.ranks}", base["loads"]),
                             ("load at W=1 (one rank hashes every file)", base["w1_loads"])):
            if not calls:
                continue
            total = med(calls)
            rest = statistics.median(c["s"] - c["dcp_s"] - c["hash_s"] for c in calls)
            lines.append(f"| {label} | {total:.3f} | " + " | ".join(
                f"{med(calls, k):.3f} ({100 * med(calls, k) / total:.0f}%)"
                for k in ("dcp_s", "hash_s", "fsync_s")) + f" | {rest:.3f} ({100 * rest / total:.0f}%) |")
        lines += ["", f"Each zeroopt save and each load hashes all {base['bytes'] / 2**20:.0f} MiB of "
                  "the checkpoint once, the files split over the ranks. *the rest*: building the "
                  "items (`model.state_dict()`, the optimizer's ranges), gathering file lists and "
                  "hashes, writing the manifest, the directory swap, and waiting at the barriers."]

    # What the anchors do when asked to load at another world size.
    lines += ["", "Loading the W=2 checkpoint at W=1 without conversion:", ""]
    for name, r in results.items():
        if "plain_w1" in r:
            p = r["plain_w1"]
            what = (f"loads without error; state {check_text(p.get('check'))}" if p["loaded"]
                    else f"fails: `{p['error'][:300]}`")
            lines.append(f"- {CONTENDERS[name][0]}, plain `engine.load_checkpoint`: {what}")
        elif name == "torch_zero" and r.get("saves"):
            what = (f"fails: `{r['w1_error'][:300]}`" if r.get("w1_error")
                    else f"loads; state {check_text(r.get('w1_check'))}")
            lines.append(f"- torch ZeroRedundancyOptimizer, consolidated dict at W=1: {what}")
        elif name == BASE and r.get("saves"):
            lines.append(f"- zeroopt: `load_checkpoint` at W=1; state {check_text(r.get('w1_check'))}")
    if any("universal_bytes" in r for r in results.values()):
        lines += [""] + [f"DeepSpeed's universal checkpoint ({CONTENDERS[n][0]}) takes "
                         f"{r['universal_bytes'] / 2**20:.1f} MiB more on disk." for n, r in
                         results.items() if "universal_bytes" in r]
    failures = [f"- {CONTENDERS[n][0]}, {f}" for n, r in results.items() for f in r.get("failures", [])]
    if failures:
        lines += ["", "Jobs that failed or aborted (the tables use the other rounds):", ""] + failures
    lines += ["", "Implementations: " + "; ".join(
        f"{CONTENDERS[n][0]}: {r['info']}" for n, r in results.items() if r.get("info")) + ".", "",
        NOTES]
    return "\n".join(lines)


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
        print(report)
        if args.out:
            write_section(Path(args.out), "bench_checkpoint", report)
            print(f"\nwrote {args.out}")
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
    print("\n" + report)
    if args.out:
        write_section(Path(args.out), "bench_checkpoint", report)
        print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
