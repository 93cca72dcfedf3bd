"""Accelerate scripts with a ZeroOptimizer (zeroopt.accelerate), on every rank of a real gloo
job with a real Accelerator (test_accelerate.py holds the assertions).

Every run trains the same model on the same data: 96 samples, micro-batches of 4 per rank, 2
accumulation micro-steps per optimizer step, 6 steps at W = 2 (Accelerate's data loader deals
batch i to rank i mod W), AdamW at stage 2, clipping at 0.05 (the norms are ~1: every step
clips), and a LambdaLR schedule that Accelerate steps W times per optimizer step (its default
for split_batches=False: the schedule counts samples seen, not steps).
"""

from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as dist
from torch import nn

import zeroopt
import zeroopt.accelerate

MICRO, ACCUMULATE, STEPS, RESUME_AT = 4, 2, 6, 3
MAX_NORM = 0.05


def join_accelerate() -> tuple[int, int]:
    """Accelerate reads the job from the launcher's variables (as under accelerate launch or
    torchrun) and reuses run_ranks' gloo group; on CPU it joins only with cpu=True."""
    rank, world = dist.get_rank(), dist.get_world_size()
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world), OMP_NUM_THREADS="1")
    return rank, world


def mlp(seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 48), nn.Tanh(), nn.Linear(48, 8)).to(dtype)


def dataset() -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(7)
    n = STEPS * ACCUMULATE * MICRO * 2
    return torch.utils.data.TensorDataset(torch.randn(n, 16, generator=g),
                                          torch.randn(n, 8, generator=g), torch.arange(n))


def optimizer(model: nn.Module, **options) -> zeroopt.ZeroOptimizer:
    return zeroopt.ZeroOptimizer(model.parameters(), "adamw", **{
        "stage": 2, "lr": 0.01, "weight_decay": 0.1, "bucket_numel": 200, **options})


def schedule(opt) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda n: 1.0 / (1 + 0.1 * n))


def loss_of(model, batch) -> torch.Tensor:
    x, y, _ = batch
    dtype = next(model.parameters()).dtype
    return nn.functional.mse_loss(model(x.to(dtype)).float(), y)


def flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()


def suite(directory: str) -> dict:
    rank, world = join_accelerate()
    from accelerate import Accelerator

    out = {"plain": plain_loop(rank, world)}
    out["accelerate"] = accelerate_loop(Accelerator(cpu=True,
                                                    gradient_accumulation_steps=ACCUMULATE))
    out["resumed"] = resumed_loop(os.path.join(directory, "state"))
    out["bf16"] = accelerate_loop(Accelerator(cpu=True, gradient_accumulation_steps=ACCUMULATE),
                                  dtype=torch.bfloat16)
    out["bf16_resumed"] = resumed_loop(os.path.join(directory, "bf16"), dtype=torch.bfloat16)
    out["ddp"] = accelerate_loop(Accelerator(cpu=True, gradient_accumulation_steps=ACCUMULATE),
                                 stage=1, average_grads=False)
    out["refused"] = refusals(Accelerator(cpu=True, gradient_accumulation_steps=ACCUMULATE))
    return out


def plain_loop(rank: int, world: int) -> dict:
    """The reference: a plain ZeroOptimizer loop reading the batches Accelerate's loader deals
    this rank, accumulating in no_sync() with the loss divided by the micro-steps (as
    accelerator.backward does), clipping with opt.clip_grad_norm_."""
    model = mlp()
    opt = optimizer(model)
    sched = schedule(opt)
    batches = list(torch.utils.data.DataLoader(dataset(), batch_size=MICRO))[rank::world]
    out = {"norm": [], "lr": []}
    for step in range(STEPS):
        for micro in range(ACCUMULATE):
            batch = batches[step * ACCUMULATE + micro]
            last = micro == ACCUMULATE - 1
            with contextlib.nullcontext() if last else opt.no_sync():
                (loss_of(model, batch) / ACCUMULATE).backward()
        out["norm"].append(float(opt.clip_grad_norm_(MAX_NORM)))
        opt.step()
        for _ in range(world):
            sched.step()
        opt.zero_grad()
        out["lr"].append(sched.get_last_lr()[0])
    out["params"] = flat(model)
    return out


def train(accelerator, model, opt, sched, loader, out: dict) -> None:
    """Accelerate's documented loop, with accelerator.clip_grad_norm_ at each real step, over
    the whole loader (a loop left mid-loader leaves Accelerate's gradient state attached to
    it: its last batch would count as the end of the data)."""
    for batch in loader:
        with accelerator.accumulate(model):
            accelerator.backward(loss_of(model, batch))
            if accelerator.sync_gradients:
                out["norm"].append(float(accelerator.clip_grad_norm_(model.parameters(),
                                                                     MAX_NORM)))
            opt.step()
            sched.step()
            opt.zero_grad()
        out["ids"] += batch[2].tolist()
        if accelerator.sync_gradients:
            out["lr"].append(sched.get_last_lr()[0])


