"""DeepSpeed runs, on every rank of a real gloo job (test_deepspeed.py holds the assertions):
zeroopt's ZeroOptimizer inside DeepSpeed's engine (``engine_suite``), and zeroopt's
FusedOptimizer as the optimizer DeepSpeed's own ZeRO wraps (``fused_suite``)."""

from __future__ import annotations

import os
import tempfile

import torch
from torch import nn

import zeroopt

# A micro-batch is 4 samples per rank; the dataset of 96 lasts 12 micro-steps at W = 2.
MICRO, SAMPLES = 4, 96
WARMUP = {"type": "WarmupLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": 0.01,
                                         "warmup_num_steps": 4, "warmup_type": "linear"}}


def join_deepspeed() -> int:
    """DeepSpeed reads the job from the launcher's variables; it reuses run_ranks' gloo group.
    Its data loader's workers start as under a launcher (fork, Linux's default): run_ranks'
    ranks inherit "spawn", whose workers re-import torch (~10 s each on this machine)."""
    import multiprocessing

    import torch.distributed as dist

    multiprocessing.set_start_method("fork", force=True)
    rank = dist.get_rank()
    os.environ.update(DS_ACCELERATOR="cpu", RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(dist.get_world_size()))
    return rank


def mlp(seed: int = 0) -> nn.Module:
    """768 + 48 + 384 + 8 params: buckets of 200 (per rank: 400 at W = 2) cut the first
    matrix; 8-bit from min_8bit_size 256."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 48), nn.Tanh(), nn.Linear(48, 8))


def dataset() -> torch.utils.data.TensorDataset:
    """The same samples on every rank (DeepSpeed's sampler splits them); ids to see who got what."""
    g = torch.Generator().manual_seed(7)
    return torch.utils.data.TensorDataset(torch.randn(SAMPLES, 16, generator=g),
                                          torch.randn(SAMPLES, 8, generator=g),
                                          torch.arange(SAMPLES))


def batch_for(rank: int, step: int, size: int = MICRO):
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(size, 16, generator=g), torch.randn(size, 8, generator=g), None


def loss_of(model, batch) -> torch.Tensor:
    x, y, _ = batch
    return nn.functional.mse_loss(model(x), y)


def micro_step(engine, batch) -> None:
    engine.backward(loss_of(engine, batch))
    engine.step()


def rel_err(model, reference) -> float:
    """Largest difference, relative to each param's largest magnitude (as test_equivalence.py)."""
    return max(((p.float() - q.float()).abs().max() / q.float().abs().max()).item()
               for p, q in zip(model.parameters(), reference.parameters()))


def identical(model, reference) -> bool:
    return all(torch.equal(p, q) for p, q in zip(model.parameters(), reference.parameters()))


def config(stage: int = 1, zeroopt_section: dict | None = None, **top) -> dict:
    section = {"optimizer": "adamw", "stage": stage, "lr": 0.01, "weight_decay": 0.1,
               "bucket_numel": 200, **(zeroopt_section or {})}
    return {"train_micro_batch_size_per_gpu": MICRO, "steps_per_print": 10**9,
            "gradient_clipping": 0.0, **top, "zeroopt": section}


def count_reductions(opt) -> list[int]:
    """[number of bucket reductions since the last reset]: wraps the optimizer's collectives."""
    count = [0]
    reduce_bucket = opt.comm.reduce_bucket

    def counting(*args, **kwargs):
        count[0] += 1
        return reduce_bucket(*args, **kwargs)

    opt.comm.reduce_bucket = counting
    return count


# -- zeroopt inside DeepSpeed's engine ------------------------------------------------------

def engine_suite() -> dict:
    join_deepspeed()
    out = {}
    for stage in (1, 2):
        out["vs_deepspeed", stage] = against_deepspeed(stage)
        out["accumulation", stage] = accumulation_against_twice_the_batch(stage)
    out["bf16"] = bf16_against_zero_optimizer()
    out["muon"] = muon_against_zero_optimizer()
    out["skip"] = skipped_step()
    with tempfile.TemporaryDirectory() as scratch:
        import torch.distributed as dist

        path = [scratch]
        dist.broadcast_object_list(path, src=0)  # one directory for the job (a shared disk)
        out["resume"] = resume_from_checkpoint(os.path.join(path[0], "ckpt"))
        dist.barrier()  # rank 0's directory outlives every rank's use of it
    return out


def against_deepspeed(stage: int) -> dict:
    """zeroopt (AdamW, stage 1 or 2) against DeepSpeed's own data-parallel engine with torch's
    fused AdamW, through everything the engine does: its data loader, 2-step gradient
    accumulation, gradient_clipping (active: the norms are ~1), a WarmupLR scheduler section.
    (DeepSpeed's data-parallel engine reports no gradient norm: get_global_grad_norm() is None.)"""
    import deepspeed

    top = dict(gradient_accumulation_steps=2, gradient_clipping=0.5, scheduler=WARMUP)
    ours, opt, loader, _ = zeroopt.deepspeed.initialize(model=mlp(), config=config(stage, **top),
                                                        training_data=dataset())
    model = mlp()
    plain = {k: v for k, v in config(**top).items() if k != "zeroopt"}
    theirs, _, their_loader, _ = deepspeed.initialize(
        model=model, config=plain, training_data=dataset(),
        optimizer=torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1, fused=True))
    reductions = count_reductions(opt)
    out = {"ids": [], "lr": [], "their_lr": [], "norm": [],
           "reductions_per_step": [], "buckets": len(opt.layout.buckets),
           "optimizer": type(ours.optimizer).__name__,
           "allreduce": ours.enable_backward_allreduce}
    # Each loader read to its end: a loader left mid-epoch shuts its workers down by timeout.
    for batch, their_batch in zip(list(loader), list(their_loader), strict=True):
        steps = ours.global_steps
        micro_step(ours, batch)
        micro_step(theirs, their_batch)
        out["ids"] += batch[2].tolist()
        if ours.global_steps > steps:  # an optimizer step happened
            out["lr"].append(ours.get_lr()[0])
            out["their_lr"].append(theirs.get_lr()[0])
            out["norm"].append(float(ours.get_global_grad_norm()))
            out["reductions_per_step"].append(reductions[0])
            reductions[0] = 0
    out["rel_err"] = rel_err(ours.module, theirs.module)
    out["steps"], out["their_steps"] = ours.global_steps, theirs.global_steps
    return out


