"""zeroopt.wrap: every class it maps trains as that class does; what it does not map, or an
option its rule does not follow, is refused with the reason.

32-bit classes: the class and its wrap train 5 steps side by side on the same data in one
process, params within a tolerance per kind (observed errors beside them). 8-bit and paged
classes (bitsandbytes'):

1. the wrapped param groups are exactly those wrap builds from the class's 32-bit, unpaged
   counterpart, but for the state options its name implies (state_precision="8bit" with its
   min_8bit_size, paged=True): the counterpart's own side-by-side test then covers every
   hyperparameter;
2. the first step matches bitsandbytes' to fp32 rounding (both update in fp32 from zero
   states; only what each stores afterwards is rounded);
3. after 5 steps, zeroopt's 8-bit is at least as close to the 32-bit class as bitsandbytes'
   8-bit is (test_states_single.py's yardstick: each stores different codes, zeroopt the
   nearest one, so they are not expected to agree step by step).

One case at 2 ranks (tests/ranks/wrap.py) holds wrapped classes whose steps need every rank
(cautious Lion's per-param statistic, Adafactor's whole tensors) to the unsharded class.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import zeroopt
from distributed import run_ranks
from ranks import wrap as wrap_ranks
from zeroopt.algorithms import registered_rules

STEPS = 5
BNB = "bitsandbytes.optim"
PAGED = ("AdamW", "Adam", "Lion", "AdEMAMix")  # the families bitsandbytes pages
FAMILIES = {  # bitsandbytes family -> (rule, hyperparameters, tolerance of the 32-bit forms)
    # bitsandbytes' CPU kernels round Adam's step differently (m / (sqrt(v) + eps c2) times
    # lr c2 / c1): observed 6.3e-7 relative after 5 steps; RMSprop's 8.2e-7, Adagrad's 2.0e-7;
    # SGD and Lion bit for bit. Its AdEMAMix warms beta3 up without the 1e-8 apple's adds in
    # log(beta) (as pytorch-optimizer's): observed 2.2e-6.
    "AdamW": ("adamw", dict(lr=1e-2, betas=(0.85, 0.99), eps=1e-7, weight_decay=0.1), 2e-6),
    "Adam": ("adamw", dict(lr=1e-2, betas=(0.85, 0.99), weight_decay=0.1), 2e-6),
    "Lion": ("lion", dict(lr=1e-3, betas=(0.8, 0.95), weight_decay=0.1), 0.0),
    "AdEMAMix": ("ademamix", dict(lr=1e-2, betas=(0.85, 0.99, 0.999), alpha=4.0, t_alpha=4,
                                  t_beta3=3, weight_decay=0.1), 1e-5),
    "RMSprop": ("rmsprop", dict(lr=1e-3, alpha=0.9, eps=1e-6, weight_decay=0.1), 2e-6),
    "Adagrad": ("adagrad", dict(lr=1e-2, eps=1e-8, weight_decay=0.1), 2e-6),
    "SGD": ("sgd", dict(lr=1e-2, momentum=0.8, weight_decay=0.1), 0.0),
}
# bitsandbytes' own AdEMAMix32bit classes do not step (they allocate one first moment where
# the kernel reads two): their counterpart is AdEMAMix(optim_bits=32), paged or not.
STEPS_AS = {"AdEMAMix32bit": ("AdEMAMix", {}), "PagedAdEMAMix32bit": ("PagedAdEMAMix", {})}

# Hyperparameters exact in fp32, as tests/ranks/state_4bit.py's DYADIC_HP.
TORCHAO_HP = dict(lr=2.0**-7, weight_decay=0.125, betas=(0.5, 0.75))

# Not bitsandbytes: (class, hyperparameters, rule, tolerance). torch.optim's fused and
# foreach kernels round differently from zeroopt's: observed <= 4.1e-7.
OTHERS = [
    ("torch.optim.AdamW", dict(lr=1e-2, betas=(0.85, 0.99), weight_decay=0.1), "adamw", 1e-6),
    # (maximize with L2 decay here makes one gradient cancel to ~0, where Adam's step is
    # sign-like and the kernels' rounding shows: 9e-5 between torch's own fused and foreach)
    ("torch.optim.Adam", dict(lr=1e-2, weight_decay=0.1), "adam", 1e-6),
    ("torch.optim.Adam", dict(lr=1e-2, maximize=True), "adam", 1e-6),
    ("torch.optim.Adam", dict(lr=1e-2, weight_decay=0.1, decoupled_weight_decay=True),
     "adamw", 1e-6),
    ("torch.optim.SGD", dict(lr=1e-2, momentum=0.9, nesterov=True, weight_decay=0.1), "sgd",
     0.0),
    ("torch.optim.SGD", dict(lr=1e-2, momentum=0.9, dampening=0.1), "sgd", 0.0),
    ("torch.optim.RMSprop", dict(lr=1e-3, momentum=0.5, centered=True, weight_decay=0.1),
     "rmsprop", 1e-6),
    # its state exists (at step 0) from construction: not "stepped"
    ("torch.optim.Adagrad", dict(lr=1e-2, lr_decay=0.01, weight_decay=0.1,
                                 initial_accumulator_value=0.1), "adagrad", 1e-6),
    # transformers' Adafactor: the rule's own step is the class's, bit for bit
    ("transformers.optimization.Adafactor", dict(lr=1e-2, relative_step=False,
                                                 scale_parameter=False, beta1=0.9,
                                                 weight_decay=0.1), "adafactor", 0.0),
    ("transformers.optimization.Adafactor", dict(warmup_init=True), "adafactor", 0.0),
    ("lion_pytorch.Lion", dict(lr=1e-3, betas=(0.8, 0.95), weight_decay=0.1), "lion", 0.0),
    ("pytorch_optimizer.Lion", dict(lr=1e-3, weight_decay=0.1), "lion", 0.0),
    # cautious: the kept fraction's rescaling rounds differently (observed 4e-9)
    ("pytorch_optimizer.Lion", dict(lr=1e-3, cautious=True, maximize=True), "lion", 1e-7),
    # pytorch-optimizer's AdEMAMix lerps its moments and leaves out apple's 1e-8 in
    # log(beta) during the warm-up: observed 2.1e-6 without, 4.0e-7 with a warm-up
    ("pytorch_optimizer.AdEMAMix", dict(lr=1e-2, weight_decay=0.1, weight_decouple=True),
     "ademamix", 1e-5),
    ("pytorch_optimizer.AdEMAMix", dict(lr=1e-2, alpha=4.0, t_alpha_beta3=4), "ademamix",
     1e-5),
    ("pytorch_optimizer.Grams", dict(lr=1e-2, weight_decay=0.1), "adamw", 1e-6),  # 4.5e-7
    # optimi's rms is an fp32 mean, zeroopt's fp64 (its docstring): observed 2.2e-7
    ("optimi.StableAdamW", dict(lr=1e-2, betas=(0.85, 0.95), weight_decay=0.1, eps=1e-7),
     "stable_adamw", 1e-6),
    ("optimi.StableAdamW", dict(lr=1e-2, weight_decay=1e-3, decouple_lr=True, foreach=False),
     "stable_adamw", 1e-6),
    # its eps (1e-8, not zeroopt's 1e-6) lets g^2 / v grow where v is tiny, and its fp32 rms
    # mean then rounds further from zeroopt's fp64 one: observed 1.3e-6 (optimi's at eps 1e-8:
    # 9.3e-7; the two packages 3.6e-7 apart)
    ("pytorch_optimizer.StableAdamW", dict(lr=1e-2, betas=(0.85, 0.95), weight_decay=0.1),
     "stable_adamw", 2e-6),
    # clip_threshold and eps1/eps2 live on the instance there; the rule's step is the
    # package's, bit for bit (as grokadamw's and schedulefree's below)
    ("pytorch_optimizer.CAME", dict(lr=1e-2, weight_decay=0.1, clip_threshold=0.5,
                                    eps1=1e-20), "came", 0.0),
    ("pytorch_optimizer.CAME", dict(lr=1e-2, betas=(0.8, 0.9, 0.99), ams_bound=True,
                                    maximize=True, weight_decay=0.1, fixed_decay=True),
     "came", 0.0),
    # per-position beta1 and per-param clipping (4 params)
    ("grokadamw.GrokAdamW", dict(lr=1e-2, weight_decay=0.1, gamma=0.2, gradient_clipping=0.5,
                                 lamb=1.5, alpha_init=0.9), "grokadamw", 0.0),
    ("grokadamw.GrokAdamW", {}, "grokadamw", 0.0),
    # schedulefree's classes start in eval mode: train() first (SETUP)
    ("schedulefree.AdamWScheduleFree", dict(lr=1e-2, betas=(0.85, 0.99), weight_decay=0.1,
                                            warmup_steps=2, r=1.0), "schedule_free_adamw", 0.0),
    # beta2 0.8: 4 steps of SGD (rho_t <= 4), then a rectified one
    ("schedulefree.RAdamScheduleFree", dict(lr=1e-2, betas=(0.9, 0.8), weight_decay=0.1,
                                            silent_sgd_phase=False), "schedule_free_radam", 0.0),
    ("schedulefree.RAdamScheduleFree", dict(lr=1e-2, betas=(0.9, 0.8)), "schedule_free_radam",
     0.0),
    ("schedulefree.SGDScheduleFree", dict(lr=0.1, momentum=0.8, weight_decay=0.1,
                                          warmup_steps=2, r=1.0), "schedule_free_sgd", 0.0),
    # torchao's AdamW4bit, both weights (6,144 and 7,680 elements) 4-bit in blocks of 128 or
    # 64, with hyperparameters exact in fp32 (torchao computes lr * wd and 1 - beta^t in fp32):
    # test_state_4bit.py's tolerance, 1e-6 (observed 1.9e-7); 4-bit states move these params by
    # more than 1e-2 of them (test_torchao_4bit_states_are_4bit)
    ("torchao.optim.AdamW4bit", dict(TORCHAO_HP), "adamw", 1e-6),
    ("torchao.optim.AdamW4bit", dict(TORCHAO_HP, block_size=64), "adamw", 1e-6),
]


# What a class needs after construction before it steps: schedulefree's start in eval mode.
SETUP = {f"schedulefree.{name}": lambda opt: opt.train()
         for name in ("AdamWScheduleFree", "RAdamScheduleFree", "SGDScheduleFree")}


def eager_torch_compile(monkeypatch, path: str) -> None:
    """torchao steps each param through torch.compile, ~35 s a shape on these cores
    (tests/ranks/state_4bit.py): run it eagerly (a few fp32 ulps from compiled)."""
    if path.startswith("torchao."):
        monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: fn)


def _variants(family: str) -> list[str]:
    paged = ("Paged",) if family in PAGED else ()
    return [f"{p}{family}{bits}" for p in ("", *paged) for bits in ("", "8bit", "32bit")]


def bnb_cases() -> list[tuple[str, dict, str]]:
    """(class name, hyperparameters, family) for every bitsandbytes class wrap maps, and
    AdamW(optim_bits=8) (8-bit by its argument, not its name)."""
    cases = [(name, hp, family) for family, (_, hp, _) in FAMILIES.items()
             for name in _variants(family)]
    return cases + [("AdamW", dict(FAMILIES["AdamW"][1], optim_bits=8), "AdamW")]


def _class(path: str):
    module, _, name = path.rpartition(".")
    return getattr(pytest.importorskip(module), name)


def mlp() -> nn.Module:
    """Two weights over bitsandbytes' min_8bit_size (6,144 and 7,680 elements: 8-bit states
    where the class says so), and biases under it (32-bit states)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 96), nn.Tanh(), nn.Linear(96, 80))


