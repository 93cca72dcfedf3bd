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
all-reduce after they are reduced. With one data-parallel rank the flags never leave the host
(nothing to agree on; on a GPU or an XLA device, no sync for them).

On XLA with several replicas (``comm.lazy``) no host read happens here: a read would run the
graph so far (the gradients' reductions included) on its own, cutting the step in two. There each
replica takes the facts it knows itself, as every SPMD program does, and the agreement is checked
on the device instead (``settle_on_device``): every bucket is reduced once in every step, whatever
each replica staged (so the collectives are the same everywhere), the per-param flags are summed
over the replicas inside the step's graph with the norm, and the step is kept only where every
flag's sum is 0 or the replica count (lazy_skip.py). A disagreement is reported, on every replica
at once, when the host next settles the step: an error naming the params, that step not applied.
Only a param frozen at construction that has a gradient here (the layout must grow, on every
replica alike) still agrees on the host first, through ``comm.host_all_reduce``.
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
        used_counts: None where ``active`` was agreed on the host. From ``settle_on_device``:
            per slot, on the device (fp64), on how many replicas the param has a gradient;
            ``active`` is then this replica's own view, right only where every count is 0 or
            the replica count (``agreed``).
    """

    active: frozenset[int]
    norm: torch.Tensor | None = None
    unfrozen: frozenset[int] = frozenset()
    used_counts: torch.Tensor | None = None

    def agreed(self, world_size: int) -> torch.Tensor:
        """0-d bool on the device: whether the replicas agreed on ``active`` (only where
        ``used_counts`` is set): each param has a gradient on all of them or on none."""
        counts = self.used_counts
        return ((counts == 0) | (counts == world_size)).all()


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
    if comm.lazy and comm.world_size > 1 and not frozen_with_grads.any():
        return settle_on_device(grads, comm, norm_type)
    grads.complete([])  # backward's buckets into the shard; untouched chunks zeroed
    op = "max" if norm_type == float("inf") else "sum"
    norm_part = ([] if norm_type is None else [grads.squared_norm()] if norm_type == 2.0
                 else [local_norm_part(grads.shard, norm_type)])
    pending, used = grads.pending(), grads.used()
    device = grads.shard.device  # NCCL and XLA reduce device tensors only
    alone = comm.data_parallel_size == 1
    if comm.lazy or alone:  # the norm in the step's graph, the flags apart from it
        flags = torch.cat([pending, used, frozen_with_grads])
        if not alone:  # XLA: in a small graph of their own (when the layout grows, see above)
            flags = comm.host_all_reduce(flags, device, op)
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


def settle_on_device(grads, comm, norm_type: float | None) -> StepInputs:
    """``settle`` without a host read, for lazy backends with several replicas (see the module
    notes): this replica's own active params, checked on the device (``StepInputs.agreed``).

    Every bucket not reduced yet in this step is reduced now, on every replica (a replica
    with nothing staged in one sends zeros); the per-slot flags and the norm's partial share
    one all-reduce (two for the inf norm, whose partials are maxed, not summed). The norm's
    partial is taken as ``settle`` takes it, so the result is the same bit for bit.
    """
    late = grads.staged_late()
    grads.complete(grads.unreduced())
    used = grads.used()
    flags = used.to(grads.shard.device)
    op = "max" if norm_type == float("inf") else "sum"
    norm_part = ([] if norm_type is None else [grads.squared_norm()]
                 if norm_type == 2.0 and not late else [local_norm_part(grads.shard, norm_type)])
    if op == "sum":
        vector = torch.cat([*norm_part, flags])
        comm.all_reduce(vector, "sum")
        total, counts = vector[:len(norm_part)], vector[len(norm_part):]
    else:
        total = torch.cat(norm_part)
        comm.all_reduce(total, "max")
        counts = flags
        comm.all_reduce(counts, "sum")
    norm = finish_norm(total, norm_type) if norm_type is not None else None
    active = frozenset((used > 0).nonzero().flatten().tolist())
    return StepInputs(active, norm, used_counts=counts)


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
