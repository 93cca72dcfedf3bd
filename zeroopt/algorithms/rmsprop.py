"""RMSprop (torch.optim.RMSprop semantics, with its centered and momentum options).

On the CPU (contiguous fp32) the step is one pass over memory in C (zeroopt/kernels/
_rmsprop.c), with the torch path's arithmetic op for op; elsewhere the torch._foreach_* path
runs.
"""

from __future__ import annotations

import torch

from . import sources
from .base import ShardTensors, UpdateRule, check_nonnegative
from ..kernels import sqrt_check
from ..kernels.library import Library

LIB = Library("_rmsprop.c")


def _validate(group: dict) -> None:
    check_nonnegative(group, "lr", "eps", "weight_decay", "momentum", "alpha")


def _states(group: dict) -> tuple[str, ...]:
    return ("square_avg",
            *(("momentum_buffer",) if group["momentum"] > 0 else ()),
            *(("grad_avg",) if group["centered"] else ()))


def _fused(group: dict, shard: ShardTensors, step: torch.Tensor, stats=None) -> None:
    states = [shard.states[name] for name in _states(group)[1:]]  # momentum, then grad_avg
    lists = [shard.params, shard.grads, shard.states["square_avg"], *states]
    # (a tensor lr: the torch path, whose arithmetic on it the kernel does not repeat)
    if (not isinstance(group["lr"], torch.Tensor) and LIB.usable(*lists)
            and sqrt_check.matches_torch(LIB)):
        alpha = group["alpha"]
        LIB.each("zk_rmsprop_step", lists,
                 [alpha, 1 - alpha, group["weight_decay"], group["eps"], group["momentum"],
                  -group["lr"], float(group["maximize"]), float(group["centered"]),
                  float(group["momentum"] > 0)])
        return
    alpha, grads, params = group["alpha"], shard.grads, shard.params
    if group["maximize"]:
        torch._foreach_neg_(grads)  # the gradient shard is consumed by step()
    if group["weight_decay"] != 0:
        torch._foreach_add_(grads, params, alpha=group["weight_decay"])
    square_avg = shard.states["square_avg"]
    torch._foreach_mul_(square_avg, alpha)
    torch._foreach_addcmul_(square_avg, grads, grads, value=1 - alpha)
    if group["centered"]:
        grad_avg = shard.states["grad_avg"]
        torch._foreach_lerp_(grad_avg, grads, 1 - alpha)
        avg = torch._foreach_addcmul(square_avg, grad_avg, grad_avg, value=-1)
        torch._foreach_sqrt_(avg)
    else:
        avg = torch._foreach_sqrt(square_avg)
    torch._foreach_add_(avg, group["eps"])
    if group["momentum"] > 0:
        buf = shard.states["momentum_buffer"]
        torch._foreach_mul_(buf, group["momentum"])
        torch._foreach_addcdiv_(buf, grads, avg)
        torch._foreach_add_(params, buf, alpha=-group["lr"])
    else:
        torch._foreach_addcdiv_(params, grads, avg, value=-group["lr"])


def _reference(group: dict, param: torch.Tensor, grad: torch.Tensor, state: dict, t: int) -> None:
    alpha = group["alpha"]
    if group["maximize"]:
        grad = -grad
    if group["weight_decay"] != 0:
        grad = grad.add(param, alpha=group["weight_decay"])
    square_avg = state["square_avg"].mul_(alpha).addcmul_(grad, grad, value=1 - alpha)
    if group["centered"]:
        grad_avg = state["grad_avg"].lerp_(grad, 1 - alpha)
        avg = square_avg.addcmul(grad_avg, grad_avg, value=-1).sqrt_()
    else:
        avg = square_avg.sqrt()
    avg = avg.add_(group["eps"])
    if group["momentum"] > 0:
        buf = state["momentum_buffer"].mul_(group["momentum"]).addcdiv_(grad, avg)
        param.add_(buf, alpha=-group["lr"])
    else:
        param.addcdiv_(grad, avg, value=-group["lr"])


# zeroopt.wrap: torch.optim.RMSprop, and bitsandbytes' RMSprop, whose betas are (alpha,
# momentum): its kernel has one state and ignores momentum (and it refuses centered=True).
_SOURCES = sources.Sources(
    sources.Source(torch.optim.RMSprop),
    *sources.bitsandbytes("RMSprop", "RMSprop8bit", "RMSprop32bit",
                          options=sources.unpack_betas("rmsprop", "alpha", "momentum", 0)),
)

RMSPROP = UpdateRule(
    name="rmsprop",
    nonnegative_states=("square_avg",),
    defaults=dict(lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0,
                  centered=False, maximize=False),
    states=_states,
    fused_step=_fused,
    reference_step=_reference,
    validate=_validate,
    torch_class=torch.optim.RMSprop,
    wraps=_SOURCES,
    from_torch_options=_SOURCES.from_torch_options,
)
