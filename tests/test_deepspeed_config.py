"""An unchanged DeepSpeed config with zeroopt.deepspeed.initialize (zeroopt/deepspeed/config.py
and config_mapping.py).

configs/ds_zero2_adamw.json is put together from DeepSpeed's own docs (deepspeed.ai, the
deepspeedai/DeepSpeed repository): the "optimizer" example of docs/_pages/config-json.md
("Optimizer Parameters": lr 0.001, betas [0.8, 0.999], eps 1e-8, weight_decay 3e-7) with the type
AdamW that page lists, its "scheduler" example (WarmupLR) and gradient_clipping 1.0, and the
ZeRO-2 block of docs/_tutorials/zero.md ("Training a 10B Parameter GPT-2 model":
contiguous_gradients, overlap_comm, reduce_scatter, reduce_bucket_size 5e8,
allgather_bucket_size 5e8). Adapted to CPU: the docs' "fp16" block is left out (no fp16 on
CPU), and the batch is a test's (train_batch_size 16, 2 accumulation steps: 4 samples per
micro-batch at W = 2).

Run for real on 2 gloo ranks (one spawn, ranks/deepspeed_config.py), no mocks:
- with zeroopt: bit-identical to a plain ZeroOptimizer loop with the mapped settings written
  out by hand (the same code path: any mapping slip, a beta or the stage, changes the bits);
- through args.deepspeed_config (DeepSpeed's launcher): bit-identical to the config-dict run;
- with DeepSpeed alone (deepspeed.initialize builds its FusedAdam under its own ZeRO-2): within
  1e-6 relative to each param's largest magnitude, test_deepspeed.py's bound for the same AdamW
  computed by another kernel over another partition (a few fp32 ulps a step; observed ~1e-7).
  A wrong beta1 (0.9 for 0.8) moves the params ~1e-5 relative in these 6 steps: it would fail.
- DeepSpeed's Muon section: bit-identical to ZeroOptimizer over the hybrid groups written out.
The mapping of each optimizer type, the zero_optimization keys and each refusal are unit tests
of ``plan`` (no processes).
"""

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from distributed import run_ranks
from ranks import deepspeed_config as ranks
from zeroopt.deepspeed.config import ConfigError, plan

pytest.importorskip("deepspeed", reason="pip install deepspeed (the test extras)")

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-6
ZERO2_ADAMW = json.loads((ROOT / "configs" / "ds_zero2_adamw.json").read_text())


@pytest.fixture(scope="module")
def runs():
    return run_ranks(2, ranks.suite, timeout=300)


# -- the unchanged config, W = 2 -------------------------------------------------------------

def test_unchanged_config_trains_as_zero_optimizer_with_the_mapped_settings(runs):
    for run in runs:
        assert run["optimizer"] == "ZeroOptimizer" and run["deepspeed_zero_stage"] == 0
        assert run["settings"] == {"rule": "adamw", "stage": 2, "bucket_numel": 500_000_000,
                                   "betas": (0.8, 0.999), "eps": 1e-8, "weight_decay": 3e-7}
        assert run["steps"] == (6, 12)  # 12 micro-batches, 2 a step
        assert run["identical_to_mapped"]
        assert run["moved"] > 1e-3  # WarmupLR's log warm-up to 0.001 over 1000 steps: ~2.6e-4
    ids = [sum(run["ids"], []) for run in runs]
    assert sorted(ids[0] + ids[1]) == list(range(96))  # DeepSpeed's loader split the data


def test_the_launchers_args_deepspeed_config_runs_the_same(runs):
    for run in runs:
        assert run["launcher"] == {"identical": True, "stage": 2, "args_untouched": True}


@pytest.mark.slow  # DeepSpeed compiles its FusedAdam CPU op on a machine's first use: ~2 min
def test_the_same_config_with_deepspeed_alone():
    """DeepSpeed's own ZeRO-2 with its FusedAdam against zeroopt's stage 2 with torch's AdamW
    update: the same samples, the same LRs, params within 1e-6."""
    for run in run_ranks(2, ranks.suite, True, timeout=900):
        assert run["their_optimizer"] == ("DeepSpeedZeroOptimizer", "FusedAdam")
        assert run["their_zero_stage"] == 2 and run["their_steps"] == 6
        assert run["ids"] == run["their_ids"]
        assert run["lr"] == run["their_lr"] and run["lr"][0] == 0.0 < run["lr"][-1]
        assert run["rel_err_vs_deepspeed"] < TOL, run["rel_err_vs_deepspeed"]


