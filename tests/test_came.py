"""CAME sharded, against pytorch_optimizer.CAME, at W = 1, 2, 3, stages 1 and 2; and a
checkpoint saved at W=3 resumed at W=2 (tests/ranks/came.py).

The reference trains unsharded on the exact average of every rank's gradient, so the only
possible difference is the update's arithmetic. zeroopt runs the package's own per-tensor
operations in its order, on the rank that owns each whole param: the params agree bit for bit
(observed 0.0 at every W, stage and case, after 8 steps). Tolerance 1e-6 relative, as in
test_whole_tensors.py: a wrong moment (b2 for b3), a missed confidence factor or a wrong owner
gives 1e-3 or more (the params move by ~0.1 relative over the run).
"""

import pytest
import torch

import zeroopt
from distributed import run_ranks
from ranks import came

TOL = 1e-6
WORLD_SIZES = (3, 2, 1)  # W=3 first: it saves the checkpoint W=2 resumes
STAGES = (1, 2)
_results: dict = {}


def results_at(world_size: int, root: str) -> list:
    """Every rank's results of came.suite at ``world_size``, run once (W=2 resumes what W=3
    saved, so W=3 runs first)."""
    if world_size not in _results:
        if world_size == 2:
            results_at(3, root)
        _results[world_size] = run_ranks(world_size, came.suite, root, world_size == 3,
                                         world_size == 2, shared=True)
    return _results[world_size]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("came_checkpoints"))


@pytest.fixture(scope="module", params=WORLD_SIZES, ids=lambda w: f"W{w}")
def results(request, root):
    return request.param, results_at(request.param, root)


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("case", list(came.CASES))
def test_matches_pytorch_optimizer_came(results, case, stage):
    world_size, per_rank = results
    for reference in ("package", "eager"):
        err = max(r["ref", case, stage][reference] for r in per_rank)
        assert err <= TOL, f"{case} stage {stage} W={world_size}: {reference} rel err {err:.2e}"
    assert min(r["ref", case, stage]["moved"] for r in per_rank) > 1e-2  # it trained


@pytest.mark.parametrize("case", list(came.CASES))
def test_each_param_is_stepped_whole_by_one_rank(results, case):
    world_size, per_rank = results
    owned = [set(r["ref", case, 2]["owned"]) for r in per_rank]
    assert sum(map(len, owned)) == len(set().union(*owned)) == 9, owned  # all, each once
    if world_size > 1:
        assert all(owned), f"a rank owns nothing: {owned}"


def test_checkpoint_saved_at_3_ranks_resumes_at_2_identically(root):
    saved = results_at(3, root)
    resumed = results_at(2, root)
    for r in resumed:
        differ = [i for i, (a, b) in enumerate(zip(saved[0]["uninterrupted"], r["resumed"]))
                  if not torch.equal(a, b)]
        assert not differ, f"W=3 -> 2: params {differ} differ from the uninterrupted run"


def test_placement_cost_is_the_matrix_size():
    rule = zeroopt.algorithms.get_rule("came")
    assert rule.placement_cost(torch.Size([41, 37])) == 41 * 37  # m n, not an SVD's m n min
    assert rule.placement_cost(torch.Size([])) == 1
    assert rule.whole_tensors({}) and rule.tensor_step is not None
