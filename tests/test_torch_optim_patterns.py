"""Every training-loop pattern torch.optim accepts gives torch.optim's result sharded, at
W = 1, 2, 3, stages 1 and 2 (rank-side code: ranks/torch_optim_patterns.py).

Tolerance 1e-6 relative to each param's largest magnitude, as in test_equivalence.py (the
gradients are summed exactly in fp64; what remains is the fused kernels' arithmetic against
torch.optim's per-tensor loop, ~1e-7). A param stepped when it should not be (weight decay,
momentum), or not stepped when torch.optim steps it (a grad zeroed by
``zero_grad(set_to_none=False)``), a missed or doubled gradient, or a wrong per-param step count
gives 1e-3 or more.
"""

import pytest

from ranks import torch_optim_patterns
from distributed import run_ranks

TOL = 1e-6
WORLD_SIZES = (1, 2, 3)
STAGES = (1, 2)
_runs: dict = {}


@pytest.fixture(scope="module", params=WORLD_SIZES, ids=lambda w: f"W{w}")
def per_rank(request):
    if request.param not in _runs:
        _runs[request.param] = run_ranks(request.param, torch_optim_patterns.suite,
                                         shared=True)
    return _runs[request.param]


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("name", ["adamw", "sgd", "lamb", "adafactor", "paged_adamw_32bit"])
def test_params_without_gradients_are_not_stepped(per_rank, name, stage):
    for r in per_rank:
        assert r["unused", name, stage] < TOL, r["unused", name, stage]


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_zero_grad_without_set_to_none_keeps_stepping_params_that_had_a_gradient(
        per_rank, name, stage):
    """zero_grad(set_to_none=False) leaves zeroed grads: torch.optim goes on stepping those
    params (weight decay, momentum) in steps where no rank uses them, until set_to_none=True."""
    for r in per_rank:
        got = r["zeroed_kept", name, stage]
        assert got["params"] < TOL, got
        assert got["hand_grad_zeroed_in_place"], got


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_zero_grad_without_set_to_none_with_a_model_wrapped_in_ddp(per_rank, name):
    """The same with DistributedDataParallel's averaged grads (average_grads=False, stage 1)."""
    if len(per_rank) == 1:
        pytest.skip("DistributedDataParallel needs a process group (W > 1)")
    for r in per_rank:
        got = r["zeroed_kept_ddp", name]
        assert got["params"] < TOL, got
        assert got["hand_grad_zeroed_in_place"], got


@pytest.mark.parametrize("stage", STAGES)
def test_params_frozen_later_stop_and_unfrozen_train_again(per_rank, stage):
    for r in per_rank:
        assert r["freeze", stage] < TOL


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("mode", ["by_hand", "mixed", "autograd_grad", "closure"])
def test_gradients_that_did_not_come_through_backward_hooks(per_rank, mode, stage):
    for r in per_rank:
        assert r["outside_backward", stage][mode] < TOL, r["outside_backward", stage]


@pytest.mark.parametrize("stage", STAGES)
def test_weights_loaded_into_a_bf16_model_are_where_the_next_step_starts(per_rank, stage):
    for r in per_rank:
        assert r["loaded_weights", stage]["master"] < TOL, r["loaded_weights", stage]


@pytest.mark.parametrize("stage", STAGES)
def test_a_rebuilt_optimizer_takes_over_and_the_old_one_says_so(per_rank, stage):
    for r in per_rank:
        got = r["rebuilt", stage]
        assert got["params"] < TOL, got
        assert "a newer ZeroOptimizer, built over the same params, has taken over" in \
            got["old_error"]


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("name", ["adamw", "lamb"])
def test_params_frozen_at_construction_train_once_unfrozen(per_rank, name, stage):
    for r in per_rank:
        assert r["unfrozen", name, stage] < TOL, r["unfrozen", name, stage]


@pytest.mark.parametrize("stage", STAGES)
def test_a_checkpoint_from_before_unfreezing_loads_with_fresh_state_for_the_rest(per_rank, stage):
    for r in per_rank:
        assert r["resumed_unfrozen", stage] < TOL, r["resumed_unfrozen", stage]


def test_one_groups_list_given_to_two_optimizers_keeps_each_names_preset():
    """The user's group dicts are not written into, so the second optimizer gets its own
    name's preset (galore_adamw_8bit: 8-bit moments), not the first one's resolved values."""
    import torch

    import zeroopt

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 8))
    groups = zeroopt.galore_param_groups(model, "all-linear", rank=8, update_proj_gap=2)
    keys_before = [set(g) for g in groups]
    zeroopt.ZeroOptimizer(groups, "galore_adamw", lr=1e-3)
    assert [set(g) for g in groups] == keys_before
    second = zeroopt.ZeroOptimizer(groups, "galore_adamw_8bit", lr=1e-3, min_8bit_size=64)
    assert [g["state_precision"] for g in second.param_groups] == ["8bit", "8bit"]
    model(torch.randn(4, 64)).sum().backward()
    second.step()
    state = second.state_dict()["state"]
    projected = len(list(model.parameters()))  # galore_param_groups puts them last
    codes = [state[i]["exp_avg"].dtype for i in range(projected - 2, projected)]
    assert codes == [torch.uint8, torch.uint8], codes


def test_an_optimizer_that_failed_to_build_takes_nothing_over():
    """A construction that raises (here an invalid lr) leaves the params with the optimizer
    that held them: it still steps, and a later optimizer takes over from it as usual."""
    import torch

    import zeroopt

    model = torch.nn.Linear(4, 3)
    held = zeroopt.ZeroOptimizer(model.parameters(), "adamw", lr=1e-2)
    with pytest.raises(ValueError, match="lr"):
        zeroopt.ZeroOptimizer(model.parameters(), "adamw", lr=-1.0)
    before = model.weight.detach().clone()
    model(torch.randn(2, 4)).sum().backward()
    held.step()
    assert not torch.equal(model.weight, before)
    zeroopt.ZeroOptimizer(model.parameters(), "adamw", lr=1e-2)
    with pytest.raises(RuntimeError, match="has taken over"):
        held.step()
