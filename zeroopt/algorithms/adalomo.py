"""AdaLomo (Lv et al. 2023, "AdaLomo: Low-memory Optimization with Adaptive Learning Rate"),
with lomo_optim's ``AdaLomo`` semantics (lomo-optim 0.1.1): Adafactor-like factored second
moments, fused into backward.

Each param is updated as soon as its gradient exists, during backward. A matrix keeps a row
and a column mean of g^2 (not a full matrix of them), a vector its own g^2 average:

    beta2_t = 1 - t^decay_rate                 (0 at t = 1: the first step takes g^2 whole)
    v_row, v_col <- beta2_t v + (1 - beta2_t) mean(g^2 + eps1)     (rows, columns)
    u = g / sqrt(v_row v_col / mean(v_row))    (vectors: u = g / sqrt(v))
    u <- u / max(1, RMS(u) / clip_threshold)   (update normalisation)
    lr_t = lr max(eps2, RMS(x))                (the param's own scale)
    x <- x (1 - lr_t wd) - lr_t u

Every param is stepped whole, on the one rank that owns it (zeroopt/whole_tensors.py: its
factored states and both RMS values need the whole matrix), as soon as its bucket's averaged
gradient is harvested into that rank's shard (during backward at stage 2, as the reductions
complete; in step() at stage 1: see lomo.py). ``loss.backward(); opt.step();
opt.zero_grad()`` trains: step() harvests what is left, publishes the params (the all-gather)
and does the step's bookkeeping. Stage 1 and stage 2 alike.

Hyperparameters (lomo_optim's names and defaults):
    lr: the relative step size (1e-3), scaled by the param's RMS. lomo_optim takes it in every
        ``fused_backward(loss, lr)``; here the group's ``lr`` is read when the param is
        stepped (an LR scheduler sets it, as the Trainer's scheduler does).
    eps: (eps1, eps2) = (1e-30, 1e-3): eps1 is added to g^2; eps2 is the smallest param scale.
    clip_threshold: the largest RMS of the normalised update (1.0).
    decay_rate: beta2_t = 1 - t^decay_rate (-0.8); t counts the param's steps from 1.
    weight_decay: decoupled weight decay, scaled by lr_t (0.0).
    clip_grad_value: clamp each element of the averaged gradient to [-v, v] first, when
        v > 0 (None).
    clip_grad_norm: must be None: lomo_optim gets the global norm from a first backward pass
        (``grad_norm(loss)``); zeroopt steps in the one backward the user runs, before any
        global norm exists.
    loss_scale: None, 0 or a power of two (2**10). lomo_optim multiplies the loss by it before
        backward and divides the gradient by it again; in fp32 (and bf16) a power of two
        cancels exactly, so the update is the same without it, which is what zeroopt computes
        (you run backward, unscaled). Another value would change lomo_optim's gradient by
        rounding, so it is refused. (For a float16 model its scaling guards against underflow
        in backward, which zeroopt leaves to you.)
    layerwise: always True (the rule steps during backward by construction).

Where zeroopt differs from lomo_optim:
- the gradient is the average over ranks; t counts each param's own steps (lomo_optim counts
  fused_backward calls: the same, since every param of a reduced bucket is stepped every step);
- lomo_optim supports 1-D and 2-D params only (a 0-d one fails in its constructor, a 3-D one
  at its first step); zeroopt steps a 0-d param as a vector, and factors a param of more
  dimensions over its last two, as Adafactor does;
- every param of a reduced bucket is stepped (one without a gradient on any rank with zeros),
  micro-steps inside ``opt.no_sync()`` are stepped once on their sum, and a matrix with a
  non-finite gradient skips its step (``skip_nonfinite``), and 16-bit params are stepped in
  fp32 masters: see lomo.py, the same holds here.
"""

from __future__ import annotations

import math

import torch

from .base import UpdateRule, check_nonnegative, check_number
from .lomo import validate_fused

_ROW, _COL, _SQ = "exp_avg_sq_row", "exp_avg_sq_col", "exp_avg_sq"


