"""Pretrain a small byte-level GPT on the Python standard library's source, with zeroopt.

Every rank holds the whole model and trains on its own random batches (data parallel);
zeroopt averages the gradients and keeps only 1/world_size of the optimizer state per rank.
The model is deliberately NOT wrapped in DistributedDataParallel: ZeroOptimizer does the
gradient reduction itself.

    bash launchers/torchrun.sh                      # 2 ranks on CPU, configs/gpt_tiny.json
    bash launchers/torchrun.sh --nproc 4 --stage 2 --optimizer lion --lr 3e-4
    python examples/train_gpt.py --steps 10          # one process, world size 1
    bash launchers/torchrun.sh --deepspeed_config configs/deepspeed_zeroopt.json
                                 # the same training through DeepSpeed's engine (deepspeed_train.py)

Any key of the config file can be overridden on the command line (--steps 20, --dtype bf16,
--grad_accum 2, ...). Rank 0 prints a header (ranks, backend, launcher, device, model,
optimizer, stage), a progress bar with the ETA when its stderr is a terminal, a line every
log_interval steps (loss, lr, grad norm, tokens/s in all and per rank, ETA) and, at the end,
the "done:" line (final_train_loss=, val_loss=, tokens_per_s_total=, tokens_per_s_per_rank=),
the optimizer memory by part, and where the summary went: --out_json PATH writes one.

--dtype bf16 is meant for GPUs: on a CPU without bf16 matmul instructions it runs ~10x slower.
"""
import contextlib
import json
import math
import pathlib
import sys
import time
from functools import partial

import torch

import zeroopt

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))  # for the helpers below
import deepspeed_train  # noqa: E402  (--deepspeed_config: the loop through DeepSpeed's engine)
import common  # noqa: E402
from common import DTYPES, lr_lambda, mean_over_ranks, params_digest  # noqa: E402
from data import ByteBatches, load_stdlib_bytes, train_val_split  # noqa: E402
from gpt_model import GPT, GPTConfig  # noqa: E402

DEFAULT_CONFIG = pathlib.Path(__file__).resolve().parent.parent / "configs" / "gpt_tiny.json"


# ----------------------------------------------------------------------------- optimizer

def optimizer_groups(model, cfg):
    """Weight decay on matrices only; with --galore_rank R > 0, the Linear weights are also
    projected (a group with GaLore's keys: for galore_adamw, galore_adamw_8bit, apollo_adamw)."""
    groups = model.param_groups(cfg["weight_decay"])
    if cfg["galore_rank"] > 0:
        linear = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Linear)}
        decayed = groups[0]["params"]
        groups[0]["params"] = [p for p in decayed if id(p) not in linear]
        groups.append({"params": [p for p in decayed if id(p) in linear],
                       "weight_decay": cfg["weight_decay"], "rank": cfg["galore_rank"],
                       "update_proj_gap": cfg["galore_update_proj_gap"],
                       "scale": cfg["galore_scale"]})
    return groups


# ----------------------------------------------------------------------------- config

def parse_config(argv=None):
    """Load --config (JSON), then let --<key> VALUE override any key in it."""
    cfg, args, _ = common.parse_config(
        argv, DEFAULT_CONFIG, __doc__.split("\n")[0], lambda parser: parser.add_argument(
            "--out_json", default=None, help="write a JSON summary here (rank 0)"))
    return cfg, args.out_json


# ----------------------------------------------------------------------------- distributed

# ----------------------------------------------------------------------------- schedule

def zeroopt_train_step(model, opt, sched, batches, cfg, device):
    """One optimizer step over grad_accum micro-batches; returns (mean loss, grad norm)."""
    accum = cfg["grad_accum"]
    step_loss = torch.zeros((), device=device)
    for micro in range(accum):
        x, y = batches.next(device)
        # Only the last micro-step lets zeroopt reduce the gradients.
        sync = micro == accum - 1
        with contextlib.nullcontext() if sync else opt.no_sync():
            _, loss = model(x, y)
            (loss / accum).backward()
        step_loss += loss.detach() / accum

    # clip_grad_norm_ returns the global norm; max_norm=inf measures without clipping.
    grad_norm = opt.clip_grad_norm_(cfg["grad_clip"] if cfg["grad_clip"] > 0 else math.inf)
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    return step_loss, grad_norm


@torch.no_grad()
def evaluate(comm, model, batches, n_batches, device):
    """Mean validation loss over n_batches per rank, averaged over ranks."""
    model.eval()
    total = torch.zeros((), device=device)
    for _ in range(n_batches):
        x, y = batches.next(device)
        total += model(x, y)[1]
    model.train()
    return common.mean_over_ranks_of(comm, (total / n_batches).item())


# ----------------------------------------------------------------------------- main

