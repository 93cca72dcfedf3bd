"""Checkpoints of a pretrain_llama.py run: model, ZeroOptimizer shards, lr schedule, each rank's
data order, and the clock, through zeroopt.save_checkpoint / load_checkpoint (which reload at
any world size).

    checkpoint_dir/step_000100/   one directory per save; the newest keep_checkpoints are kept

A resumed run at the same world size trains exactly as the uninterrupted one would (tested:
identical params). At another world size the ranks that existed before continue their data
streams and new ranks start theirs from the seed.
"""
import pathlib
import re
import shutil

import zeroopt

STEP_DIR = re.compile(r"step_(\d+)$")


def checkpoint_dir(cfg) -> pathlib.Path:
    return pathlib.Path(cfg["checkpoint_dir"] or pathlib.Path(cfg["log_dir"]) / "checkpoints")


def newest(directory: pathlib.Path) -> pathlib.Path | None:
    """The step_N directory with the largest N (None if there is none yet)."""
    found = [(int(m.group(1)), p) for p in directory.glob("step_*")
             if (m := STEP_DIR.search(p.name)) and p.is_dir()]
    return max(found)[1] if found else None


def save(cfg, comm, step, elapsed_s, model, opt, sched, train_batches) -> pathlib.Path:
    """A collective: every rank writes its shard. Older saves beyond keep_checkpoints go."""
    directory = checkpoint_dir(cfg)
    path = directory / f"step_{step:06d}"
    # Each rank draws its own batches: keep every rank's generator, not only rank 0's.
    data_rng = comm.all_gather_object(train_batches.gen.get_state())
    zeroopt.save_checkpoint(str(path), model, opt, step=step, elapsed_s=elapsed_s,
                            scheduler=sched.state_dict(), data_rng=data_rng)
    if comm.rank == 0 and cfg["keep_checkpoints"] > 0:
        saved = sorted((int(m.group(1)), p) for p in directory.glob("step_*")
                       if (m := STEP_DIR.search(p.name)))
        for _, old in saved[:-cfg["keep_checkpoints"]]:
            shutil.rmtree(old, ignore_errors=True)
    comm.barrier()  # nobody reads the directory while rank 0 prunes it
    return path


def resume(cfg, comm, model, opt, sched, train_batches, note) -> tuple[int, float]:
    """Load cfg["resume"] (a checkpoint directory, or "auto": the newest in checkpoint_dir, if
    any) into model, opt, sched and the data stream; returns (step, elapsed seconds)."""
    if cfg["resume"] == "auto":
        path = newest(checkpoint_dir(cfg))
        if path is None:
            note(f"--resume auto: no checkpoint in {checkpoint_dir(cfg)} yet; starting fresh")
            return 0, 0.0
    else:
        path = pathlib.Path(cfg["resume"])
        if not path.exists():
            raise FileNotFoundError(f"--resume {path}: no such checkpoint; pass a step_N "
                                    "directory that save_every wrote, or 'auto'")
    extras = zeroopt.load_checkpoint(str(path), model, opt)
    sched.load_state_dict(extras["scheduler"])
    data_rng = extras["data_rng"]
    if comm.rank < len(data_rng):
        train_batches.gen.set_state(data_rng[comm.rank])
    if len(data_rng) != comm.world_size:
        note(f"resuming a checkpoint of {len(data_rng)} rank(s) at world size "
             f"{comm.world_size}: ranks below {len(data_rng)} continue their data streams, "
             "others start from the seed")
    note(f"resumed from {path} at step {extras['step']}")
    return extras["step"], extras["elapsed_s"]
