"""One DeepSpeed config, trained by DeepSpeed alone and by zeroopt (zeroopt.deepspeed.initialize).

Run on its own, this script trains train_gpt.py's model on the same batches twice from one
unchanged DeepSpeed config (default configs/ds_zero2_adamw.json: DeepSpeed's AdamW under its
ZeRO-2), first with ``deepspeed.initialize`` and then with ``zeroopt.deepspeed.initialize``, and
prints both runs' losses and how far apart their params end::

    SCRIPT=examples/deepspeed_train.py bash launchers/torchrun.sh --steps 20
    SCRIPT=examples/deepspeed_train.py bash launchers/torchrun.sh --with zeroopt \\
        --deepspeed_config configs/ds_zero2_adamw.json
    SCRIPT=examples/deepspeed_train.py bash launchers/deepspeed.sh --num_gpus 2

(``--with deepspeed|zeroopt|both``; the model, data and steps come from --config, as for
train_gpt.py; the optimizer, its schedule, ZeRO and the batch from the DeepSpeed config).

train_gpt.py --deepspeed_config PATH uses ``initialize`` and ``train_step`` below: the same
training as train_gpt.py's own loop, through DeepSpeed's engine. "auto" values in that config
(configs/deepspeed_zeroopt.json has them, as HuggingFace's DeepSpeed configs do) are filled from
train_gpt.py's config, so one run's settings live in one place and `--lr 1e-3` still works; any
other value is used as written, and a "scheduler" section replaces train_gpt.py's schedule.
"""
import copy
import json
import pathlib
import sys
import time

import torch

import zeroopt

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import common  # noqa: E402
from data import ByteBatches, load_stdlib_bytes, train_val_split  # noqa: E402
from gpt_model import GPT, GPTConfig  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = ROOT / "configs" / "gpt_tiny.json"
DEFAULT_DEEPSPEED_CONFIG = ROOT / "configs" / "ds_zero2_adamw.json"


def auto_values(cfg: dict) -> dict:
    """The DeepSpeed config entries that "auto" stands for, by dotted path."""
    return {
        "train_micro_batch_size_per_gpu": cfg["batch_size"],
        "gradient_accumulation_steps": cfg["grad_accum"],
        "gradient_clipping": max(cfg["grad_clip"], 0.0),  # 0: measure the norm, clip nothing
        "bf16.enabled": cfg["dtype"] == "bf16",
        "zeroopt.optimizer": cfg["optimizer"],
        "zeroopt.stage": cfg["stage"],
        "zeroopt.lr": cfg["lr"],
        "zeroopt.betas": [cfg["beta1"], cfg["beta2"]],
        "zeroopt.weight_decay": cfg["weight_decay"],
        "zeroopt.reduce_dtype": cfg["reduce_dtype"],
    }


def fill_auto(node, values: dict, path: str = ""):
    if isinstance(node, dict):
        return {k: fill_auto(v, values, f"{path}.{k}" if path else k) for k, v in node.items()}
    if node != "auto":
        return node
    if path not in values:
        raise ValueError(f'{path}: "auto" has no value in train_gpt.py\'s config; write one in '
                         f"the DeepSpeed config (auto fills: {', '.join(values)})")
    return values[path]


def initialize(model, groups, cfg: dict, lr_lambda):
    """train_gpt.py's engine, its ZeroOptimizer and the LR scheduler: the config's "scheduler"
    section if it has one, else train_gpt.py's LambdaLR. ``cfg``'s optimizer, stage and
    grad_accum are set to what the DeepSpeed config chose, for the log and the summary."""
    if cfg["dtype"] not in ("fp32", "bf16"):
        raise ValueError(f"--dtype {cfg['dtype']} through DeepSpeed: use fp32 or bf16")
    with open(cfg["deepspeed_config"]) as f:
        config = fill_auto(json.load(f), auto_values(cfg))
    schedule = None if "scheduler" in config else (
        lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda))
    chosen = zeroopt.deepspeed.config.plan(config).optimizer_kwargs
    engine, opt, _, sched = zeroopt.deepspeed.initialize(
        model=model, model_parameters=groups, config=config, lr_scheduler=schedule)
    if engine.train_micro_batch_size_per_gpu() != cfg["batch_size"]:
        raise ValueError(f"the DeepSpeed config's micro-batch is "
                         f"{engine.train_micro_batch_size_per_gpu()} per rank and train_gpt.py's "
                         f"--batch_size {cfg['batch_size']}: pass --batch_size "
                         f"{engine.train_micro_batch_size_per_gpu()} (or make them agree)")
    cfg.update(optimizer=chosen.get("optimizer", "adamw"), stage=opt.stage,
               grad_accum=engine.gradient_accumulation_steps())
    return engine, opt, sched


