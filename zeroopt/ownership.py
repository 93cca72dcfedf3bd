"""Which ZeroOptimizer takes each param's gradients: the newest one built over it.

torch.optim lets a second optimizer be built over params that an older one holds (a notebook
cell run twice, an optimizer rebuilt after a state_dict round trip). A ZeroOptimizer takes its
params' gradients in backward hooks, so two live ones would race for them: the newest takes
over, the older one's hooks are removed, and the older one refuses to step, with a message
that says so. Kept here, not as attributes on the user's params.
"""

from __future__ import annotations

import weakref

# id(param) -> (weak ref to the param, weak ref to the optimizer that holds it)
_holders: dict[int, tuple[weakref.ref, weakref.ref]] = {}


def take_over(params, optimizer) -> None:
    """Record ``optimizer`` as the holder of ``params``; every older optimizer that held one
    of them is told to ``retire()`` (once each).

    Args:
        params: iterable of torch.nn.Parameter.
        optimizer: the new holder (anything with a ``retire()`` method).
    """
    retired = set()
    for stale in [k for k, (p, _) in _holders.items() if p() is None]:
        del _holders[stale]
    for param in params:
        held = _holders.get(id(param))
        old = held[1]() if held and held[0]() is param else None
        if old is not None and old is not optimizer and id(old) not in retired:
            retired.add(id(old))
            old.retire()
        _holders[id(param)] = (weakref.ref(param), weakref.ref(optimizer))


def holder(param):
    """The optimizer that takes ``param``'s gradients now (the newest built over it), or None
    (no ZeroOptimizer holds it, or the one that did is gone).

    Args:
        param: a torch.nn.Parameter.

    Returns:
        That optimizer, or None.
    """
    held = _holders.get(id(param))
    if held is None or held[0]() is not param:
        return None
    return held[1]()
