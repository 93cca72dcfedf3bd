"""Construction-time checks of what ZeroOptimizer is given: each bad input gets an error that
names the cause and the fix, at construction, as torch.optim's do (not a confusing failure in
the first step, or none at all).

Checks that need every rank's view (ranks that disagree) are in ``checks.py``; a problem found
here that only this rank can see (its ``page_dir``) is handed to that check, so that every rank
raises it rather than the others waiting for this one.
"""

from __future__ import annotations

import difflib
import numbers
import os
import tempfile

import torch

# Keys a param group may carry besides the rule's hyperparameters and the state options:
# torch's named params, and what LR schedulers write into the groups.
TORCH_GROUP_KEYS = ("params", "param_names", "initial_lr")


def check_options(stage, bucket_numel, window_numel) -> tuple[int, int, int | None]:
    """Check that the size-like options are ints (not 4e6, "2" or True).

    Args:
        stage: ZeroOptimizer's ``stage``.
        bucket_numel: elements per bucket.
        window_numel: elements per window, or None for the device's default.

    Returns:
        (stage, bucket_numel, window_numel) as plain ints (numpy ints are accepted).

    Raises:
        TypeError: a value that is not an int.
    """
    return (_int("stage", stage), _int("bucket_numel", bucket_numel),
            None if window_numel is None else _int("window_numel", window_numel))


def _int(name: str, value) -> int:
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    if isinstance(value, float) and value.is_integer():
        fix = f"write {int(value):_} (an int), not a float"
    elif name == "stage":
        fix = "use stage=1 or stage=2"
    else:
        fix = "pass a number of elements as an int"
    raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__}): {fix}")


def check_params(params) -> list:
    """Check the params and param groups as given to ZeroOptimizer, before torch.optim's
    constructor sees them.

    Refuses complex params, params on the meta device and a tensor given twice (in one group
    or across groups). Frozen params (requires_grad=False) are left alone, as the optimizer
    leaves them, except that they too may appear only once.

    Args:
        params: what ZeroOptimizer got: an iterable of tensors, of (name, tensor) pairs, or of
            param-group dicts.

    Returns:
        ``params`` as a list, each group a copy with its "params" as a list (what torch.optim
        makes of them: generators are consumed once, here); to pass on to torch.optim.

    Raises:
        ValueError: a complex param, a meta param, a tensor given twice.
    """
    if isinstance(params, torch.Tensor):
        return params  # torch.optim's own error says to pass an iterable
    items = [_listed(item) for item in params]  # the user's dicts stay as they are
    groups = items if items and isinstance(items[0], dict) else [{"params": items}]
    seen: dict[int, str] = {}
    for g, group in enumerate(groups):
        if not isinstance(group, dict):
            continue  # torch.optim's error
        members = group.get("params")
        members = [members] if isinstance(members, torch.Tensor) else members
        if not isinstance(members, list):
            continue
        for i, item in enumerate(members):
            name, p = item if isinstance(item, tuple) and len(item) == 2 else (None, item)
            if not isinstance(p, torch.Tensor):
                continue  # torch.optim's error
            where = (f"{name!r} (param {i} of group {g})" if name is not None
                     else f"param {i} of group {g}")
            if id(p) in seen:
                raise ValueError(
                    f"the same tensor (shape {list(p.shape)}) is given twice: as {seen[id(p)]} "
                    f"and as {where}. Give each param once (tied weights are one param: "
                    "model.parameters() lists them once; to move a param to a group of its "
                    "own, leave it out of the other groups)")
            seen[id(p)] = where
            if p.requires_grad:
                _check_tensor(p, where)
    return items


def _listed(item):
    """A group dict's copy with its "params" as a list, as torch.optim makes it (a generator
    is consumed once, here; a set is left for torch.optim's error about its order)."""
    if not isinstance(item, dict) or isinstance(item.get("params"), (torch.Tensor, set)) \
            or "params" not in item:
        return item
    return {**item, "params": list(item["params"])}


def _check_tensor(p: torch.Tensor, where: str) -> None:
    if p.is_complex():
        raise ValueError(
            f"{where} is complex ({str(p.dtype).replace('torch.', '')}, shape "
            f"{list(p.shape)}): torch.optim steps complex params as pairs of reals "
            "(torch.view_as_real), and zeroopt does not yet. Keep the param real on the model "
            "side (store torch.view_as_real(w) as the Parameter and torch.view_as_complex it in "
            "forward), or give the complex params to a plain torch.optim optimizer and the "
            "others to zeroopt")
    if p.device.type == "meta":
        raise ValueError(
            f"{where} is on the meta device (shape {list(p.shape)}, no data): zeroopt copies "
            "the params into its flat buffers at construction. Materialize the model first, "
            "e.g. model.to_empty(device='cpu') (or your accelerator) and initialise its "
            "weights (or load a state dict), then build the optimizer")


def check_group_keys(param_groups: list[dict], rule) -> None:
    """Refuse a key no part of zeroopt reads (a misspelt hyperparameter would otherwise be
    ignored silently), suggesting the closest known one, as ``resolve_defaults`` does for the
    keyword arguments. Run after the rule's own checks, which name the fix for options of
    other rules (Lion's ``adopt``).

    Args:
        param_groups: the optimizer's param groups.
        rule: the update rule; its ``defaults`` and ``group_keys``, the state options and
            ``TORCH_GROUP_KEYS`` are what a group may carry.

    Raises:
        TypeError: the first unknown key, with its group.
    """
    from .states.kinds import STATE_DEFAULTS

    known = dict.fromkeys([*TORCH_GROUP_KEYS, *rule.defaults, *STATE_DEFAULTS,
                           *rule.group_keys])
    for g, group in enumerate(param_groups):
        for key in group:
            if key not in known:
                close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.5)
                hint = f" Did you mean {close[0]!r}?" if close else ""
                raise TypeError(
                    f"param group {g} has an unknown key {key!r}.{hint} A param group of "
                    f"{rule.name} takes: {', '.join(known)}")


def page_dir_problem(page_dir: str | None) -> str | None:
    """What is wrong with ``page_dir`` on this rank, if anything (a directory that exists and
    that this process can create files in is fine). Not raised here: ``checks.py`` raises it
    on every rank. None (the temp dir) is not checked: tempfile chose it as writable.

    Args:
        page_dir: ZeroOptimizer's ``page_dir``.

    Returns:
        A message naming the cause and the fix, or None.
    """
    if page_dir is None:
        return None
    path = os.fspath(page_dir)
    if not os.path.exists(path):
        return (f"page_dir {path!r} does not exist: create it (os.makedirs) or pass an existing "
                "directory, on a disk with room for the paged states")
    if not os.path.isdir(path):
        return f"page_dir {path!r} is not a directory: pass a directory for the paged states"
    try:  # os.access is not enough: root passes it on read-only file systems
        with tempfile.TemporaryFile(prefix="zeroopt-check-", dir=path):
            pass
    except OSError as error:
        return (f"page_dir {path!r} is not writable by this process ({error.strerror}): pass "
                "a directory it can create files in")
    return None
