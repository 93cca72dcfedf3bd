"""Muon sharded, against torch.optim.Muon, at W = 1, 2, 3, stages 1 and 2 (tests/ranks/muon.py);
each matrix orthogonalized once per step in the whole job, by its owner; hybrid groups
(``zeroopt.muon_param_groups``: Muon for the hidden matrices, AdamW for the rest); the refusal
of a 1-D param in a Muon group.

The reference trains unsharded on the exact average of every rank's gradient, so the only
possible difference is the update's arithmetic. zeroopt runs torch.optim.Muon's own per-tensor
operations in its order (the Newton-Schulz iteration in bfloat16, as torch does on CPU), on the
rank that owns each whole matrix: on the matrix-only model params and momentum buffers agree
bit for bit (observed 0.0 at every W, stage and case, after 8 steps). In the hybrid case the
AdamW params run zeroopt's fused AdamW, whose rounding differs from torch.optim.AdamW's by
about an ulp per step; that reaches the Muon matrices through the gradients (observed 1.7e-7
params and buffers). Tolerance 1e-6 relative, as in test_came.py and test_whole_tensors.py:
torch run with another adjust_lr_fn, nesterov=False or no weight decay differs by 7.6e-2,
6.9e-2 and 3.8e-2 (observed, W=1), the hybrid's AdamW with eps 1e-6 by 1.7e-2, and the params
move by 5e-2 to 0.2 relative.
"""


import pytest
import torch

import zeroopt
from distributed import run_ranks
from ranks import muon

TOL = 1e-6
WORLD_SIZES = (1, 2, 3)
STAGES = (1, 2)


@pytest.fixture(scope="module", params=WORLD_SIZES, ids=lambda w: f"W{w}")
def results(request):
    return request.param, run_ranks(request.param, muon.suite, timeout=300)


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("case", list(muon.CASES))
def test_matches_torch_optim_muon(results, case, stage):
    world_size, per_rank = results
    for key in ("err", "buffer_err"):
        err = max(r[case, stage][key] for r in per_rank)
        assert err <= TOL, f"{case} stage {stage} W={world_size}: {key} {err:.2e}"
    assert min(r[case, stage]["moved"] for r in per_rank) > 1e-2  # it trained


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("case", list(muon.CASES))
def test_each_matrix_is_orthogonalized_once_per_step_by_its_owner(results, case, stage):
    world_size, per_rank = results
    owned = [set(r[case, stage]["owned"]) for r in per_rank]
    assert sum(map(len, owned)) == len(set().union(*owned)) == muon.MATRICES[case], owned
    if muon.MATRICES[case] >= world_size:  # spread: no rank idle while another has two
        assert all(owned), f"a rank owns nothing: {owned}"
    for step in range(muon.STEPS):
        done = [[shape for t, shape in r[case, stage]["calls"] if t == step] for r in per_rank]
        assert sum(map(len, done)) == muon.MATRICES[case], f"step {step}: {done}"
        for rank, (shapes, mine) in enumerate(zip(done, owned)):
            assert len(shapes) == len(set(shapes)) and set(shapes) <= mine, \
                f"step {step}: rank {rank} orthogonalized {shapes}, owns {sorted(mine)}"


def test_params_that_are_not_matrices_are_refused_with_the_fix():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    with pytest.raises(ValueError, match=r"use_muon=True.*shape \(3,\).*use_muon=False.*"
                                         r"zeroopt.muon_param_groups\(model\)"):
        zeroopt.ZeroOptimizer(model.parameters(), "muon")
    weights = [p for p in model.parameters() if p.dim() == 2]
    zeroopt.ZeroOptimizer(weights, "muon")  # matrices alone are fine
    zeroopt.ZeroOptimizer([torch.nn.Parameter(torch.zeros(2, 3, 4))], "muon")  # a conv's too
    zeroopt.ZeroOptimizer(zeroopt.muon_param_groups(model), "muon")
    norms = [p for p in model.parameters() if p.dim() == 1]
    opt = zeroopt.ZeroOptimizer([{"params": weights}, {"params": norms, "use_muon": False}],
                                "muon", eps=1e-5, weight_decay=0.2)
    assert opt.param_groups[0]["eps"] == 1e-5  # Newton-Schulz's floor, as given
    assert opt.param_groups[1]["eps"] == 1e-8 and opt.param_groups[1]["weight_decay"] == 0.2
    with pytest.raises(ValueError, match="use_muon must be True"):
        zeroopt.ZeroOptimizer([{"params": weights, "use_muon": "yes"}], "muon")


