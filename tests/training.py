"""The shared toolkit of the distributed tests: a model, rank-dependent data, and an unsharded
reference that sees the average of every rank's gradient.

The model has odd-sized layers (no size divides by the world size or the 256-element padding),
a 0-d param, and small buckets, so params straddle shard and bucket boundaries at every world
size from 1 to 4.
"""

from __future__ import annotations

import copy
import os

import torch
import torch.distributed as dist
from torch import nn

import zeroopt
from zeroopt.algorithms import get_preset

BUCKET = 700  # several buckets for a ~3,000-param model
# Sum ranks' fp32 gradients in fp64: exact, so the average does not depend on the order in which
# a backend adds them, and the reference can reproduce it bit for bit (see test_equivalence.py).
EXACT = dict(bucket_numel=BUCKET, reduce_dtype=torch.float64)


class OddModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(37, 41)
        self.mid = nn.Linear(41, 29)
        self.norm = nn.LayerNorm(29)
        self.out = nn.Linear(29, 5)
        self.scale = nn.Parameter(torch.tensor(0.75))

    def forward(self, x):
        return self.out(self.norm(torch.tanh(self.mid(torch.tanh(self.inp(x)))))) * self.scale


def world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if os.environ.get("ZEROOPT_BACKEND") == "mpi":  # under mpirun (distributed.mpi_ranks)
        from mpi4py import MPI

        return MPI.COMM_WORLD.Get_rank(), MPI.COMM_WORLD.Get_size()
    return 0, 1


def models(dtype=torch.float32):
    torch.manual_seed(1234)
    model = OddModel()
    return model.to(dtype), copy.deepcopy(model).float()


def batch(step: int, rank: int, micro: int = 0):
    g = torch.Generator().manual_seed(10_000 * step + 100 * rank + micro)
    return torch.randn(6, 37, generator=g), torch.randn(6, 5, generator=g)


def loss_of(model, x, y):
    return nn.functional.mse_loss(model(x.to(next(model.parameters()).dtype)).float(), y)


def reference_backward(ref, step: int, world_size: int, micro: int = 0, accum: int = 1,
                       scale: float = 1.0):
    """Give ``ref`` the average over ranks of their gradients, summed exactly (fp64) and
    rounded once to fp32: the gradient zeroopt reduces with ``reduce_dtype=torch.float64``.
    Gradients accumulate across calls, as backward's do."""
    total = [torch.zeros_like(p, dtype=torch.float64) for p in ref.parameters()]
    for r in range(world_size):
        for p in ref.parameters():
            p.grad, p.saved_grad = None, p.grad
        (loss_of(ref, *batch(step, r, micro)) * scale / accum).backward()
        for t, p in zip(total, ref.parameters()):
            if p.grad is not None:
                t += p.grad.double()
            p.grad = p.saved_grad
    for t, p in zip(total, ref.parameters()):
        if p.requires_grad:
            avg = (t * (1.0 / world_size)).float()
            p.grad = avg if p.grad is None else p.grad + avg
    for p in ref.parameters():
        del p.saved_grad


def train_side_by_side(model, opt, references, steps) -> None:
    """Train ``model`` with ``opt`` on this rank's batches, and each ``(ref, ref_opt)`` of
    ``references`` unsharded on the average of every rank's gradient, for ``steps`` (an
    iterable of step numbers): the loop the equivalence tests share."""
    rank, world_size = world()
    for step in steps:
        loss_of(model, *batch(step, rank)).backward()
        opt.step()
        opt.zero_grad()
        for ref, ref_opt in references:
            reference_backward(ref, step, world_size)
            ref_opt.step()
            ref_opt.zero_grad()


def max_rel_err(model, ref) -> float:
    return max(((a.detach().float() - b.detach()).abs().max() / b.detach().abs().max()).item()
               for a, b in zip(model.parameters(), ref.parameters()))


def reference_optimizer(name, params, hp):
    """The unsharded optimizer the tests hold ``name`` to: the class its rule mirrors
    (``UpdateRule.torch_class``, with its ``torch_defaults``) where that class is installed,
    the name presets nothing and no zeroopt-only option is on; else the rule's eager
    ``ReferenceOptimizer``."""
    rule, preset = get_preset(name)
    torch_class = rule.mirrored_class()
    variant = any(hp.get(option, off) != off for option, off in rule.zeroopt_only.items())
    if torch_class is not None and not preset and not variant:
        hp = {k: v for k, v in hp.items() if k not in rule.zeroopt_only}  # all off
        return torch_class(params, **{**rule.torch_defaults, **hp})
    return zeroopt.ReferenceOptimizer(params, optimizer=name, **hp)


# --- single-process comparisons with independent implementations ----------------------------


def small_pair():
    """Two identical small models (for comparing two optimizers in one process)."""
    torch.manual_seed(3)
    a = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 4))
    b = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 4))
    b.load_state_dict(a.state_dict())
    return a, b


def train_small(model, opt, steps=10, before_step=lambda t: None):
    """``steps`` steps on fixed random data; ``before_step(t)`` may adjust the optimizer."""
    torch.manual_seed(7)
    for t in range(1, steps + 1):
        x, y = torch.randn(8, 16), torch.randn(8, 4)
        nn.functional.mse_loss(model(x), y).backward()
        before_step(t)
        opt.step()
        opt.zero_grad()
    return model


def rel_diff(a, b) -> float:
    return max(((p - q).abs().max() / q.abs().max()).item()
               for p, q in zip(a.parameters(), b.parameters()))


def error_of(fn) -> str:
    """The message of the ValueError or RuntimeError ``fn()`` raises, or "no error"."""
    try:
        fn()
    except (ValueError, RuntimeError) as e:
        return str(e)
    return "no error"