def train_step(engine, batches, device):
    """One optimizer step, as train_gpt.train_step: DeepSpeed's micro-step loop (backward scales
    the loss, step() steps the optimizer at the accumulation boundary). (mean loss, grad norm)"""
    accum = engine.gradient_accumulation_steps()
    step_loss = torch.zeros((), device=device)
    for _ in range(accum):
        x, y = batches.next(device)
        _, loss = engine(x, y)
        engine.backward(loss)
        engine.step()
        step_loss += loss.detach() / accum
    return step_loss, engine.get_global_grad_norm()


# -- run on its own: the same config with DeepSpeed alone and with zeroopt -------------------

def train(name: str, config: dict, cfg: dict, tokens, log) -> tuple[torch.nn.Module, list]:
    """``cfg["steps"]`` optimizer steps of train_gpt.py's model from ``config``, by DeepSpeed
    alone (``name`` "deepspeed") or by zeroopt; each rank's batches depend on its rank only,
    so both runs see the same ones. Returns the model and the per-step losses (rank 0's)."""
    import deepspeed

    torch.manual_seed(cfg["seed"])
    model = GPT(GPTConfig(vocab_size=256, block_size=cfg["block_size"], n_layer=cfg["n_layer"],
                          n_head=cfg["n_head"], n_embd=cfg["n_embd"], dropout=cfg["dropout"]))
    start = deepspeed.initialize if name == "deepspeed" else zeroopt.deepspeed.initialize
    # zeroopt: the model's params, or for Muon its hybrid groups (zeroopt.muon_param_groups)
    params = list(model.parameters()) if name == "deepspeed" else None
    engine, opt, _, _ = start(model=model, model_parameters=params, config=copy.deepcopy(config))
    rank = torch.distributed.get_rank()
    batches = ByteBatches(tokens, cfg["block_size"], engine.train_micro_batch_size_per_gpu(),
                          seed=cfg["seed"] + rank)
    inner = getattr(opt, "optimizer", opt)  # DeepSpeed's ZeRO wraps its optimizer
    log(f"{name}: {type(opt).__name__}({type(inner).__name__}), DeepSpeed ZeRO stage "
        f"{engine.zero_optimization_stage()}, micro-batch "
        f"{engine.train_micro_batch_size_per_gpu()} x {engine.gradient_accumulation_steps()} "
        f"accumulation steps x {engine.world_size} ranks")
    losses, started = [], time.perf_counter()
    for step in range(1, cfg["steps"] + 1):
        loss, _ = train_step(engine, batches, engine.device)
        losses.append(loss.item())
        if step % cfg["log_interval"] == 0 or step == cfg["steps"]:
            log(f"{name} step {step:4d} | loss {loss.item():.4f} | lr {engine.get_lr()[0]:.2e}")
    log(f"{name}: {time.perf_counter() - started:.1f} s")
    return engine.module, losses


def main(argv=None):
    def add_arguments(parser):
        parser.add_argument("--with", dest="runs", choices=("both", "deepspeed", "zeroopt"),
                            default="both", help="which to train with the DeepSpeed config")
    cfg, args, _ = common.parse_config(argv, DEFAULT_CONFIG, __doc__.split("\n")[0],
                                       add_arguments)
    path = cfg["deepspeed_config"] or str(DEFAULT_DEEPSPEED_CONFIG)
    with open(path) as f:
        config = fill_auto(json.load(f), auto_values(cfg))
    if args.runs != "zeroopt" and "optimizer" not in config:
        raise SystemExit(f'{path} has no "optimizer" section: DeepSpeed alone would train '
                         f"nothing. Use --with zeroopt, or a config with one "
                         f"({DEFAULT_DEEPSPEED_CONFIG.name})")
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    adam = args.runs != "zeroopt" and config["optimizer"]["type"].lower() in ("adam", "adamw")
    common.note_deepspeed_build(common.printer(zeroopt.comm.environment.detect().rank == 0),
                                ("ShareMemCommBuilder", *(("FusedAdamBuilder",) if adam else ())))
    deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name())
    is_main = torch.distributed.get_rank() == 0

    def log(message):
        if is_main:
            print(message, flush=True)

    tokens, _ = train_val_split(load_stdlib_bytes(cfg["data_max_bytes"]), cfg["val_fraction"])
    log(f"DeepSpeed config {path}, model and data from {args.config}")
    names = ("deepspeed", "zeroopt") if args.runs == "both" else (args.runs,)
    models = {name: train(name, config, cfg, tokens, log) for name in names}
    if len(models) == 2:
        (ds, ds_losses), (zo, zo_losses) = models["deepspeed"], models["zeroopt"]
        apart = max((p - q).abs().max().item() for p, q in zip(zo.parameters(), ds.parameters()))
        largest = max(q.abs().max().item() for q in ds.parameters())
        log(f"final loss (rank 0's): DeepSpeed alone {ds_losses[-1]:.4f}, zeroopt "
            f"{zo_losses[-1]:.4f}; params differ by at most {apart:.1e} (the largest is "
            f"{largest:.2f}): the same AdamW, rounded by other kernels")
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
    common.exit_now()