class Tiny(torch.nn.Module):
    def __init__(self, tie: bool = False):
        super().__init__()
        self.embed_tokens = torch.nn.Embedding(10, 4)
        self.attn = torch.nn.Linear(4, 4)
        self.conv = torch.nn.Conv1d(4, 4, 3)
        self.norm = torch.nn.LayerNorm(4)
        self.lm_head = torch.nn.Linear(4, 10, bias=False)
        if tie:
            self.lm_head.weight = self.embed_tokens.weight


def _names(model, group):
    ids = {id(p) for p in group["params"]}
    return sorted(name for name, p in model.named_parameters() if id(p) in ids)


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_muon_param_groups_gives_muon_the_hidden_matrices(tie):
    model = Tiny(tie)
    muon_group, adamw_group = zeroopt.muon_param_groups(model, adamw_lr=3e-4)
    assert _names(model, muon_group) == ["attn.weight", "conv.weight"]
    assert set(_names(model, adamw_group)) == {n for n, _ in model.named_parameters()} - \
        {"attn.weight", "conv.weight"}
    assert adamw_group["use_muon"] is False and adamw_group["lr"] == 3e-4
    assert adamw_group["eps"] == 1e-8 and "weight_decay" not in adamw_group  # inherited


def test_muon_param_groups_by_target_modules_and_refusals():
    model = Tiny()
    (muon_group, _) = zeroopt.muon_param_groups(model, ["conv"])
    assert _names(model, muon_group) == ["conv.weight"]
    assert _names(model, zeroopt.muon_param_groups(model, "all-linear")[0]) == \
        ["attn.weight", "lm_head.weight"]
    with pytest.raises(ValueError, match="no param of two or more dimensions.*attn"):
        zeroopt.muon_param_groups(model, ["mlp"])
    with pytest.raises(TypeError, match="target_modules"):
        zeroopt.muon_param_groups(model, 3)


@pytest.mark.parametrize("bad, match", [
    (dict(adjust_lr_fn="sqrt"), "adjust_lr_fn"), (dict(ns_steps=100), "ns_steps"),
    (dict(ns_coefficients=(1.0, 2.0)), "ns_coefficients"), (dict(momentum=-0.1), "momentum"),
    (dict(nesterov=1), "nesterov")])
def test_invalid_hyperparameters_are_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        zeroopt.ZeroOptimizer([torch.nn.Parameter(torch.zeros(3, 4))], "muon", **bad)


def test_defaults_and_placement_cost_are_torch_optim_muons():
    rule = zeroopt.algorithms.get_rule("muon")
    torch_defaults = torch.optim.Muon([torch.zeros(2, 2)]).defaults
    ours = ("layerwise", "use_muon", "betas")  # zeroopt's; betas for use_muon=False groups
    assert {k: v for k, v in rule.defaults.items() if k not in ours} == torch_defaults
    assert rule.torch_class is torch.optim.Muon
    assert rule.placement_cost(torch.Size([41, 29])) == 41 * 29 * 29  # Newton-Schulz: m n min
    assert rule.placement_cost(torch.Size([3, 2, 5])) == 3 * 10 * 3  # as its 3 x 10 matrix
    assert rule.whole_tensors({"use_muon": True}) and not rule.whole_tensors({"use_muon": False})
    assert "muon" not in zeroopt.algorithms.ELSEWHERE
