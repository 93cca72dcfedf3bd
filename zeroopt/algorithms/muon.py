"""Muon (Jordan et al. 2024, "Muon: An optimizer for hidden layers in neural networks"), as
torch.optim.Muon computes it (torch/optim/_muon.py, torch 2.13).

Each 2-D weight's momentum is orthogonalized by a Newton-Schulz iteration before it is applied:

    B <- lerp(B, g, 1 - mu)                        (B = mu B + (1 - mu) g: torch's code, an EMA)
    U = lerp(g, B, mu)  with nesterov, else  U = B
    O = NS(U)                                      (ns_steps quintic Newton-Schulz iterations)
    x <- x (1 - lr wd)                             (decoupled weight decay, by the unadjusted lr)
    x <- x - lr' O,   lr' = lr sqrt(max(1, A / B))        ("original", also adjust_lr_fn=None)
                      lr' = lr 0.2 sqrt(max(A, B))        ("match_rms_adamw", Moonshot's)

for a param of shape A x B. NS(U): X = U (transposed if A > B, so X is wide), in bfloat16;
X <- X / max(||X||_F, eps); then ns_steps times, with (a, b, c) = ns_coefficients,
G = X X^T, X <- a X + (b G + c G G) X; transposed back. The result is bfloat16 and is added to
the fp32 param (type promotion), as torch does.

The Newton-Schulz iteration needs the whole matrix, so every param of a muon group is stepped
whole, on the one rank that owns it (``whole_tensors``), as GaLore and Adafactor are: each
matrix is orthogonalized exactly once per step in the whole job, by its owner, and the updated
params reach the other ranks with the usual all-gather. A step's work is the iteration's
matrix products, ~ m n min(m, n) for an m x n matrix: that is its ``placement_cost``.

Hyperparameters (names and defaults are torch.optim.Muon's):

- ``lr`` (1e-3); ``weight_decay`` (0.1): decoupled, x <- x (1 - lr wd);
- ``momentum`` (0.95): mu above; ``nesterov`` (True);
- ``ns_coefficients`` ((3.4445, -4.7750, 2.0315)): a, b, c of the quintic iteration;
  ``eps`` (1e-7): the floor of the Frobenius norm U is divided by; ``ns_steps`` (5, < 100);
- ``adjust_lr_fn`` (None, which is "original"; or "match_rms_adamw"): lr' above;
- ``layerwise`` (False): zeroopt's own (as Adafactor's and CAME's): step each matrix as soon as
  its averaged gradient is reduced, during backward.
- ``use_muon`` (True): a group's flag, False for AdamW's step (below); ``betas``
  ((0.9, 0.999)): those AdamW groups' betas.

State: ``momentum_buffer`` per param, fp32 in the param's shape (torch's name), kept by
``tensor_step``'s state dict, so state dicts and checkpoints carry it.

Dtype: torch.optim.Muon iterates in bfloat16 on every device, CPU included (``grad.bfloat16()``),
and zeroopt does the same on CPU and GPU, so it computes what torch computes, bit for bit on the
same gradient. The momentum buffer and the params stay fp32.

Hybrid groups, as Muon is run in practice (Keller Jordan's ``MuonWithAuxAdam``, Moonlight): a
group with ``use_muon=False`` runs torch.optim.AdamW's step on its params instead, element-wise
over the flat shard, with the group's ``lr``, ``betas`` ((0.9, 0.999)), ``eps`` and
``weight_decay``; states ``exp_avg`` and ``exp_avg_sq`` (torch.optim.AdamW's names). Such a
group inherits the optimizer's lr and weight_decay when it does not set them, as every torch
param group does (Moonlight runs both with one lr); its ``eps``, when not set, is
torch.optim.AdamW's 1e-8, not the optimizer's (Muon's eps is another quantity: the floor of
the Newton-Schulz normalisation). Embeddings, the output head, norms and biases go there.

Params of a muon group (``use_muon=True``, the default) have two dimensions or more:
torch.optim.Muon takes 2-D ones only; a convolution's weight (out, in, kh, kw) is stepped as its
(out, in kh kw) matrix, as Keller Jordan's Muon flattens it, with lr' from that matrix's shape:
exactly torch.optim.Muon's step on the flattened weight. A 1-D param there is refused at
construction with the fix (``use_muon=False`` or ``zeroopt.muon_param_groups``).
"""

