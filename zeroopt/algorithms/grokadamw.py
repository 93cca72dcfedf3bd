"""GrokAdamW, as the ``grokadamw`` package (0.1.2, ``grokadamw.GrokAdamW``) computes it: AdamW on
a Grokfast-amplified gradient (Lee et al. 2024, "Grokfast: Accelerated Grokking by Amplifying
Slow Gradients"), with a first-moment decay that shrinks with the param's position in its group,
and each param's gradient clipped by its own norm.

For the i-th param of a group among those with a gradient this step (i from 0):

    g  <- g min(1, c / (||g|| + 1e-6))            (c = gradient_clipping; none if c <= 0)
    a   = alpha_init exp(-grokking_signal_decay_rate s)       (s: the grokking signal)
    e  <- a e + (1 - a) g                         (grok_ema: the slow gradient component)
    h   = g + lamb e                              (the amplified gradient)
    b1i = b1 (1 - gamma)^i
    m  <- b1i m + (1 - b1i) h                     v <- b2 v + (1 - b2) h^2
    x  <- x (1 - lr wd)
    x  <- x - lr sqrt(1 - b2^t) / (1 - b1^t) m / (sqrt(v) + eps)   (t: this param's steps)

That is the package's update, and the name's meaning (Transformers' ``grokadamw`` builds the
package's class): there is no paper for GrokAdamW itself, only for Grokfast's EMA filter. Where
the package does something a reader might not expect, zeroopt follows it: the bias correction
uses b1, not b1i; i counts the params of the group that have a gradient, in group order (so
``gamma`` ties the update to the order params are given in); the clipping is per param
(``clip_grad_norm_`` called on each param alone), not the global norm.

Whole-param statistics: the clipping needs each param's gradient norm and i needs which params
have a gradient, and params straddle ranks. So a group with ``gamma`` != 0 or
``gradient_clipping`` > 0 is tensor-wise: each rank sums, per param, the squares of its pieces'
gradients and counts its pieces (``statistics``); the optimizer all-reduces the sums in its one
small collective. The norm is then the whole param's, summed in fp64 and rounded to fp32 (torch's
own fp32 sum can be an ulp away). With ``gamma`` = 0 and no clipping the rule is element-wise.

Hyperparameters (the package's names and defaults; Transformers' ``grokadamw`` passes ``lr``,
``weight_decay`` and ``alpha_init``, ``lamb``, ``gamma``, ``grokking_signal_decay_rate``,
``gradient_clipping`` from ``optim_args``, at these same defaults; not the betas or eps):

- ``lr`` (1e-3), ``betas`` (0.9, 0.999), ``eps`` (1e-8): Adam's.
- ``weight_decay`` (1e-2): decoupled, x <- x (1 - lr wd), before the Adam step.
- ``alpha_init`` (0.98): the EMA's decay when the grokking signal is 0; in [0, 1].
- ``lamb`` (2.0): how much of the EMA is added to the gradient.
- ``gamma`` (0.1): b1 shrinks by (1 - gamma) per position in the group.
- ``grokking_signal_decay_rate`` (0.1): how fast the grokking signal lowers the EMA's decay.
- ``gradient_clipping`` (1.0): each param's gradient norm is clipped to it; <= 0 turns it off.
- ``grokking_signal_fns``: must be None (the default). The package calls these user callables
  in every step and averages what they return. zeroopt refuses them: every rank would call its
  own, and a rank-local value (its loss) gives ranks different updates of the same params, which
  sharding cannot repair; nor can a state dict hold them (the package drops them from its own).

The grokking signal, as the package computes it without signal functions: from a group's
``train_loss`` and ``eval_loss`` keys (set them on ``optimizer.param_groups``, the same on every
rank: all-reduced losses), s = max(0, eval - train) / max(eval, train); 0 while either is
missing, which makes a = alpha_init. Both are supported exactly.

Where zeroopt differs from the package, and why:

- The package keeps its states in ``param_groups[i]["state"]`` (keyed by tensor, on the CPU) and
  runs under ``torch.cuda.amp.autocast()`` (no effect on these in-place ops). zeroopt keeps
  exp_avg, exp_avg_sq and grok_ema as ordinary states: sharded, saved, resharded, and 8-bit if
  asked.
- pytorch_optimizer.GrokFastAdamW is a different rule: its EMA starts at the first gradient (here
  at zero), ``normalize_lr`` divides lr by 1 + lamb, the denominator is clamped at eps instead of
  adding it, weight decay may be fixed or coupled, and it has no per-position b1, no clipping
  and no grokking signal (but a warm-up, ``grokfast_after_step``).
"""

