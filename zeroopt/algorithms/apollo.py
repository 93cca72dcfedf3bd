"""APOLLO (Zhu et al. 2024) with apollo-torch's semantics: SGD-like memory, AdamW-like steps.

For a matrix in a group that carries ``rank``: Adam runs on a random projection of its gradient
(N(0, 1/r) entries from a seeded generator, regenerated from a new seed every
``update_proj_gap`` steps, so only the seed is kept), and only the *scaling* it implies is
used: the raw gradient is multiplied per channel (``scale_type="channel"``: each row or column,
whichever the projection keeps) or per tensor (``"tensor"``) by
``||Adam update|| / ||projected gradient||``. Then:

- the norm-growth limiter (unless ``disable_nl``): the scaled gradient's norm may grow at most
  1.01x per step;
- ``sqrt(scale)`` multiplies it (before the limiter with ``scale_front``);
- the step size is Transformers' old AdamW's (``correct_bias``), and weight decay follows it.

APOLLO-Mini is the same rule with rank 1, ``scale_type="tensor"`` and ``scale=128``. Params in
groups without ``rank`` run Transformers' old AdamW, as in apollo-torch. ``proj="svd"`` uses
GaLore's SVD basis instead of a random one.
"""

from __future__ import annotations

import math

import torch

from .base import UpdateRule, adam_arguments
from .galore import GALORE_ADAMW, galore_adamw_step, hf_adam_direction, hf_step_size
from .projection import (is_projected, next_seed, project, random_basis, refresh_due, side,
                         svd_basis, validate_projected)

_PROJECTED_KEYS = dict(proj="random", scale_type="channel", update_proj_gap=200, scale=1.0,
                       proj_type="std")  # Transformers' apollo_adamw defaults


def _validate(group: dict) -> None:
    GALORE_ADAMW.validate({k: v for k, v in group.items() if k != "rank"})
    if not is_projected(group):
        return
    validate_projected(group, "apollo_adamw", _PROJECTED_KEYS)
    for key, allowed in (("proj", ("random", "svd")), ("scale_type", ("channel", "tensor"))):
        if group[key] not in allowed:
            raise ValueError(f"apollo_adamw: {key} must be one of {allowed}, got {group[key]!r}")
    if group["proj_type"] not in ("std", "reverse_std", "left", "right"):
        raise ValueError(f"apollo_adamw: unknown proj_type {group['proj_type']!r}")


def _basis(group: dict, grad: torch.Tensor, state: dict, t: int, where: str) -> torch.Tensor:
    if group["proj"] == "svd":
        if refresh_due(group, t, state, "ortho_matrix"):
            state["ortho_matrix"] = svd_basis(grad, group["rank"], where)
        return state["ortho_matrix"]
    if refresh_due(group, t, state, "proj_seed"):
        # apollo-torch seeds each param with its 1-based position among the optimizer's params
        seed = state.get("seed", state["param_index"] + 1)
        state["proj_seed"], state["seed"] = seed, next_seed(seed)
    return random_basis(grad.shape, group["rank"], where, state["proj_seed"], grad.device)


def _step(group: dict, param: torch.Tensor, grad: torch.Tensor, state: dict, t: int) -> None:
    if not is_projected(group):
        return galore_adamw_step(group, param, grad, state, t)
    where = side(group["proj_type"], grad.shape)
    low = project(grad, _basis(group, grad, state, t, where), where)
    adam_update = hf_adam_direction(group, low, state)
    if group["scale_type"] == "channel":  # the dimension the projection keeps, per channel
        dim = 0 if grad.shape[0] < grad.shape[1] else 1
        factor = torch.norm(adam_update, dim=dim) / (torch.norm(low, dim=dim) + 1e-8)
        if dim == 1:
            factor = factor.unsqueeze(1)
    else:
        factor = torch.norm(adam_update) / (torch.norm(low) + 1e-8)
    scaled = grad * factor
    if group["scale_front"]:
        scaled *= math.sqrt(group["scale"])
    if not group["disable_nl"]:
        if "scaled_grad" in state:  # the norm-growth limiter, gamma = 1.01
            norm = torch.norm(scaled)
            limiter = max(norm / (state["scaled_grad"] + 1e-8), 1.01) / 1.01
            scaled = scaled / limiter
            state["scaled_grad"] = norm / limiter
        else:
            state["scaled_grad"] = torch.norm(scaled)
    if not group["scale_front"]:
        scaled *= math.sqrt(group["scale"])
    param.add_(scaled, alpha=-hf_step_size(group, t))
    if group["weight_decay"] > 0.0:
        param.add_(param, alpha=-group["lr"] * group["weight_decay"])


APOLLO_ADAMW = UpdateRule(
    name="apollo_adamw",
    nonnegative_states=("exp_avg_sq",),
    defaults=dict(GALORE_ADAMW.defaults, scale_front=False, disable_nl=False),
    states=GALORE_ADAMW.states,
    fused_step=GALORE_ADAMW.fused_step,
    reference_step=_step,
    validate=_validate,
    whole_tensors=is_projected,
    tensor_step=_step,
    tensor_states_8bit=("exp_avg", "exp_avg_sq"),
    group_keys=("rank", *_PROJECTED_KEYS),
    transformers_arguments=adam_arguments,
    transformers_projection=dict(rank=128, **_PROJECTED_KEYS),
)
