"""Options that change how Adam and Lion turn moments into an update.

- ``adopt=True`` (Taniguchi et al. 2024, "ADOPT"): the first step only initialises v = g^2; then
  the gradient is normalised by the *previous* v, clipped to +-(t-1)^0.25, and averaged into m,
  which is the update (no bias correction); v is updated last. As the authors' adopt.py.
- ``grams=True`` (Cao et al. 2024, "Grams"): the update takes the gradient's sign and the Adam
  update's magnitude, sign(g) * |u|.
- ``cautious=True`` (Liang et al. 2024, "Cautious Optimizers"): the update is kept only where it
  agrees in sign with the gradient, and rescaled by numel / (kept + 1), counted over the whole
  param across ranks (an all-reduced statistic, as the trust ratios are).

With any of them Adam(W) runs this path instead of torch's fused kernel: on CPU fp32 shards,
C kernels (zeroopt/kernels/_adam_variants.c) that go over memory once per tensor (once per
phase with cautious) with the arithmetic of the torch._foreach_* path below, bit for bit;
elsewhere (other devices, ``ZEROOPT_NATIVE=0``, no compiler) that torch path.
"""

from __future__ import annotations

import math

import torch

from ..kernels import sqrt_check
from ..kernels.library import Library
from .base import ShardTensors, adam_denominator

OPTIONS = ("cautious", "adopt", "grams")

_LIB = Library("_adam_variants.c")


def any_option(group: dict) -> bool:
    """Whether the group turns on any of ``OPTIONS`` (then Adam(W) runs this path).

    Args:
        group: the param group.

    Returns:
        True if ``cautious``, ``adopt`` or ``grams`` is set and true.
    """
    return any(group.get(name) for name in OPTIONS)


def native(group: dict, shard: ShardTensors) -> bool:
    """Whether the C kernels take this shard: CPU fp32 contiguous tensors (params, gradients,
    exp_avg, exp_avg_sq), a float lr, the kernels built (``Library.usable``) and their square
    root torch's (``sqrt_check``).

    Args:
        group: the param group.
        shard: this rank's part of the group.

    Returns:
        True if ``native_step``, ``native_cautious`` and the native paths of
        ``adam_direction``, ``keep_agreeing`` and ``apply_cautious`` run.
    """
    if not shard.params or isinstance(group["lr"], torch.Tensor):
        return False
    return _LIB.usable(shard.params, shard.grads, shard.states["exp_avg"],
                       shard.states["exp_avg_sq"]) and sqrt_check.matches_torch(_LIB)


def _hyper(group: dict, t: int, decoupled: bool, write_grads: bool = False) -> list[float]:
    """The kernels' hyperparameters (_adam_variants.c's h), each the expression the torch
    path below computes."""
    beta1, beta2 = group["betas"]
    lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
    l2, decay = wd != 0 and not decoupled, wd != 0 and decoupled
    return [-1.0 if group["maximize"] else 1.0, wd if l2 else 0.0, 1 - lr * wd if decay else 1.0,
            1 - beta1, beta2, 1 - beta2, math.sqrt(1 - beta2**t), eps, 1 / (1 - beta1**t),
            (t - 1) ** 0.25, -lr, l2, bool(group["adopt"]), bool(group["grams"]), decay,
            write_grads]


def native_step(group: dict, shard: ShardTensors, t: int, decoupled: bool) -> bool:
    """The whole step without cautious, one pass per tensor, if ``native``: what
    ``adam_direction`` then ``params += -lr direction`` do (ADOPT's first step: v only).

    Args:
        group: the param group (adopt, grams, maximize, weight_decay...).
        shard: this rank's part; params and states updated in place.
        t: the step count, from 1.
        decoupled: AdamW's decay (else Adam's L2 term).

    Returns:
        False (nothing done) where the kernels do not take the shard.
    """
    if not native(group, shard):
        return False
    hyper = _hyper(group, t, decoupled)
    if group["adopt"] and t == 1:
        _LIB.each("zk_adopt_init", [shard.params, shard.grads, shard.states["exp_avg_sq"]],
                  hyper)
    else:
        _LIB.each("zk_adam_variant_step", [shard.params, shard.grads, shard.states["exp_avg"],
                                           shard.states["exp_avg_sq"]], hyper)
    return True


