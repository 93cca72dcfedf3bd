"""zeroopt in Transformers' Trainer: real Trainer runs on a tiny Llama built from a config.

Tolerances: runs that differ only in floating-point summation order (a 2-rank average against
a 1-rank mean, zeroopt's one flat gradient norm against torch's norm of per-param norms) agree
to a few fp32 ulps of the values involved; 3 steps of lr 1e-3 move the params by ~3e-3, so
1e-6 sits far above the rounding (measured: 1.4e-7) and far below any real difference (an
unclipped, undivided or unreduced gradient changes the params by ~1e-4 or more).
"""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

import zeroopt  # noqa: E402
from ranks.transformers import (PROJECTION_ARGS, distributed_settings,  # noqa: E402
                                resume_settings, train)
from distributed import run_ranks  # noqa: E402
from transformers.training_args import OptimizerNames  # noqa: E402

TRANSFORMERS_NAMES = {name.value for name in OptimizerNames}
ROUNDING = 1e-6  # see the module docstring


def max_diff(a: dict, b: dict) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


def settings_for(name: str) -> dict:
    """TrainingArguments for a registry name: ``optim`` where Transformers knows the name,
    else ``optim_args="optimizer=..."``; layerwise names cannot clip."""
    projected = name.startswith(("galore", "apollo"))
    extra = [PROJECTION_ARGS] if projected else []
    settings = dict(max_grad_norm=0.0 if name.endswith("_layerwise") else 1.0)
    if projected:
        settings["optim_target_modules"] = ["attn", "mlp"]
    if name in TRANSFORMERS_NAMES:
        settings["optim"] = name
    else:
        extra.insert(0, f"optimizer={name}")
    if name == "schedule_free_radam":  # its first steps (rho_t <= 4) take no step by default
        extra.append("silent_sgd_phase=false")
    if extra:
        settings["optim_args"] = ",".join(extra)
    return settings


@pytest.mark.parametrize("name", zeroopt.available_optimizers())
def test_every_registry_name_trains_in_the_trainer(name, tmp_path):
    run = train(str(tmp_path), dataset_size=24, **settings_for(name))
    assert run["changed"] > 1e-6, f"{name}: the params did not move"
    assert run["loss_after"] < run["loss_before"], f"{name}: {run}"
    norms = [entry.get("grad_norm") for entry in run["logs"]]
    if name.endswith("_layerwise"):
        assert norms == [None] * 3  # no global norm exists: nothing to log
    else:  # the ZeroOptimizer's norm: the Trainer's own would read 0 (param.grad is consumed)
        assert all(0.1 < norm < 10 for norm in norms), norms


def test_optimizers_argument_equals_building_from_training_arguments(tmp_path):
    """optimizers=(ZeroOptimizer, None) in a plain Trainer and in ZeroTrainer, and ZeroTrainer
    building it from optim="adamw_torch": the same training, bit for bit."""
    def own(model):
        return zeroopt.ZeroOptimizer(model.parameters(), "adamw", lr=1e-3, weight_decay=0.0)

    common = dict(optim="adamw_torch", max_grad_norm=0.0)
    plain = train(str(tmp_path / "plain"), trainer="plain", optimizer=own, **common)
    passed = train(str(tmp_path / "passed"), optimizer=own, **common)
    built = train(str(tmp_path / "built"), **common)
    assert max_diff(plain["params"], built["params"]) == 0.0
    assert max_diff(passed["params"], built["params"]) == 0.0
    assert built["changed"] > 1e-3


@pytest.mark.parametrize("optimizer", ["sgd", "adamw_torch"])
def test_clipping_matches_torch_in_the_plain_trainer(optimizer, tmp_path):
    """max_grad_norm clips zeroopt's gradient shard by the global norm, as the Trainer clips
    torch's param.grad: same params, same logged norms. Clipping is active (norms ~0.8-1.4 >
    0.3), and without it the params differ by far more than the tolerance."""
    settings = dict(optim=optimizer, learning_rate=0.05 if optimizer == "sgd" else 1e-3,
                    weight_decay=0.01, adam_epsilon=1e-3)  # eps ~ |update|: Adam feels the clip
    torch_run = train(str(tmp_path / "torch"), trainer="plain", max_grad_norm=0.3, **settings)
    zero_run = train(str(tmp_path / "zero"), max_grad_norm=0.3, **settings)
    unclipped = train(str(tmp_path / "unclipped"), max_grad_norm=0.0, **settings)
    assert max_diff(zero_run["params"], torch_run["params"]) < ROUNDING
    assert max_diff(unclipped["params"], torch_run["params"]) > 100 * ROUNDING
    norms = [(z["grad_norm"], t["grad_norm"]) for z, t in zip(zero_run["logs"], torch_run["logs"])]
    assert all(t > 0.3 and abs(z - t) <= 1e-5 * t for z, t in norms), norms


@pytest.mark.parametrize("optim", ["adamw_torch", "galore_adamw_layerwise"])
def test_gradient_accumulation_equals_the_larger_batch(optim, tmp_path):
    """Two micro-batches of 4 accumulated equal one batch of 8. Layerwise names step during
    backward: without the micro-steps inside opt.no_sync(), the second one would be refused."""
    settings = dict(optim=optim, max_grad_norm=0.0, optim_target_modules=["attn", "mlp"],
                    optim_args=PROJECTION_ARGS if optim.startswith("galore") else None)
    accumulated = train(str(tmp_path / "ga"), per_device_train_batch_size=4,
                        gradient_accumulation_steps=2, **settings)
    whole = train(str(tmp_path / "whole"), per_device_train_batch_size=8, **settings)
    assert max_diff(accumulated["params"], whole["params"]) < ROUNDING
    assert whole["changed"] > 1e-3


