"""ZeroOptimizer: optimizer state sharded across data-parallel ranks (ZeRO stage 1 and 2).

Example (``torchrun --nproc_per_node 2 train.py``; also runs as plain ``python train.py``)::

    import torch, zeroopt
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1))
    opt = zeroopt.ZeroOptimizer(model.parameters(), optimizer="adamw", stage=2, lr=1e-3)
    for x, y in batches:                       # each rank its own data
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()                        # gradients reduced bucket by bucket, overlapped
        opt.clip_grad_norm_(1.0)               # global norm over every rank's shard
        opt.step()                             # fused update of this rank's shard, params gathered
        opt.zero_grad()

What happens, per step: backward's gradients are averaged across ranks into each rank's fp32
gradient shard (``grad_sync``); step() updates only that shard (fp32 master weights and states,
``algorithms``), then all-gathers the updated params back into the model (``layout`` says who
owns what). The model must not be wrapped in DistributedDataParallel: the optimizer averages the
gradients itself. For a model that is (stage 1 only), pass ``average_grads=False``.

Notes for users:
- Construct the optimizer after moving the model to its device and dtype: the model's trainable
  params become views into flat buffers (``model.to(...)`` afterwards would detach them).
- ``param.grad`` is consumed during backward (it is None afterwards); use
  ``opt.clip_grad_norm_`` rather than ``torch.nn.utils.clip_grad_norm_``.
- A param with no gradient on a rank counts as a zero gradient there (as in DistributedDataParallel).
- ``state_dict()`` is a collective: call it on every rank. For checkpoints, prefer
  ``zeroopt.save_checkpoint`` (every rank writes its own part; loads at any world size).
- ``backend`` ("nccl", "gloo", "mpi", "xla", "hccl"; or ZEROOPT_BACKEND) overrides the one that
  follows the params' device; ``shard_size=S`` shards over groups of S ranks and replicates
  across groups (HSDP-style; ``comm/hierarchical.py``).
- ``timeout`` (seconds, or a datetime.timedelta; default None) bounds every wait of the
  optimizer's collectives: a rank that hangs or dies then stops the others with
  ``zeroopt.comm.CollectiveTimeout`` naming the timeout (and the rank waited on, where known),
  instead of a hang until the process group's own timeout (``init_process_group(timeout=...)``,
  30 minutes by default), which still bounds torch's own calls. If the optimizer makes the
  process group itself (launched by torchrun, none made yet), the group gets this timeout too.
- At construction the ranks check, in one all-gather, that they agree about everything that
  decides the layout, the state kinds, the collectives and the update (params, their order and
  names, every param group's hyperparameters, stage, bucket size...): ranks that disagree all
  get one error naming the first difference.
"""

from __future__ import annotations

import logging
import weakref

import torch

from . import state_dict as state_io
from . import shard_windows
from .algorithms import ShardTensors, get_preset
from .algorithms.base import resolve_defaults
from .checks import check_ranks_agree, describe_params
from .comm import collectives_for, split
from .grad_sync import BucketedReducer, LocalGradients
from .layout import DEFAULT_BUCKET_NUMEL, Layout
from .states import kinds
from .states.storage import RegionStates
from .validation import check_group_keys, check_options, check_params, page_dir_problem
from .whole_tensors import WholeTensors

log = logging.getLogger("zeroopt")


