"""State moves between torch.optim and zeroopt in both directions, at W=2 (sharded).

Tolerance 1e-6 relative, as test_equivalence.py: zeroopt's fused update and torch.optim's
per-tensor loop differ by a few fp32 ulps per step (observed ~1e-7); a state that did not move
(zeros, or another param's) gives 1e-3 or more.
"""

from __future__ import annotations

import pytest
import torch

from ranks import torch_interop
import zeroopt
from distributed import run_ranks

TOL = 1e-6


@pytest.mark.parametrize("name", list(torch_interop.RULES))
def test_state_moves_both_ways(name):
    errors = run_ranks(2, torch_interop.both_directions, name, shared=True)
    assert set(errors[0]) == {"zeroopt->torch", "torch->zeroopt"}
    for direction, err in errors[0].items():
        assert err <= TOL, f"{name} {direction}: rel err {err:.2e}"


def test_rules_without_a_torch_equivalent_are_refused():
    model = torch.nn.Linear(4, 3)
    with pytest.raises(ValueError, match="'lion' has no torch.optim equivalent"):
        zeroopt.export_torch_state_dict(zeroopt.ZeroOptimizer(model.parameters(), "lion"))
    model = torch.nn.Linear(4, 3)
    opt = zeroopt.ZeroOptimizer(model.parameters(), "adamw", cautious=True)
    with pytest.raises(ValueError, match="no 'cautious'"):
        zeroopt.export_torch_state_dict(opt)


def test_torch_groups_with_options_the_rule_lacks_are_refused():
    model = torch.nn.Linear(4, 3)
    torch_opt = torch.optim.Adam(model.parameters(), amsgrad=True)
    model(torch.ones(2, 4)).sum().backward()
    torch_opt.step()
    opt = zeroopt.ZeroOptimizer(torch.nn.Linear(4, 3).parameters(), "adam")
    with pytest.raises(ValueError, match="amsgrad|max_exp_avg_sq"):
        opt.load_state_dict(torch_opt.state_dict())