from __future__ import annotations

import math

import torch

from . import adam, sources
from .base import ShardTensors, UpdateRule, check_betas, check_nonnegative, check_number

ADJUST_LR_FNS = (None, "original", "match_rms_adamw")


_ADAMW_STATES = ("exp_avg", "exp_avg_sq")
ADAMW_EPS = adam.ADAMW.defaults["eps"]  # torch.optim.AdamW's 1e-8


def uses_muon(group: dict) -> bool:
    """Whether a group's params get Muon's step (else torch.optim.AdamW's)."""
    return group["use_muon"]


def _group_defaults(group: dict, defaults: dict) -> None:
    """An AdamW group's eps is AdamW's own (1e-8) unless it sets one."""
    if group.get("use_muon", defaults["use_muon"]) is False:
        group.setdefault("eps", ADAMW_EPS)


def _validate(group: dict) -> None:
    if not isinstance(group["use_muon"], bool):
        raise ValueError(f"muon: use_muon must be True (Muon's step) or False (AdamW's), got "
                         f"{group['use_muon']!r}")
    check_nonnegative(group, "lr", "weight_decay", "momentum", "eps")
    check_betas(group)
    if not isinstance(group["nesterov"], bool):
        raise ValueError(f"muon: nesterov must be True or False, got {group['nesterov']!r}")
    coefficients = group["ns_coefficients"]
    if not isinstance(coefficients, (tuple, list)) or len(coefficients) != 3:
        raise ValueError(f"muon: ns_coefficients must be three numbers (a, b, c), got "
                         f"{coefficients!r}")
    for value in coefficients:
        check_number(value, "ns_coefficients")
    steps = group["ns_steps"]
    if isinstance(steps, bool) or not isinstance(steps, int) or not 0 <= steps < 100:
        raise ValueError(f"muon: ns_steps must be an int in [0, 100), got {steps!r}")
    if group["adjust_lr_fn"] not in ADJUST_LR_FNS:
        raise ValueError(f"muon: adjust_lr_fn must be None, 'original' or 'match_rms_adamw', "
                         f"got {group['adjust_lr_fn']!r}")
    if not isinstance(group["layerwise"], bool):
        raise ValueError(f"layerwise must be True or False, got {group['layerwise']!r}")
    if uses_muon(group):
        check_matrices(group, "muon", "torch.optim.AdamW's step): "
                       "zeroopt.muon_param_groups(model) builds both groups")


def check_matrices(group: dict, rule: str, elsewhere: str) -> None:
    """Raise ValueError if a param of a ``use_muon=True`` group has fewer than two dimensions;
    the message names ``rule`` and, after "use_muon=False (", ``elsewhere``: where such params
    go instead."""
    for param in group.get("params", ()):
        if param.dim() < 2:
            raise ValueError(
                f"{rule} orthogonalizes matrices: a group with use_muon=True (the default) "
                f"takes params of 2 or more dimensions, and this one has a param of shape "
                f"{tuple(param.shape)}. Put biases, norms, embeddings and the output head in a "
                f"group with use_muon=False ({elsewhere}")


def zeropower_via_newtonschulz(update: torch.Tensor, ns_coefficients, ns_steps: int,
                               eps: float) -> torch.Tensor:
    """The orthogonalized ``update`` (a matrix): torch.optim.Muon's Newton-Schulz iteration, in
    bfloat16, with torch's operations in its order. Returns a bfloat16 matrix of its shape."""
    a, b, c = ns_coefficients
    x = update.bfloat16()
    tall = update.size(0) > update.size(1)
    if tall:
        x = x.T
    x.div_(x.norm().clamp(min=eps))  # spectral norm at most 1
    for _ in range(ns_steps):
        gram = x @ x.T
        gram_update = torch.addmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.addmm(x, gram_update, x, beta=a)
    return x.T if tall else x