def accumulation_against_twice_the_batch(stage: int) -> dict:
    """SGD with momentum (linear in the gradient, so rounding is not amplified, unlike Adam's
    m / sqrt(v)): 2 micro-batches of 4 accumulated, against one batch of those 8 samples."""
    rank = join_deepspeed()
    section = {"optimizer": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 0.0}
    accumulated, _, _, _ = zeroopt.deepspeed.initialize(
        model=mlp(), config=config(stage, section, gradient_accumulation_steps=2))
    whole, _, _, _ = zeroopt.deepspeed.initialize(
        model=mlp(), config=config(stage, section, train_micro_batch_size_per_gpu=2 * MICRO))
    for step in range(6):
        x, y, _ = batch_for(rank, step, size=2 * MICRO)
        micro_step(accumulated, (x[:MICRO], y[:MICRO], None))
        micro_step(accumulated, (x[MICRO:], y[MICRO:], None))
        micro_step(whole, (x, y, None))
    return {"rel_err": rel_err(accumulated.module, whole.module),
            "moved": rel_err(whole.module, mlp()),
            "steps": (accumulated.global_steps, whole.global_steps)}


def bf16_against_zero_optimizer() -> dict:
    """The bf16 section: the engine's model is bf16, ZeroOptimizer keeps fp32 masters, and the
    run is bit-identical to a plain loop with ZeroOptimizer over the same bf16 model."""
    rank = join_deepspeed()
    top = dict(bf16={"enabled": True}, gradient_clipping=1.0)
    engine, opt, _, _ = zeroopt.deepspeed.initialize(model=mlp(), config=config(2, **top))
    model = mlp()
    for p in model.parameters():
        p.data = p.data.to(torch.bfloat16)
    plain = zeroopt.ZeroOptimizer(model.parameters(), "adamw", stage=2, lr=0.01,
                                  weight_decay=0.1, bucket_numel=200)
    for step in range(5):
        batch = tuple(t.to(torch.bfloat16) if t is not None else t for t in batch_for(rank, step))
        micro_step(engine, batch)
        loss_of(model, batch).backward()
        plain.clip_grad_norm_(1.0)
        plain.step()
        plain.zero_grad()
    return {"identical": identical(engine.module, model), "moved": rel_err(model, mlp()),
            "param_dtypes": {str(p.dtype) for p in engine.module.parameters()},
            "master_dtypes": {str(m.dtype) for m in opt.shard.masters.values()},
            "optimizer": type(engine.optimizer).__name__,
            "deepspeed_sees_bf16": engine.bfloat16_enabled()}


