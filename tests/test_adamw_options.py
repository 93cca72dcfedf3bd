"""adamw/adam's fine-tuning options (zeroopt/algorithms/adamw_options.py), sharded at world
sizes 1, 2 and 3 (ranks/adamw_options.py) against their eager reference and, where one exists,
an independent implementation; in combination with each other and with cautious, adopt and
grams (W = 2); with 8-bit states; and across a checkpoint that reshards 3 -> 2.

Tolerances. The sharded step and the eager reference compute the same thing in a different
order (multi-tensor ops against per-tensor ones; whole-param sums as float64 partial sums
against one fp32 reduction), a few fp32 ulps a step, which Adam's m / sqrt(v) passes on: 1e-6
relative to each param's largest magnitude, the tolerance of test_equivalence.py (observed:
at most ~7e-7 for orthograd, whose rescale ||g|| / ||g_perp|| amplifies rounding; ~2e-7 for
the others). Params stepped whole run the reference's own code on the same fp32 numbers: 0.
The independent implementations: pytorch_optimizer.OrthoGrad + torch AdamW and AGR + torch
AdamW differ from zeroopt only in fp32 rounding (same tolerance; observed <= 7e-7); the
transcribed AdamSPD and TAM take their norms and cosines in fp32/float64 as written
(observed ~3e-7). A wrong option (a sign, a missed whole-param sum, a piece's partial sum
used as the whole's) moves params by 1e-3 or more. 8-bit: bitsandbytes' measure, as
test_states.py (params within atol 1e-5 / rtol 1e-3 but for a handful, dequantized states
within a mean absolute error of 1.2e-4, each step from a common point).
"""

import pytest
import torch

import zeroopt
from distributed import run_ranks
from ranks import adamw_options as scenarios
from training import models

TOL = 1e-6
# AGR: observed 1.2e-6 at W=3, one element of mid.weight whose first two gradients nearly
# cancel, so Adam's second m / sqrt(v) scales up (~10x) the ulp-level difference of the AGR'd
# gradient (g (S - |g|) / S, S summed in float64 here, in fp32 by the reference).
TOLS = {"agr": 2e-6}
HANDFUL = 5
_suites: dict = {}


def suite(world_size: int) -> list:
    if world_size not in _suites:
        _suites[world_size] = run_ranks(world_size, scenarios.suite, world_size == 2,
                                        shared=True)
    return _suites[world_size]


@pytest.fixture(scope="module", params=[1, 2, 3], ids=lambda w: f"W{w}")
def results(request):
    return request.param, suite(request.param)


@pytest.mark.parametrize("case", list(scenarios.CASES))
def test_each_option_matches_its_eager_reference(results, case):
    world_size, per_rank = results
    for got in per_rank:
        got = got[case]
        tol = 0.0 if got["whole"] else TOLS.get(case, TOL)
        assert got["eager"] <= tol, f"{case} W={world_size}: {got}"
        if world_size > 1 and not got["whole"]:  # params really straddle ranks
            assert max(got["ranks_per_param"]) > 1, got


@pytest.mark.parametrize("case", ["orthograd", "agr", "spd", "tam"])
def test_each_option_matches_an_independent_implementation(results, case):
    """orthograd: pytorch_optimizer.OrthoGrad(torch.optim.AdamW); agr: torch AdamW on AGR.py's
    gradient; spd: the authors' AdamSPD step; tam: the paper's damping inside AdamW."""
    world_size, per_rank = results
    for got in per_rank:
        assert got[case]["independent"] < TOLS.get(case, TOL), f"{case} W={world_size}: " \
                                                                f"{got[case]}"


@pytest.mark.parametrize("case", list(scenarios.COMBINATIONS))
def test_combinations_match_the_eager_reference(case):
    for got in suite(2):
        got = got[case]
        assert got["eager"] <= (0.0 if got["whole"] else TOL), f"{case}: {got}"
        # cautious or spd with a gradient transform needs two rounds of sums: stepped whole
        assert got["whole"] == (case in ("agr_cautious", "tam_cautious_adopt", "spd_orthograd"))


@pytest.mark.parametrize("stage", [1, 2])
def test_alora_lora_pairs_match_the_eager_reference(results, stage):
    world_size, per_rank = results
    for got in per_rank:
        got = got["alora", stage]
        assert got["eager"] == 0.0, got  # stepped whole: the reference's own code
        assert got["ranks_per_param"] == [1] * 4, got  # each LoRA matrix on one rank
        assert got["moved"] > 1e-3, got