def native_cautious(group: dict, shard: ShardTensors, t: int, decoupled: bool):
    """Cautious's phase 1 in one pass per tensor, if ``native``: moments, the direction
    masked by ``keep_agreeing`` and written over the gradients. AdamW's decay of the params
    is left to ``apply_cautious`` (which then reads and writes them in any case).

    Returns:
        The kept counts ``[1, num_params]`` (float64; zeros on ADOPT's first step, which
        only initialises v), or None (nothing done) where the kernels do not take the shard.
    """
    if not native(group, shard):
        return None
    hyper = _hyper(group, t, decoupled)
    if group["adopt"] and t == 1:
        _LIB.each("zk_adopt_init", [shard.params, shard.grads, shard.states["exp_avg_sq"]],
                  hyper)
        return torch.zeros(1, shard.num_params, dtype=torch.float64)
    kept = _LIB.each("zk_adam_variant_cautious", [shard.params, shard.grads,
                                                  shard.states["exp_avg"],
                                                  shard.states["exp_avg_sq"]], hyper, outputs=1)
    return shard.per_param(torch.tensor([k[0] for k in kept], dtype=torch.float64))[None]


def scaled_step(shard: ShardTensors, scales: list[float], lr: float, decay: float) -> bool:
    """x <- x decay - lr (d scale) per piece, one pass each (_adam_variants.c; the torch ops
    ``p.mul_(decay)``, ``d.mul_(scale)``, ``p.add_(d, alpha=-lr)`` bit for bit): cautious
    phase 2 of Adam(W) and Lion, the direction d in ``shard.grads``.

    Returns:
        False, doing nothing, where the kernels do not take the tensors."""
    if not _LIB.usable(shard.params, shard.grads):
        return False
    for p, d, s in zip(shard.params, shard.grads, scales):
        _LIB.run("zk_cautious_apply", [p, d], [s, -lr, decay])
    return True


def apply_cautious(group: dict, shard: ShardTensors, kept: torch.Tensor,
                   decoupled: bool) -> None:
    """Cautious's phase 2: ``params += -lr * scale * direction`` with the direction that
    phase 1 left in the gradients and ``cautious_scale(kept)``. Where ``native`` (phase 1
    ran ``native_cautious``) one pass that also decays the params (AdamW), else the torch ops
    (which scale the gradients in place; phase 1 decayed the params).

    Args:
        group: the param group (the same as phase 1's).
        shard: this rank's part.
        kept: the all-reduced kept counts, ``[1, num_params]``.
        decoupled: AdamW's decay (else Adam's L2 term, which phase 1 took).
    """
    scale = cautious_scale(kept, shard)
    lr, wd = group["lr"], group["weight_decay"]
    if native(group, shard):  # the same test as phase 1's: it left the decay to here
        scaled_step(shard, scale, lr, 1 - lr * wd if decoupled and wd != 0 else 1.0)
        return
    torch._foreach_mul_(shard.grads, scale)
    torch._foreach_add_(shard.params, shard.grads, alpha=-lr)