def main(argv=None):
    cfg, out_json = parse_config(argv)
    # Joins the job from torchrun's, mpirun's or DeepSpeed's environment (one rank if none);
    # the backend follows the device unless --backend names one (gloo, nccl, mpi, xla, hccl).
    comm, device = zeroopt.comm.init_distributed(cfg["backend"] or None)
    rank, world = comm.rank, comm.world_size
    is_main = rank == 0
    log = common.printer(is_main)  # rank 0 only; keeps the progress bar intact
    log(common.job_line("train_gpt.py", comm, device))

    # Data: the same byte stream on every rank; different random windows per rank.
    tokens = load_stdlib_bytes(cfg["data_max_bytes"])
    train_tokens, val_tokens = train_val_split(tokens, cfg["val_fraction"])
    bs, T = cfg["batch_size"], cfg["block_size"]
    train_batches = ByteBatches(train_tokens, T, bs, seed=cfg["seed"] + rank)
    val_batches = ByteBatches(val_tokens, T, bs, seed=cfg["seed"] + 100_000 + rank)

    # Model: bf16 params if asked; zeroopt keeps the fp32 master copy of its shard.
    with common.SEEDED_INIT:  # same seed on every rank: identical initial weights
        torch.manual_seed(cfg["seed"])
        model = GPT(GPTConfig(vocab_size=256, block_size=T, n_layer=cfg["n_layer"],
                              n_head=cfg["n_head"], n_embd=cfg["n_embd"],
                              dropout=cfg["dropout"]))
    model.to(device=device, dtype=DTYPES[cfg["dtype"]])
    model.tie_weights()  # an XLA device splits it (see GPT.tie_weights)
    log(f"model: GPT, {model.num_params():,} params ({cfg['dtype']}, {cfg['n_layer']} layers x "
        f"{cfg['n_embd']}) | data: {len(train_tokens):,} + {len(val_tokens):,} validation bytes")

    if cfg["deepspeed_config"]:  # the same training through DeepSpeed's engine
        common.note_deepspeed_build(log)  # its first run on a machine compiles an op
        engine, opt, sched = deepspeed_train.initialize(model, optimizer_groups(model, cfg), cfg,
                                                        lr_lambda(cfg))
        train_step = partial(deepspeed_train.train_step, engine, train_batches, device)
    else:
        opt = zeroopt.ZeroOptimizer(
            optimizer_groups(model, cfg), optimizer=cfg["optimizer"], stage=cfg["stage"],
            lr=cfg["lr"], betas=(cfg["beta1"], cfg["beta2"]), weight_decay=cfg["weight_decay"],
            reduce_dtype=DTYPES[cfg["reduce_dtype"]], backend=cfg["backend"] or None,
            shard_size=cfg["shard_size"] or None)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
        train_step = partial(zeroopt_train_step, model, opt, sched, train_batches, cfg, device)

    steps, accum = cfg["steps"], cfg["grad_accum"]
    tokens_per_rank_step = bs * T * accum
    tokens_per_step = tokens_per_rank_step * world  # summed over all ranks
    through = f", through DeepSpeed's engine ({cfg['deepspeed_config']})" \
        if cfg["deepspeed_config"] else ""
    log(f"optimizer: {cfg['optimizer']}, ZeRO stage {opt.stage}{through} | {steps} steps x "
        f"{tokens_per_step:,} tokens ({tokens_per_rank_step:,}/rank: {bs} x {T}"
        f"{f' x {accum} accumulated' if accum > 1 else ''})")

    # Per-step losses stay on the device and are averaged over ranks once per log window,
    # so the loop does not sync with the host every step.
    window, losses = [], []
    bar = common.progress_bar(steps, 0, is_main)  # None unless rank 0 has a terminal
    t_start = t_window = time.perf_counter()
    for step in range(1, steps + 1):
        step_loss, grad_norm = train_step()
        window.append(step_loss)
        if bar is not None:
            bar.update(1)

        if step % cfg["log_interval"] == 0 or step == steps:
            window_losses = mean_over_ranks(comm, torch.stack(window)).tolist()  # also syncs
            losses += window_losses
            now = time.perf_counter()
            speed = common.tokens_per_s(len(window) * tokens_per_rank_step, now - t_window,
                                        world)
            if bar is not None:
                bar.set_postfix(loss=f"{window_losses[-1]:.3f}")
            log(f"step {step:5d}/{steps} | loss {window_losses[-1]:.4f} | "
                f"lr {sched.get_last_lr()[0]:.2e} | grad_norm {float(grad_norm):.3f} | "
                f"{common.speed_text(*speed)} | opt state {opt.state_bytes() / 2**20:.2f} "
                f"MB/rank | ETA {common.eta(step, steps - step, now - t_start)}")
            window, t_window = [], time.perf_counter()
    if bar is not None:
        bar.close()
    train_time = time.perf_counter() - t_start

    val_loss = evaluate(comm, model, val_batches, cfg["eval_batches"], device)
    memory = comm.all_gather_object(common.optimizer_memory(opt))
    state_bytes = [m["held"] for m in memory]
    tok_s, tok_s_rank = common.tokens_per_s(steps * tokens_per_rank_step, train_time, world)
    log(f"done: steps={steps} world={world} final_train_loss={losses[-1]:.4f} "
        f"val_loss={val_loss:.4f} tokens_per_s_total={tok_s:.0f} "
        f"tokens_per_s_per_rank={tok_s_rank:.0f} "
        f"state_MB_per_rank={max(state_bytes) / 2**20:.3f} train_time_s={train_time:.1f}")
    log(common.memory_line(memory))

    if is_main and out_json:
        summary = {
            "config": cfg, "world_size": world, "device": str(device),
            "backend": comm.backend, "launcher": common.launcher(),
            "num_params": model.num_params(),
            "final_train_loss": losses[-1], "val_loss": val_loss,
            "tokens_per_s_total": tok_s, "tokens_per_s_per_rank": tok_s_rank,
            "train_time_s": train_time,
            "state_bytes_per_rank": state_bytes, "optimizer_memory_per_rank": memory,
            "train_losses": losses, "params_sha256": params_digest(model),
        }
        pathlib.Path(out_json).parent.mkdir(parents=True, exist_ok=True)
        with open(out_json, "w") as f:
            json.dump(summary, f, indent=2)
    log(f"wrote: the summary (losses, speed, memory by part) to {out_json}" if out_json else
        "wrote: no files (--out_json PATH saves a JSON summary: losses, speed, memory by part)")

    comm.barrier()  # no rank tears its connections down while another still uses them
    zeroopt.comm.shutdown()


if __name__ == "__main__":
    main()
    common.exit_now()
