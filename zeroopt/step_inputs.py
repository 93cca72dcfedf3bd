"""What one step works on, agreed by every rank in one small collective.

Before an update every rank must know:

- which params got a gradient on some rank since ``zero_grad()``: only those are stepped. Every
  other one is left exactly as torch.optim leaves a param whose ``grad`` is None (no weight
  decay, no momentum, its step count unchanged). A param with a gradient on some ranks only
  counts as zeros on the others, as in DistributedDataParallel; one that had a gradient before
  a ``zero_grad(set_to_none=False)`` counts as used, with zeros, as torch.optim steps a
  zeroed grad;
- which buckets still hold gradients that no reduction has taken (assigned to ``p.grad`` by
  hand, or staged inside ``no_sync()``): every rank reduces those buckets together;
- whether a param that was frozen when the optimizer was built has a gradient now (the
  optimizer then lays it out, and the step's inputs are settled again);
- the global gradient norm, when clipping or the non-finite check needs it.

All of it travels in one fp64 vector, all-reduced once per step (the norm's all-reduce, which
the non-finite check makes anyway):

    [ norm partial | a flag per bucket | a flag per slot | a flag per param frozen at build ]

Only when some rank had gradients outside backward is the norm summed again, in a second small
all-reduce after they are reduced.

On XLA (``comm.lazy``) the flags go alone, through ``comm.host_all_reduce`` (a small graph of
their own, read on the host), and the norm stays in the step's graph: read together, the host
read would run the step's gradient collectives in that small graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class StepInputs:
    """The agreed facts of one step.

    Attributes:
        active: positions in ``layout.slots`` of the params with a gradient on some rank.
        norm: the global gradient norm (fp32, 0-d), or None when none was asked for.
        unfrozen: positions in the list of params frozen at construction of those that have
            a gradient on some rank now. When not empty, nothing else was agreed: the caller
            lays them out and settles again.
    """

    active: frozenset[int]
    norm: torch.Tensor | None = None
    unfrozen: frozenset[int] = frozenset()


def settle(grads, comm, norm_type: float | None, frozen_with_grads: torch.Tensor) -> StepInputs:
    """Reduce what is left of this step's gradients and agree on the step's inputs.

    Args:
        grads: the optimizer's gradient source (``grad_sync.BucketedReducer`` or
            ``ddp_gradients.LocalGradients``); the 2-norm's partial is its
            ``squared_norm()`` (the harvest's sums).
        comm: its ``Collectives``.
        norm_type: the p of the global norm to compute, or None for no norm.
        frozen_with_grads: fp64 flags, one per param that was frozen when the optimizer was
            built: 1 where that param now has a gradient on this rank.

    Returns:
        The agreed ``StepInputs``.
    """
    grads.finish()
    grads.take_detached()
    grads.complete([])  # backward's buckets into the shard; untouched chunks zeroed
    op = "max" if norm_type == float("inf") else "sum"
    norm_part = ([] if norm_type is None else [grads.squared_norm()] if norm_type == 2.0
                 else [local_norm_part(grads.shard, norm_type)])
    pending, used = grads.pending(), grads.used()
    device = grads.shard.device  # NCCL and XLA reduce device tensors only
    if comm.lazy:  # XLA: the flags in a small graph of their own, the norm in the step's
        flags = comm.host_all_reduce(torch.cat([pending, used, frozen_with_grads]), device, op)
        vector = torch.cat(norm_part) if norm_part else None
        if vector is not None:
            comm.all_reduce(vector, op)
    else:
        vector = torch.cat([*norm_part, *(flags.to(device) for flags in
                                          (pending, used, frozen_with_grads))])
        comm.all_reduce(vector, op)
        flags = vector[len(norm_part):].clone()
        comm.all_reduce_over_replicas(flags, op)
        flags = flags.cpu()
    pending, used, frozen = flags.split([len(pending), len(used), len(frozen_with_grads)])
    late = (pending > 0).nonzero().flatten().tolist()
    if late:  # gradients outside backward
        grads.complete(late)
    unfrozen = frozenset((frozen > 0).nonzero().flatten().tolist())
    if unfrozen:
        return StepInputs(frozenset(), unfrozen=unfrozen)
    norm = None
    if late:  # the norm again, over the gradients just reduced
        if norm_type is not None:
            total = local_norm_part(grads.shard, norm_type)
            comm.all_reduce(total, op)
            norm = finish_norm(total, norm_type)
    elif norm_type is not None:
        norm = finish_norm(vector[:1], norm_type)
    active = frozenset((used > 0).nonzero().flatten().tolist())
    return StepInputs(active, norm)


def local_norm_part(shard: torch.Tensor, norm_type: float) -> torch.Tensor:
    """This rank's part of the global norm, as a 1-element fp64 tensor: ``max|g|`` for the
    inf norm, else ``sum |g|^p``. The sum over ranks is taken in fp64; p other than 2 (rare:
    not the per-step check) also accumulates in fp64 (``|g|^p`` in fp32 costs ~1e-6)."""
    if norm_type == float("inf"):
        value = shard.abs().max() if shard.numel() else shard.new_zeros(())
        return value.double().reshape(1)
    dtype = torch.float32 if norm_type == 2.0 else torch.float64
    return (torch.linalg.vector_norm(shard, norm_type, dtype=dtype).double()
            ** norm_type).reshape(1)


def finish_norm(total: torch.Tensor, norm_type: float) -> torch.Tensor:
    """The global norm (fp32, 0-d) from the all-reduced ``local_norm_part``."""
    total = total.reshape(())
    if norm_type == float("inf"):
        return total.float()
    return (total ** (1.0 / norm_type)).float()