def train(model, opt, steps=STEPS):
    torch.manual_seed(1)
    for _ in range(steps):
        nn.functional.mse_loss(model(torch.randn(32, 64)), torch.randn(32, 80)).backward()
        opt.step()
        opt.zero_grad()
    return model


def rel_err(a, b) -> float:
    return max(((p - q).abs().max() / q.abs().max()).item()
               for p, q in zip(a.parameters(), b.parameters()))


def max_err(a, b) -> float:
    return max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))


def side_by_side(cls, hp: dict, steps=STEPS, reference=None, setup=None):
    """(wrapped optimizer, its model, the class's model) after ``steps`` steps each;
    ``setup(optimizer)`` readies the class's optimizer to step."""
    ours, theirs = mlp(), mlp()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bitsandbytes: paged falls back to unpaged on CPU
        wrapped = zeroopt.wrap(cls(ours.parameters(), **hp))
        ref_cls, ref_hp = reference or (cls, hp)
        train(ours, wrapped, steps)
        its = ref_cls(theirs.parameters(), **ref_hp)
        if setup is not None:
            setup(its)
        train(theirs, its, steps)
    return wrapped, ours, theirs


def state_options(group: dict) -> tuple:
    return group["state_precision"], group["min_8bit_size"], group["paged"]


@pytest.mark.parametrize("path, hp, rule, tol", OTHERS,
                         ids=[f"{p.split('.')[0]}.{p.rpartition('.')[2]}-{i}"
                              for i, (p, *_) in enumerate(OTHERS)])
