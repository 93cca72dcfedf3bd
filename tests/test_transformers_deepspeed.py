"""ZeroTrainer with ``--deepspeed ds.json``: the ZeRO-2 config of Transformers' DeepSpeed docs,
"auto" everywhere the docs put it (ranks/transformers_deepspeed.py: HF_ZERO2), runs on
zeroopt's sharding without DeepSpeed's engine, real Trainer and real DeepSpeed scheduler.

Tolerance: none. Each comparison is between two runs of the same code (ZeroTrainer building a
ZeroOptimizer with the same groups and options, the same scheduler class, stepped at the same
points): the config's "auto" values resolved by Transformers must give exactly the arguments'
values, so the params agree bit for bit (0.0). A wrong value shows far above rounding: the
Trainer's constant lr in place of DeepSpeed's WarmupLR moves the params 4.3e-3 apart in 4 steps
(measured).

The default suite runs one process (in this one); the same at 2 ranks with everything else
(bf16, no scheduler, DeepSpeed's Muon, a torchrun-style launch without use_cpu) spawns ranks
that import Transformers and DeepSpeed (~45 s on 2 cores): marked slow.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")
if importlib.util.find_spec("deepspeed") is None:  # not imported here: it takes seconds
    pytest.skip("deepspeed is not installed", allow_module_level=True)

from distributed import run_ranks  # noqa: E402
from ranks.transformers_deepspeed import (AS_ARGUMENTS, SETTINGS, config, error,  # noqa: E402
                                          reference_lrs, train, warmup_lr)

# The Trainer's lr_scheduler_type="constant_with_warmup" over the same 2 warmup steps: what the
# logs would show if the Trainer's scheduler ran instead of DeepSpeed's WarmupLR (log warmup,
# its first two steps at warmup_min_lr: it is stepped after each optimizer step).
TRAINER_WARMUP = [0.0, 5e-4, 1e-3, 1e-3]
MISMATCH = "Please correct the following DeepSpeed config values that mismatch TrainingArguments"


def max_diff(a: dict, b: dict) -> float:
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def test_the_docs_config_trains_as_its_settings_given_as_arguments(tmp_path):
    """One process: the docs' config (AdamW, WarmupLR, ZeRO-2 with offload, all "auto") equals
    ZeroTrainer given the same settings as TrainingArguments + optim/optim_args, with
    DeepSpeed's WarmupLR built by hand; the logged lr is DeepSpeed's schedule; a checkpoint
    at step 2 resumes bit for bit, the lr logged from where it was."""
    ds = train(str(tmp_path / "ds"), deepspeed=config(), save_strategy="steps", save_steps=2)
    by_hand = train(str(tmp_path / "args"), scheduler=warmup_lr, decay_all=True,
                    **AS_ARGUMENTS)
    assert max_diff(ds["params"], by_hand["params"]) == 0.0
    assert ds["changed"] > 1e-3
    assert ds["lrs"] == by_hand["lrs"] == reference_lrs(SETTINGS["max_steps"])
    assert ds["lrs"] != TRAINER_WARMUP
    assert ds["scheduler"] == "WarmupLR" and ds["paged"] is True  # offload_optimizer: paged
    assert ds["deepspeed"] == (None, False)  # the Trainer ran without DeepSpeed
    assert ds["max_grad_norm"] == SETTINGS["max_grad_norm"]  # "auto"
    resumed = train(str(tmp_path / "resumed"), deepspeed=config(),
                    resume=str(tmp_path / "ds" / "checkpoint-2"))
    assert max_diff(resumed["params"], ds["params"]) == 0.0
    assert resumed["lrs"] == ds["lrs"]  # WarmupLR's state holds its iteration only


def test_values_that_contradict_the_arguments_are_refused_at_construction(tmp_path):
    """Transformers' own mismatch error (a non-"auto" value that is not the arguments'), and
    optim_args next to a config that names the optimizer (Transformers would ignore them)."""
    message = error(str(tmp_path / "a"), deepspeed=config(train_micro_batch_size_per_gpu=16))
    assert MISMATCH in message
    assert "ds train_micro_batch_size_per_gpu=16 vs hf per_device_train_batch_size=4" in message
    message = error(str(tmp_path / "b"), deepspeed=config(gradient_clipping=1.0))
    assert "ds gradient_clipping=1.0 vs hf max_grad_norm=0.5" in message
    message = error(str(tmp_path / "c"), deepspeed=config(), optim_args="stage=1")
    assert "Transformers ignores optim_args" in message and '"zeroopt" section' in message
    assert error(str(tmp_path / "d"), deepspeed=config()) == ""


@pytest.mark.slow  # 2 ranks importing Transformers and DeepSpeed: ~45 s on 2 cores
def test_two_ranks(tmp_path):
    """2 ranks (gloo): the docs' config launched as torchrun would (no use_cpu), against its
    settings as arguments; without a "scheduler" the Trainer's; bf16 as DeepSpeed's (bf16 params,
    fp32 masters); DeepSpeed's Muon groups; the mismatch error; a resume."""
    two = run_ranks(2, _runs, str(tmp_path))
    for rank in (0, 1):
        runs = two[rank]
        ds = runs["deepspeed"]
        assert max_diff(ds["params"], runs["arguments"]["params"]) == 0.0
        assert max_diff(ds["params"], two[0]["deepspeed"]["params"]) == 0.0
        assert ds["lrs"] == runs["reference_lrs"] != TRAINER_WARMUP
        assert ds["world_size"] == 2 and ds["should_save"] == (rank == 0)
        assert ds["set_up_for"] == ("DEEPSPEED", "MULTI_CPU")  # set up again, data-parallel
        assert ds["changed"] > 1e-3 and ds["deepspeed"] == (None, False)
        assert max_diff(runs["resumed"]["params"], ds["params"]) == 0.0
        assert runs["resumed"]["lrs"] == ds["lrs"]
        # no "scheduler": lr_scheduler_type (cosine) as without --deepspeed
        assert runs["no_scheduler"]["scheduler"] == "LambdaLR"
        assert max_diff(runs["no_scheduler"]["params"],
                        runs["arguments_cosine"]["params"]) == 0.0
        assert runs["no_scheduler"]["lrs"] == runs["arguments_cosine"]["lrs"]
        # "bf16": the params cast before the ZeroOptimizer is built, as by hand
        assert {p.dtype for p in runs["bf16"]["params"].values()} == {torch.bfloat16}
        assert max_diff(runs["bf16"]["params"], runs["bf16_by_hand"]["params"]) == 0.0
        assert runs["bf16"]["changed"] > 1e-3
        assert MISMATCH in runs["mismatch"] and MISMATCH in runs["mismatch_clip"]
        assert "Transformers ignores optim_args" in runs["optim_args"]
    _check_muon_groups(two[0]["muon"]["groups"])


def _check_muon_groups(groups: list[dict]) -> None:
    """DeepSpeed's Muon through ZeroTrainer: the matrices at the config's lr; the rest (AdamW)
    at adam_lr with DeepSpeed's Muon defaults for betas and eps (not the arguments' 0.9/0.999,
    1e-8); weight decay on every param, norms too, as DeepSpeed's optimizer gets one group."""
    by_kind = {(g["use_muon"], g["weight_decay"]): g for g in groups}
    assert set(by_kind) == {(True, 0.1), (False, 0.1)}
    assert by_kind[True, 0.1]["lr"] == SETTINGS["learning_rate"]
    adamw = by_kind[False, 0.1]
    assert (adamw["lr"], adamw["betas"], adamw["eps"]) == (3e-4, (0.9, 0.95), 1e-10)
    assert "model.embed_tokens.weight" in adamw["names"]
    assert any("norm" in name for name in adamw["names"])


def _runs(root: str) -> dict:
    from ranks.transformers_deepspeed import runs

    return runs(root)