def adam_direction(group: dict, shard: ShardTensors, t: int, decoupled: bool,
                   tam_cos: list[float] | None = None):
    """Weight decay and moments; returns the update direction (new tensors), or None on
    ADOPT's first step, which only initialises v. ``tam_cos``: per piece, the cosine of
    Torque-Aware Momentum (adamw_options.py), which damps the gradient's weight in m. The
    gradients are left as the moments saw them (negated with maximize, plus Adam's L2 term).
    One pass per tensor where ``native`` (and no ``tam_cos``)."""
    if tam_cos is None and native(group, shard):
        return _native_direction(group, shard, t, decoupled)
    beta1, beta2 = group["betas"]
    lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
    params, grads = shard.params, shard.grads
    m, v = shard.states["exp_avg"], shard.states["exp_avg_sq"]
    if group["maximize"]:
        torch._foreach_neg_(grads)  # consumed by step()
    if wd != 0 and not decoupled:
        torch._foreach_add_(grads, params, alpha=wd)
    if group["adopt"] and t == 1:
        torch._foreach_addcmul_(v, grads, grads, value=1)
        return None
    if wd != 0 and decoupled:
        torch._foreach_mul_(params, 1 - lr * wd)
    damping = None
    if tam_cos is not None:  # s <- gamma s + (1 - gamma) cos; d = (1 + s) / 2 + eps
        s, gamma = shard.states["tam_s"], group["tam_decay_rate"]
        torch._foreach_mul_(s, gamma)
        torch._foreach_add_(s, [(1 - gamma) * c for c in tam_cos])
        damping = torch._foreach_add(s, 1.0)
        torch._foreach_mul_(damping, 0.5)
        torch._foreach_add_(damping, eps)
    if group["adopt"]:
        denom = torch._foreach_sqrt(v)
        torch._foreach_clamp_min_(denom, eps)
        direction = torch._foreach_div(grads, denom)
        clip = (t - 1) ** 0.25
        torch._foreach_clamp_min_(direction, -clip)
        torch._foreach_clamp_max_(direction, clip)
        _first_moment(m, direction, beta1, damping)
        torch._foreach_mul_(v, beta2)
        torch._foreach_addcmul_(v, grads, grads, value=1 - beta2)
        torch._foreach_copy_(direction, m)
    else:
        _first_moment(m, grads, beta1, damping)
        torch._foreach_mul_(v, beta2)
        torch._foreach_addcmul_(v, grads, grads, value=1 - beta2)
        direction = adam_denominator(v, beta2, t, eps)
        torch._foreach_reciprocal_(direction)
        torch._foreach_mul_(direction, m)
        torch._foreach_mul_(direction, 1 / (1 - beta1**t))
    if group["grams"]:
        torch._foreach_abs_(direction)
        torch._foreach_mul_(direction, torch._foreach_sign(grads))
    return direction


def _native_direction(group: dict, shard: ShardTensors, t: int, decoupled: bool):
    """``adam_direction`` by the kernels."""
    params, grads, v = shard.params, shard.grads, shard.states["exp_avg_sq"]
    if group["adopt"] and t == 1:
        _LIB.each("zk_adopt_init", [params, grads, v], _hyper(group, t, decoupled, True))
        return None
    direction = [torch.empty_like(g) for g in grads]
    _LIB.each("zk_adam_variant_direction", [params, grads, shard.states["exp_avg"], v,
                                            direction], _hyper(group, t, decoupled))
    return direction


def _first_moment(m: list[torch.Tensor], new: list[torch.Tensor], beta1: float,
                  damping: list[torch.Tensor] | None) -> None:
    """m <- b1 m + (1 - b1) new, the new term damped element-wise by ``damping`` (TAM)."""
    if damping is None:
        torch._foreach_lerp_(m, new, 1 - beta1)
        return
    torch._foreach_mul_(m, beta1)
    torch._foreach_add_(m, torch._foreach_mul(damping, new), alpha=1 - beta1)


def keep_agreeing(direction: list[torch.Tensor], grads: list[torch.Tensor],
                  shard: ShardTensors) -> torch.Tensor:
    """Zero the direction where it disagrees in sign with the gradient; this rank's count of
    kept elements per param, ``[1, num_params]`` (one pass per tensor on CPU fp32)."""
    if direction and _LIB.usable(direction, grads):
        counts = _LIB.each("zk_keep_agreeing", [direction, grads], outputs=1)
        return shard.per_param(torch.tensor([c[0] for c in counts], dtype=torch.float64))[None]
    kept = []
    for d, g in zip(direction, grads):
        mask = (d * g) > 0
        d.mul_(mask)
        kept.append(mask.sum())
    return shard.per_param(kept).unsqueeze(0)