def muon_against_zero_optimizer() -> dict:
    """"optimizer": "muon" in the section: the Linear weights get Muon and the biases AdamW
    (zeroopt.muon_param_groups), bit-identical to a plain loop with ZeroOptimizer over those
    groups; a param tagged ``use_muon = False`` (DeepSpeed's tag) goes to AdamW."""
    rank = join_deepspeed()
    section = {"optimizer": "muon", "adjust_lr_fn": "match_rms_adamw"}
    tagged = mlp()
    tagged[2].weight.use_muon = False
    engine, opt, _, _ = zeroopt.deepspeed.initialize(model=mlp(), config=config(2, section))
    _, tagged_opt, _, _ = zeroopt.deepspeed.initialize(model=tagged, config=config(2, section))
    model = mlp()
    plain = zeroopt.ZeroOptimizer(zeroopt.muon_param_groups(model), "muon", stage=2, lr=0.01,
                                  weight_decay=0.1, bucket_numel=200,
                                  adjust_lr_fn="match_rms_adamw")
    for step in range(4):
        batch = batch_for(rank, step)
        micro_step(engine, batch)
        loss_of(model, batch).backward()
        plain.step()
        plain.zero_grad()
    return {"identical": identical(engine.module, model), "moved": rel_err(model, mlp()),
            "muon_shapes": [[tuple(p.shape) for p in g["params"]] for g in opt.param_groups
                            if g["use_muon"]],
            "tagged_muon_shapes": [[tuple(p.shape) for p in g["params"]]
                                   for g in tagged_opt.param_groups if g["use_muon"]]}


def skipped_step() -> dict:
    """A non-finite gradient: ZeroOptimizer skips the step, and the engine sees DeepSpeed's
    overflow: it counts the skip and holds the LR scheduler."""
    rank = join_deepspeed()
    engine, opt, _, _ = zeroopt.deepspeed.initialize(model=mlp(),
                                                     config=config(1, scheduler=WARMUP))
    micro_step(engine, batch_for(rank, 0))
    params, lr = [p.detach().clone() for p in engine.module.parameters()], engine.get_lr()
    x, y, _ = batch_for(rank, 1)
    micro_step(engine, (x * float("nan"), y, None))
    return {"skipped": (engine.skipped_steps, opt.skipped_steps), "lr": (lr, engine.get_lr()),
            "unchanged": all(torch.equal(p, q) for p, q in
                             zip(engine.module.parameters(), params))}


def resume_from_checkpoint(path: str) -> dict:
    """8-bit states, bf16 params, WarmupLR, clipping, stage 2: 3 steps, save_checkpoint, 3 more;
    against a fresh engine (other initial weights) that loads the checkpoint and runs the same 3.
    Then load_module_only into a third engine: its fp32 masters must follow the loaded weights
    (WarmupLR's first lr is 0, so its first step must leave the weights exactly as loaded), and
    the steps after must move them (the step updates the masters the params are published from)."""
    rank = join_deepspeed()
    top = dict(bf16={"enabled": True}, gradient_clipping=1.0, scheduler=WARMUP)
    cfg = config(2, {"optimizer": "adamw_8bit", "min_8bit_size": 256}, **top)

    def run(engine, steps):
        for step in steps:
            micro_step(engine, tuple(t.to(torch.bfloat16) if t is not None else t
                                     for t in batch_for(rank, step)))

    first, opt, _, _ = zeroopt.deepspeed.initialize(model=mlp(), config=cfg)
    run(first, range(3))
    first.save_checkpoint(path)
    saved = [p.detach().clone() for p in first.module.parameters()]
    run(first, range(3, 6))
    second, _, _, _ = zeroopt.deepspeed.initialize(model=mlp(seed=1), config=cfg)
    load_path, _ = second.load_checkpoint(path)
    run(second, range(3, 6))
    third, _, _, _ = zeroopt.deepspeed.initialize(model=mlp(seed=2), config=cfg)
    third.load_checkpoint(path, load_module_only=True)
    run(third, range(3, 4))
    kept = all(torch.equal(p, q) for p, q in zip(third.module.parameters(), saved))
    run(third, range(4, 6))  # and later steps move them: the step updates those masters
    moved = any(not torch.equal(p, q) for p, q in zip(third.module.parameters(), saved))
    tag_dir = os.path.join(path, "global_step3")
    deepspeed_file = torch.load(os.path.join(tag_dir, "mp_rank_00_model_states.pt"),
                                weights_only=False)
    return {"identical": identical(second.module, first.module),
            "lr": (first.get_lr(), second.get_lr()),
            "steps": (first.global_steps, second.global_steps),
            "load_path": load_path, "tag_dir": tag_dir,
            "zeroopt_dir": os.listdir(os.path.join(tag_dir, "zeroopt")),
            "deepspeed_saved_optimizer": deepspeed_file["optimizer"],
            "eight_bit_states": opt.state_dict()["state"][0]["exp_avg"].dtype == torch.uint8,
            "module_only_kept_weights": kept, "module_only_then_trains": moved}


