"""SGD with momentum, dampening, Nesterov and weight decay (torch.optim.SGD semantics)."""

from __future__ import annotations

import torch

from . import sources
from .base import ShardTensors, UpdateRule, check_nonnegative


def _validate(group: dict) -> None:
    check_nonnegative(group, "lr", "momentum", "weight_decay", "dampening")
    if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
        raise ValueError("Nesterov momentum requires momentum > 0 and dampening = 0 "
                         f"(got momentum={group['momentum']}, dampening={group['dampening']})")


def _fused(group: dict, shard: ShardTensors, step_count: torch.Tensor, stats=None) -> None:
    buffers = shard.states["momentum_buffer"] if group["momentum"] != 0 else []
    # On the first step torch.optim.SGD starts the buffer at the gradient itself.
    torch._fused_sgd_(shard.params, shard.grads, buffers, weight_decay=group["weight_decay"],
                      momentum=group["momentum"], lr=float(group["lr"]),
                      dampening=group["dampening"], nesterov=group["nesterov"],
                      maximize=group["maximize"], is_first_step=bool(step_count.item() == 1))


def _reference(group: dict, param: torch.Tensor, grad: torch.Tensor, state: dict, t: int) -> None:
    momentum, dampening = group["momentum"], group["dampening"]
    if group["maximize"]:
        grad = -grad
    if group["weight_decay"] != 0:
        grad = grad.add(param, alpha=group["weight_decay"])
    if momentum != 0:
        buf = state["momentum_buffer"]
        if t == 1:
            buf.copy_(grad)
        else:
            buf.mul_(momentum).add_(grad, alpha=1 - dampening)
        grad = grad.add(buf, alpha=momentum) if group["nesterov"] else buf
    param.add_(grad, alpha=-group["lr"])


def _states(group: dict) -> tuple[str, ...]:
    return ("momentum_buffer",) if group["momentum"] != 0 else ()


def _bitsandbytes_options(optimizer, group: dict) -> None:
    """bitsandbytes' SGD keeps (momentum, dampening) as betas, and an eps it does not use."""
    sources.unpack_betas("sgd", "momentum", "dampening", 0)(optimizer, group)
    sources.drop(group, "eps")


# zeroopt.wrap: torch.optim.SGD (Nesterov too: a hyperparameter here), and bitsandbytes' SGD,
# which is always momentum SGD: its kernel has no dampening and no Nesterov (its nesterov
# argument is not even recorded), so that is what wrap maps.
_SOURCES = sources.Sources(
    sources.Source(torch.optim.SGD),
    *sources.bitsandbytes("SGD", "SGD8bit", "SGD32bit", options=_bitsandbytes_options),
)

SGD = UpdateRule(
    name="sgd",
    defaults=dict(lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False,
                  maximize=False),
    states=_states,
    fused_step=_fused,
    reference_step=_reference,
    validate=_validate,
    torch_class=torch.optim.SGD,
    wraps=_SOURCES,
    from_torch_options=_SOURCES.from_torch_options,
)

# "nesterov": SGD with Nesterov momentum on by default.
NESTEROV = UpdateRule(
    name="nesterov",
    defaults={**SGD.defaults, "momentum": 0.9, "nesterov": True},
    states=_states,
    fused_step=_fused,
    reference_step=_reference,
    validate=_validate,
    torch_class=torch.optim.SGD,
    torch_defaults=dict(momentum=0.9, nesterov=True),
)