def cautious_scale(kept: torch.Tensor, shard: ShardTensors) -> list[float]:
    """numel / (kept + 1) per param, spread to the pieces."""
    return shard.per_piece(shard.param_numel / (kept[0] + 1))


def reference_direction(group: dict, param: torch.Tensor, grad: torch.Tensor, state: dict,
                        t: int, decoupled: bool):
    """The per-tensor reference of ``adam_direction`` (mutates param, states); returns the
    direction (None on ADOPT's first step) and the gradient the moments saw."""
    beta1, beta2 = group["betas"]
    lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
    m, v = state["exp_avg"], state["exp_avg_sq"]
    if group["maximize"]:
        grad = -grad
    if wd != 0 and not decoupled:
        grad = grad + wd * param
    if group["adopt"] and t == 1:
        v.addcmul_(grad, grad)
        return None, grad
    if wd != 0 and decoupled:
        param.mul_(1 - lr * wd)
    if group["adopt"]:
        normed = (grad / v.sqrt().clamp_min(eps)).clamp(-(t - 1) ** 0.25, (t - 1) ** 0.25)
        m.lerp_(normed, 1 - beta1)
        v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        direction = m.clone()
    else:
        m.lerp_(grad, 1 - beta1)
        v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        direction = (m / (1 - beta1**t)) / (v.sqrt() / math.sqrt(1 - beta2**t) + eps)
    if group["grams"]:
        direction = grad.sign() * direction.abs()
    return direction, grad


