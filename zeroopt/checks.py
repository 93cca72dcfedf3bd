"""Checks that every rank agrees on what is being sharded, before any bucket collective runs.

Ranks that disagree would otherwise deadlock, abort, or silently train apart. Each rank
contributes a small description to one ``all_gather_object`` (one per agreement group:
``Collectives.agreement_groups``); every rank then compares them and raises the same error,
naming the first difference, so no rank is left waiting. Compared:

- the settings that decide the layout, the state kinds and the collectives' sequence (stage,
  bucket size, skip_nonfinite...);
- each param's shape, dtype, group, whether it trains, and its name where the user gave names
  (``model.named_parameters()``: then same-shape params in another order are caught too);
- every key of every param group: what decides the layout or the state kind
  (``state_precision``, ``min_8bit_size``, GaLore's ``rank``) and the numbers that only change
  the update (``lr``, ``betas``, ``weight_decay``...), which would step each rank's shard
  differently.

Not compared: what may differ per rank by nature (``page_dir``, a local path). A problem only
one rank can see (its ``page_dir`` does not exist) travels in the same gather, so every rank
raises it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from .comm import Collectives

_MISSING = object()


class Description(NamedTuple):
    """What every rank must agree on about the params, as ``describe_params`` makes it.

    Attributes:
        params: one ``(group, shape, dtype, trainable, name or None)`` per param.
        groups: each group's keys but its params and names, as plain values.
    """

    params: list[tuple]  # (group, shape, dtype, trainable, name or None) per param
    groups: list[dict]  # each group's keys but its params and names, as plain values


@dataclass(frozen=True)
class TensorValue:
    """A tensor hyperparameter (torch.optim accepts a tensor lr), compared by value."""

    values: Any
    dtype: str

    def __repr__(self) -> str:
        return f"tensor({self.values})"


def describe_params(param_groups: list[dict]) -> Description:
    """What every rank must agree on about ``param_groups`` (small, picklable).

    Args:
        param_groups: the optimizer's param groups, defaults filled in.

    Returns:
        A ``Description`` for ``check_ranks_agree``.
    """
    params = []
    for g, group in enumerate(param_groups):
        names = group.get("param_names") or [None] * len(group["params"])
        params += [(g, tuple(p.shape), str(p.dtype).replace("torch.", ""), p.requires_grad,
                    name) for p, name in zip(group["params"], names)]
    groups = [{key: _plain(value) for key, value in group.items()
               if key not in ("params", "param_names")} for group in param_groups]
    return Description(params, groups)


def _plain(value) -> Any:
    """``value`` in a form that pickles small and compares by value on any rank."""
    if isinstance(value, torch.Tensor):
        return TensorValue(value.tolist(), str(value.dtype).replace("torch.", ""))
    if isinstance(value, (tuple, list)):
        return type(value)(_plain(v) for v in value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str, bytes, torch.dtype)):
        return value
    return f"<{type(value).__qualname__}>"  # an object: its address would differ per rank


def check_ranks_agree(comm: Collectives, params: Description, settings: dict[str, Any],
                      problem: str | None = None) -> None:
    """Raise the same error on every rank if the ranks disagree, or if any rank has a local
    ``problem``; return on every rank otherwise.

    Args:
        comm: the job's collectives.
        params: ``describe_params(optimizer.param_groups)``.
        settings: the optimizer's arguments that must be equal everywhere.
        problem: what is wrong on this rank only (validation.page_dir_problem), or None.

    Raises:
        ValueError: some rank has a ``problem`` (the first rank's, with its number).
        RuntimeError: the ranks disagree (the first difference, and the two ranks' values).
    """
    found = None  # (exception type name, message), once some rank found a difference
    for group in comm.agreement_groups():
        mine = (found, problem, params, settings, _job_rank(group))
        # The errors found in earlier groups travel too, so every rank raises the same one
        # (with (sharding, replication) groups, a rank whose own group agrees still learns of
        # a difference in another group, rather than waiting for ranks that have raised).
        views = [mine] if group.world_size == 1 else group.all_gather_object(mine)
        earlier = [view[0] for view in views if view[0] is not None]
        found = earlier[0] if earlier else _first_disagreement(views)
    if found is not None:
        kind, message = found
        raise (ValueError if kind == "ValueError" else RuntimeError)(message)


def _job_rank(group: Collectives) -> int:
    """This rank's number in the whole job, as messages name it (a group's own numbering
    differs for process groups that are not the whole job)."""
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else group.rank


def _first_disagreement(views: list[tuple]) -> tuple[str, str] | None:
    for _, problem, _, _, rank in views:
        if problem is not None:
            where = f"zeroopt: on rank {rank}: " if len(views) > 1 else "zeroopt: "
            return "ValueError", where + problem
    _, _, ref_params, ref_settings, ref = views[0]
    for _, _, rank_params, rank_settings, rank in views[1:]:
        for key in ref_settings:
            if not _equal(rank_settings.get(key), ref_settings[key]):
                return "RuntimeError", (
                    f"zeroopt: ranks disagree about {key}: rank {ref} has "
                    f"{ref_settings[key]!r}, rank {rank} has {rank_settings.get(key)!r}. Build "
                    "the optimizer with the same arguments on every rank.")
        difference = _first_difference(ref_params.params, rank_params.params, ref, rank)
        if difference:
            return "RuntimeError", (
                f"zeroopt: ranks disagree about the parameters: {difference}. Every rank must "
                "build the same model and pass the same params, in the same order, to the "
                "optimizer.")
        difference = _group_difference(ref_params.groups, rank_params.groups, ref, rank)
        if difference:
            return "RuntimeError", (
                f"zeroopt: ranks disagree about {difference}. Every rank must build the "
                "optimizer with the same param groups and hyperparameters: each rank steps "
                "its own shard with its own, so different values would train the ranks' "
                "shards differently (or lay the states out differently and hang).")
    return None


def _first_difference(ref: list[tuple], other: list[tuple], first: int,
                      rank: int) -> str | None:
    for i, (a, b) in enumerate(zip(ref, other)):
        if a != b:
            return (f"param {i} is {_fmt(a)} on rank {first} but {_fmt(b)} on rank {rank}")
    if len(ref) != len(other):
        return f"rank {first} has {len(ref)} params, rank {rank} has {len(other)}"
    return None


def _group_difference(ref: list[dict], other: list[dict], first: int,
                      rank: int) -> str | None:
    if len(ref) != len(other):
        return f"the param groups: rank {first} has {len(ref)}, rank {rank} has {len(other)}"
    for g, (a, b) in enumerate(zip(ref, other)):
        for key in [*a, *(k for k in b if k not in a)]:  # the first rank's order, then others'
            mine, theirs = a.get(key, _MISSING), b.get(key, _MISSING)
            if not _equal(mine, theirs):
                return (f"param group {g}'s {key!r}: rank {first} has {_show(mine)}, rank "
                        f"{rank} has {_show(theirs)}")
    return None


def _equal(a, b) -> bool:
    """Equal values: NaN equals NaN, and a tuple the list of the same values (betas)."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(map(_equal, a, b))
    return a == b


def _show(value) -> str:
    return "no such key" if value is _MISSING else repr(value)


def _fmt(desc: tuple) -> str:
    group, shape, dtype, trainable, name = desc
    return (f"{'' if name is None else repr(name) + ' '}shape {list(shape)} {dtype} in group "
            f"{group}{'' if trainable else ' (frozen)'}")
