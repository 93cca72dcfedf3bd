"""Schedule-free SGD (Defazio et al. 2024, "The Road Less Scheduled", Algorithm 1), as
facebookresearch/schedule_free's SGDScheduleFree computes it.

The model holds y = (1 - momentum) z + momentum x; each step takes the gradient at y as the
direction, and moves y and z as every schedule-free rule does (schedule_free.py):

    d = g + wd y
    y <- lerp(y, z, c) + lr (momentum (1 - c) - 1) d      c = weight / weight_sum
    z <- z - lr d

with the average's weight (k+1)^r lr_max^power. The paper's Algorithm 1 averages uniformly
(c = 1/(t+1)) and has no weight decay or warmup; the package adds those (an L2 term at y, a
linear warmup, warmup steps weighted by lr_max^power, section 3's weighting with r), and
zeroopt follows the package, which is what the name means (Transformers' schedule_free_sgd).

Hyperparameters, as SGDScheduleFree's: lr (1.0), momentum (0.9: the interpolation beta, in
(0, 1) exclusive), weight_decay (0), warmup_steps (0: the lr rises linearly over that many
steps), r (0), weight_lr_power (2), foreach (accepted for the package's signature; zeroopt
always runs the foreach kernels, with the same arithmetic). The only state is z.
"""

from __future__ import annotations

import torch

from . import sources
from .base import ShardTensors, UpdateRule, check_nonnegative, check_number
from .schedule_free import (BOOKKEEPING, TRANSFORMERS_OPTIM_ARGS, advance, check_foreach,
                            check_schedule, mode_switches, reference_y_and_z, step_y_and_z,
                            warmup_lr, warmup_steps_argument)


def _validate(group: dict) -> None:
    check_schedule(group)
    check_foreach(group)
    check_nonnegative(group, "warmup_steps")
    if not 0 < check_number(group["momentum"], "momentum") < 1:
        raise ValueError(f"Momentum must be between 0 and 1 exclusive: {group['momentum']}")


def _before_step(group: dict) -> None:
    advance(group, warmup_lr(group))


def _fused(group: dict, shard: ShardTensors, step: torch.Tensor, stats=None) -> None:
    step_y_and_z(group, shard, shard.grads, group["momentum"])  # the gradients are consumed


def _reference(group: dict, param: torch.Tensor, grad: torch.Tensor, state: dict, t: int) -> None:
    reference_y_and_z(group, param, grad, state["z"], group["momentum"])


_TO_EVAL, _TO_TRAIN = mode_switches(lambda group: group["momentum"])
# zeroopt.wrap: the package's class (it starts in eval mode, this rule in train mode)
_SOURCES = sources.Sources(sources.schedulefree("SGDScheduleFree"))

SCHEDULE_FREE_SGD = UpdateRule(
    name="schedule_free_sgd",
    full_precision_states=("z",),
    defaults=dict(lr=1.0, momentum=0.9, weight_decay=0.0, warmup_steps=0, r=0.0,
                  weight_lr_power=2.0, foreach=True, **BOOKKEEPING),
    states=lambda group: ("z",),
    fused_step=_fused,
    reference_step=_reference,
    validate=_validate,
    initial_values=lambda group: {"z": "param"},
    before_step=_before_step,
    to_eval=_TO_EVAL,
    to_train=_TO_TRAIN,
    # Transformers' handler: no Adam arguments; warmup_steps, weight_decay (the groups'), and
    # weight_lr_power and r from optim_args
    transformers_arguments=lambda args: dict(
        warmup_steps=warmup_steps_argument(args, "schedule_free_sgd")),
    transformers_optim_args=TRANSFORMERS_OPTIM_ARGS,
    wraps=_SOURCES,
    from_torch_options=_SOURCES.from_torch_options,
)
