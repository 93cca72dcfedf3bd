"""Gradual unfreezing: params frozen when the optimizer was built that get a gradient later.

torch.optim steps every param of its groups whose ``grad`` is not None, whatever its
``requires_grad`` was when the optimizer was built. ZeroOptimizer lays out (packs into flat
buffers and shards) only the params trainable at construction; the others wait, with no state,
in ``FrozenAtBuild``. When the ranks agree (``step_inputs.settle``) that some of them have a
gradient on some rank, every rank packs those into new buffers after the existing ones
(``lay_out``): nothing laid out before moves (states, masters and this step's reduced gradients
stay where they are), and the new params start with fresh states, as torch.optim creates a
param's state at its first step. A new gradient source (``gradient_source.py``), hooked on
every param of the grown layout, takes over this step's gradients from the old one.
"""

from __future__ import annotations

from typing import Callable

import torch

from .gradient_source import connect_layerwise
from .layout import Layout
from .shard import Shard


class FrozenAtBuild:
    """The params of the optimizer's groups that are not laid out yet: frozen
    (``requires_grad=False``) when it was built, and given no gradient since.

    Args:
        param_groups: the optimizer's groups.

    Attributes:
        params: those params, in group order.
    """

    def __init__(self, param_groups: list[dict]):
        self.params = [p for group in param_groups for p in group["params"]
                       if not p.requires_grad]

    def with_grads(self) -> torch.Tensor:
        """fp64 flags, one per param of ``params``: 1 where its ``grad`` is not None on this
        rank (what ``step_inputs.settle`` agrees on)."""
        return torch.tensor([float(p.grad is not None) for p in self.params],
                            dtype=torch.float64)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """torch.optim's ``zero_grad`` for these params: set each ``grad`` to None, or with
        ``set_to_none=False`` zero it in place (a zeroed grad still counts as a gradient)."""
        for p in self.params:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()

    def take(self, positions) -> list[torch.nn.Parameter]:
        """Remove the params at ``positions`` (indices into ``params``, the same on every
        rank) and return them, in ``params`` order: they are about to be laid out."""
        chosen = set(positions)
        taken = [p for i, p in enumerate(self.params) if i in chosen]
        self.params = [p for i, p in enumerate(self.params) if i not in chosen]
        return taken


def params_by_group(param_groups: list[dict], keep: Callable[[torch.Tensor], bool]
                    ) -> list[list[tuple[int, torch.nn.Parameter]]]:
    """Per group, ``(state_dict index, param)`` of the params that ``keep`` accepts, as
    ``Layout`` takes them: the indices run on across groups, as in torch.optim's state dict."""
    out, start = [], 0
    for group in param_groups:
        out.append([(i, p) for i, p in enumerate(group["params"], start=start) if keep(p)])
        start += len(group["params"])
    return out


@torch.no_grad()
def lay_out(params: list[torch.nn.Parameter], param_groups: list[dict], layout: Layout, comm,
            shard: Shard, grads, new_source: Callable[[], object]):
    """Pack ``params`` (from ``FrozenAtBuild.take``; every rank passes the same ones) into new
    flat buffers after ``layout``'s existing ones, holding rank 0's values (as at
    construction), give them fresh states in ``shard``, and have a new gradient source take
    over this step's gradients from ``grads``. A collective (a broadcast per new buffer).

    Args:
        params: the params to lay out.
        param_groups: the optimizer's groups (which group each param is in, its index).
        layout: the optimizer's ``Layout``; it grows in place.
        comm: the optimizer's ``Collectives``.
        shard: the optimizer's ``Shard``; it grows in place.
        grads: the optimizer's gradient source; it takes no more gradients.
        new_source: makes a gradient source for the grown ``layout``
            (``gradient_source.new_source``).

    Returns:
        The new gradient source, holding what ``grads`` held.
    """
    wanted = {id(p) for p in params}
    first = layout.extend(params_by_group(param_groups, lambda p: id(p) in wanted))
    layout.allocate_param_buffers(first, allocate=comm.allocate)
    for buffer in layout.buffers[first:]:
        comm.broadcast(buffer.data, src=0)
    grads.remove_hooks()
    new = new_source()
    new.carry_over(grads)
    shard.extend(first, new.shard)
    connect_layerwise(new, shard.whole)
    return new
