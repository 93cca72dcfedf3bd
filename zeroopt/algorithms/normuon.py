"""NorMuon (Li et al. 2025, "NorMuon: Making Muon more efficient and scalable"), as
pytorch-optimizer's ``pytorch_optimizer.NorMuon`` computes it (pytorch-optimizer 4.1,
optimizer/muon/normuon.py), so a pytorch-optimizer user changes one line.

Muon with a neuron-wise (row-wise) normalized second moment after the orthogonalization. A
group with ``use_muon=True`` (hidden weight matrices; a param of more than two dimensions is
taken as its (shape[0], rest) matrix, as NorMuon reshapes it) steps each param whole, on the
rank that owns it (``whole_tensors``, as zeroopt's muon), in NorMuon's per-tensor order:

    g <- -g if maximize;  x <- x (1 - lr wd)  (weight_decouple; else g <- g + wd x)
    B <- lerp(B, g, 1 - momentum);   U = lerp(g, B, momentum) with nesterov, else U = B
    O = NS(U), cast to fp32                           (NS: below)
    v <- lerp(v, mean of O^2 over each row, 1 - beta2)          (v: one value per row)
    O' = O / (sqrt(v) + eps)
    preserve_norm: x <- x - lr' O' ||O|| / (||O'|| + eps),
                   lr' = lr sqrt(max(1, A / B)), or with use_adjusted_lr lr 0.2 sqrt(max(A, B))
    match_rms:     x <- x - lr O' 0.2 sqrt(A B) / (||O'|| + eps)

for the A x B matrix. NS is pytorch-optimizer's ``zero_power_via_newton_schulz_5``: in
bfloat16 (on every device, CPU included), X = U (transposed if A > B), X <- X / max(||X||_F,
1e-7), then for each of ``ns_steps`` iterations, with the iteration's (a, b, c) from the
``ns_coeffs`` schedule (its last entry repeated): G = X X^T, X <- a X + (b G + c G G) X.

A group with ``use_muon=False`` (embeddings, the output head, biases, norms) runs NorMuon's
own AdamW, element-wise over the flat shard (``fused_step``, torch's ``_foreach`` ops):

    g <- -g if maximize;  x <- x (1 - lr wd)  (weight_decouple; else g <- g + wd x)
    m <- lerp(m, g, 1 - b1);  v <- lerp(v, g^2, 1 - b2)
    x <- x - lr / (1 - b1^t) m / (sqrt(v) / sqrt(1 - b2^t) + eps)

with t the group's step count (pytorch-optimizer counts steps per group, not per param, so a
param first stepped in its group's 5th step is debiased as at t = 5; ``step``, kept in the
group and saved with it). A step() with no gradient on any rank changes nothing here, the
count included; NorMuon's still counts it.

Hyperparameters, NorMuon's names and defaults: ``lr`` (0.02), ``momentum`` (0.95), ``beta2``
(0.95), ``weight_decay`` (0), ``weight_decouple`` (True), ``nesterov`` (True), ``ns_steps``
(5), ``ns_coeffs`` ("original": Keller Jordan's (3.4445, -4.7750, 2.0315); another preset
name of pytorch-optimizer's, "quintic", "polar_express"..., read from its table, which must be
installed; or (a, b, c), or a list of them), ``update_scale`` ("preserve_norm" or
"match_rms"), ``use_adjusted_lr`` (False), ``eps`` (1e-10), ``maximize`` (False), and for the
AdamW groups ``adamw_lr`` (3e-4), ``adamw_betas`` ((0.9, 0.95)), ``adamw_wd`` (0),
``adamw_eps`` (1e-10). As in NorMuon, a ``use_muon=False`` group's ``lr``, ``betas``, ``eps``
and ``weight_decay`` are its own where it sets them, else ``adamw_lr``, ``adamw_betas``,
``adamw_eps`` and ``adamw_wd`` (``group_defaults``), not the optimizer's ``lr``...; a
``use_muon=True`` group takes the optimizer's. ``use_muon`` defaults to True here (NorMuon
requires it in every group). NorMuon's ``foreach`` only picks a kernel; zeroopt takes none.
``layerwise`` (False) is zeroopt's own, as muon's: step each Muon matrix as soon as its averaged
gradient is reduced, during backward (the AdamW groups still step in step()).

In the Transformers Trainer (``optim_args="optimizer=normuon"``; Transformers has no NorMuon):
each of the Trainer's groups is split, as for muon, into its hidden matrices (those of
``optim_target_modules``, else all but embeddings and the output head) and the rest, which
runs NorMuon's AdamW with ``adamw_lr``, ``adamw_betas`` and ``adamw_eps`` (optim_args, else the
defaults above) and the weight decay the Trainer gives that group.

States (NorMuon's names): ``momentum_buffer`` (the param's shape) and
``second_momentum_buffer`` (shape[0] x 1) per Muon param, kept by ``tensor_step``'s state
dict; ``exp_avg`` and ``exp_avg_sq`` per AdamW param, in the flat shard. With
``state_precision="8bit"`` the momentum buffer is kept 8-bit as muon_8bit keeps it (the row
second moment stays fp32); that runs, but is not held to a reference here.

Where zeroopt differs: a ``use_muon=False`` group's eps (``adamw_eps``) must be > 0 (the flat
shard's padding, zero gradient and zero moments, would divide 0 by 0); NorMuon, too, writes
NaN into any element whose gradients were all zero when it is 0. Params are stepped in fp32
(16-bit params through their fp32 masters); NorMuon steps a 16-bit param in its own dtype.
"""

