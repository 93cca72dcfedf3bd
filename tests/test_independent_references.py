"""zeroopt's rules against independent implementations that install here.

(torch.optim is the reference throughout test_equivalence.py; pytorch-optimizer's LAMB and LARS
are in test_trust_ratio.py.)
"""

import pytest
import torch

import zeroopt
from training import rel_diff as rel
from training import small_pair as pair
from training import train_small as train


def test_lion_equals_lion_pytorch_bit_for_bit():
    lion_pytorch = pytest.importorskip("lion_pytorch")
    ours, theirs = pair()
    train(ours, zeroopt.ZeroOptimizer(ours.parameters(), "lion", lr=1e-3, weight_decay=0.1))
    train(theirs, lion_pytorch.Lion(theirs.parameters(), lr=1e-3, weight_decay=0.1))
    assert rel(ours, theirs) == 0.0


def test_wrap_lion_pytorch():
    lion_pytorch = pytest.importorskip("lion_pytorch")
    ours, theirs = pair()
    wrapped = zeroopt.wrap(lion_pytorch.Lion(ours.parameters(), lr=1e-3, betas=(0.95, 0.98)))
    assert wrapped.rule.name == "lion" and wrapped.param_groups[0]["betas"] == (0.95, 0.98)
    train(ours, wrapped)
    train(theirs, lion_pytorch.Lion(theirs.parameters(), lr=1e-3, betas=(0.95, 0.98)))
    assert rel(ours, theirs) == 0.0
    with pytest.raises(ValueError, match="decoupled_weight_decay"):
        zeroopt.wrap(lion_pytorch.Lion(pair()[0].parameters(), decoupled_weight_decay=True))


@pytest.mark.parametrize("warmup, tol", [
    (None, 1e-6),
    # pytorch-optimizer's beta3 warm-up omits the 1e-8 that apple's adds inside log(beta):
    # (1 - beta3_t) moves by ~1e-4 relative during the warm-up, the params by ~1e-6.
    (5, 1e-5),
])
def test_ademamix_matches_pytorch_optimizer(warmup, tol):
    po = pytest.importorskip("pytorch_optimizer")
    ours, theirs = pair()
    hp = dict(lr=1e-2, betas=(0.9, 0.999, 0.9999), alpha=5.0, weight_decay=0.1, eps=1e-8)
    train(ours, zeroopt.ZeroOptimizer(ours.parameters(), "ademamix", alpha_warmup=warmup,
                                      beta3_warmup=warmup, **hp))
    train(theirs, po.AdEMAMix(theirs.parameters(), t_alpha_beta3=warmup, weight_decouple=True,
                              fixed_decay=False, **hp))
    assert rel(ours, theirs) < tol


def test_adopt_matches_pytorch_optimizer():
    """pytorch-optimizer's ADOPT clips at step**0.25 counting the step after its increment; the
    authors' adopt.py (and zeroopt) count it before, so shift its clip by one step. Weight decay
    off: pytorch-optimizer also decays on the initialising step, the authors do not."""
    po = pytest.importorskip("pytorch_optimizer")
    for cautious in (False, True):
        ours, theirs = pair()
        train(ours, zeroopt.ZeroOptimizer(ours.parameters(), "adamw", lr=1e-2, weight_decay=0.0,
                                          betas=(0.9, 0.9999), eps=1e-6, adopt=True,
                                          cautious=cautious))
        train(theirs, po.ADOPT(theirs.parameters(), lr=1e-2, betas=(0.9, 0.9999), eps=1e-6,
                               clip_lambda=lambda step: (step - 1) ** 0.25, cautious=cautious))
        assert rel(ours, theirs) < 1e-6, cautious


def test_grams_matches_pytorch_optimizer():
    po = pytest.importorskip("pytorch_optimizer")
    ours, theirs = pair()
    train(ours, zeroopt.ZeroOptimizer(ours.parameters(), "adamw", lr=1e-2, weight_decay=0.1,
                                      grams=True))
    train(theirs, po.Grams(theirs.parameters(), lr=1e-2, weight_decay=0.1, eps=1e-8))
    assert rel(ours, theirs) < 1e-6


def test_schedule_free_adamw_matches_schedulefree():
    """Training point y, evaluation point x after eval(), and training again after train()."""
    schedulefree = pytest.importorskip("schedulefree")
    ours, theirs = pair()
    hp = dict(lr=1e-2, weight_decay=0.05, warmup_steps=3)
    opt = zeroopt.ZeroOptimizer(ours.parameters(), "schedule_free_adamw", **hp)
    ref = schedulefree.AdamWScheduleFree(theirs.parameters(), **hp)
    ref.train()
    train(ours, opt)
    train(theirs, ref)
    assert rel(ours, theirs) < 1e-6
    opt.eval()
    ref.eval()
    assert rel(ours, theirs) < 1e-6
    with pytest.raises(RuntimeError, match=r"step\(\) in eval mode: call opt.train\(\)"):
        ours(torch.randn(2, 16)).sum().backward()
        opt.step()
    opt.zero_grad()
    opt.train()
    ref.train()
    train(ours, opt, steps=3)
    train(theirs, ref, steps=3)
    assert rel(ours, theirs) < 1e-6