from __future__ import annotations

import math

import torch

from ..kernels import sqrt_check
from ..kernels.library import Library
from . import sources
from .base import ShardTensors, UpdateRule, check_betas, check_nonnegative, check_number

# On CPU fp32 shards the step is one pass of a C kernel with the torch path's arithmetic
# (zeroopt/kernels/_grokadamw.c); the torch path in _fused runs everywhere else.
_LIB = Library("_grokadamw.c")

_SIGNAL_KEYS = ("train_loss", "eval_loss")


def _validate(group: dict) -> None:
    check_nonnegative(group, "lr", "eps", "weight_decay")
    check_betas(group)
    for name in ("lamb", "gamma", "grokking_signal_decay_rate", "gradient_clipping"):
        check_number(group[name], name)
    if not 0.0 <= check_number(group["alpha_init"], "alpha_init") <= 1.0:
        raise ValueError(f"Invalid alpha_init: {group['alpha_init']} (it must be in [0, 1])")
    if group["grokking_signal_fns"] is not None:
        raise ValueError(
            "grokadamw: grokking_signal_fns is not supported by zeroopt: each rank would call "
            "its own functions, and rank-local values give the ranks different updates (nor can "
            "a state dict hold functions). Set the group's 'train_loss' and 'eval_loss' (the "
            "same on every rank) for GrokAdamW's default signal instead")


def grokking_signal(group: dict) -> float:
    """GrokAdamW's default signal (no signal functions): the relative gap of the eval loss over
    the train loss, from the group's ``train_loss`` and ``eval_loss``; 0.0 while either is
    missing."""
    train_loss, eval_loss = group.get("train_loss"), group.get("eval_loss")
    if train_loss is None or eval_loss is None:
        return 0.0
    diff = max(0, eval_loss - train_loss)
    max_loss = max(eval_loss, train_loss)
    return diff / max_loss if max_loss > 0 else 0.0


def _ema_decay(group: dict) -> float:
    return group["alpha_init"] * math.exp(-group["grokking_signal_decay_rate"]
                                          * grokking_signal(group))


def _per_tensor(group: dict) -> bool:
    return group["gamma"] != 0 or group["gradient_clipping"] > 0


def _statistics(group: dict, shard: ShardTensors, step: torch.Tensor) -> torch.Tensor:
    """Per param: this rank's sum of squared gradients, and its number of pieces (> 0 on some
    rank: the param has a gradient this step)."""
    if shard.grads and _LIB.usable(shard.grads):  # the sums in one pass, each in fp64
        sums = _LIB.each("zk_grokadamw_sum_squares", [shard.grads], outputs=1)
        norms = list(torch.tensor([s[0] for s in sums], dtype=torch.float64).sqrt())
    else:
        norms = torch._foreach_norm(shard.grads, 2, dtype=torch.float64) if shard.grads else []
    squares = shard.per_param([n.square() for n in norms])
    pieces = shard.per_param(torch.ones(len(shard.params), dtype=torch.float64))
    return torch.stack([squares, pieces])


