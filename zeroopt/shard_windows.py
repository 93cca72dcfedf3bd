"""How a param group's part of the shard is handed to its update rule: in windows.

Resident 32-bit states are stepped in place: the group's whole part of such a region is one
window of views (params, gradients, states), as torch's multi-tensor kernels like it. States in
any other form (8-bit, bf16, paged) are decoded into fp32 scratch one window at a time, stepped
by the same rule code, and encoded back, so the fp32 working set (and, paged, the resident
state) never exceeds the window:

    for each window: prefetch the next one; decode its states; step; encode; release its pages

A window holds ``window_numel`` elements at most, cut on 256-element boundaries (8-bit blocks
never split). For tensor-wise rules every entry is one param's piece (``ShardTensors``).

Plain Adam and AdamW with 8-bit states on the CPU take one C call per window instead: it decodes,
steps and encodes (``states/adam8bit.py``), with the same results bit for bit. ``run`` takes it
per window where ``one_pass_adam`` offers it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from .algorithms import ShardTensors, adam, adamw_options, variants
from .states import adam8bit
from .states.storage import RegionStates


@dataclass(eq=False)
class Window:
    """One window: a stretch of a param group's part of the shard, stepped as one
    ``ShardTensors``.

    Attributes:
        shard: the flat fp32 params, gradients and states the rule steps; its states are
            views of the region (in place) or of ``scratch``.
        region: the ``RegionStates`` its states are decoded from and encoded into, or None
            when it is stepped in place (resident 32-bit states).
        io: ``[region offset, scratch offset, numel]`` of each contiguous stretch to decode
            and encode (elements).
        scratch: per state name, the fp32 scratch tensor its states are decoded into (shared
            by the windows; empty when in place).
        numel: elements in the window so far: at most the ``window_numel`` it was cut with,
            except in place, where no bound applies.
    """

    shard: ShardTensors
    region: RegionStates | None = None  # None: stepped in place, nothing to decode
    # (region offset, scratch offset, numel): contiguous stretches to decode and encode
    io: list[list[int]] = field(default_factory=list)
    scratch: dict[str, torch.Tensor] = field(default_factory=dict)
    numel: int = 0
    # one_pass_adam's plan, made at its first use: the ids of the region's stored tensors and
    # an adam8bit.Stretch per stretch of io; False where the window does not qualify
    _one_pass: tuple | bool | None = field(default=None, repr=False)

    def prefetch(self) -> None:
        """Ask for the pages of this window's states ahead of use (paged states:
        ``RegionStates.prefetch``); nothing when in place."""
        if self.region is not None:
            for lo, _, n in self.io:
                self.region.prefetch(lo, n)

    def load(self) -> None:
        """Decode this window's states from its region into ``scratch`` (fp32); nothing when
        in place."""
        if self.region is not None:
            for name in self.shard.states:
                for lo, at, n in self.io:
                    self.region.load(name, lo, self.scratch[name][at:at + n])

    def store(self) -> None:
        """Encode the fp32 states in ``scratch`` back into the region; nothing when in
        place."""
        if self.region is not None:
            for name in self.shard.states:
                for lo, at, n in self.io:
                    self.region.store(name, lo, self.scratch[name][at:at + n])

    def release(self) -> None:
        """Drop this window's state pages from the process (paged states:
        ``RegionStates.release``); nothing when in place."""
        if self.region is not None:
            for lo, _, n in self.io:
                self.region.release(lo, n)

    def step_8bit_adam(self, hyperparameters) -> bool:
        """Step this window with the one-call 8-bit Adam(W) kernel, from and into its region's
        stored codes (the scratch is its working space), if it qualifies: 8-bit CPU states
        ``exp_avg`` (signed) and ``exp_avg_sq`` (non-negative), contiguous fp32 CPU params,
        gradients and scratch.

        Args:
            hyperparameters: ``adam8bit.hyper(...)`` of the window's group and step.

        Returns:
            Whether it stepped the window (False: nothing was touched).
        """
        # the stored tensors by identity (the plan keeps them alive, so no id is reused)
        stored = tuple(map(id, self.region.tensors.values())) if self.region else ()
        if self._one_pass is None or (self._one_pass and self._one_pass[0] != stored):
            self._one_pass = self._one_pass_plan(stored)  # first use, or states replaced
        if not self._one_pass:
            return False
        for stretch in self._one_pass[1]:
            stretch.step(hyperparameters)
        return True

    def _one_pass_plan(self, stored: tuple[int, ...]) -> tuple | bool:
        """(``stored``: the ids of the region's stored tensors, one ``adam8bit.Stretch`` per
        stretch of io), or False where the window does not qualify."""
        region = self.region
        if (region is None or region.kind.precision != "8bit" or region.device.type != "cpu"
                or tuple(self.shard.states) != adam8bit.STATES
                or region.signed != {"exp_avg": True, "exp_avg_sq": False}):
            return False
        if not all(t.dtype is torch.float32 and t.is_cpu and t.is_contiguous()
                   for t in (*self.shard.params, *self.shard.grads, *self.scratch.values())):
            return False
        if not adam8bit.available():  # built at the first 8-bit window
            return False
        starts = [0]
        for param in self.shard.params:
            starts.append(starts[-1] + param.numel())
        stretches = []
        m_scratch, v_scratch = (self.scratch[name] for name in adam8bit.STATES)
        for lo, at, n in self.io:  # whole entries: add() never splits one across stretches
            first, last = starts.index(at), starts.index(at + n)
            (m, m_absmax), (v, v_absmax) = (region.blocks(name, lo, n)
                                            for name in adam8bit.STATES)
            stretches.append(adam8bit.Stretch(
                self.shard.params[first:last], self.shard.grads[first:last], (m, v),
                (m_absmax, v_absmax), (m_scratch[at:at + n], v_scratch[at:at + n])))
        return stored, stretches

    def add(self, param: torch.Tensor, grad: torch.Tensor, region_lo: int,
            direct: dict[str, torch.Tensor] | None) -> None:
        """Append one stretch: its params and gradients, and its states (``direct`` views for
        in-place regions, else scratch)."""
        n = param.numel()
        self.shard.params.append(param)
        self.shard.grads.append(grad)
        for name, states in self.shard.states.items():
            states.append(direct[name] if direct else self.scratch[name][self.numel:self.numel + n])
        if direct is None:
            last = self.io[-1] if self.io else None
            if last and last[0] + last[2] == region_lo and last[1] + last[2] == self.numel:
                last[2] += n
            else:
                self.io.append([region_lo, self.numel, n])
        self.numel += n


def run(windows: list[Window], fn: Callable[[ShardTensors], object], *, load: bool,
        store: bool, direct: Callable[[Window], bool] | None = None) -> list:
    """``fn`` over every window, decoding states first if ``load`` and encoding them after if
    ``store``; the next window's pages are requested while this one is stepped.

    Args:
        windows: the windows (``build_windows``).
        fn: the step of one window's ``ShardTensors``; its results are returned.
        load, store: decode the states before ``fn``, encode them after it.
        direct: with ``load`` and ``store``, tried first on each window: a step straight from
            the stored states, True if it stepped the window (then no decoding, ``fn`` or
            encoding, and None is its result): ``one_pass_adam``'s. None (default): none.

    Returns:
        Per window, what ``fn`` returned (None where ``direct`` stepped it).
    """
    results = []
    direct = direct if load and store else None
    for i, window in enumerate(windows):
        if load and i + 1 < len(windows):
            windows[i + 1].prefetch()
        if direct is not None and direct(window):
            results.append(None)
        else:
            if load:
                window.load()
            results.append(fn(window.shard))
            if store:
                window.store()
        if load or store:
            window.release()
    return results


def one_pass_adam(rule, group: dict, step: torch.Tensor,
                  stats=None) -> Callable[[Window], bool] | None:
    """``run``'s ``direct`` for a group whose step is plain Adam or AdamW (torch's fused kernel:
    no option of variants.py or adamw_options.py, no statistics): each window with 8-bit CPU
    states is stepped in one kernel call (``Window.step_8bit_adam``), the others as usual.

    Args:
        rule: the optimizer's ``UpdateRule``.
        group: the param group.
        step: the class's step count, already advanced (0-d tensor).
        stats: the statistics phase's result, if any (then None is returned).

    Returns:
        The per-window step, or None where it does not apply. (A window it cannot take, or
        every window where the kernel is unavailable (``adam8bit.available``: ZEROOPT_NATIVE=0,
        no compiler, or no match with torch here), it leaves to the usual path.)
    """
    if stats is not None or rule.fused_step not in (adam.ADAMW.fused_step, adam.ADAM.fused_step):
        return None
    if adamw_options.any_option(group) or variants.any_option(group):
        return None
    hyperparameters = adam8bit.hyper(group, step, rule.fused_step is adam.ADAMW.fused_step)
    return lambda window: window.step_8bit_adam(hyperparameters)


def window_numel_for(window_numel: int | None, device: torch.device) -> int:
    """The elements per window.

    Args:
        window_numel: the user's choice, or None for the default: 2**18 (~256K) on CPU, where
            the window's working set stays in cache; 2**22 (4M) on accelerators (fewer,
            larger transfers and launches).
        device: the compute device.

    Returns:
        ``window_numel`` or the default.

    Raises:
        ValueError: not a positive multiple of 256 (whole 8-bit blocks).
    """
    from .states.blockwise import BLOCK

    if window_numel is None:
        window_numel = 1 << 18 if device.type == "cpu" else 1 << 22
    if not isinstance(window_numel, int) or window_numel < BLOCK or window_numel % BLOCK:
        raise ValueError(f"window_numel must be a positive multiple of {BLOCK} (whole 8-bit "
                         f"blocks), got {window_numel!r}")
    return window_numel


Span = tuple[int, int, int, "int | None"]  # (buffer, shard offset, numel, param index or None)


def build_windows(spans: list[Span], layout, regions: list[RegionStates], names: tuple[str, ...],
                  master_view, grads: torch.Tensor, scratch: dict[str, torch.Tensor],
                  window_numel: int, template: ShardTensors) -> list[Window]:
    """Cut one group's spans into windows. ``template`` carries the group's per-param facts
    (tensor-wise rules); each window gets its own ``param_index``."""
    windows: list[Window] = []
    current, indices = None, []
    for buffer_index, offset, numel, param in spans:
        buffer = layout.buffers[buffer_index]
        region, in_place = regions[buffer_index], buffer.kind.in_place
        while numel:
            if current is None or current.region is not (None if in_place else region) \
                    or (not in_place and current.numel == window_numel):
                current = _new_window(windows, indices, template, names, None if in_place
                                      else region, scratch)
            take = numel if in_place else min(numel, window_numel - current.numel)
            lo = buffer.region_offset(offset)
            direct = {name: region.view(name, lo, take) for name in names} if in_place else None
            current.add(master_view(buffer, offset, take), grads[offset:offset + take], lo,
                        direct)
            indices[-1].append(param)
            offset, numel = offset + take, numel - take
    if not windows:  # nothing here: one empty window, so tensor-wise statistics still run
        _new_window(windows, indices, template, names, None, scratch)
    for window, index in zip(windows, indices):
        if template.num_params:
            window.shard.param_index = torch.tensor(index, dtype=torch.long)
    return windows


def _new_window(windows, indices, template, names, region, scratch) -> Window:
    shard = ShardTensors([], [], {name: [] for name in names}, None, template.num_params,
                         template.param_numel, template.param_names)
    window = Window(shard, region, scratch={n: scratch[n] for n in names} if region else {})
    windows.append(window)
    indices.append([])
    return window