def _validate(group: dict) -> None:
    check_nonnegative(group, "lr", "weight_decay")
    validate_fused(group, "adalomo")
    eps = group["eps"]
    if not isinstance(eps, (tuple, list)) or len(eps) != 2:
        raise ValueError(f"adalomo: eps must be a pair (eps1 added to g^2, eps2 the smallest "
                         f"param scale), got {eps!r}")
    for i, value in enumerate(eps):
        check_number(value, f"eps[{i}]")
    if check_number(group["clip_threshold"], "clip_threshold") <= 0:
        raise ValueError(f"adalomo: clip_threshold must be > 0, got {group['clip_threshold']}")
    if check_number(group["decay_rate"], "decay_rate") > 0:
        raise ValueError(f"adalomo: decay_rate must be <= 0 (beta2_t = 1 - t^decay_rate), got "
                         f"{group['decay_rate']}")
    scale = group["loss_scale"]
    if scale is not None and scale != 0:
        scale = check_number(scale, "loss_scale")
        if scale < 0 or math.frexp(scale)[0] != 0.5:
            raise ValueError(
                f"adalomo: loss_scale={group['loss_scale']!r} is not supported: zeroopt does "
                f"not scale the loss (you run backward). lomo_optim's scaling and unscaling "
                f"cancel exactly only for a power of two (the default 2**10), or None; use one")


def _rms(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.norm(2) / (tensor.numel() ** 0.5)


def _step(group: dict, param: torch.Tensor, grad: torch.Tensor, state: dict, t: int) -> None:
    """One whole param's step, as lomo_optim's ``AdaLomo.fuse_update`` computes it (also the
    reference: the same code, per tensor). ``grad`` is not written (the gradient shard keeps
    the averaged gradient)."""
    factored = param.dim() >= 2
    if _ROW not in state and _SQ not in state:
        if factored:
            state[_ROW] = grad.new_zeros(grad.shape[:-1], dtype=torch.float32)
            state[_COL] = grad.new_zeros(grad.shape[:-2] + grad.shape[-1:], dtype=torch.float32)
        else:
            state[_SQ] = torch.zeros_like(grad, dtype=torch.float32)
    grad = grad.to(torch.float32)
    value = group["clip_grad_value"]
    if value is not None and value > 0:
        grad = grad.clamp(min=-value, max=value)
    beta2t = 1.0 - math.pow(t, group["decay_rate"])
    update = (grad**2) + group["eps"][0]
    if factored:
        row, col = state[_ROW], state[_COL]
        row.mul_(beta2t).add_(update.mean(dim=-1), alpha=1.0 - beta2t)
        col.mul_(beta2t).add_(update.mean(dim=-2), alpha=1.0 - beta2t)
        r_factor = (row / row.mean(dim=-1, keepdim=True)).rsqrt_().unsqueeze(-1)
        update = torch.mul(r_factor, col.unsqueeze(-2).rsqrt())
        update.mul_(grad)
    else:
        v = state[_SQ]
        v.mul_(beta2t).add_(update, alpha=1.0 - beta2t)
        update = v.rsqrt().mul_(grad)
    update.div_((_rms(update) / group["clip_threshold"]).clamp_(min=1.0))
    # lomo_optim's own arithmetic, order and types (a 0-d tensor lr when RMS(x) > eps2): the
    # param moves bit for bit as there
    p_rms = torch.norm(param, 2.0) / math.sqrt(param.numel())
    lr = group["lr"] * max(group["eps"][1], p_rms)
    if group["weight_decay"] > 0.0:
        param.mul_(1.0 - lr * group["weight_decay"])
    param.add_(update, alpha=-lr)


def _whole_only(group, shard, step, stats=None) -> None:
    raise AssertionError("adalomo steps every param whole (tensor_step); no flat shard")


ADALOMO = UpdateRule(
    name="adalomo",
    defaults=dict(lr=1e-3, loss_scale=2**10, eps=(1e-30, 1e-3), clip_threshold=1.0,
                  decay_rate=-0.8, clip_grad_norm=None, clip_grad_value=None, weight_decay=0.0,
                  layerwise=True),
    states=lambda group: (),
    fused_step=_whole_only,
    reference_step=_step,
    validate=_validate,
    nonnegative_states=(_ROW, _COL, _SQ),
    whole_tensors=lambda group: True,
    tensor_step=_step,
    # the step's work is O(numel) (no SVD): spread the params by their sizes
    placement_cost=lambda shape: int(torch.Size(shape).numel()),
    # Layerwise by construction: whole_tensors.py steps each matrix as its bucket is reduced.
    fixed=dict(layerwise=True),
    # No torch_class: lomo_optim.AdaLomo takes the model and steps in fused_backward(loss,
    # lr); tests/test_lomo.py runs it so.
)
