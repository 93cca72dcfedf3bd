"""train_gpt.py's training through DeepSpeed's engine (--deepspeed_config PATH): the same model,
data, optimizer and schedule, with zeroopt.deepspeed.initialize building the engine and the
ZeroOptimizer from the DeepSpeed config's "zeroopt" section.

"auto" values in the DeepSpeed config (configs/deepspeed_zeroopt.json has them, as HuggingFace's
DeepSpeed configs do) are filled from train_gpt.py's config, so one run's settings live in one
place and `--lr 1e-3` still works. Any other value is used as written.
"""
import json

import torch

import zeroopt


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
    """The engine, its ZeroOptimizer and the LR scheduler (train_gpt.py's LambdaLR)."""
    if cfg["dtype"] not in ("fp32", "bf16"):
        raise ValueError(f"--dtype {cfg['dtype']} through DeepSpeed: use fp32 or bf16")
    with open(cfg["deepspeed_config"]) as f:
        config = fill_auto(json.load(f), auto_values(cfg))
    engine, opt, _, sched = zeroopt.deepspeed.initialize(
        model=model, model_parameters=groups, config=config,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda))
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