def test_wrap_trains_as_the_class(path, hp, rule, tol, monkeypatch):
    eager_torch_compile(monkeypatch, path)
    wrapped, ours, theirs = side_by_side(_class(path), hp, setup=SETUP.get(path))
    assert wrapped.rule.name == rule
    assert rel_err(ours, theirs) <= tol


@pytest.mark.parametrize("block", (128, 64))
def test_torchao_4bit_states_are_4bit(block, monkeypatch):
    """The wrap of AdamW4bit keeps 4-bit states in its blocks (whole-block params of 4096
    elements or more), and 4-bit states move these params far more than the tolerance above
    (else its case compares nothing 4-bit)."""
    eager_torch_compile(monkeypatch, "torchao.")
    hp = dict(TORCHAO_HP, block_size=block)
    wrapped, ours, _ = side_by_side(_class("torchao.optim.AdamW4bit"), hp)
    assert all((g["state_precision"], g["block_size"], g["min_8bit_size"]) == ("4bit", block, 4096)
               for g in wrapped.param_groups)
    full = mlp()
    train(full, torch.optim.AdamW(full.parameters(), **TORCHAO_HP))
    assert rel_err(ours, full) > 1e-2


@pytest.mark.parametrize("name, hp, family", bnb_cases(),
                         ids=[f"{n}{'-optim_bits8' if 'optim_bits' in hp else ''}"
                              for n, hp, _ in bnb_cases()])