def accelerate_loop(accelerator, dtype: torch.dtype = torch.float32, **options) -> dict:
    model = mlp(dtype=dtype)
    opt = optimizer(model, **options)
    sched = schedule(opt)
    loader = torch.utils.data.DataLoader(dataset(), batch_size=MICRO)
    reductions = count_reductions(opt)
    model, opt, loader, sched = zeroopt.accelerate.prepare(accelerator, model, opt, loader, sched)
    out = {"norm": [], "lr": [], "ids": [], "model_type": type(model).__name__,
           "optimizer_type": type(opt).__name__}
    train(accelerator, model, opt, sched, loader, out)
    out["params"] = flat(model)
    out["reductions"], out["buckets"] = reductions[0], len(opt.optimizer.layout.buckets)
    out["masters"] = masters(opt.optimizer)
    return out


def count_reductions(opt) -> list[int]:
    """[bucket reductions so far]: wraps the optimizer's collectives."""
    count = [0]
    reduce_bucket = opt.comm.reduce_bucket

    def counting(*args, **kwargs):
        count[0] += 1
        return reduce_bucket(*args, **kwargs)

    opt.comm.reduce_bucket = counting
    return count


def resumed_loop(path: str, dtype: torch.dtype = torch.float32) -> dict:
    """RESUME_AT steps (the first samples only: the job stops there),
    accelerator.save_state (safetensors, Accelerate's default), then a new
    Accelerator, model (other initial weights) and ZeroOptimizer, load_state, and the rest of
    the data (skip_first_batches), as a restarted job does."""
    from accelerate import Accelerator

    out = {"norm": [], "lr": [], "ids": []}
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=ACCUMULATE)
    model = mlp(dtype=dtype)
    opt = optimizer(model)
    sched = schedule(opt)
    first = torch.utils.data.Subset(dataset(), range(RESUME_AT * ACCUMULATE * MICRO * 2))
    loader = torch.utils.data.DataLoader(first, batch_size=MICRO)  # the job stops there
    model, opt, loader, sched = zeroopt.accelerate.prepare(accelerator, model, opt, loader, sched)
    train(accelerator, model, opt, sched, loader, out)
    out["saved_step"] = accelerator.step
    accelerator.save_state(path)
    out["files"] = sorted(os.listdir(path))
    out["saved_params"] = flat(model)

    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=ACCUMULATE)
    model = mlp(seed=1, dtype=dtype)
    opt = optimizer(model)
    sched = schedule(opt)
    loader = torch.utils.data.DataLoader(dataset(), batch_size=MICRO)
    model, opt, loader, sched = zeroopt.accelerate.prepare(accelerator, model, opt, loader, sched)
    accelerator.load_state(path)
    out["loaded_params"] = flat(model)
    out["loaded_step"] = accelerator.step
    loader = accelerator.skip_first_batches(loader, RESUME_AT * ACCUMULATE)
    train(accelerator, model, opt, sched, loader, out)
    out["params"] = flat(model)
    out["masters"] = masters(opt.optimizer)
    return out


def masters(opt) -> list[torch.Tensor]:
    """The fp32 masters of 16-bit params (none for fp32 params)."""
    return [m.clone() for m in opt.shard.masters.values()]


def refusals(accelerator) -> dict:
    """Each misuse, and the error's message."""
    out = {}

    def attempt(name, fn):
        try:
            fn()
            out[name] = None
        except (ValueError, RuntimeError) as error:
            out[name] = f"{type(error).__name__}: {error}"

    model = mlp()
    opt = optimizer(model)
    model, opt = zeroopt.accelerate.prepare(accelerator, model, opt)
    batch = next(iter(torch.utils.data.DataLoader(dataset(), batch_size=MICRO)))
    attempt("subset", lambda: accelerator.clip_grad_norm_(model[0].parameters(), 1.0))
    with accelerator.accumulate(model):  # the first of 2 micro-steps: not synced
        accelerator.backward(loss_of(model, batch))
        attempt("micro_step", lambda: accelerator.clip_grad_norm_(model.parameters(), 1.0))

    loose = mlp()
    optimizer_of_part = zeroopt.ZeroOptimizer(loose[0].parameters(), "adamw")
    attempt("loose", lambda: zeroopt.accelerate.prepare(accelerator, loose, optimizer_of_part))

    alone = dist.new_group([0]), dist.new_group([1])  # every rank makes both
    single = mlp()
    one_rank = zeroopt.ZeroOptimizer(single.parameters(), "adamw",
                                     process_group=alone[dist.get_rank()])
    attempt("world", lambda: zeroopt.accelerate.prepare(accelerator, single, one_rank))
    return out
