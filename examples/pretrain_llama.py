"""Pretrain a Llama-style model with zeroopt: the same script on CPU ranks and on GPUs.

Every rank holds the whole model and trains on its own random batches (data parallel);
zeroopt.ZeroOptimizer averages the gradients and keeps 1/world_size of the optimizer state per
rank. The model size, optimizer, stage, state precision and schedule come from a JSON config;
any key can be overridden on the command line (--optimizer lion --lr 3e-4 --stage 2 ...).

    python -m torch.distributed.run --standalone --nproc_per_node 2 \
        examples/pretrain_llama.py --config configs/llama_tiny.json          # 2 CPU ranks
    torchrun --nproc_per_node 8 examples/pretrain_llama.py --config configs/llama_1b.json
    python examples/pretrain_llama.py --steps 20                           # one process

Each rank writes log_dir/log_rank{r}.csv (step, loss, lr, tokens/s, memory; see run_log.py)
and log_dir/summary_rank{r}.json (final and validation loss, tokens/s, state bytes, a SHA-256
of its params: equal on every rank when the ranks stayed in step). docs/EXAMPLES.md has more.
"""
import contextlib
import json
import math
import pathlib
import sys
import time

import torch

import zeroopt

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))  # the helpers beside this file
import common  # noqa: E402
from common import DTYPES, lr_lambda, mean_over_ranks, params_digest  # noqa: E402
from data import ByteBatches, load_stdlib_bytes, train_val_split  # noqa: E402
from llama_model import Llama, LlamaConfig  # noqa: E402
import run_checkpoints  # noqa: E402
from run_log import RunLog, memory_columns, peak_rss_bytes  # noqa: E402

DEFAULT_CONFIG = pathlib.Path(__file__).resolve().parent.parent / "configs" / "llama_tiny.json"
MODEL_KEYS = ("dim", "n_layers", "n_heads", "n_kv_heads", "hidden_dim", "rope_theta",
              "norm_eps", "tie_embeddings")
LOW_RANK_PREFIXES = ("galore_", "apollo_")  # rules that project the groups carrying "rank"
ADJUST_LR_FNS = ("original", "match_rms_adamw")  # torch.optim.Muon's


def is_muon(name: str) -> bool:
    """Rules with Muon's hybrid groups (muon, muon_8bit, muon_layerwise, normuon...): hidden
    matrices orthogonalized, the rest stepped by AdamW in groups with use_muon=False."""
    return "use_muon" in zeroopt.algorithms.get_rule(name).defaults


def extra_arguments(parser) -> None:
    """The flags that are not config keys: --grad_compression, --muon_adjust_lr_fn."""
    parser.add_argument(
        "--grad_compression", default=None, choices=("int8", "int4"),
        help="quantize the gradients the ranks exchange (blockwise int8 or int4, one all-to-all "
             "hop, summed in fp32; with shard_size only across the sharding groups): about "
             "1/4 (int8) or 1/8 (int4) of the gradient reduction's bytes, lossy. Default: "
             "exact (zeroopt.comm.compression)")
    parser.add_argument(
        "--muon_adjust_lr_fn", default="match_rms_adamw", choices=ADJUST_LR_FNS,
        help="Muon rules only: how the orthogonalized update's lr is scaled per matrix. "
             "match_rms_adamw (default; Moonshot's, 0.2 sqrt(max(A, B))) gives the update "
             "AdamW's RMS, so the config's AdamW lr and weight decay serve both the Muon "
             "matrices and the AdamW params; original: sqrt(max(1, A/B)), for lrs near 0.02")


# ----------------------------------------------------------------------------- config

def parse_config(argv=None) -> dict:
    """Load --config (JSON), then let --<key> VALUE override any key in it."""
    cfg, args, parser = common.parse_config(argv, DEFAULT_CONFIG, __doc__.split("\n")[0],
                                            extra_arguments)
    if is_muon(cfg["optimizer"]):  # recorded in the summary with the config's keys
        cfg["muon_adjust_lr_fn"] = args.muon_adjust_lr_fn
    if args.grad_compression:  # recorded too, when set
        cfg["grad_compression"] = args.grad_compression
    if cfg["save_every"] < 0:
        parser.error(f"--save_every must be >= 0 (0: never save), got {cfg['save_every']}")
    if cfg["autocast"] not in ("", "bf16"):
        parser.error(f"--autocast must be '' (off) or 'bf16', got {cfg['autocast']!r}")
    if cfg["optimizer"].endswith("_layerwise") and cfg["grad_clip"] > 0:
        parser.error(f"--optimizer {cfg['optimizer']} steps each matrix during backward, before "
                     "a global gradient norm exists to clip by: pass --grad_clip 0")
    if cfg["optimizer"].startswith(LOW_RANK_PREFIXES) and cfg["galore_rank"] < 1:
        parser.error(f"--optimizer {cfg['optimizer']} projects the attention and MLP matrices "
                     "to a low rank: set --galore_rank to a positive rank (e.g. 32)")
    return cfg