from __future__ import annotations

import importlib
import math

import torch

from .base import ShardTensors, UpdateRule, check_betas, check_nonnegative, check_number
from .muon import check_matrices, newton_schulz_cost

ORIGINAL = ((3.4445, -4.7750, 2.0315),)  # Keller Jordan's coefficients, NorMuon's default
UPDATE_SCALES = ("preserve_norm", "match_rms")
_ADAMW_STATES = ("exp_avg", "exp_avg_sq")
_FLAGS = ("use_muon", "weight_decouple", "nesterov", "use_adjusted_lr", "maximize", "layerwise")


def uses_muon(group: dict) -> bool:
    """Whether a group's params get NorMuon's orthogonalized step (else its AdamW step)."""
    return group["use_muon"]


def _group_defaults(group: dict, defaults: dict) -> None:
    """NorMuon's defaults for a ``use_muon=False`` group: ``adamw_*``, not the optimizer's."""
    if group.get("use_muon", defaults["use_muon"]) is False:
        for key, source in (("lr", "adamw_lr"), ("betas", "adamw_betas"), ("eps", "adamw_eps"),
                            ("weight_decay", "adamw_wd")):
            group.setdefault(key, group.get(source, defaults[source]))


def ns_schedule(ns_coeffs) -> list[tuple[float, float, float]]:
    """The Newton-Schulz coefficients ``ns_coeffs`` stands for, as NorMuon resolves them.

    Args:
        ns_coeffs: "original"; another preset name (case-insensitive) from
            pytorch-optimizer's ``NS_COEFFICIENTS`` (imported only then); one (a, b, c); or a
            non-empty list or tuple of them (iteration i uses entry min(i, len - 1)).

    Returns:
        The schedule, a list of (a, b, c) float tuples.

    Raises:
        ValueError: an unknown preset (or pytorch-optimizer not installed for one), or not
            numbers in threes.
    """
    if isinstance(ns_coeffs, str):
        if ns_coeffs.lower() == "original":
            return list(ORIGINAL)
        try:
            table = importlib.import_module("pytorch_optimizer.optimizer.utils.matrix")
            return list(table.NS_COEFFICIENTS[ns_coeffs.lower()])
        except (ImportError, AttributeError, KeyError):
            raise ValueError(f"normuon: ns_coeffs {ns_coeffs!r} is not a preset zeroopt can "
                             f"read: 'original', or one of pytorch-optimizer's (installed), or "
                             f"give the coefficients as (a, b, c) or a list of them") from None
    entries = [ns_coeffs] if (isinstance(ns_coeffs, (tuple, list)) and len(ns_coeffs) == 3
                              and not isinstance(ns_coeffs[0], (tuple, list))) else ns_coeffs
    if not isinstance(entries, (tuple, list)) or not entries or any(
            not isinstance(e, (tuple, list)) or len(e) != 3 for e in entries):
        raise ValueError(f"normuon: ns_coeffs must be a preset name, (a, b, c) or a list of "
                         f"them, got {ns_coeffs!r}")
    return [tuple(check_number(c, "ns_coeffs") for c in e) for e in entries]