@pytest.mark.parametrize("case", list(scenarios.EIGHT_BIT))
def test_8bit_states_within_bitsandbytes_tolerances(results, case):
    world_size, per_rank = results
    for got in per_rank:
        got = got["8bit", case]
        assert got["eight_bit_states"] > 0, got
        assert got["params_not_close"] <= HANDFUL, f"{case} W={world_size}: {got}"
        assert got["state_mean_abs_err"] < 1.2e-4, f"{case} W={world_size}: {got}"
        assert got["state_max_abs"] > 100 * got["state_mean_abs_err"], got


def test_checkpoint_reshards_3_to_2(tmp_path):
    """Save at W=3, resume at W=2: params stepped whole continue bit for bit; flat ones within
    fp32 rounding of their whole-param sums, which follow the cut (observed ~1e-7)."""
    uninterrupted = run_ranks(3, scenarios.save_partway, str(tmp_path), shared=True)[0]
    resumed = run_ranks(2, scenarios.resume, str(tmp_path), shared=True)
    for case, (hp, _) in scenarios.CHECKPOINTS.items():
        for got in resumed:
            for a, b in zip(got[case], uninterrupted[case]):
                if case in ("tam_8bit", "alora_spd"):
                    assert torch.equal(a, b), case
                else:
                    assert ((a - b).abs().max() / b.abs().max()).item() < TOL, case


# --- single process: the options' definitions, and what is refused -----------------------------


def _named_lora(b_scale: float = 0.0):
    """The LoRA-shaped model; ``b_scale`` > 0 starts lora_B away from zero."""
    model, _ = scenarios.lora_models()
    if b_scale:
        torch.manual_seed(5)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn_like(p) * b_scale)
    return model


@pytest.mark.parametrize("b_scale", [0.0, 0.5])
def test_alora_scales_each_row_of_the_first_update(b_scale):
    """Adam's first step moves every element by lr (g / (|g| + eps)); with alora, row i of each
    LoRA matrix by lr / sqrt(||row_i||^2 + 1/eta^2) times that (ALLoRA). LoRA's start (B = 0):
    only B moves, by lr * eta; from B != 0 both matrices move, each row by its own scale."""
    eta, lr = 3.0, 1e-2
    plain, scaled = _named_lora(b_scale), _named_lora(b_scale)
    x = torch.randn(8, 37)
    moves = []
    for model, alora in ((plain, False), (scaled, True)):
        before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        opt = zeroopt.ZeroOptimizer(model.named_parameters(), "adamw", lr=lr, weight_decay=0.0,
                                    alora=alora, alora_eta=eta)
        model(x).square().mean().backward()
        opt.step()
        moves.append({n: p.detach() - before[n] for n, p in model.named_parameters()
                      if n in before})
    for name, p in _named_lora(b_scale).named_parameters():
        if not p.requires_grad:
            continue
        assert (moves[0][name] != 0).any() == (b_scale > 0 or "lora_B" in name), name
        rows = p.detach().reshape(p.shape[0], -1)
        expected = (rows.square().sum(1, keepdim=True) + 1 / eta**2).rsqrt()
        got = moves[1][name].reshape(p.shape[0], -1)
        want = moves[0][name].reshape(p.shape[0], -1) * expected
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-9), name
    if b_scale:
        return
    # lora_B starts at zero: its rows step lr * eta (Adam's first step is lr * g / (|g| + eps))
    b = moves[1]["inp.lora_B.default.weight"]
    assert torch.allclose(b, moves[0]["inp.lora_B.default.weight"] * eta)
    assert b.abs().max().item() == pytest.approx(lr * eta, rel=1e-4)


def test_alora_finds_pairs_by_name_and_refuses_without_them():
    # a fresh model each time: a refused ZeroOptimizer still owns its params (see the report)
    zeroopt.ReferenceOptimizer(_named_lora().named_parameters(), "adamw", alora=True)
    with pytest.raises(ValueError, match=r"pass model.named_parameters\(\)"):
        zeroopt.ZeroOptimizer(_named_lora().parameters(), "adamw", alora=True)
    only_a = [(n, p) for n, p in _named_lora().named_parameters() if "lora_B" not in n]
    with pytest.raises(ValueError, match="has no partner 'inp.lora_B.default.weight'"):
        zeroopt.ZeroOptimizer(only_a, "adamw", alora=True)
    with pytest.raises(ValueError, match="found no lora_A/lora_B pair"):
        zeroopt.ZeroOptimizer(models()[0].named_parameters(), "adamw", alora=True)
    mixed = [*_named_lora().named_parameters(),
             ("head.weight", torch.nn.Parameter(torch.ones(2, 2)))]
    with pytest.raises(ValueError, match="'head.weight' is not a LoRA matrix"):
        zeroopt.ZeroOptimizer(mixed, "adamw", alora=True)
    # a group of LoRA pairs, and the other params in a group with alora=False
    model = _named_lora()
    head = torch.nn.Parameter(torch.ones(2, 2))
    opt = zeroopt.ZeroOptimizer([{"params": list(model.named_parameters()), "alora": True},
                                 {"params": [("head.weight", head)]}], "adamw")
    assert [opt.rule.whole_tensors(g) for g in opt.param_groups] == [True, False]


