"""``identical``: two results equal bit for bit, through nested dicts, lists and tuples."""
from __future__ import annotations

import torch


def identical(a, b) -> bool:
    """Whether ``a`` and ``b`` are equal bit for bit: tensors by ``torch.equal`` (same shape
    and values), dicts by keys and values, lists and tuples element by element, anything else
    by ``==``."""
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(identical(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(identical(x, y) for x, y in zip(a, b))
    return a == b
