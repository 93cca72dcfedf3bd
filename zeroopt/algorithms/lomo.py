"""LOMO (Lv et al. 2023, "Full Parameter Fine-tuning for Large Language Models with Limited
Resources"), with lomo_optim's ``Lomo`` semantics (lomo-optim 0.1.1): SGD fused into backward.

Each param is updated as soon as its gradient exists, during backward, so no optimizer state
and no gradient beyond one layer's is ever held:

    g <- clamp(g, -clip_grad_value, clip_grad_value)       (when clip_grad_value > 0)
    x <- x (1 - lr wd) - lr g

Here a bucket's params are updated as its averaged gradient is harvested into this rank's
shard: this rank's elements of them are stepped right there (zeroopt/whole_tensors.py),
element-wise, so params that straddle ranks are stepped piece by piece. Stage 2 harvests a
bucket during backward once its reduction has completed (or its staging buffer is needed);
stage 1, which keeps every staging buffer, harvests in step(), and what is left at stage 2
too. ``loss.backward(); opt.step(); opt.zero_grad()`` trains: step() harvests what is left,
publishes the params (the all-gather) and does the step's bookkeeping. With
``average_grads=False`` (a model DDP wraps: no bucket is reduced here) LOMO steps in step().

Hyperparameters (lomo_optim's names and defaults):
    lr: the step size (1e-3). lomo_optim takes it in every ``fused_backward(loss, lr)``;
        here the group's ``lr`` is read when the bucket is stepped (an LR scheduler sets it,
        as the Trainer's scheduler does).
    weight_decay: decoupled weight decay, x <- x (1 - lr wd) (0.0).
    clip_grad_value: clamp each element of the averaged gradient to [-v, v] before the
        update, when v > 0 (None). Element-wise, so it is exact on any shard.
    clip_grad_norm: must be None. lomo_optim gets the global gradient norm from a first
        backward pass (``grad_norm(loss)``) and steps in a second one; zeroopt steps in the one
        backward the user runs, before any global norm exists, so it cannot clip by it (and
        ``opt.clip_grad_norm_`` is refused). Transformers' Trainer never calls grad_norm: with
        clip_grad_norm set, Lomo itself refuses to step there.
    loss_scale_args: must be empty ({} or None). lomo_optim uses it only for a float16 loss:
        dynamic loss scaling, dropping the rest of a step whose gradient overflows, and
        clipping at 1.0 by default. zeroopt does not scale the loss (you run backward).
    layerwise: always True (the rule steps during backward by construction).

Where zeroopt differs from lomo_optim:
- the gradient is the average over ranks (lomo_optim's non-ZeRO path runs one process, or
  relies on DeepSpeed ZeRO-3 to all-reduce); each rank steps only its own elements;
- every param of a reduced bucket is stepped, one that no rank gave a gradient with a zero
  gradient (its weight decay applies), as zeroopt's other layerwise names; lomo_optim skips a
  param whose ``grad`` is None;
- the params move on each rank's own elements first; the other ranks' elements arrive with
  step()'s all-gather (lomo_optim's whole model moves during backward);
- gradient accumulation: micro-steps inside ``opt.no_sync()`` are reduced and stepped once, on
  their sum; lomo_optim under the Trainer steps on every micro-batch;
- a non-finite gradient skips this rank's piece of the bucket (``skip_nonfinite``, each rank
  deciding for its own elements: no global check exists yet during backward); lomo_optim
  without a loss scaler applies it;
- 16-bit params are stepped in fp32 masters (rounded into the params by step()), as for every
  rule; lomo_optim steps an fp32 copy and rounds it back into the param, keeping no master;
- memory: no optimizer state, as in lomo_optim, but the gradient shard is held as for every
  rule (1/W of the gradients at stage 2): zeroopt saves by sharding, not by LOMO's freeing of
  each gradient as it goes;
- under Transformers' Trainer, lomo_optim gets only ``lr`` (TrainingArguments'
  ``weight_decay`` is not passed to it); zeroopt.transformers gives the decayed group the
  Trainer's ``weight_decay``, as for every rule (the same at its default, 0).
"""