def test_wrap_trains_as_the_bitsandbytes_class(name, hp, family):
    rule, _, tol = FAMILIES[family]
    eight_bit = "8bit" in name or hp.get("optim_bits") == 8
    cls = _class(f"{BNB}.{name}")
    reference = None
    if name in STEPS_AS:
        base, extra = STEPS_AS[name]
        reference = (_class(f"{BNB}.{base}"), {**hp, **extra})
    wrapped, ours, theirs = side_by_side(cls, hp, reference=reference)
    assert wrapped.rule.name == rule
    paged = name.startswith("Paged")
    assert all(state_options(g) == ("8bit" if eight_bit else "32bit", 4096, paged)
               for g in wrapped.param_groups)
    if not eight_bit:
        assert rel_err(ours, theirs) <= tol
        return
    # 1. the counterpart's hyperparameters, but for the state options
    counterpart = zeroopt.wrap(_class(f"{BNB}.{family}")(
        mlp().parameters(), **{k: v for k, v in hp.items() if k != "optim_bits"}))
    for ours_group, its_group in zip(wrapped.param_groups, counterpart.param_groups):
        assert {k: v for k, v in ours_group.items() if k != "params"} == {
            k: v for k, v in its_group.items() if k != "params"} | dict(
            state_precision="8bit", paged=paged)
    # 2. the first step: fp32 rounding (observed <= 1.1e-7 relative)
    _, one, its_one = side_by_side(cls, hp, steps=1)
    assert rel_err(one, its_one) < 1e-6
    # 3. as close to 32-bit as bitsandbytes' 8-bit (observed: as close for Lion and SGD,
    # 2 to 5 times closer for Adam, AdEMAMix, RMSprop and Adagrad)
    full = mlp()
    train(full, _class(f"{BNB}.{family}")(
        full.parameters(), **{k: v for k, v in hp.items() if k != "optim_bits"}))
    assert 0 < max_err(ours, full) <= 1.05 * max_err(theirs, full)


def test_every_mapped_class_is_tested_here():
    """A class a rule's sources add must get a case above."""
    tested = {p for p, *_ in OTHERS} | {f"{BNB}.{n}" for n, *_ in bnb_cases()} | \
        {"torch.optim.Muon"}  # matrices only, unlike mlp()'s biases: tests/test_muon_state.py
    mapped = {path for rule in registered_rules() if hasattr(rule.wraps, "mapped")
              for path in rule.wraps.mapped()}
    assert mapped <= tested, sorted(mapped - tested)


def test_the_minimum_8bit_size_comes_along():
    bnb = pytest.importorskip("bitsandbytes")
    opt = zeroopt.wrap(bnb.optim.PagedLion8bit(mlp().parameters(), min_8bit_size=7000))
    assert all(state_options(g) == ("8bit", 7000, True) for g in opt.param_groups)


