"""What the example scripts (train_gpt.py, pretrain_llama.py) share: the config and its
command-line overrides, averaging over ranks, a digest of the params, the LR schedule, what a
run prints (its header, speed, ETA, progress bar and optimizer memory, named the same way in
both), the note before DeepSpeed compiles an op, and a clean exit."""
import argparse
import dataclasses
import hashlib
import json
import math
import os
import sys
import threading

import torch

import zeroopt

try:  # the progress bar; without tqdm the per-interval lines (with their ETA) still print
    from tqdm import tqdm
except ImportError:
    tqdm = None

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp64": torch.float64}

# XLA:CPU replicas are threads of one process (launchers/xla_spawn.py) and share torch's global
# generator: seeding and building the model under this lock gives each the same weights.
SEEDED_INIT = threading.Lock()


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


def mean_over_ranks_of(comm, value: float) -> float:
    """The mean over ranks of a number read on the host (the ranks' own values gathered:
    on XLA no collective joins the graph that computed ``value``, whose compile time differs
    between replicas)."""
    return sum(comm.all_gather_object(float(value))) / comm.world_size


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


# ----------------------------------------------------------------------------- what a run prints

BACKEND_NAMES = {"mpi": "MPI (mpi4py)", "nccl": "NCCL", "gloo": "gloo", "xla": "XLA",
                 "hccl": "HCCL", "none": "no backend"}
MB = 2 ** 20


def printer(is_main: bool):
    """A print for rank 0 only (the other ranks' calls do nothing) that leaves a progress bar
    intact (``tqdm.write``) and flushes, so lines arrive in order through a launcher's pipe."""
    def say(message: str) -> None:
        if not is_main:
            return
        if tqdm is not None:
            tqdm.write(message)
        else:
            print(message)
        sys.stdout.flush()
    return say


def launcher() -> str:
    """Who started this process, read from the environment (``zeroopt.comm.environment``):
    "torchrun", "mpirun", "the DeepSpeed launcher" (it sets CROSS_RANK and LOCAL_SIZE),
    "a RANK/WORLD_SIZE launcher" for any other, or "no launcher" (one process)."""
    launch = zeroopt.comm.environment.detect()
    if launch.launcher == "mpi":
        return "mpirun"
    if launch.launcher == "none":
        return "no launcher"
    if "TORCHELASTIC_RUN_ID" in os.environ:
        return "torchrun"
    if "CROSS_RANK" in os.environ and "LOCAL_SIZE" in os.environ:
        return "the DeepSpeed launcher"
    return "a RANK/WORLD_SIZE launcher"


def job_line(script: str, comm, device: torch.device) -> str:
    """The header's first line: the ranks, the backend they joined through (comm.backend: an
    mpirun job on CPU says MPI), the launcher, and the device (on CPU, its threads per rank)."""
    world = comm.world_size
    if device.type == "cuda":
        where = f"device {device} ({torch.cuda.get_device_name(device)})"
    elif device.type == "cpu":
        threads = torch.get_num_threads()
        where = f"device cpu, {threads} thread{'s' if threads > 1 else ''} per rank"
    else:
        where = f"device {device}"
    ranks = f"{world} rank{'s' if world > 1 else ''}"
    if world == 1 and comm.backend == "none":
        return f"{script}: 1 rank ({launcher()}), {where}"
    return (f"{script}: {ranks} over {BACKEND_NAMES.get(comm.backend, comm.backend)}, "
            f"launched by {launcher()}, {where}")


def tokens_per_s(tokens_per_rank: float, seconds: float, world: int) -> tuple[float, float]:
    """(total over all ranks, per rank): this rank's tokens over its seconds, and world times
    that (the ranks keep in step: every step ends in a collective)."""
    per_rank = tokens_per_rank / seconds if seconds > 0 else math.nan
    return per_rank * world, per_rank


def speed_text(total: float, per_rank: float) -> str:
    """tokens/s as the log lines print it, e.g. "6,441 tok/s (3,220/rank)"."""
    return f"{total:,.0f} tok/s ({per_rank:,.0f}/rank)"


def duration(seconds: float) -> str:
    """h:mm:ss (m:ss under an hour), e.g. for an ETA."""
    if not math.isfinite(seconds):
        return "?"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def eta(steps_done: int, steps_left: int, seconds: float) -> str:
    """The time the steps left take at the pace of the steps done so far."""
    return duration(seconds / steps_done * steps_left if steps_done > 0 else math.nan)


