"""ZeroTrainer with ``--deepspeed`` (TrainingArguments(deepspeed=config)) at 2 ranks, for
test_transformers_deepspeed.py: every run of the test in one spawn.

HF_ZERO2 is the ZeRO-2 config of Transformers' DeepSpeed docs (docs/source/en/deepspeed.md,
"ZeRO-2" example), "auto" everywhere the docs put it; only "reduce_bucket_size" is "auto" too
(the docs write 2e8; "auto" is the model's hidden size squared, 32 * 32 = 1024 here, so the
gradients travel in many buckets), as the docs' ZeRO-3 example has it.
"""

from __future__ import annotations

import copy
import os

import torch

from ranks.transformers import arguments, dataset, tiny_llama

HF_ZERO2 = {
    "fp16": {"enabled": "auto", "loss_scale": 0, "loss_scale_window": 1000,
             "initial_scale_power": 16, "hysteresis": 2, "min_loss_scale": 1},
    "bf16": {"enabled": "auto"},
    "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto",
                                              "weight_decay": "auto"}},
    "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": "auto", "warmup_max_lr": "auto",
                                                 "warmup_num_steps": "auto"}},
    "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu", "pin_memory": True},
                          "allgather_partitions": True, "allgather_bucket_size": 2e8,
                          "overlap_comm": True, "reduce_scatter": True,
                          "reduce_bucket_size": "auto", "contiguous_gradients": True},
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
    "steps_per_print": 2000,
    "train_batch_size": "auto",
    "train_micro_batch_size_per_gpu": "auto",
    "wall_clock_breakdown": False,
}
# What the config resolves to, as TrainingArguments: global batch 8 (4 a rank), clipping active
# (the norms are ~0.8), weight decay on every param (decay_all: a config's "optimizer" is
# DeepSpeed's, which Transformers hands one group of every param).
SETTINGS = dict(max_steps=4, per_device_train_batch_size=4, learning_rate=1e-3, warmup_steps=2,
                weight_decay=0.1, max_grad_norm=0.5)
# The config's optimizer and ZeRO sections, as optim/optim_args (offload_optimizer: paged)
AS_ARGUMENTS = dict(optim="adamw_torch", optim_args="stage=2,bucket_numel=1024,paged=true")


def config(**changes) -> dict:
    """HF_ZERO2 with top-level keys replaced (None: removed)."""
    out = copy.deepcopy(HF_ZERO2)
    for key, value in changes.items():
        if value is None:
            out.pop(key)
        else:
            out[key] = value
    return out


def warmup_lr(optimizer):
    """DeepSpeed's WarmupLR with the values HF_ZERO2's "auto" resolve to (log warmup, its
    default), built by hand."""
    from deepspeed.runtime.lr_schedules import WarmupLR

    return WarmupLR(optimizer, warmup_min_lr=0, warmup_max_lr=SETTINGS["learning_rate"],
                    warmup_num_steps=SETTINGS["warmup_steps"])


def train(output_dir: str, scheduler=None, bf16_model: bool = False, resume: str | None = None,
          build_only: bool = False, construct_only: bool = False, decay_all: bool = False,
          **overrides) -> dict:
    """A fresh tiny Llama trained by ZeroTrainer with SETTINGS and ``overrides``.
    ``scheduler``: a function (optimizer) -> scheduler that replaces the Trainer's;
    ``decay_all``: weight decay on every param (biases and norms too).
    ``build_only``: construct and build the optimizer, no training; ``construct_only``: only
    construct the trainer."""
    from zeroopt.transformers import ZeroTrainer

    class Trainer(ZeroTrainer):
        def create_scheduler(self, num_training_steps, optimizer=None):
            if scheduler is not None and self.lr_scheduler is None:
                self.lr_scheduler = scheduler(self.zero_optimizer)
            return super().create_scheduler(num_training_steps, optimizer)

        def get_decay_parameter_names(self, model):
            if decay_all:
                return [name for name, _ in model.named_parameters()]
            return super().get_decay_parameter_names(model)

    torch.set_num_threads(1)
    model = tiny_llama()
    initial = [p.detach().clone() for p in model.parameters()]
    if bf16_model:  # the params only, as DeepSpeed 0.19 casts them (rotary buffers stay fp32)
        for p in model.parameters():
            p.data = p.data.to(torch.bfloat16)
    args = arguments(output_dir, **{**SETTINGS, **overrides})
    set_up_for = args.distributed_state.distributed_type.name  # before ZeroTrainer
    run = Trainer(model=model, args=args, train_dataset=dataset(32))
    if construct_only:
        return {}
    if build_only:
        run.create_optimizer()
        return dict(groups=[{k: v for k, v in g.items() if k != "params"} | {
            "names": sorted(n for n, p in model.named_parameters()
                            if any(p is q for q in g["params"]))}
            for g in run.zero_optimizer.param_groups])
    run.train(resume_from_checkpoint=resume)
    return dict(params={n: p.detach().clone() for n, p in model.named_parameters()},
                lrs=[e["learning_rate"] for e in run.state.log_history if "loss" in e],
                norms=[e["grad_norm"] for e in run.state.log_history if "loss" in e],
                scheduler=type(run.lr_scheduler).__name__, max_grad_norm=run.args.max_grad_norm,
                deepspeed=(run.args.deepspeed, run.is_deepspeed_enabled),
                paged=run.zero_optimizer.param_groups[0].get("paged"),
                world_size=run.args.world_size, should_save=run.args.should_save,
                set_up_for=(set_up_for, run.args.distributed_state.distributed_type.name),
                # from the initial params in the final dtype (a bf16 cast alone is no change)
                changed=max((p.detach().float() - p0.to(p.dtype).float()).abs().max().item()
                            for p, p0 in zip(model.parameters(), initial)))