from __future__ import annotations

import torch

from .base import ShardTensors, UpdateRule, check_nonnegative, check_number


def validate_fused(group: dict, rule: str) -> None:
    """The checks LOMO and AdaLomo share: ``layerwise`` stays True, ``clip_grad_norm`` None,
    ``clip_grad_value`` None or a number.

    Args:
        group: the param group.
        rule: the rule's name, for the messages.

    Raises:
        ValueError: one of them is set otherwise.
    """
    if group["layerwise"] is not True:
        raise ValueError(f"{rule} steps each param during backward, as its averaged gradient "
                         f"arrives (lomo_optim's fused_backward): layerwise must stay True, "
                         f"got {group['layerwise']!r}")
    if group["clip_grad_norm"] is not None:
        raise ValueError(
            f"{rule}: clip_grad_norm={group['clip_grad_norm']!r} is not supported. lomo_optim "
            f"computes the global gradient norm in a first backward pass (grad_norm(loss)) and "
            f"steps in a second; zeroopt steps each param in the one backward you run, before "
            f"any global norm exists. Leave clip_grad_norm=None (clip_grad_value clamps each "
            f"element, and works)")
    value = group["clip_grad_value"]
    if value is not None:
        check_number(value, "clip_grad_value")


def clamped(group: dict, grads: list[torch.Tensor]) -> list[torch.Tensor]:
    """The gradients clamped to [-clip_grad_value, clip_grad_value] (new tensors) when it is
    set and > 0, as lomo_optim clamps; else ``grads`` themselves. The gradient shard is left
    as it is (the norm step() computes for its non-finite check, and the one the Trainer
    logs, are of the averaged gradient before clamping, as lomo_optim's grad_norm)."""
    value = group["clip_grad_value"]
    if value is None or value <= 0:
        return grads
    low = torch._foreach_clamp_min(grads, -value)
    torch._foreach_clamp_max_(low, value)
    return low


def _validate(group: dict) -> None:
    check_nonnegative(group, "lr", "weight_decay")
    validate_fused(group, "lomo")
    if group["loss_scale_args"]:
        raise ValueError(
            f"lomo: loss_scale_args={group['loss_scale_args']!r} is not supported. lomo_optim "
            f"uses it for a float16 loss only (dynamic loss scaling, skipping steps that "
            f"overflow); zeroopt does not scale the loss, you run backward. Leave it empty")


def _fused(group: dict, shard: ShardTensors, step: torch.Tensor, stats=None) -> None:
    """This rank's pieces of one bucket's params (called during backward)."""
    lr, wd = group["lr"], group["weight_decay"]
    grads = clamped(group, shard.grads)
    if wd > 0.0:
        torch._foreach_mul_(shard.params, 1.0 - lr * wd)
    torch._foreach_add_(shard.params, grads, alpha=-lr)


def _reference(group: dict, param: torch.Tensor, grad: torch.Tensor, state: dict,
               t: int) -> None:
    """lomo_optim.Lomo's update of one whole param (``fuse_update``), without the hooks."""
    value = group["clip_grad_value"]
    grad = grad.float()
    if value is not None and value > 0:
        grad = grad.clamp(min=-value, max=value)
    if group["weight_decay"] > 0.0:
        param.mul_(1.0 - group["lr"] * group["weight_decay"])
    param.add_(grad, alpha=-group["lr"])


LOMO = UpdateRule(
    name="lomo",
    defaults=dict(lr=1e-3, clip_grad_norm=None, clip_grad_value=None, weight_decay=0.0,
                  loss_scale_args={}, layerwise=True),
    states=lambda group: (),
    fused_step=_fused,
    reference_step=_reference,
    validate=_validate,
    # Layerwise by construction: whole_tensors.py steps every param as its bucket is reduced.
    fixed=dict(layerwise=True),
    # No torch_class: lomo_optim.Lomo takes the model (not params), registers its own hooks
    # and steps in fused_backward(loss, lr), so neither zeroopt.wrap, export_torch_state_dict
    # nor the generic tests can build it from params; tests/test_lomo.py runs it as
    # Transformers does.
)