# ----------------------------------------------------------------------------- model, optimizer

def build_model(cfg, device) -> Llama:
    """The config's Llama over bytes (vocab 256), on device, its params in cfg's dtype."""
    model_cfg = LlamaConfig(vocab_size=256, max_seq_len=cfg["max_seq_len"],
                            **{k: cfg[k] for k in MODEL_KEYS})
    return Llama(model_cfg).to(device=device, dtype=DTYPES[cfg["dtype"]])


def optimizer_groups(model, cfg) -> list[dict]:
    """Weight decay on matrices, none on norms. For GaLore/APOLLO, the attention and MLP
    weights form one more group carrying the projection's keys (as galore-torch takes it).
    For Muon rules, zeroopt.muon_param_groups: the attention and MLP matrices get Muon; the
    embedding (tied to the head) and the norms are two AdamW groups (use_muon=False)."""
    if is_muon(cfg["optimizer"]):
        muon, *rest = zeroopt.muon_param_groups(model)
        others = rest[0]["params"] if rest else []
        adamw = [{"params": [p for p in others if p.dim() >= 2], "use_muon": False,
                  "weight_decay": cfg["weight_decay"]},
                 {"params": [p for p in others if p.dim() < 2], "use_muon": False,
                  "weight_decay": 0.0}]
        return [{**muon, "weight_decay": cfg["weight_decay"]}, *(g for g in adamw if g["params"])]
    groups = [{"params": list(model.parameters())}]
    if cfg["optimizer"].startswith(LOW_RANK_PREFIXES):
        groups = zeroopt.galore_param_groups(
            model, ["self_attn", "mlp"], rank=cfg["galore_rank"],
            update_proj_gap=cfg["galore_update_proj_gap"], scale=cfg["galore_scale"])
        groups[1]["weight_decay"] = cfg["weight_decay"]
    others = groups[0]["params"]
    return [{"params": [p for p in others if p.dim() >= 2], "weight_decay": cfg["weight_decay"]},
            {"params": [p for p in others if p.dim() < 2], "weight_decay": 0.0},
            *groups[1:]]


