"""Schedule-free RAdam, as facebookresearch/schedule_free's RAdamScheduleFree (schedulefree >= 1.4)
computes it: schedule-free AdamW (Defazio et al. 2024, see schedule_free.py) with RAdam's
rectification (Liu et al. 2020, "On the Variance of the Adaptive Learning Rate and Beyond") in
place of a warmup.

At step t the length of the approximated simple moving average is

    rho_inf = 2 / (1 - b2) - 1        rho_t = rho_inf - 2 t b2^t / (1 - b2^t)

While rho_t <= 4 (the first 4 steps at b2 = 0.999) the second moment is too young to trust:
v is updated, but the direction is the raw gradient (an SGD step at lr), or, with
``silent_sgd_phase`` (the default), there is no step at all (lr 0: the params and z stay where
they are, and those steps weigh nothing in the average). Afterwards the direction is Adam's,
at the rectified lr

    lr_t = lr sqrt((rho_t - 4)(rho_t - 2) rho_inf / ((rho_inf - 4)(rho_inf - 2) rho_t))

and y and z move as in schedule-free AdamW, with lr_t as that step's lr (also in lr_max, and
so in the average's weights).

Schedule-free RAdam has no paper of its own: the name is defined by the package, whose
arithmetic is followed exactly (the rectification in Python floats, in its order, the SGD phase,
weight decay added to the direction at y even in the SGD phase).

Hyperparameters, as RAdamScheduleFree's: lr (0.0025), betas ((0.9, 0.999): beta1 interpolates
y between x and z, beta2 is the second moment's decay, which also sets the rectification),
eps (1e-8, added outside the root), weight_decay (0: an L2 term at y), r (0: the average's
weights grow as t^r), weight_lr_power (2: and as lr_max^power), foreach (accepted for the
package's signature; zeroopt runs the foreach kernels or, on the CPU, one pass in C, with
the same arithmetic),
silent_sgd_phase (True). There is no warmup_steps: the rectification is the warmup
(Transformers' handler passes none either).
"""

from __future__ import annotations

import torch

from . import sources
from .base import ShardTensors, UpdateRule, adam_arguments, check_betas, check_nonnegative
from .schedule_free import (BOOKKEEPING, TRANSFORMERS_OPTIM_ARGS, adam_normalise_, advance,
                            check_foreach, check_schedule, mode_switches, native_step,
                            reference_y_and_z, second_moment_, step_y_and_z)


def rectification(beta2: float, t: int) -> tuple[float, float | None]:
    """(rho_t, the rectification factor) at step ``t`` (from 1), or (rho_t, None) in the SGD
    phase (rho_t <= 4); in the package's float arithmetic and order."""
    beta2_t = beta2 ** t
    bias_correction2 = 1 - beta2_t
    rho_inf = 2 / (1 - beta2) - 1
    rho_t = rho_inf - 2 * t * beta2_t / bias_correction2
    if rho_t > 4.0:
        return rho_t, ((rho_t - 4) * (rho_t - 2) * rho_inf
                       / ((rho_inf - 4) * (rho_inf - 2) * rho_t)) ** 0.5
    return rho_t, None


def _validate(group: dict) -> None:
    check_schedule(group)
    check_foreach(group)
    check_nonnegative(group, "eps")
    check_betas(group)
    if not isinstance(group["silent_sgd_phase"], bool):
        raise ValueError(f"silent_sgd_phase must be True or False, "
                         f"got {group['silent_sgd_phase']!r}")


def _before_step(group: dict) -> None:
    _, rect = rectification(group["betas"][1], group["k"] + 1)
    if rect is None:
        rect = float(not group["silent_sgd_phase"])
    advance(group, group["lr"] * rect)


def _fused(group: dict, shard: ShardTensors, step: torch.Tensor, stats=None) -> None:
    beta1, beta2 = group["betas"]
    adam_phase = rectification(beta2, group["k"])[1] is not None  # k: this step's number
    if native_step(group, shard, beta1, normalise=adam_phase):  # one pass on the CPU
        return
    grads, v = shard.grads, shard.states["exp_avg_sq"]  # the gradients are consumed
    second_moment_(v, grads, beta2)
    if adam_phase:
        adam_normalise_(grads, v, beta2, group["k"], group["eps"])
    step_y_and_z(group, shard, grads, beta1)


def _reference(group: dict, param: torch.Tensor, grad: torch.Tensor, state: dict, t: int) -> None:
    beta1, beta2 = group["betas"]
    v = state["exp_avg_sq"]
    v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    if rectification(beta2, group["k"])[1] is not None:
        direction = grad / (v.div(1 - beta2 ** group["k"]).sqrt() + group["eps"])
    else:
        direction = grad  # the SGD phase (at lr 0 when silent)
    reference_y_and_z(group, param, direction, state["z"], beta1)


_TO_EVAL, _TO_TRAIN = mode_switches(lambda group: group["betas"][0])
# zeroopt.wrap: the package's class (it starts in eval mode, this rule in train mode)
_SOURCES = sources.Sources(sources.schedulefree("RAdamScheduleFree"))

SCHEDULE_FREE_RADAM = UpdateRule(
    name="schedule_free_radam",
    nonnegative_states=("exp_avg_sq",),
    full_precision_states=("z",),
    defaults=dict(lr=0.0025, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, r=0.0,
                  weight_lr_power=2.0, foreach=True, silent_sgd_phase=True, **BOOKKEEPING),
    states=lambda group: ("z", "exp_avg_sq"),
    fused_step=_fused,
    reference_step=_reference,
    validate=_validate,
    initial_values=lambda group: {"z": "param"},
    before_step=_before_step,
    to_eval=_TO_EVAL,
    to_train=_TO_TRAIN,
    transformers_arguments=adam_arguments,  # no warmup_steps, as Transformers' handler
    transformers_optim_args=TRANSFORMERS_OPTIM_ARGS,
    wraps=_SOURCES,
    from_torch_options=_SOURCES.from_torch_options,
)
