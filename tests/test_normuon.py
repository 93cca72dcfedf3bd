"""NorMuon sharded, against pytorch_optimizer.NorMuon, at W = 1, 2, 3, stages 1 and 2
(tests/ranks/normuon.py): a model with Muon matrices of odd sizes (13 x 12, 7 x 13, 13 x 7, a
13 x 7 x 3 conv weight) and AdamW params (input layers, head, biases, a LayerNorm, a 0-d
scale), a bias and the norm weight straddling the ranks' chunks; each matrix orthogonalized once
per step, by its owner; a checkpoint saved at W=3 resumed at W=2; NorMuon's defaults and its
AdamW groups' adamw_* values; the refusals.

The reference trains unsharded on the exact average of every rank's gradient, so the only
possible difference is the update's arithmetic. zeroopt runs NorMuon's operations in its order:
on the Muon matrices, whole on their owner, its per-tensor step with pytorch-optimizer's
Newton-Schulz iteration (bfloat16, its op order); on the AdamW params, its foreach operations
on the flat shard, element-wise. Params and every state (momentum_buffer,
second_momentum_buffer, exp_avg, exp_avg_sq) agree bit for bit: observed 0.0 at every W, stage
and case, after 6 steps, and so does zeroopt's eager reference.

Tolerance 1e-6 relative, as test_muon.py. The bf16 iteration is why nothing between exact
and ~1e-4 is to be expected: a difference of one fp32 ulp anywhere (an AdamW param, hence the
next gradient) can flip an element's bf16 rounding in a Muon matrix's input, 2^-8 ~ 4e-3 of
that element of the orthogonalized update, ~1e-4 of the param after a step at lr 0.02. The
match is exact because both sides round the same fp32 numbers to bf16 in the same operations
(the variant cases run at stage 2 only: the stages differ in how gradients arrive). Perturbed on zeroopt's side only
(W=1, case "defaults", measured by hand): beta2 0.9 for 0.95 7.7e-3; momentum 0.9 for 0.95
2.3e-2; nesterov off 7.7e-2; use_adjusted_lr on 9.1e-2; the AdamW groups given the optimizer's
lr, eps and weight decay instead of adamw_* (no group_defaults) 5.1; adamw_lr 1e-2 for 3e-3
2.1; the AdamW step debiased by each param's own step count, not the group's (the conv bias
sits out odd steps) 7.6e-3; one second moment per matrix instead of per row 2.6e-2. (The Muon
eps, 1e-10 against row RMS ~1e-1, is below it: 1e-8 gives 1.1e-7.)
test_a_wrong_hyperparameter_shows checks three of them on every run.
"""

from __future__ import annotations

import inspect

import pytest
import torch

import zeroopt
from distributed import run_ranks

po = pytest.importorskip("pytorch_optimizer")

from ranks import normuon  # noqa: E402

TOL = 1e-6
RUNS = [(case, stage) for case in normuon.CASES for stage in normuon.STAGES.get(case, (1, 2))]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return str(tmp_path_factory.mktemp("normuon"))


@pytest.fixture(scope="module")
def w3(checkpoints):
    return run_ranks(3, normuon.suite, checkpoints, True, False, timeout=300)


@pytest.fixture(scope="module")
def w2(checkpoints, w3):  # after W=3: it resumes W=3's checkpoint
    return run_ranks(2, normuon.suite, checkpoints, False, True, timeout=300)


@pytest.fixture(scope="module")
def w1():
    return run_ranks(1, normuon.suite, timeout=300)


@pytest.fixture(params=[1, 2, 3], ids=lambda w: f"W{w}")
def results(request):
    return request.param, request.getfixturevalue(f"w{request.param}")


@pytest.mark.parametrize("case,stage", RUNS)
def test_matches_pytorch_optimizer_normuon(results, case, stage):
    world_size, per_rank = results
    for r in per_rank:
        got = r[case, stage]
        assert got["err"] <= TOL and got["eager_err"] <= TOL, (case, stage, world_size, got)
        assert set(got["state_err"]) == {"momentum_buffer", "second_momentum_buffer",
                                         "exp_avg", "exp_avg_sq"}, got["state_err"]
        assert max(got["state_err"].values()) <= TOL, (case, stage, world_size, got)
        assert got["moved"] > 1e-2, got  # it trained
        assert got["group_steps"] == [(normuon.STEPS, normuon.STEPS)] * 2, got
        if world_size > 1:  # a bias and the 1-D norm weight across the chunk boundary
            assert {"up.bias", "norm.weight"} <= set(got["straddling"]), got["straddling"]


@pytest.mark.parametrize("case,stage", RUNS)
def test_each_matrix_is_orthogonalized_once_per_step_by_its_owner(results, case, stage):
    world_size, per_rank = results
    owned = [r[case, stage]["owned"] for r in per_rank]
    assert sum(map(len, owned)) == len({s for o in owned for s in o}) == normuon.MATRICES
    if world_size > 1:
        assert all(owned), f"a rank owns nothing: {owned}"
    skip_conv = normuon.CASES[case][4]
    for step in range(normuon.STEPS):
        active = normuon.MATRICES - (skip_conv and step % 2 == 1)  # the conv sits out
        done = [[shape for t, shape in r[case, stage]["calls"] if t == step] for r in per_rank]
        assert sum(map(len, done)) == active, f"step {step}: {done}"
        for rank, (shapes, mine) in enumerate(zip(done, owned)):
            # the conv weight is orthogonalized as its 13 x 21 matrix
            mine = {(s[0], s[1] * s[2]) if len(s) == 3 else s for s in mine}
            assert len(shapes) == len(set(shapes)) and set(shapes) <= mine, \
                f"step {step}: rank {rank} orthogonalized {shapes}, owns {sorted(mine)}"


