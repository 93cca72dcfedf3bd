"""Transformers Trainer runs on a tiny Llama built from a config (no download), shared by
test_transformers.py and the ranks it spawns.

``train(...)`` builds the model from a fixed seed, trains it with a real Trainer (or
ZeroTrainer) for a few steps and returns the final params, the logs and the loss on a fixed
batch before and after, so runs can be compared with each other.
"""

from __future__ import annotations

import os

import torch

SEQ, VOCAB = 16, 128
PROJECTION_ARGS = "rank=4,update_proj_gap=2"  # GaLore/APOLLO on 32 x 32 and 64 x 32 matrices


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                         max_position_embeddings=SEQ)
    return LlamaForCausalLM(config)


def dataset(n: int = 64) -> list[dict]:
    """``n`` random token sequences, their own labels (the model shifts them)."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (n, SEQ), generator=g)
    return [{"input_ids": row, "labels": row.clone()} for row in ids]


def eval_batch() -> dict:
    rows = dataset(8)
    return {key: torch.stack([row[key] for row in rows]) for key in rows[0]}


def arguments(output_dir: str, **overrides):
    from transformers import TrainingArguments

    settings = dict(output_dir=output_dir, max_steps=3, per_device_train_batch_size=8,
                    learning_rate=1e-3, lr_scheduler_type="constant", logging_steps=1,
                    save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
                    per_device_eval_batch_size=8,
                    dataloader_num_workers=0, seed=0)
    return TrainingArguments(**{**settings, **overrides})


def train(output_dir: str, trainer: str = "zero", optimizer=None, resume: str | None = None,
          dataset_size: int = 64, zeroopt: dict | None = None, **argument_overrides) -> dict:
    """Train a fresh tiny Llama. ``trainer``: "zero" (ZeroTrainer), "plain" (Trainer).
    ``optimizer``: a function (model) -> optimizer, passed as ``optimizers=(opt, None)``.
    Returns the params as the Trainer left them, and after ``opt.eval()`` (schedule-free's
    average; the same params for other rules), with the loss on eval_batch() at each."""
    from transformers import Trainer

    from zeroopt.transformers import ZeroTrainer

    torch.set_num_threads(1)
    model = tiny_llama()
    batch = eval_batch()
    with torch.no_grad():
        loss_before = model(**batch).loss.item()
    initial = [p.detach().clone() for p in model.parameters()]
    args = arguments(output_dir, **argument_overrides)
    kwargs = dict(model=model, args=args, train_dataset=dataset(dataset_size),
                  eval_dataset=dataset(8))  # the rows of eval_batch()
    if optimizer is not None:
        kwargs["optimizers"] = (optimizer(model), None)
    if trainer == "zero":
        run = ZeroTrainer(**kwargs, zeroopt=zeroopt)
    else:
        run = Trainer(**kwargs)
    run.train(resume_from_checkpoint=resume)
    params = {name: p.detach().clone() for name, p in model.named_parameters()}
    with torch.no_grad():
        loss_as_left = model(**batch).loss.item()
    opt = getattr(run.optimizer, "optimizer", run.optimizer)
    if hasattr(opt, "eval"):  # schedule-free: evaluate at the average, as the Trainer does
        opt.eval()
    eval_params = {name: p.detach().clone() for name, p in model.named_parameters()}
    with torch.no_grad():
        loss_after = model(**batch).loss.item()
    changed = max((p.detach() - p0).abs().max().item()
                  for p, p0 in zip(model.parameters(), initial))
    logs = [entry for entry in run.state.log_history if "loss" in entry]
    evaluations = [entry["eval_loss"] for entry in run.state.log_history if "eval_loss" in entry]
    return dict(params=params, logs=logs, loss_before=loss_before, loss_after=loss_after,
                loss_as_left=loss_as_left, eval_params=eval_params, evaluations=evaluations,
                changed=changed, wrapper=type(run.model_wrapped).__name__,
                steps=run.state.global_step, should_save=run.args.should_save)


def two_rank_runs(root: str) -> dict:
    """On each of 2 ranks (Trainer sees a torch.distributed job): the runs the test compares
    with one process training on the same global batch."""
    import torch.distributed as dist

    rank = dist.get_rank()
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_WORLD_SIZE="2")
    runs = {name: train(os.path.join(root, name), **settings)
            for name, settings in distributed_settings(per_device_batch=4).items()}
    # save (every rank writes its shard) and resume, at 2 ranks
    settings = resume_settings(per_device_batch=4)
    runs["straight"] = train(os.path.join(root, "straight"), **settings)
    runs["resumed"] = train(os.path.join(root, "resumed"),
                            resume=os.path.join(root, "straight", "checkpoint-2"), **settings)
    # torchrun on CPU without use_cpu=True: Transformers alone would train each rank on all the
    # 32 samples (8 steps of 4, every rank saving); ZeroTrainer sets it up data-parallel
    runs["without_use_cpu"] = train(os.path.join(root, "without_use_cpu"), use_cpu=False,
                                    max_steps=-1, num_train_epochs=1, dataset_size=32,
                                    per_device_train_batch_size=4)
    return runs


def resume_settings(per_device_batch: int) -> dict:
    return dict(optim="adamw_torch", optim_args="stage=2", max_steps=4, save_strategy="steps",
                save_steps=2, per_device_train_batch_size=per_device_batch)


def distributed_settings(per_device_batch: int) -> dict[str, dict]:
    """The runs compared at 1 and 2 ranks (global batch 8 each step)."""
    common = dict(per_device_train_batch_size=per_device_batch)
    return {
        # clipping active (the norm is ~1), stage 2, two param groups
        "adamw_stage2_clip": dict(common, optim="adamw_torch", max_grad_norm=0.5,
                                  weight_decay=0.1, optim_args="stage=2"),
        # whole matrices spread over the ranks, each stepped during backward, accumulation
        "galore_layerwise_accumulate": dict(
            dict(common, per_device_train_batch_size=per_device_batch // 2),
            optim="galore_adamw_layerwise", optim_target_modules=["attn", "mlp"],
            optim_args=PROJECTION_ARGS, max_grad_norm=0.0, gradient_accumulation_steps=2),
        # the other way: the Trainer's DDP averages, the optimizer takes param.grad as it is
        "adamw_under_ddp": dict(common, optim="adamw_torch", max_grad_norm=0.5,
                                optim_args="average_grads=false"),
    }
