"""TrainingArguments -> ZeroOptimizer: each name's hyperparameters are the ones Transformers'
own Trainer passes to its optimizer (read from Trainer.get_optimizer_cls_and_kwargs itself),
params are grouped as the Trainer groups them, and bad input gets a clear error."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")

from ranks.transformers import arguments, tiny_llama  # noqa: E402
from transformers import Trainer  # noqa: E402

from zeroopt.algorithms import get_rule  # noqa: E402
from zeroopt.transformers import create_optimizer, parse_optim_args, zeroopt_name  # noqa: E402

# Transformers' optimizer keyword -> (zeroopt hyperparameter, how the value translates)
TRANSLATED = {"optim_bits": ("state_precision", lambda bits: f"{bits}bit"),
              "is_paged": ("paged", bool), "t_alpha": ("alpha_warmup", int),
              "t_beta3": ("beta3_warmup", int)}
NOT_HYPERPARAMETERS = {"fused", "params", "optimizer_dict", "weight_decay"}  # groups set decay

CASES = [  # (optim, optim_args, the zeroopt name it runs)
    ("adamw_torch", None, "adamw_torch"),
    ("adamw_torch_fused", None, "adamw_torch_fused"),
    ("adamw_bnb_8bit", None, "adamw_bnb_8bit"),
    ("paged_adamw_8bit", None, "paged_adamw_8bit"),
    ("lion_8bit", None, "lion_8bit"),
    ("lion_32bit", None, "lion_32bit"),
    ("ademamix", "beta3=0.999,alpha=4.0,t_alpha=10,t_beta3=20", "ademamix"),
    ("paged_ademamix_8bit", None, "paged_ademamix_8bit"),
    ("rmsprop", "momentum=0.5,centered=true", "rmsprop"),
    ("rmsprop_bnb", None, "rmsprop"),
    ("rmsprop_bnb_8bit", None, "rmsprop_bnb_8bit"),
    ("sgd", "momentum=0.9,nesterov=true", "sgd"),
    ("adagrad", "lr_decay=0.01", "adagrad"),
    ("adafactor", None, "adafactor"),
    ("schedule_free_adamw", "weight_lr_power=1.5", "schedule_free_adamw"),
    ("galore_adamw", "rank=8,update_proj_gap=50,scale=0.5", "galore_adamw"),
    ("galore_adamw_8bit", "rank=8", "galore_adamw_8bit"),
    ("galore_adafactor", "rank=8,proj_type=left", "galore_adafactor"),
    ("galore_adamw_layerwise", "rank=8", "galore_adamw_layerwise"),
    ("apollo_adamw", "rank=1,scale_type=tensor,scale=128", "apollo_adamw"),
]


@pytest.mark.parametrize("optim,optim_args,expected", CASES)
def test_hyperparameters_are_the_trainers(optim, optim_args, expected, tmp_path):
    args = arguments(str(tmp_path), optim=optim, optim_args=optim_args, weight_decay=0.05,
                     adam_beta1=0.8, adam_beta2=0.95, adam_epsilon=1e-7,
                     optim_target_modules=["attn", "mlp"])
    model = tiny_llama()
    try:
        _, theirs = Trainer.get_optimizer_cls_and_kwargs(args, model)
    except ImportError as missing:  # the Trainer's own optimizer needs a package not here
        pytest.skip(str(missing))
    theirs_groups = theirs.get("params", [])
    opt = create_optimizer(args, model)
    assert opt.rule is get_rule(expected)
    for key, value in theirs.items():
        if key in NOT_HYPERPARAMETERS:
            continue
        ours, translate = TRANSLATED.get(key, (key, lambda v: v))
        for group in opt.param_groups:
            assert group[ours] == translate(value), (key, group[ours], value)
    # The Trainer's weight-decay groups: decay on all but biases and norms
    decay = set(Trainer.get_decay_parameter_names(None, model))
    for group in opt.param_groups:
        names = {n for n, p in model.named_parameters() if any(p is q for q in group["params"])}
        assert names <= decay if group["weight_decay"] == 0.05 else not names & decay
    # GaLore / APOLLO: the same projected params, with the same projection keys
    if theirs_groups:
        projected = [g for g in opt.param_groups if "rank" in g]
        assert {id(p) for g in projected for p in g["params"]} == \
               {id(p) for p in theirs_groups[1]["params"]}
        for key, value in theirs_groups[1].items():
            if key != "params":
                assert all(g[key] == value for g in projected), (key, value)


def test_names_transformers_does_not_have_go_through_optim_args(tmp_path):
    args = arguments(str(tmp_path), optim_args="optimizer=lamb,stage=2,state_precision=8bit")
    opt = create_optimizer(args, tiny_llama())
    assert opt.rule.name == "lamb" and opt.stage == 2
    assert all(g["state_precision"] == "8bit" and g["betas"] == (0.9, 0.999)
               for g in opt.param_groups)


@pytest.mark.parametrize("target_modules", [None, ["mlp"]], ids=["hidden", "mlp"])
def test_muon_gets_the_matrices_and_adamw_the_rest(target_modules, tmp_path):
    """Transformers has no "muon" optim: optim_args names it; optim_target_modules (or, unset,
    every hidden matrix) chooses the Muon matrices; the rest run AdamW with the Trainer's
    adam_beta1/2 and adam_epsilon; weight decay as the Trainer groups it."""
    args = arguments(str(tmp_path), optim_args="optimizer=muon,adjust_lr_fn=match_rms_adamw",
                     optim_target_modules=target_modules, weight_decay=0.1, adam_beta2=0.95,
                     adam_epsilon=1e-6)
    model = tiny_llama()
    opt = create_optimizer(args, model)
    names = {id(p): n for n, p in model.named_parameters()}
    muon = [names[id(p)] for g in opt.param_groups if g["use_muon"] for p in g["params"]]
    adamw = [g for g in opt.param_groups if not g["use_muon"]]
    wanted = ["mlp"] if target_modules else ["self_attn", "mlp"]
    assert muon and all(any(w in n for w in wanted) and n.endswith("weight") for n in muon)
    assert len(muon) == (6 if target_modules else 14)  # 2 layers x (3 mlp [+ 4 attn])
    assert all(g["betas"] == (0.9, 0.95) and g["eps"] == 1e-6 for g in adamw)
    assert {g["weight_decay"] for g in adamw} == {0.0, 0.1}  # embeddings/head decay, norms not
    assert all(g["weight_decay"] == 0.1 and g["eps"] == 1e-7 and
               g["adjust_lr_fn"] == "match_rms_adamw" for g in opt.param_groups if g["use_muon"])
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))


def test_overrides_win_over_the_arguments(tmp_path):
    args = arguments(str(tmp_path), optim="adamw_torch", optim_args="stage=2")
    opt = create_optimizer(args, tiny_llama(), optimizer="lion", stage=1, lr=3e-4)
    assert opt.rule.name == "lion" and opt.stage == 1
    assert all(g["lr"] == 3e-4 for g in opt.param_groups)


def test_optim_args_values_are_typed():
    assert parse_optim_args("rank=8, scale=0.25,lr=1e-3,centered=True,proj=random") == dict(
        rank=8, scale=0.25, lr=1e-3, centered=True, proj="random")
    with pytest.raises(ValueError, match="key=value"):
        parse_optim_args("rank8")


@pytest.mark.parametrize("optim,closest", [("adamw_torch_fusd", "adamw_torch_fused"),
                                           ("paged_lion8bit", "paged_lion_8bit")])
def test_a_name_zeroopt_does_not_run_suggests_the_closest(optim, closest):
    with pytest.raises(ValueError, match=f"closest zeroopt name is '{closest}'"):
        zeroopt_name(optim)


@pytest.mark.parametrize("optim", ["adan", "soap", "sophia"])
def test_a_name_zeroopt_has_no_rule_for_says_where_it_lives(optim):
    """Not a name merely spelt alike ("adan" -> "adam" is another optimizer, not a typo)."""
    with pytest.raises(ValueError, match=rf"no update rule for optim='{optim}' \(.*\)\. Pick a") \
            as caught:
        zeroopt_name(optim)
    assert "closest" not in str(caught.value)


@pytest.mark.parametrize("optim", ["adamw_torch_xla", "adamw_torch_npu_fused", "rmsprop_bnb",
                                   "rmsprop_bnb_32bit"])
def test_names_only_the_trainer_had_are_zeroopt_names(optim, tmp_path):
    """Registered, so ZeroOptimizer, the DeepSpeed section and the Trainer all take them; the
    bitsandbytes RMSprop names keep 32-bit states (Transformers: optim_bits=8 only for
    "8bit" names)."""
    import zeroopt
    from zeroopt.deepspeed.config import plan

    assert optim in zeroopt.available_optimizers() and zeroopt_name(optim) == optim
    opt = create_optimizer(arguments(str(tmp_path), optim=optim), tiny_llama())
    assert opt.rule is get_rule("rmsprop" if "rmsprop" in optim else "adamw")
    assert all(g["state_precision"] == "32bit" for g in opt.param_groups)
    kwargs = plan({"zeroopt": {"optimizer": optim}}).optimizer_kwargs
    assert zeroopt.ZeroOptimizer(tiny_llama().parameters(), **kwargs).rule is opt.rule


def test_bad_settings_get_clear_errors(tmp_path):
    model = tiny_llama()
    with pytest.raises(TypeError, match="Did you mean 'momentum'"):
        create_optimizer(arguments(str(tmp_path), optim="sgd", optim_args="momentun=0.9"), model)
    with pytest.raises(ValueError, match="optim_target_modules"):
        create_optimizer(arguments(str(tmp_path), optim="galore_adamw"), model)
    with pytest.raises(ValueError, match="Did you mean 'lamb'"):
        create_optimizer(arguments(str(tmp_path), optim_args="optimizer=lamp"), model)
    with pytest.raises(ValueError, match="is a ratio"):
        create_optimizer(arguments(str(tmp_path), optim="schedule_free_adamw",
                                   warmup_steps=0.1), model)
