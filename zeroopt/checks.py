"""Checks that every rank agrees on what is being sharded, before any bucket collective runs.

Ranks that disagree about the params would otherwise deadlock (or silently corrupt each other)
in the first reduce. Each rank contributes a small description of its params and settings to
one ``all_gather_object``; every rank then compares them and raises the same error, naming the
first difference, so no rank is left waiting.
"""

from __future__ import annotations

from typing import Any

from .comm import Collectives


def describe_params(param_groups: list[dict]) -> list[tuple]:
    return [(g, tuple(p.shape), str(p.dtype).replace("torch.", ""), p.requires_grad)
            for g, group in enumerate(param_groups) for p in group["params"]]


def check_ranks_agree(comm: Collectives, params: list[tuple], settings: dict[str, Any]) -> None:
    for group in comm.agreement_groups():
        _check_group_agrees(group, params, settings)


def _check_group_agrees(comm: Collectives, params: list[tuple], settings: dict[str, Any]) -> None:
    if comm.world_size == 1:
        return
    views = comm.all_gather_object((params, settings))
    ref_params, ref_settings = views[0]
    for rank, (rank_params, rank_settings) in enumerate(views[1:], start=1):
        for key in ref_settings:
            if rank_settings.get(key) != ref_settings[key]:
                raise RuntimeError(
                    f"zeroopt: ranks disagree about {key}: rank 0 has {ref_settings[key]!r}, "
                    f"rank {rank} has {rank_settings.get(key)!r}. Build the optimizer with the "
                    "same arguments on every rank.")
        difference = _first_difference(ref_params, rank_params, rank)
        if difference:
            raise RuntimeError(
                f"zeroopt: ranks disagree about the parameters: {difference}. Every rank must "
                "build the same model and pass the same params, in the same order, to the "
                "optimizer.")


def _first_difference(ref: list[tuple], other: list[tuple], rank: int) -> str | None:
    for i, (a, b) in enumerate(zip(ref, other)):
        if a != b:
            return (f"param {i} is {_fmt(a)} on rank 0 but {_fmt(b)} on rank {rank}")
    if len(ref) != len(other):
        return f"rank 0 has {len(ref)} params, rank {rank} has {len(other)}"
    return None


def _fmt(desc: tuple) -> str:
    group, shape, dtype, trainable = desc
    return (f"shape {list(shape)} {dtype} in group {group}"
            f"{'' if trainable else ' (frozen)'}")
