"""schedule_free_radam and schedule_free_sgd, sharded at W = 1, 2, 3 (stages 1 and 2), against
schedulefree's RAdamScheduleFree / SGDScheduleFree and against their own eager references
(tests/ranks/schedule_free_rules.py), in train mode and at the evaluation point after
eval() midway; a checkpoint saved in eval mode at W=3 and resumed at W=2; and the Trainer's
arguments for both names.

All three optimizers see the same gradient bit for bit (the exact fp64 average), and zeroopt
runs the package's own foreach operations in its order, so the params agree exactly: observed
0.0 against both yardsticks, at every W and stage, train and eval points alike. The tolerance is
1e-6 relative, as in test_equivalence.py. Perturbed by hand, each fails it by far: the SGD
phase one step too long 1.0, the silent phase ignored inf (a param the package leaves at 0
moves), weight decay halved 2e-3, SGD's eval point at momentum 0.9 instead of 0.7 0.2, and the
weight sum not restored by a load makes the resumed params differ.
"""

from __future__ import annotations

import pytest
import torch

from distributed import run_ranks
from ranks import schedule_free_rules as rules

pytest.importorskip("schedulefree")

TOL = 1e-6
WORLD_SIZES = (1, 2, 3)
STAGES = (1, 2)


@pytest.fixture(scope="module")
def saved_at_3(tmp_path_factory):
    """The W=3 suite, which also saves the checkpoints (one spawn for both)."""
    root = str(tmp_path_factory.mktemp("schedule_free_rules"))
    return root, run_ranks(3, rules.suite, root, "save", shared=True)


@pytest.fixture(scope="module")
def resumed_at_2(saved_at_3):
    """The W=2 suite, which also resumes W=3's checkpoints."""
    root, _ = saved_at_3
    return run_ranks(2, rules.suite, root, "resume", shared=True)


@pytest.fixture(scope="module", params=WORLD_SIZES, ids=lambda w: f"W{w}")
def results(request):
    if request.param == 3:
        return 3, request.getfixturevalue("saved_at_3")[1]
    if request.param == 2:
        return 2, request.getfixturevalue("resumed_at_2")
    return request.param, run_ranks(request.param, rules.suite, shared=True)


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("case", list(rules.CASES))
def test_matches_schedulefree_and_eager_reference(results, case, stage):
    world_size, per_rank = results
    for key in ("package", "package_eval", "eager", "eager_eval"):
        err = max(r[case, stage][key] for r in per_rank)
        assert err <= TOL, f"{case} stage {stage} W={world_size} {key}: rel err {err:.2e}"
    # eval() moved the params at the second switch (else the eval comparison would be the
    # training one again; observed >= 4.4e-5, RAdam's silent phase keeps x = y at the first)
    assert all(r[case, stage]["eval_moved"][1] > 1e-5 for r in per_rank)


def test_checkpoint_saved_at_3_resumes_at_2_identically(saved_at_3, resumed_at_2):
    """Saved in eval mode at W=3, loaded at W=2: the same evaluation point, and after train()
    the same training, bit for bit (the same batch on every rank: the average gradient is the
    same at both world sizes, see ranks/checkpoint.py)."""
    saved = [r["checkpoint"] for r in saved_at_3[1]]
    resumed = [r["checkpoint"] for r in resumed_at_2]
    for case in rules.CHECKPOINT_CASES:
        for phase in ("eval", "final"):
            for r in (*saved, *resumed):
                differ = [i for i, (a, b) in enumerate(zip(saved[0][case][phase], r[case][phase]))
                          if not torch.equal(a, b)]
                assert not differ, f"{case} {phase}: params {differ} differ"
        moved = max((a - b).abs().max().item()
                    for a, b in zip(saved[0][case]["eval"], saved[0][case]["final"]))
        assert moved > 1e-4, f"{case}: training after the resume changed nothing"


@pytest.mark.parametrize("optim,optim_args", [("schedule_free_radam", "r=1,weight_lr_power=1"),
                                              ("schedule_free_sgd", "weight_lr_power=1.5")])
def test_trainer_arguments_are_transformers(optim, optim_args, tmp_path):
    """The hyperparameters are those Transformers' _get_schedule_free_optimizer passes:
    RAdam the Adam arguments and no warmup_steps, SGD warmup_steps and no Adam arguments;
    both weight_lr_power and r from optim_args, as floats."""
    pytest.importorskip("transformers")
    from ranks.transformers import arguments, tiny_llama
    from transformers import Trainer

    from zeroopt.algorithms import get_rule
    from zeroopt.transformers import create_optimizer

    args = arguments(str(tmp_path), optim=optim, optim_args=optim_args, weight_decay=0.05,
                     adam_beta1=0.8, adam_beta2=0.95, adam_epsilon=1e-7, warmup_steps=4)
    model = tiny_llama()
    cls, theirs = Trainer.get_optimizer_cls_and_kwargs(args, model)
    opt = create_optimizer(args, model)
    assert opt.rule is get_rule(optim)
    assert set(theirs) - {"weight_decay"} <= set(opt.rule.defaults)
    for key, value in theirs.items():
        if key != "weight_decay":  # the groups': 0.05 decayed, 0 for biases and norms
            assert all(g[key] == value and type(g[key]) is type(value)
                       for g in opt.param_groups), (key, value)
    assert ("warmup_steps" in theirs) == (optim == "schedule_free_sgd")
    assert ("betas" in theirs) == (optim == "schedule_free_radam")
    assert {g["weight_decay"] for g in opt.param_groups} == {0.05, 0.0}