def test_moot_keys_are_named_in_one_info_line_on_rank_0(runs):
    first, second = runs
    assert second["info"] == []
    (line,) = first["info"]
    for key in ("contiguous_gradients", "overlap_comm", "reduce_scatter",
                "allgather_bucket_size"):
        assert f"zero_optimization.{key}" in line
    assert "reduce_bucket_size" not in line  # mapped: bucket_numel


def test_deepspeeds_muon_section_runs_hybrid_groups(runs):
    for run in runs:
        out = run["muon"]
        muon, adamw = out["groups"]
        assert muon["use_muon"] and muon["shapes"] == [(48, 16), (8, 48)]
        assert (muon["lr"], muon["momentum"], muon["weight_decay"]) == (0.02, 0.9, 0.01)
        assert adamw == {"use_muon": False, "lr": 0.003, "momentum": 0.9, "betas": (0.9, 0.95),
                         "eps": 1e-10, "weight_decay": 0.01, "shapes": [(48,), (8,)]}
        assert out["identical"] and out["moved"] > 0.01


# -- the mapping (no processes) --------------------------------------------------------------

def kwargs_of(optimizer: dict, **top) -> dict:
    return plan({"optimizer": optimizer, **top}).optimizer_kwargs


def test_zero2_adamw_config_maps():
    p = plan(ZERO2_ADAMW)
    assert p.optimizer_kwargs == {"optimizer": "adamw", "lr": 0.001, "betas": (0.8, 0.999),
                                  "eps": 1e-8, "weight_decay": 3e-7, "stage": 2,
                                  "bucket_numel": 500_000_000}
    assert p.deepspeed_config == {"train_batch_size": 16, "gradient_accumulation_steps": 2,
                                  "gradient_clipping": 0.0, "steps_per_print": 2000,
                                  "scheduler": ZERO2_ADAMW["scheduler"]}
    assert p.gradient_clipping == 1.0 and p.param_dtype is None


@pytest.mark.parametrize("optimizer,expected", [
    # FusedAdam's defaults: weight_decay 0, not zeroopt's (torch.optim.AdamW's) 0.01
    ({"type": "AdamW"}, dict(optimizer="adamw", lr=1e-3, betas=(0.9, 0.999), eps=1e-8,
                             weight_decay=0.0)),
    # "Adam" is AdamW unless adam_w_mode is false (DeepSpeed's ADAM_W_MODE_DEFAULT)
    ({"type": "Adam", "params": {"lr": 3e-4}},
     dict(optimizer="adamw", lr=3e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)),
    ({"type": "Adam", "params": {"adam_w_mode": False, "weight_decay": 0.1}},
     dict(optimizer="adam", lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)),
    # torch_adam: torch.optim.AdamW, whose default weight_decay is 0.01
    ({"type": "AdamW", "params": {"torch_adam": True, "amsgrad": True}},
     dict(optimizer="adamw", lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01,
          amsgrad=True)),
    ({"type": "adamw", "params": {"betas": [0.9, 0.95], "weight_decay": 0.1}},
     dict(optimizer="adamw", lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)),
    # FusedLion's defaults (zeroopt's lion: lr 1e-4, betas (0.9, 0.99))
    ({"type": "Lion"}, dict(optimizer="lion", lr=1e-3, betas=(0.9, 0.999), weight_decay=0.0)),
    ({"type": "Lion", "params": {"lr": 1e-4, "betas": [0.95, 0.98], "weight_decay": 0.1}},
     dict(optimizer="lion", lr=1e-4, betas=(0.95, 0.98), weight_decay=0.1)),
    # MuonWithAuxAdam's Muon half: lr 0.02, momentum 0.95, weight_decay 0 (zeroopt's: 0.1)
    ({"type": "Muon"}, dict(optimizer="muon", lr=0.02, momentum=0.95, weight_decay=0.0,
                            nesterov=True, ns_steps=5, adjust_lr_fn="original")),
    ({"type": "Muon", "params": {"lr": 1e-3, "muon_lr": 0.05, "ns_method": "standard"}},
     dict(optimizer="muon", lr=0.05, momentum=0.95, weight_decay=0.0, nesterov=True,
          ns_steps=5, adjust_lr_fn="original")),
], ids=["adamw", "adam", "adam-l2", "torch-adamw", "adamw-betas", "lion", "lion-params",
        "muon", "muon-lr"])
def test_optimizer_types_map_with_deepspeeds_defaults(optimizer, expected):
    assert kwargs_of(optimizer) == expected