def reference_cautious(direction: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """The per-tensor reference of cautious masking (Liang et al. 2024).

    Args:
        direction: the update direction of one whole param.
        grad: the gradient the moments saw, same shape.

    Returns:
        A new tensor: ``direction`` where it agrees in sign with ``grad``, zero elsewhere,
        times ``numel / (kept + 1)``.
    """
    mask = (direction * grad > 0).to(direction.dtype)
    return direction * mask * (mask.numel() / (mask.sum() + 1))


# --- the per-tensor pieces of adamw_options.py's options (the reference, whole steps) ----------


def alora_row_scale(group: dict, param: torch.Tensor) -> torch.Tensor:
    """ALLoRA: 1 / sqrt(||row||^2 + 1/eta^2) per row (dim 0), shaped to broadcast over
    ``param.reshape(rows, -1)``."""
    rows = param.detach().reshape(param.shape[0] if param.dim() else 1, -1).double()
    eta = float(group["alora_eta"])
    return (rows.square().sum(1, keepdim=True) + 1 / eta**2).rsqrt().float()


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """<a, b> / (||a|| ||b||) in float64, each norm at least 1e-12 (F.normalize's rule)."""
    a, b = a.double().reshape(-1), b.double().reshape(-1)
    return float(torch.dot(a, b) / (a.norm().clamp_min(1e-12) * b.norm().clamp_min(1e-12)))


def orthogonalized(param: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """OrthoGrad for one whole param, pytorch_optimizer.OrthoGrad's formula and guard, taken
    in float64 (the same wherever the tensors sit in memory, as fp32 BLAS sums are not)."""
    w, g = param.reshape(-1).double(), grad.reshape(-1).double()
    proj = torch.dot(w, g) / (torch.dot(w, w) + 1e-30)
    perp = g - w * proj
    norm, perp_norm = g.norm(), perp.norm()
    if perp_norm <= 4 * torch.finfo(torch.float32).eps * norm:
        return torch.zeros_like(grad)
    return (perp * (norm / (perp_norm + 1e-30))).view_as(grad).to(grad.dtype)


def agr(grad: torch.Tensor) -> torch.Tensor:
    """AGR for one whole param: g - g |g| / sum|g|, as g (sum|g| - |g|) / sum|g|."""
    total = grad.abs().sum(dtype=torch.float64)
    return (grad * ((total - grad.abs()) / total)).to(grad.dtype) if total > 0 else grad.clone()


def spd_project(strength: float, param: torch.Tensor, new: torch.Tensor,
                raw_grad: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
    """SPD for one whole param: ``new`` (x~) pulled toward ``anchor`` (x0) by strength * r
    where c = -<g, x - x0> < 0 (norms in float64), else ``new``."""
    displacement = (param - anchor).double()
    condition = -torch.dot(raw_grad.double().reshape(-1), displacement.reshape(-1))
    if condition >= 0:
        return new
    current = (new - anchor).double().norm()
    previous = displacement.norm()
    ratio = float(((current - previous) / current).clamp(0, 1)) if current > 0 else 0.0
    return new - strength * ratio * (new - anchor)


def ensure_states(group: dict, param: torch.Tensor, state: dict) -> None:
    """Create a whole param's missing states (its first step, or an option turned on)."""
    for name in ("exp_avg", "exp_avg_sq", *(("initial_param",) if group["spd"] else ()),
                 *(("tam_s",) if group["tam"] else ())):
        if name not in state:
            state[name] = (param.detach().float().clone() if name == "initial_param"
                           else torch.zeros_like(param, dtype=torch.float32))


def reference_with_options(group: dict, param: torch.Tensor, grad: torch.Tensor, state: dict,
                           t: int, decoupled: bool) -> None:
    """The per-tensor definition of Adam(W) with adamw_options.py's options on (and
    cautious, adopt, grams): the eager reference, and the step of params stepped whole.

    In order: maximize; agr; orthograd; Adam's L2 term (``adam``; not with spd); ADOPT's first
    step (v only); AdamW's decay (not with spd); tam's damping of m; the direction (ADOPT or
    Adam), grams, cautious, alora's row scale; the step, projected by spd."""
    from .adamw_options import effective_weight_decay

    ensure_states(group, param, state)
    beta1, beta2 = group["betas"]
    lr, eps = group["lr"], group["eps"]
    wd = 0.0 if group["spd"] else effective_weight_decay(group, t)
    m, v = state["exp_avg"], state["exp_avg_sq"]
    raw = -grad if group["maximize"] else grad
    rows = alora_row_scale(group, param) if group["alora"] else None
    g = agr(raw) if group["agr"] else raw
    if group["orthograd"]:
        g = orthogonalized(param, g)
    if wd != 0 and not decoupled:
        g = g + wd * param
    if group["adopt"] and t == 1:
        v.addcmul_(g, g)
        return
    before = param.clone() if group["spd"] else None
    if wd != 0 and decoupled:
        param.mul_(1 - lr * wd)
    damping = None
    if group["tam"]:
        s, gamma = state["tam_s"], group["tam_decay_rate"]
        s.mul_(gamma).add_((1 - gamma) * cosine(m, g))
        damping = (s + 1) * 0.5 + eps
    if group["adopt"]:
        new = (g / v.sqrt().clamp_min(eps)).clamp(-(t - 1) ** 0.25, (t - 1) ** 0.25)
    else:
        new = g
    if damping is None:
        m.lerp_(new, 1 - beta1)
    else:
        m.mul_(beta1).add_(damping * new, alpha=1 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    if group["adopt"]:
        direction = m.clone()
    else:
        direction = (m / (1 - beta1**t)) / (v.sqrt() / math.sqrt(1 - beta2**t) + eps)
    if group["grams"]:
        direction = g.sign() * direction.abs()
    if group["cautious"]:
        direction = reference_cautious(direction, g)
    if rows is not None:
        direction = (direction.reshape(rows.shape[0], -1) * rows).view_as(direction)
    if group["spd"]:
        new_param = spd_project(effective_weight_decay(group, t), before,
                                before - lr * direction, raw, state["initial_param"])
        param.copy_(new_param)
    else:
        param.add_(direction, alpha=-lr)