def _validate(group: dict) -> None:
    for flag in _FLAGS:
        if not isinstance(group[flag], bool):
            raise ValueError(f"normuon: {flag} must be True or False, got {group[flag]!r}")
    check_nonnegative(group, "lr", "weight_decay", "eps", "adamw_lr", "adamw_wd", "adamw_eps")
    for name in ("momentum", "beta2"):
        if not 0.0 <= check_number(group[name], name) < 1.0:
            raise ValueError(f"normuon: {name} must be in [0, 1), got {group[name]!r}")
    check_betas(dict(betas=group["adamw_betas"]))
    steps = group["ns_steps"]
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"normuon: ns_steps must be an int >= 1, got {steps!r}")
    group["ns_coeffs"] = ns_schedule(group["ns_coeffs"])  # resolved, as NorMuon stores it
    if group["update_scale"] not in UPDATE_SCALES:
        raise ValueError(f"normuon: update_scale must be 'preserve_norm' or 'match_rms', got "
                         f"{group['update_scale']!r}")
    if isinstance(group["step"], bool) or not isinstance(group["step"], int) or group["step"] < 0:
        raise ValueError(f"step counts the group's steps (an int >= 0), got {group['step']!r}")
    if not uses_muon(group):
        group.setdefault("betas", group["adamw_betas"])
        check_betas(group)
        if not check_number(group["eps"], "eps") > 0:
            raise ValueError("normuon: a use_muon=False group needs eps > 0 (adamw_eps): with "
                             "0, an element whose gradient and moments are all 0 divides 0 by "
                             "0 (NaN), in NorMuon too")
        return
    check_matrices(group, "normuon", "NorMuon's AdamW, with adamw_lr...)")


def newton_schulz(matrix: torch.Tensor, schedule, ns_steps: int,
                  eps: float = 1e-7) -> torch.Tensor:
    """pytorch-optimizer's ``zero_power_via_newton_schulz_5`` on one matrix, its operations in
    its order, in bfloat16.

    Args:
        matrix: the m x n update.
        schedule: (a, b, c) per iteration (``ns_schedule``; the last one repeats).
        ns_steps: how many iterations.
        eps: the floor of the Frobenius norm the matrix is divided by (pytorch-optimizer's
            1e-7).

    Returns:
        The orthogonalized m x n matrix, bfloat16.
    """
    tall = matrix.size(0) > matrix.size(1)
    x = (matrix.T if tall else matrix).to(torch.bfloat16, copy=True,
                                          memory_format=torch.contiguous_format)
    x.div_(x.norm(2, dim=(-2, -1), keepdim=True).clamp_min_(eps))
    for i in range(ns_steps):
        a, b, c = schedule[min(i, len(schedule) - 1)]
        gram = torch.mm(x, x.T)
        gram_update = torch.addmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.addmm(x, gram_update, x, beta=a, alpha=1.0)
    return x.T if tall else x


def adjusted_lr(lr: float, rows: int, cols: int, use_adjusted_lr: bool) -> float:
    """NorMuon's lr for an orthogonalized rows x cols update (pytorch-optimizer's
    ``get_adjusted_lr``, in its arithmetic): lr 0.2 sqrt(max(rows, cols)) with
    ``use_adjusted_lr``, else lr sqrt(max(1, rows / cols))."""
    ratio = (0.2 * math.sqrt(max(rows, cols)) if use_adjusted_lr
             else math.pow(max(1.0, rows / cols), 0.5))
    return lr * ratio