def build_optimizer(model, cfg) -> zeroopt.ZeroOptimizer:
    hyper = dict(lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    # beta1/beta2 go to the rules that have betas (Adam, Lion, LAMB, GaLore...); Adafactor,
    # SGD and the like keep their own defaults.
    if "betas" in zeroopt.algorithms.get_rule(cfg["optimizer"]).defaults:
        hyper["betas"] = (cfg["beta1"], cfg["beta2"])
    if is_muon(cfg["optimizer"]):  # betas above go to the AdamW groups
        hyper["adjust_lr_fn"] = cfg["muon_adjust_lr_fn"]
    if cfg["state_precision"]:  # "" keeps the name's own ("adamw_8bit" -> 8-bit)
        hyper["state_precision"] = cfg["state_precision"]
    return zeroopt.ZeroOptimizer(
        optimizer_groups(model, cfg), optimizer=cfg["optimizer"], stage=cfg["stage"],
        reduce_dtype=DTYPES[cfg["reduce_dtype"]], backend=cfg["backend"] or None,
        shard_size=cfg["shard_size"] or None, grad_compression=cfg.get("grad_compression"),
        **hyper)


# ----------------------------------------------------------------------------- helpers

def load_tokens(cfg) -> torch.Tensor:
    """Byte tokens: data_file's bytes (memory-mapped, any size), else the stdlib's source;
    the first data_max_bytes of them (0: all)."""
    limit = cfg["data_max_bytes"] if cfg["data_max_bytes"] > 0 else sys.maxsize
    if not cfg["data_file"]:
        return load_stdlib_bytes(limit)
    path = pathlib.Path(cfg["data_file"])
    if not path.is_file():
        raise FileNotFoundError(f"--data_file {path} does not exist; pass a file of text (read "
                                "as bytes), or '' for the Python standard library's source")
    size = min(path.stat().st_size, limit)
    return torch.from_file(str(path), shared=False, size=size, dtype=torch.uint8)


@torch.no_grad()
def evaluate(comm, model, batches, n_batches, device, amp):
    model.eval()
    total = torch.zeros((), device=device)
    for _ in range(n_batches):
        x, y = batches.next(device)
        with amp():
            total += model(x, y)[1]
    model.train()
    return mean_over_ranks(comm, total / n_batches).item()


def files_line(cfg, log: RunLog, world: int) -> str:
    """The last line of a run: where its logs went (TensorBoard's and the checkpoints too,
    when on), and the command that plots them."""
    ranks = "0" if world == 1 else f"{{0..{world - 1}}}"
    extra = f", TensorBoard {log.tensorboard_dir}" if log.tensorboard_dir else ""
    if cfg["save_every"]:
        extra += f", checkpoints {run_checkpoints.checkpoint_dir(cfg)}"
    return (f"wrote: {log.dir}/log_rank{ranks}.csv and summary_rank{ranks}.json{extra}; "
            f"plot: python examples/plot_losses.py {log.dir} --out {log.dir}/loss.png")


# ----------------------------------------------------------------------------- main

def main(argv=None):
    cfg = parse_config(argv)
    # Joins the job from torchrun's, mpirun's or DeepSpeed's environment (one rank if none);
    # the device is this rank's GPU when there is one, else the CPU.
    comm, device = zeroopt.comm.init_distributed(cfg["backend"] or None)
    rank, world = comm.rank, comm.world_size
    note = common.printer(rank == 0)  # rank 0 only; keeps the progress bar intact
    note(common.job_line("pretrain_llama.py", comm, device))

    torch.manual_seed(cfg["seed"])  # the same initial weights on every rank
    tokens = load_tokens(cfg)
    train_tokens, val_tokens = train_val_split(tokens, cfg["val_fraction"])
    bs, T, accum = cfg["batch_size"], cfg["max_seq_len"], cfg["grad_accum"]
    train_batches = ByteBatches(train_tokens, T, bs, seed=cfg["seed"] + rank)
    val_batches = ByteBatches(val_tokens, T, bs, seed=cfg["seed"] + 100_000 + rank)

    model = build_model(cfg, device)
    opt = build_optimizer(model, cfg)  # after .to(): the params become views of flat buffers
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))

    def amp():  # bf16 autocast around the forward when the config asks for it
        if not cfg["autocast"]:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=torch.bfloat16)

    steps, tokens_per_rank_step = cfg["steps"], bs * T * accum
    note(f"model: Llama, {model.num_params():,} params ({cfg['dtype']}"
         f"{', bf16 autocast' if cfg['autocast'] else ''}, {cfg['n_layers']} layers x "
         f"{cfg['dim']}) | data: {len(train_tokens):,} + {len(val_tokens):,} validation bytes")
    note(f"optimizer: {cfg['optimizer']}, ZeRO stage {cfg['stage']} | {steps} steps x "
         f"{tokens_per_rank_step * world:,} tokens ({tokens_per_rank_step:,}/rank: {bs} x {T}"
         f"{f' x {accum} accumulated' if accum > 1 else ''}) | logs to {cfg['log_dir']}")
    start_step, elapsed_before = 0, 0.0
    if cfg["resume"]:
        start_step, elapsed_before = run_checkpoints.resume(cfg, comm, model, opt, sched,
                                                            train_batches, note)
    # A resumed run continues its CSV, dropping rows logged after the checkpoint.
    log = RunLog(cfg["log_dir"], rank, cfg["tensorboard"], note,
                 keep_until_step=start_step if cfg["resume"] else None)

    # Losses stay on the device and are averaged over ranks once per log window, so the loop
    # does not wait for the host every step.
    window, last_loss, saving_s = [], float("nan"), 0.0
    layerwise = cfg["optimizer"].endswith("_layerwise")
    bar = common.progress_bar(steps, start_step, rank == 0)  # None unless rank 0 has a terminal
    t_start = t_window = time.perf_counter()
    for step in range(start_step + 1, steps + 1):
        step_loss = torch.zeros((), device=device)
        for micro in range(accum):
            x, y = train_batches.next(device)
            # Only the last micro-step lets zeroopt reduce the gradients.
            sync = contextlib.nullcontext() if micro == accum - 1 else opt.no_sync()
            with sync:
                with amp():
                    _, loss = model(x, y)
                (loss / accum).backward()
            step_loss += loss.detach() / accum
        # The global norm over all ranks; max_norm=inf measures without clipping. (Layerwise
        # rules have stepped already, during backward: there is no norm to take.)
        grad_norm = math.nan if layerwise else \
            opt.clip_grad_norm_(cfg["grad_clip"] if cfg["grad_clip"] > 0 else math.inf)
        lr = opt.param_groups[0]["lr"]  # the lr this step uses
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        window.append(step_loss)
        if bar is not None:
            bar.update(1)

        if step % cfg["log_interval"] == 0 or step == steps:
            losses = torch.stack(window)
            own = losses.mean().item()
            last_loss = mean_over_ranks(comm, losses.mean()).item()  # also waits for the step
            now = time.perf_counter()
            speed = common.tokens_per_s(len(window) * tokens_per_rank_step, now - t_window,
                                        world)
            log.write({"rank": rank, "step": step, "loss": round(own, 5),
                       "loss_all_ranks": round(last_loss, 5), "lr": float(f"{lr:.6g}"),
                       "grad_norm": round(float(grad_norm), 5),
                       "tokens_per_s_total": round(speed[0], 1),
                       "tokens_per_s_per_rank": round(speed[1], 1),
                       "tokens_seen": step * tokens_per_rank_step * world,
                       "elapsed_s": round(elapsed_before + now - t_start, 3),
                       **memory_columns(opt, device)})
            if bar is not None:
                bar.set_postfix(loss=f"{last_loss:.3f}")
            note(f"step {step:5d}/{steps} | loss {last_loss:.4f} | lr {lr:.2e} | "
                 f"grad_norm {float(grad_norm):.3f} | {common.speed_text(*speed)} | "
                 f"opt state {opt.state_bytes() / 2**20:.2f} MB/rank | ETA "
                 f"{common.eta(step - start_step, steps - step, now - t_start - saving_s)}")
            window, t_window = [], time.perf_counter()

        if cfg["save_every"] and (step % cfg["save_every"] == 0 or step == steps):
            t_save = time.perf_counter()
            path = run_checkpoints.save(cfg, comm, step, elapsed_before + t_save - t_start,
                                        model, opt, sched, train_batches)
            saving_s += time.perf_counter() - t_save
            t_window += time.perf_counter() - t_save  # saving is not training speed
            note(f"saved {path}")
    if bar is not None:
        bar.close()
    train_time = time.perf_counter() - t_start - saving_s
    log.close()

    val_loss = evaluate(comm, model, val_batches, cfg["eval_batches"], device, amp)
    tok_s, tok_s_rank = common.tokens_per_s((steps - start_step) * tokens_per_rank_step,
                                            train_time, world)
    memory = common.optimizer_memory(opt)
    summary = {
        "rank": rank, "world_size": world, "device": str(device), "backend": comm.backend,
        "launcher": common.launcher(), "config": cfg,
        "num_params": model.num_params(), "final_train_loss": last_loss, "val_loss": val_loss,
        "train_time_s": train_time, "save_time_s": saving_s,
        "tokens_per_s_total": tok_s, "tokens_per_s_per_rank": tok_s_rank,
        "state_bytes": memory["held"], "device_state_bytes": memory["on_device"],
        "optimizer_memory": memory,
        "peak_rss_bytes": peak_rss_bytes(),
        "cuda_max_allocated_bytes": torch.cuda.max_memory_allocated(device)
        if device.type == "cuda" else None,
        "params_sha256": params_digest(model),
    }
    with open(log.dir / f"summary_rank{rank}.json", "w") as f:
        json.dump(summary, f, indent=2)
    all_memory = comm.all_gather_object(memory)
    note(f"done: steps={steps} world={world} final_train_loss={last_loss:.4f} "
         f"val_loss={val_loss:.4f} tokens_per_s_total={tok_s:.0f} "
         f"tokens_per_s_per_rank={tok_s_rank:.0f} "
         f"state_MB_per_rank={max(m['held'] for m in all_memory) / 2**20:.3f} "
         f"train_time_s={train_time:.1f}")
    note(common.memory_line(all_memory))
    note(files_line(cfg, log, world))

    comm.barrier()  # no rank tears its connections down while another still uses them
    zeroopt.comm.shutdown()


if __name__ == "__main__":
    main()
    common.exit_now()
