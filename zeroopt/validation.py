"""Construction-time checks of what ZeroOptimizer is given: each bad input gets an error that
names the cause and the fix, at construction, as torch.optim's do (not a confusing failure in
the first step, or none at all).

Checks that need every rank's view (ranks that disagree) are in ``checks.py``; a problem found
here that only this rank can see (its ``page_dir``) is handed to that check, so that every rank
raises it rather than the others waiting for this one.
"""

from __future__ import annotations

import numbers
import os
import re
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
    ignored silently), suggesting the known one it is a typo of, as ``resolve_defaults`` does
    for the keyword arguments, or naming the rules that take it (GaLore's ``rank``, SGD's
    ``momentum``). Run after the rule's own checks, which name the fix for options of
    other rules (Lion's ``adopt``).

    Args:
        param_groups: the optimizer's param groups.
        rule: the update rule; its ``defaults`` and ``group_keys``, the state options and
            ``TORCH_GROUP_KEYS`` are what a group may carry.

    Raises:
        TypeError: the first unknown key, with its group and every key the group may carry.
    """
    from .states.kinds import STATE_DEFAULTS

    known = dict.fromkeys([*TORCH_GROUP_KEYS, *rule.defaults, *STATE_DEFAULTS,
                           *rule.group_keys])
    for g, group in enumerate(param_groups):
        for key in group:
            if key not in known:
                close = closest_name(key, known)
                hint = f" Did you mean {close!r}?" if close else ""
                raise TypeError(
                    f"param group {g} has an unknown key {key!r}.{hint} A param group of "
                    f"{rule.name} takes: {', '.join(known)}.{taken_elsewhere(key, rule)}")


def closest_name(word, choices) -> str | None:
    """The choice ``word`` is a typo of, for a "Did you mean" hint; None when none is.

    A typo is within two edits of the name (a letter inserted, deleted or replaced, or two
    neighbours swapped: "adamww", "stgae", "state_precisoin"), one edit for words of up to
    four letters (where two edits are half the word: "muon" is not a misspelt "lion", nor "wd"
    of "lr"); case aside; and where both have numbers in them, the same numbers ("adamw_4bit"
    is another optimizer than "adamw_8bit", not a misspelling of it). difflib's ratio, used
    before, suggested unrelated names at any usable cutoff ("lomo" -> "lion" at 0.5; "muon"
    and "lion" share half their letters).

    Args:
        word: what the user wrote (any value; compared as its str).
        choices: the known names, in the order to prefer among equally close ones.

    Returns:
        The closest choice within that distance, or None.
    """
    word = str(word).lower()
    limit = 1 if len(word) <= 4 else 2
    numbers = re.findall(r"\d+", word)
    best, best_distance = None, limit + 1
    for choice in choices:
        other = str(choice).lower()
        digits = re.findall(r"\d+", other)
        if numbers and digits and numbers != digits:
            continue
        distance = _edit_distance(word, other, best_distance)
        if distance < best_distance:
            best, best_distance = choice, distance
    return best


def _edit_distance(a: str, b: str, stop: int) -> int:
    """Edits (insert, delete, replace, swap of neighbours) from ``a`` to ``b``; any value
    >= ``stop`` once the distance is known to reach it."""
    if abs(len(a) - len(b)) >= stop:
        return stop
    before, row = None, list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        current = [i] + [0] * len(b)
        for j, y in enumerate(b, 1):
            current[j] = min(row[j] + 1, current[j - 1] + 1, row[j - 1] + (x != y))
            if i > 1 and j > 1 and x == b[j - 2] and a[i - 2] == y:
                current[j] = min(current[j], before[j - 2] + 1)
        if min(current) >= stop:
            return stop
        before, row = row, current
    return row[-1]


def taken_elsewhere(key, rule) -> str:
    """For an unknown hyperparameter or group key: the registered rules that take it (a
    sentence to end the error with), or "" when none does.

    Args:
        key: the key the user gave.
        rule: the rule that refused it.

    Returns:
        " 'momentum' is a hyperparameter of sgd, nesterov, rmsprop and lars, not of adamw."
        and the like; for the rule's own group keys (GaLore's ``rank`` given as a keyword),
        where it goes instead.
    """
    from .algorithms import registered_rules

    if key in rule.group_keys:
        return (f" {key!r} is a key of {rule.name}'s param groups: give it in the group of "
                f"the params it applies to, not as a keyword.")
    hyperparameter = [r.name for r in registered_rules() if key in r.defaults]
    group_key = [r.name for r in registered_rules()
                 if key in r.group_keys and r.name not in hyperparameter]
    said = [f"a hyperparameter of {_listed_names(hyperparameter)}" if hyperparameter else "",
            f"a param-group key of {_listed_names(group_key)}" if group_key else ""]
    said = " and ".join(filter(None, said))
    return f" {key!r} is {said}, not of {rule.name}." if said else ""


def _listed_names(names: list[str]) -> str:
    return " and ".join(filter(None, [", ".join(names[:-1]), names[-1]]))


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