def test_wrap_at_two_ranks_matches_the_unsharded_class():
    """Cautious Lion (a per-param statistic across ranks), Adafactor (whole tensors, one
    owner each) and bitsandbytes' AdEMAMix with warm-ups, each held to its class fed the
    exact average gradient: params straddle the two shards."""
    for case, err in run_ranks(2, wrap_ranks.suite, shared=True)[0].items():
        assert err <= wrap_ranks.TOLERANCE[case], (case, err)


# -- refusals -----------------------------------------------------------------------------------

REFUSED = [  # (class, hyperparameters, error, what the message says)
    (f"{BNB}.RMSprop", dict(momentum=0.9), ValueError, r"RMSprop\(momentum=0.9\): "
     r"bitsandbytes' kernel ignores it, and zeroopt's rule would apply it"),
    (f"{BNB}.SGD", dict(lr=0.1, momentum=0.9, dampening=0.1), ValueError,
     r"SGD\(dampening=0.1\): bitsandbytes' kernel ignores it"),
    (f"{BNB}.LAMB", {}, TypeError,
     r"does not map bitsandbytes.optim.LAMB: bitsandbytes' LAMB is AdamW"),
    (f"{BNB}.LAMB8bit", {}, TypeError, r"LAMB8bit clips only the params under min_8bit_size"),
    (f"{BNB}.LARS", dict(lr=0.1, momentum=0.9), TypeError,
     r"bitsandbytes' LARS is momentum SGD .* not the trust ratio"),
    ("pytorch_optimizer.ADOPT", {}, TypeError, r"clips the normalised gradient at step\^0.25"),
    ("pytorch_optimizer.Lamb", {}, TypeError, r"never bias-corrects the second moment"),
    ("pytorch_optimizer.LARS", {}, TypeError, r"divides by \|\|g\|\| \+ wd \|\|w\|\|"),
    ("pytorch_optimizer.Lion", dict(weight_decay=0.1, weight_decouple=False), ValueError,
     r"Lion\(weight_decouple=False\): it adds weight_decay \* w to the gradient"),
    ("pytorch_optimizer.Lion", dict(weight_decay=0.1, fixed_decay=True), ValueError,
     r"Lion\(fixed_decay=True\)"),
    ("pytorch_optimizer.Lion", dict(use_gc=True), ValueError,
     r"pytorch_optimizer.Lion\(use_gc=True\): zeroopt's lion has no such option"),
    ("pytorch_optimizer.AdEMAMix", dict(weight_decay=0.1), ValueError,
     r"AdEMAMix\(weight_decouple=False\)"),  # its default: L2 decay
    ("pytorch_optimizer.AdEMAMix", dict(maximize=True), ValueError,
     r"AdEMAMix\(maximize=True\): this rule has no maximize"),
    ("pytorch_optimizer.AdEMAMix", dict(t_alpha_beta3=2.5), ValueError,
     r"whole numbers of steps"),
    ("pytorch_optimizer.Grams", dict(weight_decay=0.1, weight_decouple=False), ValueError,
     r"Grams\(weight_decouple=False\)"),
    ("torch.optim.Adafactor", {}, TypeError, r"torch's own Adafactor is another variant"),
    ("lion_pytorch.Lion", dict(decoupled_weight_decay=True), ValueError,
     r"decoupled_weight_decay"),
    # optimi stores its groups in each param's state at construction for gradient release:
    # not a step, and refused for what it is
    ("optimi.StableAdamW", dict(lr=1e-3, gradient_release=True), ValueError,
     r"StableAdamW\(gradient_release=True\): optimi steps each param inside backward"),
    ("pytorch_optimizer.StableAdamW", dict(weight_decay=0.1, weight_decouple=False), ValueError,
     r"StableAdamW\(weight_decouple=False\)"),
    ("pytorch_optimizer.StableAdamW", dict(maximize=True), ValueError,
     r"StableAdamW\(maximize=True\): this rule has no maximize"),
    ("grokadamw.GrokAdamW", dict(grokking_signal_fns=[lambda: 0.5]), ValueError,
     r"GrokAdamW\(grokking_signal_fns=.*\): each rank would call its own functions"),
    ("torchao.optim.AdamW4bit", dict(amsgrad=True), ValueError,
     r"AdamW4bit\(amsgrad=True\): torchao stores amsgrad's running maximum"),
    ("torchao.optim.AdamW4bit", dict(bf16_stochastic_round=True), ValueError,
     r"AdamW4bit\(bf16_stochastic_round=True\)"),
    ("torchao.optim.AdamW4bit", dict(block_size=96), ValueError,
     r"AdamW4bit\(block_size=96\): zeroopt's 4-bit blocks are even and divide 256"),
    ("torchao.optim.AdamW8bit", {}, TypeError,
     r"does not map torchao.optim.AdamW8bit: torchao's 8-bit states are not zeroopt's"),
]