def test_checkpoint_saved_at_3_resumes_at_2(w3, w2):
    uninterrupted, resumed = w3[0]["saved"], w2[0]["resumed"]
    assert resumed["steps_at_load"] == [normuon.SAVED_AT] * 2  # the groups' step counts
    err = max(((a - b).abs().max() / a.abs().max()).item()
              for a, b in zip(uninterrupted, resumed["params"]))
    assert err <= TOL, err


# -- single process --------------------------------------------------------------------------


@pytest.mark.parametrize("perturb", [dict(beta2=0.9), dict(use_adjusted_lr=True),
                                     dict(adamw_lr=1e-2)])
def test_a_wrong_hyperparameter_shows(perturb):
    """The comparison above can fail: one hyperparameter changed on zeroopt's side only."""
    got = normuon.against_normuon("defaults", 2, perturb=perturb)
    assert got["err"] > 100 * TOL, (perturb, got["err"])


def test_defaults_are_normuons():
    signature = inspect.signature(po.NorMuon.__init__).parameters
    theirs = {k: p.default for k, p in signature.items()
              if k not in ("self", "params", "foreach", "kwargs")}
    rule = zeroopt.algorithms.get_rule("normuon")
    assert {k: v for k, v in rule.defaults.items()
            if k not in ("use_muon", "step", "layerwise")} == theirs
    assert rule.torch_class == "pytorch_optimizer.NorMuon" and rule.mirrored_class() is po.NorMuon
    assert rule.whole_tensors({"use_muon": True}) and not rule.whole_tensors({"use_muon": False})
    assert rule.placement_cost(torch.Size([41, 29])) == 41 * 29 * 29  # Newton-Schulz: m n min


@pytest.mark.parametrize("adamw_keys", [{}, dict(lr=1e-2), dict(betas=(0.8, 0.9), eps=1e-6),
                                        dict(weight_decay=0.3, weight_decouple=False)])
@pytest.mark.parametrize("muon_keys", [{}, dict(lr=0.1, eps=1e-5, ns_coeffs="quintic")])
def test_each_group_takes_its_values_as_normuon_does(muon_keys, adamw_keys):
    """A use_muon=False group: its own lr, betas, eps, weight_decay, else adamw_lr,
    adamw_betas, adamw_eps, adamw_wd (not the optimizer's lr...); a Muon group the
    optimizer's. Also through ReferenceOptimizer."""
    hp = dict(lr=0.05, eps=1e-9, weight_decay=0.2, adamw_lr=2e-3, adamw_betas=(0.85, 0.97),
              adamw_eps=1e-7, adamw_wd=0.01, ns_coeffs="polar_express")

    def built(cls, *args):
        model = normuon.build()
        return cls(normuon.groups(model, dict(muon_keys), dict(adamw_keys)), *args, **hp)

    theirs = built(po.NorMuon).param_groups
    for ours in (built(zeroopt.ZeroOptimizer, "normuon").param_groups,
                 built(zeroopt.ReferenceOptimizer, "normuon").param_groups):
        for our_group, their_group in zip(ours, theirs):
            keys = set(their_group) - {"params", "foreach"}
            assert {k: our_group[k] for k in keys} == {k: their_group[k] for k in keys}


@pytest.mark.parametrize("bad, match", [
    (dict(update_scale="rms"), "update_scale"), (dict(ns_steps=0), "ns_steps"),
    (dict(ns_coeffs="fast"), "ns_coeffs 'fast'"), (dict(ns_coeffs=[(1.0, 2.0)]), "ns_coeffs"),
    (dict(momentum=1.0), "momentum"), (dict(beta2=-0.1), "beta2"),
    (dict(adamw_betas=(0.9, 1.0)), "beta"), (dict(adamw_lr=-1.0), "adamw_lr"),
    (dict(nesterov=1), "nesterov"), (dict(adamw_eps=0.0), "eps > 0")])
def test_invalid_hyperparameters_are_refused(bad, match):
    model = normuon.build()
    with pytest.raises(ValueError, match=match):
        zeroopt.ZeroOptimizer(normuon.groups(model, {}, {}), "normuon", **bad)


def test_params_that_are_not_matrices_need_use_muon_false():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    with pytest.raises(ValueError, match=r"use_muon=True \(the default\).*shape \(3,\)"):
        zeroopt.ZeroOptimizer(model.parameters(), "normuon")
    weights = [p for p in model.parameters() if p.dim() == 2]
    others = [p for p in model.parameters() if p.dim() < 2]
    zeroopt.ZeroOptimizer([dict(params=weights), dict(params=others, use_muon=False)],
                          "normuon")