def progress_bar(total: int, initial: int, is_main: bool):
    """Rank 0's tqdm bar (steps of total, rate, ETA) on stderr, or None: on other ranks, when
    stderr is not a terminal (a captured log gets the per-interval lines, which carry the step
    count and ETA too, instead of a bar redrawn ten times a second), or without tqdm."""
    if not (is_main and tqdm is not None and sys.stderr.isatty()):
        return None
    return tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)


def optimizer_memory(opt) -> dict:
    """``opt.memory()``'s parts in bytes (states, paged_states, masters, scratch; see
    zeroopt.memory.StateBytes) and its two totals: held (= state_bytes()) and on_device
    (= device_state_bytes())."""
    memory = opt.memory()
    return {**dataclasses.asdict(memory), "held": memory.held, "on_device": memory.on_device}


def memory_line(per_rank: list[dict]) -> str:
    """One line for the end of a run: the optimizer memory of the rank that holds the most,
    by part, as the two totals add up (``optimizer_memory`` of every rank, by rank)."""
    rank = max(range(len(per_rank)), key=lambda r: per_rank[r]["held"])
    m = {key: f"{value / MB:.3f}" for key, value in per_rank[rank].items()}
    which = f"rank {rank}, the most of {len(per_rank)} ranks" if len(per_rank) > 1 else \
        "rank 0"
    return (f"optimizer memory ({which}), MB: held {m['held']} = states {m['states']} + paged "
            f"{m['paged_states']} + fp32 masters {m['masters']}; on the device "
            f"{m['on_device']} = states + masters + decode scratch {m['scratch']}")


# ----------------------------------------------------------------------------- DeepSpeed's ops

def deepspeed_ops_to_build(builders=("ShareMemCommBuilder",)) -> tuple[list[str], str]:
    """The DeepSpeed ops among ``builders`` (op builder class names) that DeepSpeed will
    compile when first used here: compatible with this machine, not installed prebuilt, and
    not yet in torch's extension cache. On CPU (DS_ACCELERATOR=cpu) deepspeed.init_distributed
    loads ShareMemCommBuilder (deepspeed/comm/torch.py, build_shm_op) and DeepSpeed's own
    Adam loads FusedAdamBuilder; each is compiled once per machine, silently, in ~1-3 minutes.

    Returns:
        (the ops' names, the cache folder: TORCH_EXTENSIONS_DIR, else torch's default root
        and its py<version>_<cpu|cu...> folder, as torch.utils.cpp_extension.load uses).
    """
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator
    from deepspeed.git_version_info import installed_ops
    from torch.utils.cpp_extension import get_default_build_root

    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root is None:
        kind = (f"rocm{torch.version.hip.replace('.', '')}" if torch.version.hip else
                f"cu{torch.version.cuda.replace('.', '')}" if torch.version.cuda else "cpu")
        version = f"py{sys.version_info.major}{sys.version_info.minor}"
        root = os.path.join(get_default_build_root(),
                            f"{version}{getattr(sys, 'abiflags', '')}_{kind}")
    pending = []
    for name in builders:
        builder = get_accelerator().create_op_builder(name)
        if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.name, False):
            continue  # this accelerator does not build it
        if installed_ops.get(builder.name, False):
            continue  # installed prebuilt (DS_BUILD_OPS=1 pip install deepspeed)
        if not os.path.exists(os.path.join(root, builder.name, f"{builder.name}.so")):
            pending.append(builder.name)
    return pending, root


def note_deepspeed_build(say, builders=("ShareMemCommBuilder",)) -> None:
    """Say (with ``say``, e.g. ``printer``'s) that DeepSpeed is about to compile ops, when
    ``deepspeed_ops_to_build`` finds any: otherwise the first run on a machine sits silent for
    minutes. Call it before deepspeed.init_distributed / zeroopt.deepspeed.initialize."""
    pending, root = deepspeed_ops_to_build(builders)
    if pending:
        say(f"DeepSpeed compiles its op(s) {', '.join(pending)} now, once on this machine (into "
            f"{root}): 1-3 minutes without output")


def exit_now() -> None:
    """Leave without interpreter finalization: with torch 2.13 and gloo, about 1 exit in 8
    aborted there ("terminate called without an active exception", a C++ thread destroyed
    during static destruction), after the work was done and saved. Nothing is left to run."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