@pytest.mark.parametrize("path, hp, error, message", REFUSED,
                         ids=[f"{p.rpartition('.')[2]}-{i}" for i, (p, *_) in
                              enumerate(REFUSED)])
def test_what_wrap_does_not_follow_is_refused_with_the_reason(path, hp, error, message):
    with pytest.raises(error, match=message):
        zeroopt.wrap(_class(path)(mlp().parameters(), **hp))


def test_optimi_optimizer_accumulation_is_refused():
    opt = _class("optimi.StableAdamW")(mlp().parameters(), lr=1e-3, gradient_release=True)
    opt.optimizer_accumulation = True
    opt.param_groups[0]["gradient_release"] = False  # the accumulation alone
    with pytest.raises(ValueError, match=r"StableAdamW\(optimizer_accumulation=True\)"):
        zeroopt.wrap(opt)


def test_came_group_eps_the_package_ignores_is_refused():
    model = mlp()
    opt = _class("pytorch_optimizer.CAME")([
        {"params": model[0].parameters()},
        {"params": model[2].parameters(), "eps1": 1e-20}])
    with pytest.raises(ValueError, match=r"CAME\(eps1=1e-20\): pytorch_optimizer's CAME "
                                         r"steps every group with the constructor's eps1"):
        zeroopt.wrap(opt)


def test_a_stepped_optimizer_is_refused_where_it_keeps_its_states_elsewhere():
    """grokadamw keeps its states in the param groups; optimi's gradient release stores its
    groups in each param's state before any step (not a step: refused for what it is,
    above); both once stepped are refused as stepped."""
    for path, hp in (("grokadamw.GrokAdamW", {}), ("optimi.StableAdamW", dict(lr=1e-3))):
        model = mlp()
        opt = _class(path)(model.parameters(), **hp)
        train(model, opt, steps=1)
        with pytest.raises(ValueError, match="has not stepped yet"):
            zeroopt.wrap(opt)


def test_bitsandbytes_settings_zeroopt_cannot_honour_are_refused():
    bnb = pytest.importorskip("bitsandbytes")
    for option, value, message in (
            ("max_unorm", 0.5, r"AdamW\(max_unorm=0.5\): bitsandbytes scales the update"),
            ("skip_zeros", True, r"AdamW\(skip_zeros=True\): zeroopt updates every element"),
            ("percentile_clipping", 5, r"AdamW\(percentile_clipping=5\): zeroopt has no "
                                       r"percentile clipping"),  # bitsandbytes < 0.45
            ("block_wise", False, r"AdamW\(block_wise=False\)")):
        opt = bnb.optim.AdamW(mlp().parameters())
        setattr(opt.args, option, value)
        with pytest.raises(ValueError, match=message):
            zeroopt.wrap(opt)
    model = mlp()
    manager = bnb.optim.GlobalOptimManager.get_instance()
    manager.override_config(model[0].weight, "optim_bits", 32)
    try:
        with pytest.raises(ValueError, match=r"GlobalOptimManager overrides the config of 1 "
                                             r"of its params\. Give those params a param group"):
            zeroopt.wrap(bnb.optim.AdamW8bit(model.parameters()))
    finally:
        manager.pid2config.pop(id(model[0].weight))


def test_the_message_for_a_class_it_does_not_map_lists_what_it_maps():
    with pytest.raises(TypeError) as caught:
        zeroopt.wrap(torch.optim.NAdam(mlp().parameters()))
    message = str(caught.value)
    assert "cannot map torch.optim.nadam.NAdam: it maps torch.optim.{" in message
    for listed in ("RMSprop", "Adagrad", "bitsandbytes.optim.{", "PagedAdEMAMix8bit",
                   "pytorch_optimizer.{Grams, Lion, AdEMAMix, StableAdamW, CAME}",
                   "lion_pytorch.Lion", "transformers.optimization.Adafactor",
                   "optimi.StableAdamW", "grokadamw.GrokAdamW", "torchao.optim.AdamW4bit",
                   "schedulefree.{AdamWScheduleFree, RAdamScheduleFree, SGDScheduleFree}"):
        assert listed in message, listed
    for refused in ("LAMB", "LARS", "ADOPT", "Lamb", "AdamW8bit, torchao", "torchao.optim.{"):
        assert refused not in message.split("Build")[0], refused
