"""Muon sharded, against torch.optim.Muon, at W = 1, 2, 3, stages 1 and 2 (tests/ranks/muon.py);
each matrix orthogonalized once per step in the whole job, by its owner; and 2-D params only.

The reference trains unsharded on the exact average of every rank's gradient, so the only
possible difference is the update's arithmetic. zeroopt runs torch.optim.Muon's own per-tensor
operations in its order (the Newton-Schulz iteration in bfloat16, as torch does on CPU), on the
rank that owns each whole matrix: params and momentum buffers agree bit for bit (observed 0.0
at every W, stage and case, after 8 steps). Tolerance 1e-6 relative, as in test_came.py and
test_whole_tensors.py: torch run with another adjust_lr_fn, nesterov=False or no weight decay
differs by 7.6e-2, 6.9e-2 and 3.8e-2 (observed, W=1), and the params move by ~0.2 relative.
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
    assert sum(map(len, owned)) == len(set().union(*owned)) == muon.MATRICES, owned
    if world_size > 1:
        assert all(owned), f"a rank owns nothing: {owned}"
    for step in range(muon.STEPS):
        done = [[shape for t, shape in r[case, stage]["calls"] if t == step] for r in per_rank]
        assert sum(map(len, done)) == muon.MATRICES, f"step {step}: {done}"
        for rank, (shapes, mine) in enumerate(zip(done, owned)):
            assert len(shapes) == len(set(shapes)) and set(shapes) <= mine, \
                f"step {step}: rank {rank} orthogonalized {shapes}, owns {sorted(mine)}"


def test_params_that_are_not_matrices_are_refused():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    with pytest.raises(ValueError, match=r"2-D params.*shape \(3,\).*AdamW optimizer or param "
                                         r"group"):
        zeroopt.ZeroOptimizer(model.parameters(), "muon")
    with pytest.raises(ValueError, match="2-D params"):
        zeroopt.ZeroOptimizer([torch.nn.Parameter(torch.zeros(2, 3, 4))], "muon")
    weights = [p for p in model.parameters() if p.dim() == 2]
    zeroopt.ZeroOptimizer(weights, "muon")  # matrices alone are fine


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
    assert {k: v for k, v in rule.defaults.items() if k != "layerwise"} == torch_defaults
    assert rule.torch_class is torch.optim.Muon
    assert rule.placement_cost(torch.Size([41, 29])) == 41 * 29 * 29  # Newton-Schulz: m n min
    assert rule.whole_tensors({}) and rule.tensor_step is not None
    assert "muon" not in zeroopt.algorithms.ELSEWHERE