def _fused(group: dict, shard: ShardTensors, step: torch.Tensor, stats) -> None:
    t = int(step.item())
    beta1, beta2 = group["betas"]
    lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
    grads, params = shard.grads, shard.params
    m, v, ema = shard.states["exp_avg"], shard.states["exp_avg_sq"], shard.states["grok_ema"]
    coefs = None  # the clipping's factor per piece
    if stats is None:  # gamma = 0, no clipping: b1 (1 - 0)^i = b1 for every param
        beta1s = [beta1] * len(params)
    else:
        if group["gradient_clipping"] > 0:  # in fp32, as clip_grad_norm_ on each param
            norm = stats[0].sqrt().float()
            coef = (group["gradient_clipping"] / (norm + 1e-6)).clamp(max=1.0)
            coefs = shard.per_piece(coef)
        position = (torch.cumsum(stats[1] > 0, 0) - 1).tolist()
        beta1s = shard.per_piece(torch.tensor(
            [beta1 * (1 - group["gamma"]) ** i for i in position], dtype=torch.float64))
    alpha = _ema_decay(group)
    step_size = lr * math.sqrt(1 - beta2**t) / (1 - beta1**t)
    if _LIB.usable(params, grads, m, v, ema) and sqrt_check.matches_torch(_LIB):  # one pass
        decay = 1 - lr * wd if wd != 0 else 1.0  # x 1.0 is exact: as no decay
        for k, tensors in enumerate(zip(params, grads, m, v, ema)):
            b = beta1s[k]
            _LIB.run("zk_grokadamw_step", tensors,
                     [1.0 if coefs is None else coefs[k], alpha, 1 - alpha, group["lamb"], b,
                      1 - b, beta2, 1 - beta2, decay, eps, -step_size])
        return
    if coefs is not None:
        torch._foreach_mul_(grads, coefs)
    torch._foreach_mul_(ema, alpha)
    torch._foreach_add_(ema, grads, alpha=1 - alpha)
    torch._foreach_add_(grads, torch._foreach_mul(ema, group["lamb"]))  # the amplified gradient
    by_beta1: dict[float, list[int]] = {}  # one run of ops per value: add's alpha is fused
    for k, b in enumerate(beta1s):
        by_beta1.setdefault(b, []).append(k)
    for b, ks in by_beta1.items():
        torch._foreach_mul_([m[k] for k in ks], b)
        torch._foreach_add_([m[k] for k in ks], [grads[k] for k in ks], alpha=1 - b)
    torch._foreach_mul_(v, beta2)
    torch._foreach_addcmul_(v, grads, grads, value=1 - beta2)
    if wd != 0:
        torch._foreach_mul_(params, 1 - lr * wd)
    denom = torch._foreach_sqrt(v)
    torch._foreach_add_(denom, eps)
    torch._foreach_addcdiv_(params, m, denom, value=-step_size)


def _position(group: dict, param: torch.Tensor) -> int:
    """The param's position among its group's params that have a gradient."""
    with_grad = [p for p in group["params"] if p.grad is not None]
    return next(i for i, p in enumerate(with_grad) if p is param)


def _reference(group: dict, param: torch.Tensor, grad: torch.Tensor, state: dict, t: int) -> None:
    beta1, beta2 = group["betas"]
    lr = group["lr"]
    if group["gradient_clipping"] > 0:
        norm = grad.norm()
        grad = grad * (group["gradient_clipping"] / (norm + 1e-6)).clamp(max=1.0)
    layer_beta1 = beta1 * (1 - group["gamma"]) ** _position(group, param)
    alpha = _ema_decay(group)
    ema, m, v = state["grok_ema"], state["exp_avg"], state["exp_avg_sq"]
    ema.mul_(alpha).add_(grad, alpha=1 - alpha)
    grok_grad = grad + group["lamb"] * ema
    m.mul_(layer_beta1).add_(grok_grad, alpha=1 - layer_beta1)
    v.mul_(beta2).addcmul_(grok_grad, grok_grad, value=1 - beta2)
    step_size = lr * math.sqrt(1 - beta2**t) / (1 - beta1**t)
    param.mul_(1 - lr * group["weight_decay"])
    param.addcdiv_(m, v.sqrt().add_(group["eps"]), value=-step_size)


def _package_options(optimizer, group: dict) -> None:
    """The package's groups are the rule's hyperparameters; signal functions are refused."""
    if group.get("grokking_signal_fns") is not None:
        raise sources.cannot(
            sources.class_path(optimizer), "grokking_signal_fns", group["grokking_signal_fns"],
            "each rank would call its own functions, and rank-local values give the ranks "
            "different updates of the same params (nor can a state dict hold them). Pass "
            "grokking_signal_fns=None and set the groups' 'train_loss' and 'eval_loss' (the "
            "same on every rank) for GrokAdamW's default signal")


_SOURCES = sources.Sources(sources.Source("grokadamw.GrokAdamW", options=_package_options))

GROKADAMW = UpdateRule(
    name="grokadamw",
    defaults=dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, alpha_init=0.98,
                  lamb=2.0, gamma=0.1, grokking_signal_fns=None, grokking_signal_decay_rate=0.1,
                  gradient_clipping=1.0),
    states=lambda group: ("exp_avg", "exp_avg_sq", "grok_ema"),
    fused_step=_fused,
    reference_step=_reference,
    validate=_validate,
    per_tensor=_per_tensor,
    statistics=_statistics,
    nonnegative_states=("exp_avg_sq",),
    fixed={"grokking_signal_fns": None},
    group_keys=_SIGNAL_KEYS,
    torch_class="grokadamw.GrokAdamW",
    wraps=_SOURCES,
    from_torch_options=_SOURCES.from_torch_options,
)