def matrix_shape(shape: torch.Size) -> tuple[int, int]:
    """The matrix a param of ``shape`` is orthogonalized as: (shape[0], the rest flattened)."""
    rows = shape[0]
    return rows, (math.prod(shape) // rows if rows else 0)


def adjusted_lr(lr: float, adjust_lr_fn: str | None, shape: torch.Size) -> float:
    """The lr the orthogonalized update is applied with (torch.optim.Muon's ``_adjust_lr``,
    for the matrix ``matrix_shape(shape)``)."""
    rows, cols = matrix_shape(shape)
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        return lr * math.sqrt(max(1, rows / cols))
    return lr * 0.2 * math.sqrt(max(rows, cols))  # "match_rms_adamw"


def _muon_step(group: dict, param: torch.Tensor, grad: torch.Tensor, state: dict) -> None:
    """One whole matrix's step: torch.optim.Muon's per-tensor operations, in its order (on the
    flattened matrix for a param of more than two dimensions; the momentum keeps its shape)."""
    if "momentum_buffer" not in state:
        state["momentum_buffer"] = torch.zeros_like(grad)
    momentum = group["momentum"]
    buf = state["momentum_buffer"]
    buf.lerp_(grad, 1 - momentum)
    update = grad.lerp(buf, momentum) if group["nesterov"] else buf
    # looked up at call time: the tests count the orthogonalizations through this name
    update = zeropower_via_newtonschulz(update.reshape(matrix_shape(param.shape)),
                                        group["ns_coefficients"], group["ns_steps"],
                                        group["eps"])
    lr = group["lr"]
    param.mul_(1 - lr * group["weight_decay"])
    param.add_(update.reshape(param.shape),
               alpha=-adjusted_lr(lr, group["adjust_lr_fn"], param.shape))


def _step(group: dict, param: torch.Tensor, grad: torch.Tensor, state: dict, t: int) -> None:
    """One param's step, whole (also the reference): Muon's, or in a use_muon=False group
    torch.optim.AdamW's."""
    if uses_muon(group):
        _muon_step(group, param, grad, state)
    else:
        adam.ADAMW.reference_step({**adam.ADAMW.defaults, **group}, param, grad, state, t)


def _adamw_fused(group: dict, shard: ShardTensors, step: torch.Tensor, stats=None) -> None:
    """torch.optim.AdamW's step over the flat shard of a use_muon=False group."""
    adam.ADAMW.fused_step({**adam.ADAMW.defaults, **group}, shard, step, stats)


def newton_schulz_cost(shape: torch.Size) -> int:
    """A step's work on a param: ~ m n min(m, n) for the m x n matrix it is orthogonalized as
    (``matrix_shape``), the iteration's products; its element count for a 1-D (AdamW) one."""
    if len(shape) < 2:
        return int(torch.Size(shape).numel())
    m, n = matrix_shape(shape)
    return m * n * min(m, n)


MUON = UpdateRule(
    name="muon",
    defaults=dict(lr=1e-3, weight_decay=0.1, momentum=0.95, nesterov=True,
                  ns_coefficients=(3.4445, -4.7750, 2.0315), eps=1e-7, ns_steps=5,
                  adjust_lr_fn=None, layerwise=False, use_muon=True, betas=(0.9, 0.999)),
    nonnegative_states=("exp_avg_sq",),
    states=lambda group: () if uses_muon(group) else _ADAMW_STATES,
    fused_step=_adamw_fused,
    reference_step=_step,
    validate=_validate,
    group_defaults=_group_defaults,
    whole_tensors=uses_muon,
    tensor_step=_step,
    tensor_states_8bit=("momentum_buffer",),
    placement_cost=newton_schulz_cost,
    torch_class=torch.optim.Muon,
    wraps=sources.Sources(sources.Source(torch.optim.Muon)),
    transformers_hybrid=lambda args: dict(use_muon=False, betas=(args.adam_beta1, args.adam_beta2),
                                          eps=args.adam_epsilon),
)
