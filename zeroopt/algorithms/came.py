"""CAME (Luo et al. 2023, "CAME: Confidence-guided Adaptive Memory Efficient Optimization"),
as pytorch_optimizer.CAME computes it.

Adafactor's factored second moment (a row and a column mean of g^2, not a full matrix), plus a
factored "instability" moment of how far each update strays from the momentum: the momentum is
applied with confidence where the update agrees with it, less where it does not.

    v_row, v_col <- b2 v + (1 - b2) mean(g^2 + eps1)       (over the last dim, over the one before)
    u = g / sqrt(v_row v_col / mean(v_row))                 (1-D params: u = g / sqrt(v))
    u <- u / max(1, RMS(u) / clip_threshold)
    m <- b1 m + (1 - b1) u
    r_row, r_col <- b3 r + (1 - b3) mean((u - m)^2 + eps2)
    x <- x - lr m / sqrt(r_row r_col / mean(r_row))         (1-D params: x <- x - lr m)

Every update is scaled by a whole-tensor statistic (RMS(u)) and matrices keep factored moments,
so every param is stepped whole, on the one rank that owns it, as Adafactor is. A step's work is
a few passes over the matrix (m n, no SVD): that is its ``placement_cost``.

Hyperparameters (names and defaults are pytorch_optimizer.CAME's):

- ``lr`` (2e-4): the step size; ``betas`` (0.9, 0.999, 0.9999): b1 for the momentum, b2 for the
  factored g^2, b3 for the factored instability (u - m)^2;
- ``eps1`` (1e-30) added to g^2, ``eps2`` (1e-16) added to (u - m)^2, before their means;
- ``clip_threshold`` (1.0): the largest RMS the preconditioned update u may have;
- ``weight_decay`` (0.0), with ``weight_decouple`` (True: x <- x (1 - lr wd), as AdamW;
  False: wd x added to the gradient) and ``fixed_decay`` (False; True: x <- x (1 - wd), not
  scaled by lr);
- ``ams_bound`` (False): keep a running maximum of the second moment (see below);
- ``maximize`` (False): ascend the objective;
- ``layerwise`` (False): zeroopt's own (as Adafactor's): step each matrix as soon as its
  averaged gradient is reduced, during backward.

Where the paper and the package differ, zeroopt follows the package (the name is its class):

- The paper's Algorithm 1 writes r_t, c_t as sums over a row/column and v = r c / (1^T r); the
  package (and the authors' code) uses means, which is the same v (the n and m cancel).
- The paper defines no update for 1-D params; the package (and the authors' code) keeps a plain
  second moment v for them and steps by the momentum m alone, with no confidence factor.
- The paper has no weight decay; the package's is as above (the authors' code: decoupled).
- ``ams_bound`` is the package's alone: it keeps hat <- max(hat, 1/u') where u' = 1/sqrt(v) is
  the preconditioner, i.e. the running maximum of sqrt(v), and then uses rsqrt(hat / b2) as the
  preconditioner, which scales as v^(-1/4), not v^(-1/2). zeroopt follows it as written.
- The package stores ``RMS`` (the param's RMS) in each state and never reads it; zeroopt does
  not keep it.
"""

from __future__ import annotations

import math

import torch

from . import sources
from .base import UpdateRule, check_betas, check_nonnegative, check_number

_FLAGS = ("weight_decouple", "fixed_decay", "ams_bound", "maximize", "layerwise")


def _validate(group: dict) -> None:
    check_nonnegative(group, "lr", "weight_decay", "eps1", "eps2")
    check_betas(group, count=3)
    if check_number(group["clip_threshold"], "clip_threshold") <= 0:
        raise ValueError(f"came: clip_threshold must be > 0, got {group['clip_threshold']}")
    for name in _FLAGS:
        if not isinstance(group[name], bool):
            raise ValueError(f"{name} must be True or False, got {group[name]!r}")


