"""LAMB and LARS trust ratios are per tensor, exactly, however the tensors are sharded.

DeepSpeed ZeRO steps its optimizer on flat partitions, so a trust ratio there is computed on
whatever chunk of a param a rank holds. ``ChunkwiseReference`` computes exactly that; zeroopt
must match the per-tensor reference (1e-6, the tolerance of test_equivalence.py) and differ
from the chunk-wise one by far more.
"""

import math

import pytest
import torch

from ranks import trust_ratio
import zeroopt
from distributed import run_ranks
from training import rel_diff, small_pair, train_small

RULES = {"lamb": dict(lr=1e-2, weight_decay=0.05), "lars": dict(lr=0.5, weight_decay=1e-3)}


@pytest.mark.parametrize("rule", list(RULES))
@pytest.mark.parametrize("world_size", [2, 3])
def test_trust_ratio_is_per_tensor_not_per_chunk(rule, world_size):
    for got in run_ranks(world_size, trust_ratio.per_tensor_vs_chunkwise, rule, RULES[rule],
                         shared=True):
        assert got["straddling_params"] >= 1  # some param really is split across ranks
        assert got["vs_per_tensor"] < 1e-6, got
        assert got["vs_chunkwise"] > 1e-4, got


@pytest.mark.parametrize("rule", list(RULES))
def test_exclusion_by_name(rule):
    for got in run_ranks(2, trust_ratio.exclusion_by_name, rule, RULES[rule], shared=True):
        assert got["vs_named_reference"] < 1e-6, got
        assert got["vs_no_exclusion"] > 1e-4, got


def test_exclusion_by_name_needs_named_params():
    with pytest.raises(ValueError, match=r"pass model.named_parameters\(\)"):
        zeroopt.ZeroOptimizer(torch.nn.Linear(3, 2).parameters(), "lamb",
                              exclude_from_trust_ratio=["bias"])


# --- against pytorch-optimizer's independent implementations --------------------------------

po = pytest.importorskip("pytorch_optimizer")


def _groups(model, wd, **no_decay_extra):
    return [{"params": [p for n, p in model.named_parameters() if n.endswith("weight")],
             "weight_decay": wd},
            {"params": [p for n, p in model.named_parameters() if n.endswith("bias")],
             "weight_decay": 0.0, **no_decay_extra}]


def test_lamb_matches_pytorch_optimizer():
    """pytorch-optimizer's Lamb never bias-corrects v (and, by default, decays outside the
    trust ratio); with its non-decoupled form and eps, weight_decay and lr rescaled each step
    by the bias corrections, it computes apex's LAMB, which is zeroopt's definition."""
    ours, theirs = small_pair()
    lr, wd, eps = 1e-2, 0.01, 1e-6
    opt = zeroopt.ZeroOptimizer(_groups(ours, wd), "lamb", lr=lr, eps=eps)
    ref = po.Lamb(_groups(theirs, wd, adam=True), lr=lr, eps=eps, weight_decouple=False,
                  adam_debias=True, pre_norm=False, max_grad_norm=0.0)

    def rescale(t):
        bc1, bc2 = 1 - 0.9**t, math.sqrt(1 - 0.999**t)
        decay, plain = ref.param_groups
        decay.update(eps=eps * bc2, weight_decay=wd * bc1 / bc2)
        plain.update(eps=eps * bc2, lr=lr * bc2 / bc1)

    train_small(ours, opt, 10)
    train_small(theirs, ref, 10, rescale)
    assert rel_diff(ours, theirs) < 1e-6


def test_lars_matches_pytorch_optimizer_up_to_its_denominator():
    """pytorch-optimizer's LARS divides by ||g|| + wd ||w|| where the definition has
    ||g + wd w||; rescaling its trust coefficient per tensor and step by the ratio of the two
    removes exactly that difference, and nothing else remains."""
    ours, theirs = small_pair()
    lr, wd, eta = 0.5, 1e-4, 1e-3
    opt = zeroopt.ZeroOptimizer(_groups(ours, wd), "lars", lr=lr, eta=eta)
    groups = [{"params": [p], "weight_decay": wd if n.endswith("weight") else 0.0}
              for n, p in theirs.named_parameters()]
    ref = po.LARS(groups, lr=lr, momentum=0.9, trust_coefficient=eta)

    def fix_denominator(t):
        for g in ref.param_groups:
            p = g["params"][0]
            if g["weight_decay"] > 0:
                g["trust_coefficient"] = eta * (p.grad.norm() + wd * p.norm()).item() / (
                    p.grad + wd * p).norm().item()

    train_small(ours, opt, 10)
    train_small(theirs, ref, 10, fix_denominator)
    assert rel_diff(ours, theirs) < 1e-6