# -- zeroopt's FusedOptimizer inside DeepSpeed's ZeRO -----------------------------------------

HP = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)  # test_states_single.py's


def wide_mlp(seed: int = 0) -> nn.Module:
    """14,000 params: each rank's ZeRO partition (7,000 at W = 2) is over min_8bit_size 4096."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 96), nn.Tanh(), nn.Linear(96, 80))


def zero_engine(stage: int, make_optimizer, seed: int = 0):
    import deepspeed

    model = wide_mlp(seed)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=make_optimizer(model.parameters()),
        config={"train_micro_batch_size_per_gpu": 32, "gradient_clipping": 0.0,
                "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True,
                "steps_per_print": 10**9})
    return engine


def wide_batch(rank: int, step: int):
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(32, 64, generator=g), torch.randn(32, 80, generator=g), None


def fused_suite() -> dict:
    rank = join_deepspeed()
    try:
        import bitsandbytes as bnb
    except ImportError:
        bnb = None
    makers = {
        "torch_fused": lambda p: torch.optim.AdamW(p, fused=True, **HP),
        "torch_loop": lambda p: torch.optim.AdamW(p, foreach=False, **HP),
        "ours_32bit": lambda p: zeroopt.FusedOptimizer(p, "adamw", **HP),
        "ours_8bit": lambda p: zeroopt.FusedOptimizer(p, "adamw_8bit", **HP),
    }
    if bnb is not None:
        makers["bnb_8bit"] = lambda p: bnb.optim.AdamW8bit(p, **HP)
    out = {}
    for stage in (1, 2):
        engines = {name: zero_engine(stage, make) for name, make in makers.items()}
        for step in range(10):
            for engine in engines.values():
                micro_step(engine, wide_batch(rank, step))
        reference = engines["torch_fused"].module
        out[stage] = {name: (identical(engine.module, reference),
                             rel_err(engine.module, reference),
                             max((p - q).abs().max().item() for p, q in
                                 zip(engine.module.parameters(), reference.parameters())))
                      for name, engine in engines.items()}
        inner = engines["ours_8bit"].optimizer.optimizer  # DeepSpeed's ZeRO wraps it
        state = next(iter(inner.state.values()))
        out[stage]["ours_8bit_state"] = {k: (str(v.dtype), v.numel()) for k, v in state.items()}
        out[stage]["partition"] = inner.param_groups[0]["params"][0].numel()
    with tempfile.TemporaryDirectory() as scratch:
        import torch.distributed as dist

        path = [scratch]
        dist.broadcast_object_list(path, src=0)
        out["resume"] = fused_resume(os.path.join(path[0], "ckpt"), rank)
        dist.barrier()
    return out


def fused_resume(path: str, rank: int) -> bool:
    """ZeRO-2 with 8-bit FusedOptimizer: DeepSpeed saves and loads its state per rank."""
    def make(p):
        return zeroopt.FusedOptimizer(p, "adamw_8bit", **HP)

    first = zero_engine(2, make)
    for step in range(3):
        micro_step(first, wide_batch(rank, step))
    first.save_checkpoint(path)
    for step in range(3, 6):
        micro_step(first, wide_batch(rank, step))
    second = zero_engine(2, make, seed=1)
    second.load_checkpoint(path)
    for step in range(3, 6):
        micro_step(second, wide_batch(rank, step))
    return identical(second.module, first.module)
