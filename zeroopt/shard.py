"""This rank's part of the optimizer: everything it keeps for the elements it owns.

A ``Shard`` holds, for the chunks of every bucket this rank owns (``layout.py``):

- ``masters``: fp32 master weights of 16-bit buffers (fp32 buffers are their own masters: the
  update writes straight into the model's params), by buffer index;
- ``regions``: each flat buffer's optimizer states, in its kind's form (``states/``);
- ``scratch``: the fp32 windows non-resident states are decoded into (``shard_windows.py``);
- per-param step counts (torch.optim's ``state["step"]``);
- ``whole``: the params a rule steps whole (GaLore, Adafactor...) and their per-tensor states.

It cuts its groups into windows for the update rule, and says which params to step together
(``plan``). The optimizer decides the order of a step; the state-dict and checkpoint code read
and write the shard through these public names.

Offsets: a *region offset* indexes one buffer's part of the shard (``FlatBuffer.
region_offset``); shard offsets index the whole shard.
"""

from __future__ import annotations

import torch

from . import shard_windows
from .algorithms import ShardTensors, UpdateRule
from .layout import FlatBuffer, Layout
from .memory import StateBytes, shard_state_bytes
from .states.storage import RegionStates
from .whole_tensors import WholeTensors


class Shard:
    """The masters, states, windows and step counts of one rank's shard.

    Args:
        rule: the update rule (``zeroopt.algorithms.UpdateRule``).
        param_groups: the optimizer's param groups (hyperparameters filled in); read, never
            written.
        layout: this rank's ``Layout`` (buffers allocated, params already in them).
        grad: the fp32 gradient shard (``layout.shard_numel`` elements) the windows view;
            ``bind_gradients`` replaces it.
        device: the compute device.
        window_numel: elements per decode window (a multiple of 256).
        page_dir: directory of paged states' files (None: the temp directory).
        skip_nonfinite: layerwise groups skip a matrix whose gradient is not finite.
    """

    def __init__(self, rule: UpdateRule, param_groups: list[dict], layout: Layout,
                 grad: torch.Tensor, device: torch.device, window_numel: int,
                 page_dir: str | None, skip_nonfinite: bool):
        self.rule, self.param_groups, self.layout = rule, param_groups, layout
        self.grad, self.device = grad, device
        self.window_numel, self.page_dir = window_numel, page_dir
        self.masters: dict[int, torch.Tensor] = {}
        self.regions: list[RegionStates] = []
        self._step_counts: list[int] = []
        self._window_cache: dict[tuple[int, frozenset[int]], list[shard_windows.Window]] = {}
        self.deferred = None  # lazy_skip.Deferred: the last step, its skip not yet counted
        self._add_buffers(0)
        self.whole = WholeTensors(self, skip_nonfinite)
        for g in range(len(param_groups)):
            self.set_initial_values(g, self.windows_for(g, self.positions_in_group[g]))

    # -- growing: construction, and params unfrozen later -----------------------------------

    def _add_buffers(self, first: int) -> None:
        """Masters, regions, step counts for the layout's buffers from ``first`` on."""
        self.masters.update(self._make_masters(first))
        self.regions += [RegionStates(self._state_names_in(buffer), self.rule.nonnegative_states,
                                      buffer.shard_numel, buffer.kind, self.device,
                                      self.page_dir)
                         for buffer in self.layout.buffers[first:]]
        self.scratch = self._make_scratch()
        self._step_counts += [0] * (len(self.layout.slots) - len(self._step_counts))
        self.positions_in_group = [[k for k, slot in enumerate(self.layout.slots)
                                    if slot.group == g] for g in range(len(self.param_groups))]
        self._window_cache.clear()
        self.record_versions()

    def extend(self, first: int, grad: torch.Tensor) -> None:
        """Take in the buffers ``first`` on, which ``Layout.extend`` added (params unfrozen
        after construction), with fresh states; ``grad`` is the grown gradient shard."""
        self._add_buffers(first)
        self.bind_gradients(grad)

    def bind_gradients(self, grad: torch.Tensor) -> None:
        """View ``grad`` as the gradient shard from now on (a new gradient source)."""
        self.grad = grad
        self._window_cache.clear()
        self.whole.build()

    def _make_scratch(self) -> dict[str, torch.Tensor]:
        """The fp32 windows the non-resident states are decoded into: no larger than needed."""
        largest = max([b.shard_numel for b in self.layout.buffers if not b.kind.in_place],
                      default=0)
        return {name: torch.zeros(min(self.window_numel, largest), device=self.device)
                for name in self.rule.state_names(self.param_groups)}

    def _make_masters(self, first: int = 0) -> dict[int, torch.Tensor]:
        """fp32 copies of the owned chunks of the 16-bit buffers from ``first`` on."""
        masters = {}
        for buffer in self.layout.buffers[first:]:
            if buffer.dtype == torch.float32:
                continue
            master = torch.empty(buffer.shard_numel, dtype=torch.float32, device=self.device)
            for bucket in buffer.buckets:
                at = buffer.region_offset(bucket.shard_offset)
                master[at:at + bucket.chunk_numel].copy_(
                    self.layout.owned_view(buffer.data, bucket))
            masters[buffer.index] = master
        return masters

    def _state_names_in(self, buffer: FlatBuffer) -> tuple[str, ...]:
        """The flat states of the groups with params in ``buffer`` (whole params keep theirs
        per tensor)."""
        groups = {slot.group for slot in self.layout.slots if slot.buffer == buffer.index}
        return self.rule.state_names([self.param_groups[g] for g in sorted(groups)])

    # -- the fp32 masters -----------------------------------------------------------------

    def master_view(self, buffer: FlatBuffer, offset: int, numel: int) -> torch.Tensor:
        """The fp32 master of ``numel`` shard elements from shard offset ``offset`` (all in
        one bucket's chunk of ``buffer``): the model's own fp32 buffer, or the master copy of
        a 16-bit one."""
        if buffer.index in self.masters:
            at = buffer.region_offset(offset)
            return self.masters[buffer.index][at:at + numel]
        bucket = next(b for b in buffer.buckets
                      if b.shard_offset <= offset < b.shard_offset + b.chunk_numel)
        at = bucket.owned_range(self.layout.rank)[0] + offset - bucket.shard_offset
        return buffer.data[at:at + numel]

    @torch.no_grad()
    def refresh_masters(self) -> None:
        """Take the fp32 masters of 16-bit params from the params again, wholly (in place:
        the windows view them)."""
        for index, master in self._make_masters().items():
            self.masters[index].copy_(master)
        self.record_versions()

    @torch.no_grad()
    def sync_masters(self) -> None:
        """Take into the masters what was written into 16-bit params outside the optimizer
        since ``record_versions`` (``model.load_state_dict``, a model-only checkpoint load, an
        in-place edit): the master of a param written so becomes its value. Found by the
        params' version counters, which every in-place write bumps except one through
        ``p.data`` (``refresh_masters`` then)."""
        changed = {slot for slot, version in self._versions if slot.param._version != version}
        if not changed:
            return
        for piece in self.layout.pieces:
            if piece.slot in changed:
                buffer = self.layout.buffers[piece.slot.buffer]
                self.master_view(buffer, piece.shard_offset, piece.numel).copy_(
                    piece.slot.param.detach().reshape(-1)[
                        piece.param_offset:piece.param_offset + piece.numel])
        self.record_versions()

    def record_versions(self) -> None:
        """Remember the version counters of the 16-bit params: the optimizer itself wrote
        them last (it writes through the flat buffers, which bump no param's counter)."""
        self._versions = [(slot, slot.param._version) for slot in self.layout.slots
                          if slot.buffer in self.masters]

    @torch.no_grad()
    def write_masters_into_params(self) -> None:
        """Copy the 16-bit buffers' masters, rounded, into this rank's chunks of the buffers
        (the all-gather then spreads them)."""
        for index, master in self.masters.items():
            buffer = self.layout.buffers[index]
            for bucket in buffer.buckets:
                at = buffer.region_offset(bucket.shard_offset)
                self.layout.owned_view(buffer.data, bucket).copy_(
                    master[at:at + bucket.chunk_numel])

    # -- step counts ----------------------------------------------------------------------

    def param_steps(self) -> torch.Tensor:
        """torch.optim's per-param ``step`` counts, fp32, indexed by state_dict index (0 for
        params never stepped and params not trained)."""
        self.settle_deferred()
        counts = torch.zeros(sum(len(g["params"]) for g in self.param_groups))
        for slot, count in zip(self.layout.slots, self._step_counts):
            counts[slot.index] = float(count)
        return counts

    def load_param_steps(self, counts) -> None:
        """Set the per-param step counts from ``counts[state_dict index]`` (a sequence or a
        dict, as ``param_steps()`` returns)."""
        self.settle_deferred()
        for k, slot in enumerate(self.layout.slots):
            self._step_counts[k] = int(counts[slot.index])

    # -- skip_nonfinite on lazy backends (lazy_skip.py) ----------------------------------

    def step_targets(self) -> list[torch.Tensor]:
        """Every tensor a step writes in place: the 16-bit params' masters, every region's
        stored states, this rank's chunks of the fp32 flat buffers (the params themselves)
        and the whole params it owns."""
        targets = list(self.masters.values())
        for region in self.regions:
            targets += list(region.tensors.values())
        for buffer in self.layout.buffers:
            if buffer.index not in self.masters:
                targets += [self.layout.owned_view(buffer.data, bucket)
                            for bucket in buffer.buckets]
        return targets + [owned.param for owned in self.whole.all_owned()]

    def host_counts(self) -> tuple[list[int], dict[int, int]]:
        """The step counts the host keeps (per flat param, per whole param's state), for
        ``restore_host_counts``."""
        return list(self._step_counts), self.whole.host_counts()

    def restore_host_counts(self, counts: tuple[list[int], dict[int, int]]) -> None:
        """Put back what ``host_counts`` returned (params laid out since keep their counts)."""
        flat, whole = counts
        self._step_counts[:len(flat)] = flat
        self.whole.restore_host_counts(whole)

    def settle_deferred(self) -> None:
        """Count the last step if its skip was decided on the device (``self.deferred``, a
        ``lazy_skip.Deferred``): a host read, once."""
        deferred, self.deferred = self.deferred, None
        if deferred is not None:
            deferred.settle()

    def stepped(self) -> list[int]:
        """Positions (in ``layout.slots``) of the params stepped at least once."""
        return [k for k, count in enumerate(self._step_counts) if count]

    # -- windows and the step's plan ------------------------------------------------------

    def rebuild_windows(self) -> None:
        """Forget the cached windows: the groups' hyperparameters (which states) changed."""
        self._window_cache.clear()
        self.whole.build()

    def windows_for(self, g: int, positions) -> list[shard_windows.Window]:
        """Group ``g``'s part of the shard for the slots at ``positions`` (``layout.slots``
        order), cut into windows (see shard_windows): merged runs for element-wise groups, one
        piece per param for groups whose rule needs whole-param statistics, none for groups
        stepped whole (whole_tensors.py). Cached: the set of params with gradients rarely
        changes from one step to the next."""
        key = (g, frozenset(positions))
        if key in self._window_cache:
            return self._window_cache[key]
        group = self.param_groups[g]
        slots = {self.layout.slots[k] for k in key[1]}
        if self.rule.whole_tensors(group):
            windows = []
        else:
            if self.rule.per_tensor(group):
                template = self._per_param_facts(g)
                dense = {index: k for k, index in enumerate(self._trainable_indices(g))}
                spans = [(p.slot.buffer, p.shard_offset, p.numel, dense[p.slot.index])
                         for p in self.layout.padded_pieces if p.slot in slots]
            else:
                template = ShardTensors([], [])
                spans = [(run.bucket.buffer, run.shard_offset, run.numel, None)
                         for run in self.layout.runs(slots)]
            windows = shard_windows.build_windows(
                spans, self.layout, self.regions, self.rule.states(group), self.master_view,
                self.grad, self.scratch, self.window_numel, template)
        if len(self._window_cache) > 64:  # params used at random (say, experts): stay bounded
            self._window_cache.clear()
        self._window_cache[key] = windows
        return windows

    def set_initial_values(self, g: int, windows: list[shard_windows.Window]) -> None:
        """States that do not start at zero (Adagrad's accumulator, schedule-free's z), set
        when a param is first stepped (so z copies the weights it starts from, loaded or not)
        and at construction."""
        starts = self.rule.initial_values(self.param_groups[g])
        if starts:
            shard_windows.run(windows, initial_fill(starts), load=False, store=True)

    def plan(self, active: frozenset[int]) -> list[list[tuple[torch.Tensor, list]]]:
        """Advance the step counts of the params at ``active`` (positions with a gradient on
        some rank) and return, per group, the classes of params to step together: equal step
        counts (torch.optim's per-param ``step``), as ``(step, windows)``. Almost always one
        class per group. A class's first step sets its initial values. Params stepped during
        backward since the last step (whole_tensors.py) are left out."""
        self.settle_deferred()
        plan = []
        for g, positions in enumerate(self.positions_in_group):
            by_count: dict[int, list[int]] = {}
            for k in positions:
                if k in active and k not in self.whole.stepped_positions:
                    by_count.setdefault(self._step_counts[k], []).append(k)
            classes = []
            for count, members in sorted(by_count.items()):
                windows = self.windows_for(g, members)
                if count == 0:  # first step of these params: their states start now
                    self.set_initial_values(g, windows)
                for k in members:
                    self._step_counts[k] = count + 1
                classes.append((torch.tensor(float(count + 1)), windows))
            plan.append(classes)
        return plan

    def statistics_partials(self, plan) -> list[torch.Tensor | None]:
        """Per group, this rank's partial sums of the whole-param statistics its rule needs
        (LAMB/LARS norms, cautious counts: ``UpdateRule.statistics``, shaped ``[k,
        num_params]``), or None for groups that need none; ``plan`` is what ``plan()``
        returned. A rank with no active piece in a group still gives zeros of the right
        shape, so every rank's all-reduce has the same length."""
        partials = []
        for g, (group, classes) in enumerate(zip(self.param_groups, plan)):
            if not self.rule.per_tensor(group):
                partials.append(None)
                continue
            uses = self.rule.statistics_use_states
            parts = [] if classes else [self.rule.statistics(
                group, self.windows_for(g, ())[0].shard, torch.tensor(1.0))]
            for step, windows in classes:
                parts += shard_windows.run(windows, lambda shard: self.rule.statistics(
                    group, shard, step), load=uses, store=uses)
            partials.append(torch.stack(parts).sum(0))
        return partials

    def _trainable_indices(self, g: int) -> list[int]:
        """State-dict indices of group ``g``'s params in the layout, in group order."""
        return sorted(self.layout.slots[k].index for k in self.positions_in_group[g])

    def _per_param_facts(self, g: int) -> ShardTensors:
        trainable = self._trainable_indices(g)
        slots = {slot.index: slot for slot in self.layout.slots}
        names = self.param_groups[g].get("param_names")
        first = sum(len(group["params"]) for group in self.param_groups[:g])
        return ShardTensors(
            [], [], num_params=len(trainable),
            param_numel=torch.tensor([slots[i].numel for i in trainable], dtype=torch.float64),
            param_names=[names[i - first] if names else None for i in trainable])

    # -- accounting -----------------------------------------------------------------------

    def memory(self) -> StateBytes:
        """This shard's memory by part (zeroopt.memory): states, paged states, fp32 masters,
        decode windows."""
        return shard_state_bytes(self)


def initial_fill(starts: dict[str, float | str]):
    """The function that sets states to their start values (a number, or ``"param"`` for a
    copy of the param) over one window's ``ShardTensors``; ``UpdateRule.initial_values``
    gives ``starts``."""
    def fill(shard: ShardTensors) -> None:
        for name, value in starts.items():
            for state, param in zip(shard.states[name], shard.params):
                state.copy_(param) if value == "param" else state.fill_(value)

    return fill