def test_lora_names():
    from zeroopt.algorithms.adamw_options import lora_role

    assert lora_role("m.q_proj.lora_A.default.weight") == ("A", "m.q_proj.lora_B.default.weight")
    assert lora_role("m.q_proj.lora_B.default.weight") == ("B", "m.q_proj.lora_A.default.weight")
    assert lora_role("emb.lora_embedding_A.default") == ("A", "emb.lora_embedding_B.default")
    assert lora_role("m.q_proj.weight") is None and lora_role(None) is None


def test_dynamic_weight_decay_schedule():
    from zeroopt.algorithms.adamw_options import decay_factor

    group = dict(dynamic_weight_decay=True, wd_transition_steps=1000, wd_decay_factor=0.7,
                 wd_min_ratio=0.1)
    assert decay_factor(group, 1) == decay_factor(group, 1000) == 1.0
    assert decay_factor(group, 2000) == pytest.approx(0.7)
    assert decay_factor(group, 1500) == pytest.approx(0.7**0.5)
    assert decay_factor(group, 100_000) == 0.1
    assert decay_factor(dict(group, dynamic_weight_decay=False), 5000) == 1.0


@pytest.mark.parametrize("hp,match", [
    (dict(tam=True, paged=True), "paged=True"),
    (dict(tam=True, state_precision="4bit"), "state_precision='4bit' with these options"),
    (dict(tam="yes"), "tam must be True or False"),
    (dict(tam_decay_rate=1.0), "tam_decay_rate"),
    (dict(alora_eta=0.0), "alora_eta"),
    (dict(wd_transition_steps=0), "wd_transition_steps"),
    (dict(wd_decay_factor=1.5), "wd_decay_factor"),
    (dict(wd_min_ratio=-0.1), "wd_min_ratio"),
])
def test_bad_values_are_refused(hp, match):
    with pytest.raises(ValueError, match=match):
        zeroopt.ZeroOptimizer(torch.nn.Linear(3, 2).parameters(), "adamw", **hp)


def test_options_are_zeroopt_only():
    rule = zeroopt.algorithms.get_rule("adamw")
    for name in ("spd", "orthograd", "agr", "tam", "alora", "dynamic_weight_decay"):
        assert rule.zeroopt_only[name] is False
    model, _ = models()
    opt = zeroopt.ZeroOptimizer(model.parameters(), "adamw", tam=True)
    with pytest.raises(ValueError, match="has no 'tam'"):
        zeroopt.export_torch_state_dict(opt)


def test_spd_and_tam_change_the_update():
    """Each option does something: against plain AdamW after a few steps (a test that cannot
    fail is a defect)."""
    def run(**hp):
        model, _ = models()
        opt = zeroopt.ReferenceOptimizer(model.parameters(), "adamw", lr=1e-2, **hp)
        from training import batch, loss_of
        for t in range(5):
            loss_of(model, *batch(t, 0)).backward()
            opt.step()
            opt.zero_grad()
        return torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    plain = run(weight_decay=0.0)
    for hp in (dict(spd=True, weight_decay=0.5), dict(tam=True), dict(orthograd=True),
               dict(agr=True), dict(dynamic_weight_decay=True, wd_transition_steps=1,
                                    weight_decay=0.5)):
        other = run(**{"weight_decay": 0.0, **hp})
        assert (other - plain).abs().max() > 1e-4, hp


def test_adamw_8bit_and_bf16_params():
    """adamw_8bit (state_precision="8bit") with an option steps whole, moments 8-bit; a bf16
    model steps its fp32 masters on the flat path."""
    from training import batch, loss_of

    model, _ = models()
    opt = zeroopt.ZeroOptimizer(model.parameters(), "adamw_8bit", tam=True, min_8bit_size=0)
    assert opt.rule.whole_tensors(opt.param_groups[0])
    loss_of(model, *batch(0, 0)).backward()
    opt.step()
    state = opt.state_dict()["state"][1]
    assert state["exp_avg"].dtype == torch.uint8 and state["tam_s"].dtype == torch.float32
    model, _ = models(torch.bfloat16)
    opt = zeroopt.ZeroOptimizer(model.parameters(), "adamw", spd=True, cautious=True,
                                weight_decay=0.5)
    assert opt.rule.per_tensor(opt.param_groups[0])
    for t in range(3):
        loss_of(model, *batch(t, 0)).backward()
        opt.step()
        opt.zero_grad()
    state = opt.state_dict()["state"][1]
    assert state["initial_param"].dtype == torch.float32
    assert all(torch.isfinite(p).all() for p in model.parameters())