def test_muon_adamw_half_takes_deepspeeds_settings():
    assert plan({"optimizer": {"type": "Muon"}}).adamw_group == {
        "lr": 3e-4, "betas": (0.9, 0.95), "eps": 1e-10, "weight_decay": 0.0}
    p = plan({"optimizer": {"type": "Muon", "params": {
        "lr": 0.01, "adam_lr": 1e-3, "betas": [0.8, 0.9], "eps": 1e-8, "weight_decay": 0.1}}})
    assert p.adamw_group == {"lr": 1e-3, "betas": (0.8, 0.9), "eps": 1e-8, "weight_decay": 0.1}
    assert plan({"optimizer": {"type": "Muon", "params": {"lr": 0.01}}}).adamw_group["lr"] == 0.01


def test_param_groups_resolve_the_adamw_half_as_deepspeed_does():
    """Built from the model: the AdamW group takes the section's settings; given groups keep
    their own values (DeepSpeed resolves the group's last) and take the rest."""
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    p = plan({"optimizer": {"type": "Muon", "params": {"adam_lr": 1e-3}}})
    muon, adamw = p.param_groups(model)
    assert [q.shape for q in muon["params"]] == [torch.Size([8, 4]), torch.Size([2, 8])]
    assert adamw["use_muon"] is False
    assert {k: adamw[k] for k in p.adamw_group} == p.adamw_group
    given = [{"params": [model[0].weight]},
             {"params": [model[0].bias], "use_muon": False, "lr": 0.5}]
    _, other = p.param_groups(model, given)
    assert other["lr"] == 0.5 and other["betas"] == (0.9, 0.95) and other["eps"] == 1e-10
    assert "betas" not in given[1]  # the caller's dicts are left as they were
    plain = plan({"optimizer": {"type": "AdamW"}}).param_groups(model)
    assert [id(q) for q in plain] == [id(q) for q in model.parameters()]


@pytest.mark.parametrize("zero,expected,ignored", [
    ({"stage": 1}, {"stage": 1}, []),
    ({"stage": 0, "overlap_comm": True}, {}, ["zero_optimization.overlap_comm"]),
    (True, {"stage": 1}, []),  # DeepSpeed's old form
    ({"stage": 2, "reduce_bucket_size": 2e8, "round_robin_gradients": True,
      "stage3_max_live_parameters": 1e9},
     {"stage": 2, "bucket_numel": 200_000_000},
     ["zero_optimization.round_robin_gradients", "zero_optimization.stage3_max_live_parameters"]),
    ({"stage": 2, "offload_optimizer": {"device": "cpu", "pin_memory": True}},
     {"stage": 2, "paged": True}, ["zero_optimization.offload_optimizer.pin_memory"]),
    ({"stage": 1, "offload_optimizer": {"device": "nvme", "nvme_path": "/local_nvme"}},
     {"stage": 1, "paged": True, "page_dir": "/local_nvme"}, []),
    ({"stage": 2, "offload_optimizer": {"device": "none"}, "offload_param": {"device": "none"}},
     {"stage": 2}, ["zero_optimization.offload_param"]),
], ids=["stage1", "stage0", "bool", "buckets", "offload-cpu", "offload-nvme", "offload-none"])
def test_zero_optimization_maps(zero, expected, ignored):
    p = plan({"optimizer": {"type": "AdamW"}, "zero_optimization": zero})
    got = {k: v for k, v in p.optimizer_kwargs.items() if k in
           ("stage", "bucket_numel", "paged", "page_dir")}
    assert got == expected
    assert list(p.ignored) == ignored
    assert "zero_optimization" not in p.deepspeed_config  # DeepSpeed runs at stage 0


def test_precision_and_communication_map():
    p = plan({"optimizer": {"type": "AdamW"}, "communication_data_type": "bf16",
              "bf16": {"enabled": True, "bf16_optimizer_states": True,
                       "bf16_master_weights_and_grads": True}})
    assert p.optimizer_kwargs["reduce_dtype"] == torch.bfloat16
    assert p.optimizer_kwargs["state_precision"] == "bf16"
    assert p.param_dtype == torch.bfloat16
    assert p.ignored == ("bf16.bf16_master_weights_and_grads",)
    assert "communication_data_type" not in p.deepspeed_config and "bf16" not in \
        p.deepspeed_config


