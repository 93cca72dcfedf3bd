"""The foreach Adam(W) step, run where torch has no fused kernel (XLA, other accelerators),
held on CPU to torch.optim's own foreach implementation: bit for bit, with the params as
views of one flat buffer, as zeroopt's shards are. (The CPU suite otherwise always takes the
fused kernel, so this path would go untested here.)"""

import pytest
import torch

from zeroopt.algorithms import adam
from zeroopt.algorithms.base import ShardTensors

SIZES = (37, 1, 300)


@pytest.mark.parametrize("decoupled", [True, False], ids=["adamw", "adam"])
@pytest.mark.parametrize("maximize", [False, True])
def test_foreach_step_equals_torch_optim(decoupled, maximize):
    torch.manual_seed(0)
    flat = torch.randn(sum(SIZES))
    params = list(flat.split(SIZES))
    states = {name: [torch.zeros(n) for n in SIZES] for name in ("exp_avg", "exp_avg_sq")}
    group = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, maximize=maximize)

    reference = [torch.nn.Parameter(p.clone()) for p in params]
    kind = torch.optim.AdamW if decoupled else torch.optim.Adam
    ref_opt = kind(reference, foreach=True, **group)

    step = torch.zeros(())
    for _ in range(5):
        grads = [torch.randn(n) for n in SIZES]
        step += 1
        adam._foreach_step(group, ShardTensors(params, grads, states), step, decoupled)
        for p, g in zip(reference, grads):
            p.grad = g.clone()
        ref_opt.step()
    for got, want in zip(params, reference):
        assert torch.equal(got, want.detach())
    assert torch.equal(flat, torch.cat([p.detach() for p in reference]))  # the views moved