class ZeroOptimizer(torch.optim.Optimizer):
    def __init__(self, params, optimizer: str = "adamw", *, stage: int = 1,
                 process_group=None, backend: str | None = None, shard_size: int | None = None,
                 average_grads: bool = True,
                 bucket_numel: int = DEFAULT_BUCKET_NUMEL,
                 reduce_dtype: torch.dtype = torch.float32, skip_nonfinite: bool = True,
                 window_numel: int | None = None, page_dir: str | None = None,
                 timeout=None, **hyperparameters):
        stage, bucket_numel, window_numel = check_options(stage, bucket_numel, window_numel)
        if stage not in (1, 2):
            raise ValueError(f"stage must be 1 (shard optimizer states) or 2 (states and "
                             f"gradients), got {stage!r}")
        if stage == 2 and not average_grads:
            raise ValueError("average_grads=False (a model wrapped in DDP) works with stage=1 "
                             "only: DDP keeps full gradients, which stage 2 exists to avoid")
        if bucket_numel < 1:
            raise ValueError(f"bucket_numel must be positive, got {bucket_numel}")
        self.rule, preset = get_preset(optimizer)
        self.stage, self.skip_nonfinite = stage, skip_nonfinite
        self._constructed = False
        params = check_params(params)  # complex, meta, a tensor twice
        super().__init__(params, resolve_defaults(self.rule, {**preset, **hyperparameters}))
        for group in self.param_groups:
            self.rule.validate(group)
            kinds.validate(group, self.rule)
        check_group_keys(self.param_groups, self.rule)

        trainable = [[(i, p) for i, p in _indexed(self.param_groups, g) if p.requires_grad]
                     for g in range(len(self.param_groups))]
        if not any(trainable):
            raise ValueError("ZeroOptimizer got no trainable params (all have requires_grad=False)")
        self._claim(p for group in trainable for _, p in group)  # local checks before collectives
        self.device = next(p for group in trainable for _, p in group).device
        self.comm = collectives_for(self.device, process_group, backend, timeout)
        check_ranks_agree(self.comm, describe_params(self.param_groups), dict(
            optimizer=self.rule.name, stage=stage, average_grads=average_grads,
            bucket_numel=bucket_numel, reduce_dtype=str(reduce_dtype), shard_size=shard_size,
            skip_nonfinite=skip_nonfinite), problem=page_dir_problem(page_dir))
        if shard_size is not None:  # shard within groups, replicate across them
            self.comm = split(self.comm, shard_size)

        self.layout = Layout(trainable, self.comm.world_size, self.comm.rank, bucket_numel,
                             kind_of=lambda g, p: kinds.kind_of(
                                 self.param_groups[g], p.numel(),
                                 self.rule.whole_tensors(self.param_groups[g])))
        self.layout.allocate_param_buffers()
        for buffer in self.layout.buffers:  # every rank starts from rank 0's params, as DDP does
            self.comm.broadcast(buffer.data, src=0)
        self._masters = self._make_masters()
        names = self.rule.state_names(self.param_groups)
        self._regions = [RegionStates(self._state_names_in(buffer), self.rule.nonnegative_states,
                                      buffer.shard_numel, buffer.kind, self.device, page_dir)
                         for buffer in self.layout.buffers]
        self.window_numel = _window_numel(window_numel, self.device)
        # fp32 windows the non-resident states are decoded into: no larger than needed
        largest = max([b.shard_numel for b in self.layout.buffers if not b.kind.in_place],
                      default=0)
        self._scratch = {name: torch.zeros(min(self.window_numel, largest), device=self.device)
                         for name in names}
        self._steps = [torch.zeros((), dtype=torch.float32) for _ in self.param_groups]
        self.grads = (BucketedReducer(self.layout, self.comm, keep_staging=stage == 1,
                                      reduce_dtype=reduce_dtype, device=self.device)
                      if average_grads else LocalGradients(self.layout, self.device))
        weakref.finalize(self, self.grads.remove_hooks)  # a dead optimizer takes no more grads
        self._windows = self._windows_per_group()
        self._whole = WholeTensors(self)
        if self._whole.layerwise_in_bucket and average_grads:
            self.grads.on_reduced = self._whole.on_bucket_reduced
        self._set_initial_values()
        self._grad_norm: torch.Tensor | None = None  # from clip_grad_norm_, reused by step()
        self.skipped_steps = 0
        self.last_step_skipped = False
        self._constructed = True

    # -- construction helpers -------------------------------------------------------------

    def _claim(self, params) -> None:
        """Each param can feed one ZeroOptimizer: a second one's hooks would find its
        gradient already taken."""
        params = list(params)
        for p in params:
            owner = getattr(p, "_zeroopt_owner", None)
            if owner is not None and owner() is not None:
                raise RuntimeError(
                    f"a param of shape {list(p.shape)} already belongs to another ZeroOptimizer; "
                    "give each param to one optimizer (delete the old one first, or put both "
                    "sets of params in one optimizer as param groups)")
        for p in params:
            p._zeroopt_owner = weakref.ref(self)

    @torch.no_grad()
    def refresh_masters(self) -> None:
        """Take the fp32 masters of 16-bit params from the params again, after something other
        than the optimizer changed them (a model-only load). In place: the step views them."""
        for index, master in self._make_masters().items():
            self._masters[index].copy_(master)

    def _make_masters(self) -> dict[int, torch.Tensor]:
        """fp32 master copies of the owned chunks of 16-bit buffers (fp32 buffers are their
        own masters: the update writes straight into the model's params)."""
        masters = {}
        for buffer in self.layout.buffers:
            if buffer.dtype == torch.float32:
                continue
            master = torch.empty(buffer.shard_numel, dtype=torch.float32, device=self.device)
            for bucket in buffer.buckets:
                offset = bucket.shard_offset - buffer.shard_offset
                master[offset:offset + bucket.chunk_numel].copy_(
                    self.layout.owned_view(buffer.data, bucket))
            masters[buffer.index] = master
        return masters

    def _state_names_in(self, buffer) -> tuple[str, ...]:
        """The flat states of the groups with params in ``buffer`` (whole params keep theirs
        per tensor)."""
        groups = {slot.group for slot in self.layout.slots if slot.buffer == buffer.index}
        return self.rule.state_names([self.param_groups[g] for g in sorted(groups)])

    def _windows_per_group(self) -> list[list[shard_windows.Window]]:
        """Each group's part of the shard, cut into windows (see shard_windows): merged runs
        for element-wise groups, one piece per param for groups whose rule needs whole-param
        statistics, none for groups stepped whole (whole_tensors.py)."""
        result, runs = [], self.layout.runs()
        for g, group in enumerate(self.param_groups):
            if self.rule.whole_tensors(group):
                result.append([])
                continue
            if self.rule.per_tensor(group):
                template = self._per_param_facts(g, group)
                dense = {index: k for k, (index, p) in enumerate(
                    (i, p) for i, p in _indexed(self.param_groups, g) if p.requires_grad)}
                spans = [(p.slot.buffer, p.shard_offset, p.numel, dense[p.slot.index])
                         for p in self.layout.padded_pieces if p.slot.group == g]
            else:
                template = ShardTensors([], [])
                spans = [(b.buffer, offset, numel, None) for group_of, b, offset, numel in runs
                         if group_of == g]
            result.append(shard_windows.build_windows(
                spans, self.layout, self._regions, self.rule.states(group), self._master_view,
                self.grads.shard, self._scratch, self.window_numel, template))
        return result

    def _set_initial_values(self) -> None:
        """States that do not start at zero (Adagrad's accumulator, schedule-free's z)."""
        for group, windows in zip(self.param_groups, self._windows):
            starts = self.rule.initial_values(group)
            if not starts:
                continue

            def fill(shard: ShardTensors) -> None:
                for name, value in starts.items():
                    for state, param in zip(shard.states[name], shard.params):
                        state.copy_(param) if value == "param" else state.fill_(value)

            shard_windows.run(windows, fill, load=False, store=True)

    def _per_param_facts(self, g: int, group: dict) -> ShardTensors:
        trainable = [i for i, p in _indexed(self.param_groups, g) if p.requires_grad]
        slots = {slot.index: slot for slot in self.layout.slots}
        names = group.get("param_names")
        position = {index: k for k, (index, _) in enumerate(_indexed(self.param_groups, g))}
        return ShardTensors(
            [], [], num_params=len(trainable),
            param_numel=torch.tensor([slots[i].numel for i in trainable], dtype=torch.float64),
            param_names=[names[position[i]] if names else None for i in trainable])

    def _master_view(self, buffer, offset: int, numel: int) -> torch.Tensor:
        """The fp32 master of ``numel`` shard elements from ``offset`` (all in one bucket's
        chunk of ``buffer``): the model's own fp32 buffer, or the master copy of a 16-bit one."""
        if buffer.index in self._masters:
            at = offset - buffer.shard_offset
            return self._masters[buffer.index][at:at + numel]
        bucket = next(b for b in buffer.buckets
                      if b.shard_offset <= offset < b.shard_offset + b.chunk_numel)
        at = bucket.owned_range(self.comm.rank)[0] + offset - bucket.shard_offset
        return buffer.data[at:at + numel]

    def add_param_group(self, param_group: dict) -> None:
        if getattr(self, "_constructed", False):
            raise RuntimeError("ZeroOptimizer cannot add a param group after construction: the "
                               "flat buffers are laid out once. Build a new ZeroOptimizer with "
                               "every group instead.")
        super().add_param_group(param_group)

    # -- the training-loop API ------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not all(group.get("train_mode", True) for group in self.param_groups):
            raise RuntimeError("ZeroOptimizer.step() in eval mode: call opt.train() before "
                               "training again (and opt.eval() before evaluating)")
        self._sync_gradients()
        self.layout.check_params_in_place()
        norm, self._grad_norm = self._grad_norm, None
        if norm is None and self.skip_nonfinite:
            norm = self._grad_norm_over_ranks(2.0)
        self.last_step_skipped = norm is not None and not bool(torch.isfinite(norm))
        if self.last_step_skipped:
            self.skipped_steps += 1
            if self.comm.rank == 0:
                log.warning("zeroopt: gradient norm is %s; step skipped, states untouched "
                            "(%d skipped so far)", norm.item(), self.skipped_steps)
            self._whole.end_step()
            self.grads.zero()
            return loss
        for group, step in zip(self.param_groups, self._steps):
            step += 1
            if self.rule.before_step:
                self.rule.before_step(group)
        statistics = self._whole_param_statistics()
        for group, windows, step, stats in zip(self.param_groups, self._windows, self._steps,
                                               statistics):
            # States are decoded in the phase that uses them (LAMB's moments move in phase 1).
            uses = stats is None or not self.rule.statistics_use_states

            def update(shard: ShardTensors) -> None:
                if shard.params:
                    self.rule.fused_step(group, shard, step, stats)

            shard_windows.run(windows, update, load=uses, store=uses)
        self._whole.step()
        self.grads.zero()  # consumed: a rule may have overwritten them (as DeepSpeed zeroes them)
        self._publish_params()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.grads.zero(set_to_none)
        self._grad_norm = None

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
        """Clip the averaged gradients by their global norm over all ranks' shards (as
        torch.nn.utils.clip_grad_norm_ over the whole model) and return that norm."""
        if self._whole.any_layerwise:
            raise RuntimeError("clip_grad_norm_ with a layerwise optimizer: it steps each matrix "
                               "during backward, before any global gradient norm exists (as "
                               "Transformers' layerwise optimizers). Use the name without "
                               "'_layerwise' to clip")
        self._sync_gradients()
        norm = self._grad_norm_over_ranks(float(norm_type))
        coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        self.grads.shard.mul_(coef)
        self._grad_norm = norm
        return norm

    def eval(self) -> None:
        """Put the model's params where they are evaluated (schedule-free: the average x);
        a no-op for rules that train at the point they evaluate."""
        self._switch_mode(train=False)

    def train(self) -> None:
        """Put the params back where training steps them (schedule-free: y)."""
        self._switch_mode(train=True)

    @torch.no_grad()
    def _switch_mode(self, train: bool) -> None:
        move = self.rule.to_train if train else self.rule.to_eval
        # Already there: nothing to gather (the Trainer calls train() before every micro-step).
        if move is None or all(group["train_mode"] == train for group in self.param_groups):
            return
        for group, windows in zip(self.param_groups, self._windows):
            if group["train_mode"] != train:
                def step_to(shard: ShardTensors) -> None:
                    if shard.params:
                        move(group, shard)

                # reads the states (schedule-free's z), leaves them as they are
                shard_windows.run(windows, step_to, load=True, store=False)
                group["train_mode"] = train
        self._publish_params()

    def no_sync(self):
        """Context for gradient-accumulation micro-steps: backward accumulates locally and the
        next backward outside the context reduces the sum once."""
        return self.grads.no_sync()

    def state_bytes(self) -> int:
        """Bytes of optimizer state this rank holds, wherever it lives (device, host or a
        paged file): its states (8-bit codes and absmax included) and fp32 masters."""
        masters = sum(t.numel() * t.element_size() for t in self._masters.values())
        return masters + sum(region.nbytes() for region in self._regions) + self._whole.nbytes()

    def device_state_bytes(self) -> int:
        """Bytes of optimizer state kept on the compute device: what ``state_bytes`` counts
        less the paged states, plus the fp32 windows states are decoded into."""
        held = [*self._masters.values(), *self._scratch.values()]
        return sum(t.numel() * t.element_size() for t in held) + self._whole.nbytes() + \
            sum(region.device_bytes() for region in self._regions)

    def state_dict(self) -> dict:
        """The full optimizer state, per param and in its shape, as torch.optim lays it out.
        A collective: every rank must call it; every rank gets the whole dict."""
        return state_io.gather_state_dict(self)

    def load_state_dict(self, state_dict: dict) -> None:
        """Load what ``state_dict()`` returned (at any world size), or a torch.optim
        optimizer's state dict (AdamW, Adam, SGD, Adagrad, RMSprop)."""
        state_io.load_state_dict(self, state_dict)

    # -- internals ------------------------------------------------------------------------

    def _sync_gradients(self) -> None:
        self.grads.finish()
        if not self.grads.received:
            raise RuntimeError("ZeroOptimizer.step() found no gradients: call loss.backward() "
                               "before step() (and zero_grad() after it, not before it)")

    def _whole_param_statistics(self) -> list[torch.Tensor | None]:
        """Every tensor-wise group's partial sums, all-reduced together in one collective."""
        partials = []
        for group, windows, step in zip(self.param_groups, self._windows, self._steps):
            if not self.rule.per_tensor(group):
                partials.append(None)
                continue
            uses = self.rule.statistics_use_states
            parts = shard_windows.run(windows, lambda shard: self.rule.statistics(
                group, shard, step), load=uses, store=uses)
            partials.append(torch.stack(parts).sum(0))
        present = [p for p in partials if p is not None]
        if not present:
            return partials
        flat = torch.cat([p.reshape(-1) for p in present])
        self.comm.all_reduce(flat)
        totals = iter(flat.split([p.numel() for p in present]))
        return [None if p is None else next(totals).view_as(p) for p in partials]

    def _grad_norm_over_ranks(self, norm_type: float) -> torch.Tensor:
        # (Not named _global_grad_norm: DeepSpeed's engine reads that attribute of its
        # optimizer as the last step's norm; zeroopt.deepspeed sets it.)
        shard = self.grads.shard
        if norm_type == float("inf"):
            norm = shard.abs().max() if shard.numel() else shard.new_zeros(())
            self.comm.all_reduce(norm, op="max")
            return norm
        # Each rank's norm to the p, summed over ranks, the powers in fp64. Other p than 2
        # (rare: not the per-step check) also accumulate in fp64: |g|^p in fp32 costs ~1e-6.
        dtype = torch.float32 if norm_type == 2.0 else torch.float64
        total = torch.linalg.vector_norm(shard, norm_type, dtype=dtype).double() ** norm_type
        self.comm.all_reduce(total)
        return (total ** (1.0 / norm_type)).float()

    def _publish_params(self) -> None:
        """Copy 16-bit masters into the model's buffers, then all-gather every bucket."""
        for index, master in self._masters.items():
            buffer = self.layout.buffers[index]
            for bucket in buffer.buckets:
                offset = bucket.shard_offset - buffer.shard_offset
                self.layout.owned_view(buffer.data, bucket).copy_(
                    master[offset:offset + bucket.chunk_numel])
        handles = [self.comm.gather_bucket(self.layout.bucket_view(bucket))
                   for bucket in self.layout.buckets]
        for handle in handles:
            handle.wait()


def _window_numel(window_numel: int | None, device: torch.device) -> int:
    """Elements per window: by default ~256K on CPU (the windows' working set stays in cache),
    4M on accelerators (fewer, larger transfers and launches)."""
    from .states.blockwise import BLOCK

    if window_numel is None:
        window_numel = 1 << 18 if device.type == "cpu" else 1 << 22
    if not isinstance(window_numel, int) or window_numel < BLOCK or window_numel % BLOCK:
        raise ValueError(f"window_numel must be a positive multiple of {BLOCK} (whole 8-bit "
                         f"blocks), got {window_numel!r}")
    return window_numel


def _indexed(param_groups: list[dict], group: int):
    """(state_dict index, param) for one group: indices run on across groups, as in torch."""
    start = sum(len(g["params"]) for g in param_groups[:group])
    return enumerate(param_groups[group]["params"], start=start)