def test_zeroopt_section_adds_options_and_wins():
    p = plan({**ZERO2_ADAMW, "zeroopt": {"state_precision": "8bit", "lr": 3e-4, "stage": 1}})
    assert p.optimizer_kwargs == {"optimizer": "adamw", "lr": 3e-4, "betas": (0.8, 0.999),
                                  "eps": 1e-8, "weight_decay": 3e-7, "stage": 1,
                                  "bucket_numel": 500_000_000, "state_precision": "8bit"}
    # naming the optimizer chooses the rule: what it takes carries over, the rest is named
    p = plan({**ZERO2_ADAMW, "zeroopt": {"optimizer": "lion_8bit"}})
    assert p.optimizer_kwargs == {"optimizer": "lion_8bit", "lr": 0.001, "betas": (0.8, 0.999),
                                  "weight_decay": 3e-7, "stage": 2,
                                  "bucket_numel": 500_000_000}
    assert "optimizer.params.eps (not a hyperparameter of lion_8bit)" in p.info()
    # zeroopt's lamb, by name, with DeepSpeed's Lamb section's lr, betas, eps, weight_decay
    p = plan({"optimizer": {"type": "Lamb", "params": {"lr": 2e-3, "weight_decay": 0.01}},
              "zeroopt": {"optimizer": "lamb"}})
    assert p.optimizer_kwargs == {"optimizer": "lamb", "lr": 2e-3, "betas": (0.9, 0.999),
                                  "eps": 1e-8, "weight_decay": 0.01}


REFUSED = [
    ({"optimizer": {"type": "Lamb"}}, ["compute different updates", "clamps the trust ratio",
                                       '"zeroopt": {"optimizer": "lamb"}',
                                       "deepspeed.initialize"]),
    ({"optimizer": {"type": "Lamb", "params": {"max_coeff": 5.0}},
      "zeroopt": {"optimizer": "lamb"}}, ["max_coeff: zeroopt's lamb does not clamp"]),
    ({"optimizer": {"type": "Lamb", "params": {"min_coeff": 0.1, "max_coeff": 5.0}}},
     ["max_coeff and min_coeff", "remove them"]),
    ({"optimizer": {"type": "Lamb", "params": {"eps_inside_sqrt": True}},
      "zeroopt": {"optimizer": "lamb"}}, ["eps outside the square root"]),
    ({"optimizer": {"type": "AdamW", "params": {"bias_correction": False}}},
     ["always bias-correct"]),
    ({"optimizer": {"type": "AdamW", "params": {"max_grad_norm": 1.0}}},
     ['"gradient_clipping"']),
    ({"optimizer": {"type": "AdamW", "params": {"weight_decy": 0.1}}},
     ['unknown key "weight_decy"', 'Did you mean "weight_decay"']),
    ({"optimizer": {"type": "Muon", "params": {"per_head_muon": True}}},
     ["per_head_muon=true", "whole"]),
    ({"optimizer": {"type": "Muon", "params": {"adam_w_mode": False}}}, ["AdamW"]),
    ({"optimizer": {"type": "Muon", "params": {"ns_method": "svd"}}}, ['"gram" or "standard"']),
    ({"optimizer": {"type": "Adagrad"}}, ["maps DeepSpeed's Adam, AdamW, Lamb, Lion and Muon",
                                          "zeroopt.available_optimizers()"]),
    ({"optimizer": {"type": "AdamW"}, "zero_optimization": {"stage": 3}},
     ['set "stage": 2', "zeroopt.FusedOptimizer"]),
    ({"optimizer": {"type": "AdamW"},
      "zero_optimization": {"stage": 2, "offload_param": {"device": "cpu"}}},
     ["remove offload_param", "paged states"]),
    ({"optimizer": {"type": "AdamW"},
      "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "nvme"}}},
     ['needs "nvme_path"']),
    ({"optimizer": {"type": "AdamW"}, "zero_optimization": {"stage": 2, "overlap_com": True}},
     ['Did you mean "overlap_comm"']),
    ({"optimizer": {"type": "AdamW"}, "zero_optimization": {"stage": 2,
                                                             "zenflow": {"topk_ratio": 0.1}}},
     ["zenflow", "remove it"]),
    ({"optimizer": {"type": "AdamW"}, "communication_data_type": "fp16"}, ['"fp32" or "bf16"']),
    ({"optimizer": {"type": "AdamW"}, "gradient_allreduce_op": "sum"}, ["averages"]),
    ({"optimizer": {"type": "AdamW", "params": {"lr": "auto"}}},
     ['"optimizer.params.lr" is "auto"', "TrainingArguments"]),
    ({"optimizer": {"type": "AdamW"}, "train_micro_batch_size_per_gpu": "auto"},
     ['"train_micro_batch_size_per_gpu" is "auto"']),
    ({"optimizer": {"type": "AdamW"}, "fp16": {"enabled": True}}, ['"bf16": {"enabled": true}']),
]


@pytest.mark.parametrize("config,says", REFUSED, ids=[says[0][:28] for _, says in REFUSED])
def test_refusals_name_the_cause_and_the_fix(config, says):
    with pytest.raises(ConfigError) as error:
        plan(config)
    for text in says:
        assert text in str(error.value), str(error.value)