@pytest.mark.parametrize("optim", ["adamw_torch", "adamw_bnb_8bit", "galore_adamw",
                                   "schedule_free_adamw"])
def test_save_and_resume_from_checkpoint(optim, tmp_path):
    """4 steps straight through equal 2 steps, a checkpoint, and 2 more in a new Trainer."""
    settings = dict(optim=optim, max_steps=4, save_strategy="steps", save_steps=2,
                    optim_target_modules=["attn", "mlp"],
                    optim_args=PROJECTION_ARGS if optim.startswith("galore") else None)
    straight = train(str(tmp_path / "straight"), **settings)
    checkpoint = tmp_path / "straight" / "checkpoint-2"
    assert (checkpoint / "zeroopt_optimizer").is_dir() and (checkpoint / "scheduler.pt").is_file()
    resumed = train(str(tmp_path / "resumed"), resume=str(checkpoint), **settings)
    assert max_diff(resumed["params"], straight["params"]) == 0.0
    assert straight["changed"] > 1e-3


def test_resume_from_a_plain_trainer_checkpoint(tmp_path):
    """A Trainer(adamw_torch) checkpoint's optimizer.pt (torch.optim's layout) resumes in
    ZeroTrainer: the result matches the plain Trainer run to rounding."""
    settings = dict(optim="adamw_torch", max_steps=4, save_strategy="steps", save_steps=2)
    plain = train(str(tmp_path / "plain"), trainer="plain", **settings)
    resumed = train(str(tmp_path / "resumed"), resume=str(tmp_path / "plain" / "checkpoint-2"),
                    **settings)
    assert max_diff(resumed["params"], plain["params"]) < ROUNDING


def test_two_ranks_equal_one_rank_with_the_same_global_batch(tmp_path):
    """2 processes (torch.distributed, gloo): the Trainer sees a 2-rank job and would wrap the
    model in DDP; ZeroTrainer lets the ZeroOptimizer average instead (or keeps DDP for
    average_grads=False). Each run equals one process on the same global batch of 8 (params,
    logged grad norms and losses); a 2-rank checkpoint resumes at 2 ranks and at 1."""
    two = run_ranks(2, _two_rank_runs, str(tmp_path / "two"))
    for name, settings in distributed_settings(per_device_batch=8).items():
        one = train(str(tmp_path / "one" / name), **settings)
        assert one["changed"] > 1e-3
        for rank in (0, 1):
            assert max_diff(two[rank][name]["params"], one["params"]) < ROUNDING, (name, rank)
            # DDP only where asked for: otherwise its all-reduce would find param.grad taken
            # and reduce zeros (a wasted full-size all-reduce per step; the same result)
            wrapper = "DistributedDataParallel" if name.endswith("ddp") else "LlamaForCausalLM"
            assert two[rank][name]["wrapper"] == wrapper
        for a, b in zip(two[0][name]["logs"], one["logs"]):
            assert abs(a["loss"] - b["loss"]) < 1e-5, (name, a, b)
            if b.get("grad_norm") is not None:  # a mis-scaled average shows here (Adam hides it)
                assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-5 * b["grad_norm"], (a, b)
    straight = two[0]["straight"]["params"]
    assert max_diff(two[0]["resumed"]["params"], straight) == 0.0
    # the 2-rank checkpoint resumed by one process (resharded): the same global batches
    resharded = train(str(tmp_path / "one" / "resumed"), resume=str(
        tmp_path / "two" / "straight" / "checkpoint-2"), **resume_settings(per_device_batch=8))
    assert max_diff(resharded["params"], straight) < ROUNDING
    # without use_cpu=True: half the steps per epoch (the data split), only rank 0 saves
    assert [two[rank]["without_use_cpu"]["steps"] for rank in (0, 1)] == [4, 4]
    assert [two[rank]["without_use_cpu"]["should_save"] for rank in (0, 1)] == [True, False]


def _two_rank_runs(root: str) -> dict:
    from ranks.transformers import two_rank_runs

    return two_rank_runs(root)


def test_schedule_free_evaluates_at_the_average_and_trains_on(tmp_path):
    """The Trainer calls opt.eval() before evaluating (schedule-free's params move to the
    average x) and opt.train() before the next step (back to y)."""
    settings = dict(optim="schedule_free_adamw", learning_rate=1e-2)
    evaluated = train(str(tmp_path / "eval"), eval_strategy="steps", eval_steps=1, **settings)
    plain = train(str(tmp_path / "plain"), **settings)
    # each evaluation ran at x, which differs from y (where a run without evaluation ends)
    assert len(evaluated["evaluations"]) == 3
    assert abs(evaluated["evaluations"][-1] - plain["loss_after"]) < 1e-5
    assert abs(plain["loss_after"] - plain["loss_as_left"]) > 5e-4  # measured: 2.2e-3
    # and training went on at y in between, undisturbed (y -> x -> y rounds; nothing more)
    assert max_diff(evaluated["eval_params"], plain["eval_params"]) < ROUNDING


def test_layerwise_with_clipping_is_refused(tmp_path):
    with pytest.raises(ValueError, match="max_grad_norm=0"):
        train(str(tmp_path), optim="galore_adamw_layerwise", optim_target_modules=["attn"],
              optim_args=PROJECTION_ARGS, max_grad_norm=1.0)


def test_a_model_moved_after_the_optimizer_is_refused(tmp_path):
    def built_then_cast(model):
        opt = zeroopt.ZeroOptimizer(model.parameters(), "adamw")
        model.double()  # the params are copied: the optimizer's buffers are left behind
        return opt

    with pytest.raises(RuntimeError, match="no longer a view"):
        train(str(tmp_path), optimizer=built_then_cast)
