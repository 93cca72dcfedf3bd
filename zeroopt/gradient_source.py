"""Where an optimizer's averaged gradients come from.

``grad_sync.BucketedReducer`` (the default) averages them itself, bucket by bucket during
backward; ``ddp_gradients.LocalGradients`` takes ``param.grad`` as DistributedDataParallel
averaged it (``average_grads=False``). Both offer the same methods. A source serves one layout:
when the layout grows (params unfrozen after construction, ``unfreezing.py``), a new one takes
over from the old (``carry_over``).
"""

from __future__ import annotations

import torch

from .ddp_gradients import LocalGradients
from .grad_sync import BucketedReducer
from .layout import Layout


def new_source(layout: Layout, comm, device: torch.device, *, stage: int, average_grads: bool,
               reduce_dtype: torch.dtype) -> BucketedReducer | LocalGradients:
    """The gradient source for ``layout``.

    Args:
        layout: the optimizer's ``Layout``.
        comm: its ``Collectives`` (the reducer's bucket reductions).
        device: where the gradient shard lives.
        stage: 1 keeps every bucket's staging buffer; 2 pools a few.
        average_grads: True: a ``BucketedReducer``; False: ``LocalGradients``.
        reduce_dtype: the reducer's staging and reduction dtype.
    """
    if average_grads:
        return BucketedReducer(layout, comm, keep_staging=stage == 1,
                               reduce_dtype=reduce_dtype, device=device)
    return LocalGradients(layout, device)


def connect_layerwise(grads: BucketedReducer | LocalGradients, whole) -> None:
    """Have the reducer call ``whole.on_bucket_reduced`` after each bucket it harvests, where
    a layerwise rule steps params during backward (``whole``: the shard's
    ``whole_tensors.WholeTensors``). LocalGradients has no buckets: nothing to connect (its
    params are stepped in ``step()``)."""
    if whole.steps_in_backward and isinstance(grads, BucketedReducer):
        grads.on_reduced = whole.on_bucket_reduced