def _rms(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.norm(2) / math.sqrt(tensor.numel())


def _factored_rsqrt(row: torch.Tensor, col: torch.Tensor) -> torch.Tensor:
    """1 / sqrt(row col / mean(row)), the factored moment's inverse root, in the row x col
    shape (the package's approximate_sq_grad)."""
    r_factor = (row / row.mean(dim=-1, keepdim=True)).rsqrt_().unsqueeze(-1)
    return torch.mul(r_factor, col.unsqueeze(-2).rsqrt())


def _init(grad: torch.Tensor, state: dict, ams_bound: bool) -> None:
    state["exp_avg"] = torch.zeros_like(grad)
    if grad.dim() >= 2:
        for name in ("exp_avg_sq", "exp_avg_res"):
            state[f"{name}_row"] = grad.new_zeros(grad.shape[:-1])
            state[f"{name}_col"] = grad.new_zeros(grad.shape[:-2] + grad.shape[-1:])
    else:
        state["exp_avg_sq"] = torch.zeros_like(grad)
    if ams_bound:
        state["exp_avg_sq_hat"] = torch.zeros_like(grad)


def _step(group: dict, param: torch.Tensor, grad: torch.Tensor, state: dict, t: int) -> None:
    """One whole tensor's step (also the reference: the package's per-tensor operations, in its
    order)."""
    beta1, beta2, beta3 = group["betas"]
    lr, wd = group["lr"], group["weight_decay"]
    factored = grad.dim() >= 2
    if "exp_avg" not in state:
        _init(grad, state, group["ams_bound"])
    elif group["ams_bound"] and "exp_avg_sq_hat" not in state:  # ams_bound turned on later
        state["exp_avg_sq_hat"] = torch.zeros_like(grad)
    if group["maximize"]:
        grad = -grad
    if wd != 0:
        if group["weight_decouple"]:
            param.mul_(1.0 - wd * (1.0 if group["fixed_decay"] else lr))
        else:
            grad = grad.add(param, alpha=wd)

    update = torch.mul(grad, grad).add_(group["eps1"])
    if factored:
        row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
        row.mul_(beta2).add_(update.mean(dim=-1), alpha=1.0 - beta2)
        col.mul_(beta2).add_(update.mean(dim=-2), alpha=1.0 - beta2)
        update = _factored_rsqrt(row, col)
    else:
        v = state["exp_avg_sq"]
        v.mul_(beta2).add_(update, alpha=1.0 - beta2)
        update = v.rsqrt()
    if group["ams_bound"]:
        hat = state["exp_avg_sq_hat"]
        torch.max(hat, 1 / update, out=hat)
        update = torch.rsqrt(hat / beta2)
    update.mul_(grad)
    update.div_((_rms(update) / group["clip_threshold"]).clamp_(min=1.0))

    exp_avg = state["exp_avg"]
    exp_avg.lerp_(update, weight=1.0 - beta1)
    if factored:
        res = (update - exp_avg).pow_(2).add_(group["eps2"])
        row, col = state["exp_avg_res_row"], state["exp_avg_res_col"]
        row.mul_(beta3).add_(res.mean(dim=-1), alpha=1.0 - beta3)
        col.mul_(beta3).add_(res.mean(dim=-2), alpha=1.0 - beta3)
        update = _factored_rsqrt(row, col).mul_(exp_avg)
    else:
        update = exp_avg
    param.add_(update, alpha=-lr)


def _whole_only(group, shard, step, stats=None) -> None:
    raise AssertionError("came steps every param whole (tensor_step); no flat shard")


def _numel(shape: torch.Size) -> int:
    """A step's work on a param of ``shape``: a few passes over its m n elements."""
    return int(torch.Size(shape).numel())


_MOMENTS = ("exp_avg_sq", "exp_avg_sq_row", "exp_avg_sq_col", "exp_avg_res_row",
            "exp_avg_res_col", "exp_avg_sq_hat")


def _package_options(optimizer, group: dict) -> None:
    """pytorch_optimizer.CAME reads eps1 and eps2 from the instance (its constructor's), not
    from the param groups that also carry them: a group's own would be ignored there and
    applied here, so it is refused."""
    for name in ("eps1", "eps2"):
        if name in group and group[name] != getattr(optimizer, name):
            raise sources.cannot(
                sources.class_path(optimizer), name, group[name],
                f"pytorch_optimizer's CAME steps every group with the constructor's {name} "
                f"({getattr(optimizer, name)!r}) and ignores a param group's; zeroopt's came "
                f"would apply it. Leave it out of the param groups")
    sources.drop(group, "foreach")


def _package_preset(optimizer) -> dict:
    """clip_threshold, eps1, eps2 and maximize: kept on the instance by the package."""
    return dict(clip_threshold=optimizer.clip_threshold, eps1=optimizer.eps1,
                eps2=optimizer.eps2, **sources.maximize_attribute(optimizer))


_SOURCES = sources.Sources(sources.Source("pytorch_optimizer.CAME", options=_package_options,
                                          preset=_package_preset))

CAME = UpdateRule(
    name="came",
    defaults=dict(lr=2e-4, betas=(0.9, 0.999, 0.9999), weight_decay=0.0, weight_decouple=True,
                  fixed_decay=False, clip_threshold=1.0, ams_bound=False, eps1=1e-30,
                  eps2=1e-16, maximize=False, layerwise=False),
    states=lambda group: (),
    fused_step=_whole_only,
    reference_step=_step,
    validate=_validate,
    whole_tensors=lambda group: True,
    tensor_step=_step,
    tensor_states_8bit=("exp_avg", *_MOMENTS),
    nonnegative_states=_MOMENTS,
    placement_cost=_numel,
    torch_class="pytorch_optimizer.CAME",
    wraps=_SOURCES,
    from_torch_options=_SOURCES.from_torch_options,
)