def reference_lrs(steps: int) -> list[float]:
    """The lr of each step under ``warmup_lr``, stepped as DeepSpeed's engine steps it (after
    each optimizer step) over a plain torch optimizer."""
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    scheduler, lrs = warmup_lr(optimizer), []
    for _ in range(steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


def error(output_dir: str, **overrides) -> str:
    """The message ZeroTrainer's construction raises with these arguments ("" if none)."""
    try:
        train(output_dir, construct_only=True, **overrides)
    except ValueError as e:
        return f"{type(e).__name__}: {e}"
    return ""


def runs(root: str) -> dict:
    """On each of 2 ranks: every run and error the test checks."""
    import torch.distributed as dist

    rank = dist.get_rank()
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_WORLD_SIZE="2", DS_ACCELERATOR="cpu")
    path = lambda name: os.path.join(root, name)  # noqa: E731
    out = {
        # the docs' config, saved at step 2, launched as torchrun on CPU would run it (no
        # use_cpu: the arguments are first set up for DeepSpeed, then again without it); the
        # same settings as arguments, with the scheduler built by hand
        "deepspeed": train(path("deepspeed"), deepspeed=config(), save_strategy="steps",
                           save_steps=2, use_cpu=False),
        "arguments": train(path("arguments"), scheduler=warmup_lr, decay_all=True,
                           **AS_ARGUMENTS),
        # no "scheduler" in the config: the Trainer's lr_scheduler_type
        "no_scheduler": train(path("no_scheduler"), deepspeed=config(scheduler=None),
                              lr_scheduler_type="cosine"),
        "arguments_cosine": train(path("arguments_cosine"), lr_scheduler_type="cosine",
                                  decay_all=True, **AS_ARGUMENTS),
        # bf16: bf16 params with fp32 masters, as DeepSpeed's bf16; the same by hand
        # (at the constant lr: WarmupLR's first two steps are at lr 0)
        "bf16": train(path("bf16"), deepspeed=config(bf16={"enabled": True}, scheduler=None),
                      bf16=True, max_steps=2),
        "bf16_by_hand": train(path("bf16_by_hand"), bf16_model=True, bf16=True, max_steps=2,
                              decay_all=True, **AS_ARGUMENTS),
        # DeepSpeed's Muon: its AdamW half gets the config's adam_lr and DeepSpeed's betas and
        # eps (not the arguments'), every param decayed (no offload: muon's
        # whole-matrix states are not paged)
        "muon": train(path("muon"), build_only=True, deepspeed=config(
            zero_optimization={"stage": 2},
            optimizer={"type": "Muon", "params": {"lr": "auto", "weight_decay": "auto",
                                                  "adam_lr": 3e-4}})),
        "mismatch": error(path("mismatch"), deepspeed=config(train_micro_batch_size_per_gpu=16)),
        "mismatch_clip": error(path("mismatch_clip"), deepspeed=config(gradient_clipping=1.0)),
        "optim_args": error(path("optim_args"), deepspeed=config(), optim_args="stage=1"),
    }
    out["resumed"] = train(path("resumed"), deepspeed=config(),
                           resume=path("deepspeed/checkpoint-2"))
    out["reference_lrs"] = reference_lrs(SETTINGS["max_steps"])
    return out
