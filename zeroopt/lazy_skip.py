"""What ``step()`` decides on the device on lazy backends (XLA), and the host settles later.

On eager backends ``step()`` reads ``isfinite(norm)`` on the host and returns early when the
norm is inf or nan, and the ranks agree on which params have gradients in one host-read
all-reduce (step_inputs.py). On XLA either read would cut the step's graph in two and run the
gradients' reduce-scatters twice (once for the read, once more for the update). So there the
step always runs, whole, and every tensor it writes is kept only where the step stands:
``t = torch.where(keep, t_new, t_old)``, inside the step's graph - as torch_xla's own optimizers
take ``found_inf`` into their update (``torch_xla.amp.syncfree``). ``keep`` is "the norm is
finite" (``skip_nonfinite``) and, with several replicas, "the replicas agreed on the params
with gradients" (``step_inputs.settle_on_device``).

What the host counts - per-param step counts, ``skipped_steps``, the hyperparameters a rule's
``before_step`` advances (schedule-free's weight sum) - is settled when the host next needs it:
at the next step, or when ``skipped_steps``, ``last_step_skipped``, a state dict or a checkpoint
is read. By then the step's graph has run, so reading its verdict runs nothing. A disagreement
raises then, on every replica alike, with the step undone.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Callable

import torch

log = logging.getLogger("zeroopt")


@dataclasses.dataclass
class Deferred:
    """One step whose writes are kept only where its verdict holds (see the module notes),
    awaiting the host's count of it.

    Attributes:
        verdict: bool tensor of 2 on the device, computed in the step's graph: whether the
            step's norm was finite (True when no norm was checked), and whether the replicas
            agreed on which params have gradients (True with one replica).
        restore_counts: puts the per-param step counts back as they were before the step
            (``Shard.restore_host_counts`` with what ``Shard.host_counts`` returned).
        group_changes: per param group, ``{key: value before the step}`` for every key the
            rule's ``before_step`` rebound.
        param_groups: the optimizer's param groups (written back when the step is undone).
        on_skipped: called once if the norm was not finite (counts the skip, logs it).
        on_disagreed: called once if the replicas disagreed, after the step is undone; it
            raises (``disagreement_error``).
    """

    verdict: torch.Tensor
    restore_counts: Callable[[], None]
    group_changes: list[dict]
    param_groups: list[dict]
    on_skipped: Callable[[], None]
    on_disagreed: Callable[[], None]

    def settle(self) -> bool:
        """Read the verdict (a host read of what the step's graph computed) and, if the step
        was not kept, undo its host-side counting. Returns True if it was skipped.

        Raises:
            RuntimeError: from ``on_disagreed``, when the replicas disagreed.
        """
        finite, agreed = self.verdict.cpu().tolist()
        if finite and agreed:
            return False
        self.restore_counts()
        for group, changes in zip(self.param_groups, self.group_changes):
            group.update(changes)
        if not agreed:
            self.on_disagreed()
        self.on_skipped()
        return True


def disagreement_error(used_counts: torch.Tensor, world_size: int, slots,
                       param_groups: list[dict]) -> RuntimeError:
    """The error for a step whose replicas disagreed on which params have gradients.

    Args:
        used_counts: per slot, on how many replicas the param had a gradient
            (``StepInputs.used_counts``, read after the step's graph ran).
        world_size: the replica count.
        slots: ``layout.slots`` (each slot's ``index`` is its state-dict index).
        param_groups: the optimizer's groups, for ``param_names`` where given.
    """
    names = [name for group in param_groups
             for name in (group.get("param_names") or [None] * len(group["params"]))]
    odd = [(slot, int(count)) for slot, count in zip(slots, used_counts.cpu().tolist())
           if 0 < count < world_size]
    listed = ", ".join(
        f"param {slot.index}{f' ({names[slot.index]})' if names[slot.index] else ''} "
        f"of shape {list(slot.param.shape)} on {count} of {world_size}"
        for slot, count in odd[:5]) + (f" and {len(odd) - 5} more" if len(odd) > 5 else "")
    return RuntimeError(
        f"zeroopt: the XLA replicas disagreed on which params had a gradient in the last "
        f"step: {listed} replicas had one. That step was not applied (every param and state "
        "is as before it). On XLA, step() takes each replica's own view of which params have "
        "gradients and checks it on the device, since agreeing on the host would cut the "
        "step's graph in two: give such a param a gradient on every replica (p.grad = "
        "torch.zeros_like(p) where it got none, which is what it counts as on eager "
        "backends), or on none")


class HeldStep:
    """A step on the device that is kept only where its verdict holds: what it saves before
    the step (the host's counts, the groups' values, a ``Guard`` of the device tensors), and
    the verdict it takes after it (``decide``).

    Args:
        shard: the optimizer's ``Shard`` (its step targets and host counts).
        param_groups: the optimizer's param groups.
    """

    def __init__(self, shard, param_groups: list[dict]):
        self._shard, self._param_groups = shard, param_groups
        self._counts = shard.host_counts()
        self._groups = groups_before(param_groups)
        self._guard = Guard(shard.step_targets(), shard.whole.states.entries)

    def decide(self, inputs, world_size: int, slots, on_skipped: Callable[[], None]) -> Deferred:
        """After the step: keep its writes only where the norm (``inputs.norm``, if taken) is
        finite and the replicas agreed on the params with gradients (``inputs.used_counts``,
        if set), all on the device.

        Args:
            inputs: the step's ``step_inputs.StepInputs``.
            world_size: the replica count.
            slots: ``layout.slots``, to name the params of a disagreement.
            on_skipped: counts a skip (called when the host finds the norm was not finite).

        Returns:
            The ``Deferred`` the host settles later (``Shard.settle_deferred``).
        """
        yes = torch.ones((), dtype=torch.bool, device=self._shard.device)
        finite = yes if inputs.norm is None else torch.isfinite(inputs.norm).reshape(())
        agreed = yes if inputs.used_counts is None else inputs.agreed(world_size)
        verdict = torch.stack([finite, agreed])
        self._guard.keep_if(verdict.all())
        slots, param_groups = list(slots), self._param_groups

        def disagreed() -> None:
            """Raise the disagreement, naming the params."""
            raise disagreement_error(inputs.used_counts, world_size, slots, param_groups)

        return Deferred(verdict, lambda: self._shard.restore_host_counts(self._counts),
                        changed_keys(self._groups, param_groups), param_groups, on_skipped,
                        disagreed)


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

    def keep_if(self, keep: torch.Tensor) -> None:
        """Everything keeps its new value where ``keep`` (0-d bool), else gets back the one
        it had: ``target.copy_(torch.where(keep, target, saved))``."""
        for target, saved in self._saved:
            target.copy_(torch.where(keep, target, saved))
        select_entries(self._entries, keep, self._saved_entries)
        self._saved, self._saved_entries = [], {}


def select_entries(entries: dict[int, dict], keep: torch.Tensor, saved: dict[int, dict]) -> None:
    """Per-tensor states (``TensorStates.entries``, written by replacing values as well as in
    place): each tensor, and each 8-bit ``Encoded``'s codes and scales, back to its value in
    ``saved`` (``snapshot_entries``, taken before the step) where ``keep`` is False. States
    the step created have no saved value; the host drops them if the step was skipped."""
    for index, entry in entries.items():
        for name, value in entry.items():
            old = saved.get(index, {}).get(name)
            if isinstance(value, torch.Tensor) and isinstance(old, torch.Tensor):
                entry[name] = torch.where(keep, value, old)
            elif dataclasses.is_dataclass(value) and dataclasses.is_dataclass(old):
                entry[name] = dataclasses.replace(value, **{
                    field: torch.where(keep, getattr(value, field), getattr(old, field))
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
