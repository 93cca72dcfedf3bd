"""``skip_nonfinite`` on lazy backends (XLA): skipped on the device, counted on the host later.

On eager backends ``step()`` reads ``isfinite(norm)`` on the host and returns early when the
norm is inf or nan. On XLA that read would cut the step's graph in two and run the gradients'
reduce-scatters twice (once for the norm, once more for the update). So there the step always
runs, whole, and every tensor it writes is kept only where the norm is finite:
``t = torch.where(finite, t_new, t_old)``, inside the step's graph - as torch_xla's own
optimizers take ``found_inf`` into their update (``torch_xla.amp.syncfree``).

What the host counts - per-param step counts, ``skipped_steps``, the hyperparameters a rule's
``before_step`` advances (schedule-free's weight sum) - is settled when the host next needs it:
at the next step, or when ``skipped_steps``, ``last_step_skipped``, a state dict or a checkpoint
is read. By then the step's graph has run, so reading ``finite`` runs nothing.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Callable

import torch

log = logging.getLogger("zeroopt")


@dataclasses.dataclass
class Deferred:
    """One step whose writes are kept only if its gradient norm is finite (see the module
    notes), awaiting the host's count of it.

    Attributes:
        finite: 0-d bool tensor on the device: whether the step's norm was finite.
        restore_counts: puts the per-param step counts back as they were before the step
            (``Shard.restore_host_counts`` with what ``Shard.host_counts`` returned).
        group_changes: per param group, ``{key: value before the step}`` for every key the
            rule's ``before_step`` rebound.
        param_groups: the optimizer's param groups (written back on a skip).
        on_skipped: called once if the step turns out skipped (counts it, logs it).
    """

    finite: torch.Tensor
    restore_counts: Callable[[], None]
    group_changes: list[dict]
    param_groups: list[dict]
    on_skipped: Callable[[], None]

    def settle(self) -> bool:
        """Read whether the step was skipped (a host read of ``finite``) and, if so, undo
        its host-side counting. Returns True if it was skipped."""
        if bool(self.finite.cpu()):
            return False
        self.restore_counts()
        for group, changes in zip(self.param_groups, self.group_changes):
            group.update(changes)
        self.on_skipped()
        return True


class Guard:
    """The device side of one deferred step: copies of everything the step may write, taken
    before it, selected against after it.

    Args:
        targets: the tensors (any dtype, views included) the step may write in place.
        entries: the per-tensor states of whole params (``TensorStates.entries``), which a
            step also writes by replacing values.
    """

    def __init__(self, targets: list[torch.Tensor], entries: dict[int, dict]):
        self._saved = [(t, t.clone()) for t in targets]
        self._entries, self._saved_entries = entries, snapshot_entries(entries)

    def keep_if(self, finite: torch.Tensor) -> None:
        """Everything keeps its new value where ``finite`` (0-d bool), else gets back the one
        it had: ``target.copy_(torch.where(finite, target, saved))``."""
        for target, saved in self._saved:
            target.copy_(torch.where(finite, target, saved))
        select_entries(self._entries, finite, self._saved_entries)
        self._saved, self._saved_entries = [], {}


def select_entries(entries: dict[int, dict], finite: torch.Tensor, saved: dict[int, dict]) -> None:
    """Per-tensor states (``TensorStates.entries``, written by replacing values as well as in
    place): each tensor, and each 8-bit ``Encoded``'s codes and scales, back to its value in
    ``saved`` (``snapshot_entries``, taken before the step) where ``finite`` is False. States
    the step created have no saved value; the host drops them if the step was skipped."""
    for index, entry in entries.items():
        for name, value in entry.items():
            old = saved.get(index, {}).get(name)
            if isinstance(value, torch.Tensor) and isinstance(old, torch.Tensor):
                entry[name] = torch.where(finite, value, old)
            elif dataclasses.is_dataclass(value) and dataclasses.is_dataclass(old):
                entry[name] = dataclasses.replace(value, **{
                    field: torch.where(finite, getattr(value, field), getattr(old, field))
                    for field in ("codes", "absmax") if getattr(value, field) is not None})


def snapshot_entries(entries: dict[int, dict]) -> dict[int, dict]:
    """Copies of every per-tensor state's tensors (``Encoded``: its codes and scales), for
    ``select_entries``."""
    def copy(value):
        """A tensor's clone, an ``Encoded``'s with its codes and scales cloned; else itself."""
        if isinstance(value, torch.Tensor):
            return value.clone()
        if dataclasses.is_dataclass(value):
            return dataclasses.replace(value, codes=value.codes.clone(), absmax=None
                                       if value.absmax is None else value.absmax.clone())
        return value
    return {index: {name: copy(v) for name, v in entry.items()} for index, entry in entries.items()}


def groups_before(param_groups: list[dict]) -> list[dict]:
    """Shallow copies of the groups, to find what ``before_step`` rebinds (``changed_keys``)."""
    return [dict(group) for group in param_groups]


def changed_keys(before: list[dict], param_groups: list[dict]) -> list[dict]:
    """Per group, ``{key: old value}`` for each key rebound since ``groups_before``."""
    return [{k: old[k] for k in old if k in group and group[k] is not old[k]}
            for old, group in zip(before, param_groups)]