def _decayed(group: dict, param: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """NorMuon's maximize and weight decay: the param decayed in place (weight_decouple), and
    the gradient to use (a new tensor where it changes: the caller's is left alone)."""
    if group["maximize"]:
        grad = -grad
    wd = group["weight_decay"]
    if wd != 0:
        if group["weight_decouple"]:
            param.mul_(1.0 - wd * group["lr"])
        else:
            grad = grad.add(param, alpha=wd)
    return grad


def _muon_step(group: dict, param: torch.Tensor, grad: torch.Tensor, state: dict) -> None:
    """One whole Muon param's step: NorMuon's per-tensor operations, in its order."""
    if "momentum_buffer" not in state:
        state["momentum_buffer"] = torch.zeros_like(param)
        state["second_momentum_buffer"] = param.new_zeros(param.size(0), 1)
    grad = _decayed(group, param, grad)
    momentum, eps = group["momentum"], group["eps"]
    buf = state["momentum_buffer"]
    buf.lerp_(grad, 1.0 - momentum)
    update = grad.lerp(buf, momentum) if group["nesterov"] else buf
    rows = param.size(0)
    # looked up at call time: the tests count the orthogonalizations through this name
    update = newton_schulz(update.reshape(rows, -1), group["ns_coeffs"],
                           group["ns_steps"]).to(grad.dtype)
    original_norm = update.norm()
    second = state["second_momentum_buffer"]
    second.lerp_(update.square().mean(dim=-1, keepdim=True), 1.0 - group["beta2"])
    update.div_(second.sqrt().add_(eps))
    if group["update_scale"] == "preserve_norm":
        update.mul_(original_norm / update.norm().add_(eps))
        lr = adjusted_lr(group["lr"], rows, update.size(1), group["use_adjusted_lr"])
    else:  # match_rms
        update.mul_(0.2 * math.sqrt(update.numel()) / update.norm().add_(eps))
        lr = group["lr"]
    param.add_(update.reshape(param.shape), alpha=-lr)


def _bias_corrections(group: dict) -> tuple[float, float]:
    """1 - b1^t and sqrt(1 - b2^t) at the group's step t, as NorMuon computes them."""
    beta1, beta2 = group["betas"]
    t = group["step"]
    return 1.0 - math.pow(beta1, t), math.sqrt(1.0 - math.pow(beta2, t))


def _adamw_fused(group: dict, shard: ShardTensors, step: torch.Tensor, stats=None) -> None:
    """NorMuon's AdamW over this rank's flat shard of a ``use_muon=False`` group (its foreach
    operations; the gradients are consumed)."""
    params, grads = shard.params, shard.grads
    m, v = shard.states["exp_avg"], shard.states["exp_avg_sq"]
    beta1, beta2 = group["betas"]
    lr, wd = group["lr"], group["weight_decay"]
    if group["maximize"]:
        torch._foreach_neg_(grads)
    if wd != 0:
        if group["weight_decouple"]:
            torch._foreach_mul_(params, 1.0 - wd * lr)
        else:
            torch._foreach_add_(grads, params, alpha=wd)
    torch._foreach_lerp_(m, grads, 1.0 - beta1)
    torch._foreach_mul_(grads, grads)
    torch._foreach_lerp_(v, grads, 1.0 - beta2)
    bias_correction1, bias_correction2_sq = _bias_corrections(group)
    denom = grads  # reused: sqrt(v) / sqrt(1 - b2^t) + eps
    torch._foreach_copy_(denom, v)
    torch._foreach_sqrt_(denom)
    torch._foreach_div_(denom, bias_correction2_sq)
    torch._foreach_add_(denom, group["eps"])
    torch._foreach_addcdiv_(params, m, denom, value=-lr / bias_correction1)


def _adamw_reference(group: dict, param: torch.Tensor, grad: torch.Tensor, state: dict) -> None:
    """NorMuon's AdamW on one whole param, its per-tensor operations."""
    grad = _decayed(group, param, grad)
    beta1, beta2 = group["betas"]
    bias_correction1, bias_correction2_sq = _bias_corrections(group)
    state["exp_avg"].lerp_(grad, 1.0 - beta1)
    state["exp_avg_sq"].lerp_(grad.square(), 1.0 - beta2)
    denom = state["exp_avg_sq"].sqrt().div_(bias_correction2_sq).add_(group["eps"])
    param.addcdiv_(state["exp_avg"], denom, value=-group["lr"] / bias_correction1)


def _step(group: dict, param: torch.Tensor, grad: torch.Tensor, state: dict, t: int) -> None:
    """One param's step, whole (also the reference): NorMuon's Muon step, or in a
    ``use_muon=False`` group its AdamW (debiased by the group's step count, not ``t``)."""
    if uses_muon(group):
        _muon_step(group, param, grad, state)
    else:
        _adamw_reference(group, param, grad, state)


def _count_step(group: dict) -> None:
    group["step"] += 1


NORMUON = UpdateRule(
    name="normuon",
    defaults=dict(lr=2e-2, momentum=0.95, beta2=0.95, weight_decay=0.0, weight_decouple=True,
                  nesterov=True, ns_steps=5, ns_coeffs="original",
                  update_scale="preserve_norm", use_adjusted_lr=False, adamw_lr=3e-4,
                  adamw_betas=(0.9, 0.95), adamw_wd=0.0, adamw_eps=1e-10, eps=1e-10,
                  maximize=False, use_muon=True, step=0, layerwise=False),
    states=lambda group: () if uses_muon(group) else _ADAMW_STATES,
    fused_step=_adamw_fused,
    reference_step=_step,
    validate=_validate,
    before_step=_count_step,
    nonnegative_states=("exp_avg_sq",),
    whole_tensors=uses_muon,
    tensor_step=_step,
    tensor_states_8bit=("momentum_buffer",),
    group_keys=("betas",),
    group_defaults=_group_defaults,
    placement_cost=newton_schulz_cost,
    torch_class="pytorch_optimizer.NorMuon",
    # The Trainer (optim_args="optimizer=normuon"): the hidden matrices get Muon, the rest
    # NorMuon's AdamW with adamw_lr, adamw_betas and adamw_eps (from optim_args, else
    # NorMuon's defaults) and the weight decay the Trainer gives their group.
    transformers_hybrid=lambda args: dict(use_muon=False),
)
