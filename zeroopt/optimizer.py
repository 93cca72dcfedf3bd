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

The user-facing behaviour (arguments, what raises, torch.optim's patterns) is documented on
the class: ``help(zeroopt.ZeroOptimizer)``.
"""

from __future__ import annotations

import logging
import weakref

import torch

from . import gradient_source, lazy_skip, modes, ownership, shard_windows, unfreezing
from .algorithms import ShardTensors, get_preset
from .algorithms.base import resolve_defaults
from .checkpoint import state_dict as state_io
from .checks import check_ranks_agree, describe_params
from .comm import collectives_for, compressed, split
from .layout import DEFAULT_BUCKET_NUMEL, Layout
from .memory import StateBytes
from .param_gather import ParamGather
from .shard import Shard
from .states import kinds
from .step_inputs import StepInputs, settle
from .validation import check_group_keys, check_options, check_params, page_dir_problem
from .whole_tensors import without_layerwise

log = logging.getLogger("zeroopt")


class ZeroOptimizer(torch.optim.Optimizer):
    """A torch.optim.Optimizer whose states (stage 1), and gradients (stage 2), are sharded
    across the data-parallel ranks: each rank keeps and updates 1/W of them (ZeRO, Rajbhandari
    et al. 2020), and the update is the named rule's, as torch.optim (or the reference
    package the name comes from) computes it.

    - Build it after moving the model to its device and dtype: the trainable params become
      views of flat buffers (a later ``model.to(...)`` is refused at the next step).
    - Do not wrap the model in DistributedDataParallel: the optimizer averages the gradients
      (or pass ``average_grads=False``, stage 1).
    - ``param.grad`` is consumed during backward: clip with ``opt.clip_grad_norm_``, not
      ``torch.nn.utils.clip_grad_norm_``.
    - As torch.optim: a param with no gradient on any rank is not stepped; gradients assigned
      to ``p.grad`` by hand or from a closure are taken; params frozen now are laid out when
      they first get a gradient; weights written into the model are where the next step
      starts; a newer ZeroOptimizer over the same params takes over from this one.
    - ``state_dict()``, ``clip_grad_norm_()``, ``step()`` and checkpoints are collectives:
      every rank calls them. The ranks check at construction, in one all-gather, that they
      agree about the params, their names and every group's hyperparameters.

    Args:
        params (iterable): tensors, ``(name, tensor)`` pairs (``model.named_parameters()``) or
            param-group dicts, as torch.optim takes them. The dicts are not modified. Params
            frozen now get state when they first get a gradient.
        optimizer (str): the update rule, by Transformers' ``optim`` name; see
            ``zeroopt.available_optimizers()``. Default ``"adamw"`` (torch.optim.AdamW).
        stage (int): 1 shards optimizer states (every rank keeps a full gradient buffer); 2
            also shards gradients (the shard plus at most 3 buckets). Default 1.
        process_group: a ``torch.distributed`` group to shard over, or a
            ``(sharding_group, replication_group)`` pair (HSDP-style). Default: the job.
        backend (str | None): ``"nccl"``, ``"gloo"``, ``"mpi"``, ``"xla"`` or ``"hccl"``;
            default from the params' device (or ``ZEROOPT_BACKEND``).
        shard_size (int | str | None): shard over groups of this many consecutive ranks and
            replicate across groups (``"node"``: the launcher's ranks per node). Default None.
        average_grads (bool): False for a model already wrapped in DDP (stage 1 only): take
            its averaged ``param.grad``. Default True.
        bucket_numel (int): elements per gradient/param bucket (one collective each). Default
            4,000,000.
        reduce_dtype (torch.dtype): dtype of the gradient reduction (``torch.float64`` makes
            the average independent of summation order). Default ``torch.float32``.
        skip_nonfinite (bool): skip a step whose global grad norm is inf/NaN, states
            untouched (counted in ``skipped_steps``). Default True.
        window_numel (int | None): elements per decode window of non-resident states (a
            multiple of 256). Default 262,144 on CPU, 4,194,304 on accelerators.
        page_dir (str | None): directory for paged states' files (CPU). Default: the temp dir.
        timeout (float | datetime.timedelta | None): seconds any one collective wait may take
            before ``zeroopt.comm.CollectiveTimeout``. Default None (the process group's own).
        grad_compression (str | None): ``"int8"`` or ``"int4"``: gradients cross the ranks
            blockwise quantized, in one all-to-all hop, and are summed in fp32 by their owner
            (ZeRO++'s qgZ); with ``shard_size``, only the stage across sharding groups (the
            slow links) is compressed. Lossy: see ``zeroopt.comm.compression``. Default None
            (exact fp32 reduction).
        overlap_param_gather (bool | None): return from ``step()`` with the params'
            all-gathers in flight; each module's forward waits for its own params' buckets,
            and anything else that touches a param first waits for its bucket
            (``zeroopt.param_gather``; Megatron-LM's ``overlap_param_gather``). The params
            are bit for bit those of the blocking gather. Default None: on, except over the
            shared-memory transport (gloo ranks on one host), where a gather is this rank's
            own copy and there is nothing to overlap it with.
        **hyperparameters: the rule's, with torch.optim's names and defaults (``lr``,
            ``betas``, ``weight_decay``...), and every rule's ``state_precision`` ("32bit",
            "bf16", "8bit", "4bit"), ``min_8bit_size`` (4096), ``block_size`` (None: 256 for
            8-bit, 128 for 4-bit) and ``paged`` (False). Per group too.

    Raises:
        ValueError: an unknown optimizer name, an invalid hyperparameter or option, no
            trainable params, complex or meta params, a tensor given twice, a ``page_dir``
            that does not exist or is not writable.
        OSError: a ``page_dir`` too small for the paged states (ENOSPC; the bytes named).
        TypeError: an unknown hyperparameter or param-group key (with the closest known one).
        RuntimeError: ranks that disagree about the params, their groups or the settings
            (the same error on every rank, naming the first difference).
        zeroopt.comm.CollectiveTimeout: a rank did not join the construction check within
            ``timeout``.

    Example::

        opt = zeroopt.ZeroOptimizer(model.parameters(), "adamw", stage=2, lr=3e-4)
        loss.backward(); opt.clip_grad_norm_(1.0); opt.step(); opt.zero_grad()
    """

    def __init__(self, params, optimizer: str = "adamw", *, stage: int = 1,
                 process_group=None, backend: str | None = None, shard_size: int | None = None,
                 average_grads: bool = True,
                 bucket_numel: int = DEFAULT_BUCKET_NUMEL,
                 reduce_dtype: torch.dtype = torch.float32, skip_nonfinite: bool = True,
                 window_numel: int | None = None, page_dir: str | None = None,
                 timeout=None, grad_compression: str | None = None,
                 overlap_param_gather: bool | None = None, **hyperparameters):
        stage, bucket_numel, window_numel = check_options(stage, bucket_numel, window_numel)
        if stage not in (1, 2):
            raise ValueError(f"stage must be 1 (shard optimizer states) or 2 (states and "
                             f"gradients), got {stage!r}")
        if stage == 2 and not average_grads:
            raise ValueError("average_grads=False (a model wrapped in DDP) works with stage=1 "
                             "only: DDP keeps full gradients, which stage 2 exists to avoid")
        if grad_compression is not None and not average_grads:
            raise ValueError("grad_compression compresses the gradient reduction zeroopt runs; "
                             "with average_grads=False DistributedDataParallel reduces them "
                             "instead. Drop grad_compression, or unwrap the model from DDP")
        if bucket_numel < 1:
            raise ValueError(f"bucket_numel must be positive, got {bucket_numel}")
        self.rule, preset = get_preset(optimizer)
        self.stage, self.skip_nonfinite = stage, skip_nonfinite
        self._constructed = False
        self._retired = False
        # The user's group dicts stay as they are: torch.optim writes its defaults into them,
        # and a second optimizer given the same list would take those as the user's choices.
        params = params if isinstance(params, torch.Tensor) else [
            dict(p) if isinstance(p, dict) else p for p in params]
        params = check_params(params)  # complex, meta, a tensor twice
        super().__init__(params, resolve_defaults(self.rule, {**preset, **hyperparameters}))
        try:  # checked here; raised once every rank knows (one rank alone must not hang)
            for group in self.param_groups:
                self.rule.validate(group)
                kinds.validate(group, self.rule)
            check_group_keys(self.param_groups, self.rule)
            invalid = None
        except (ValueError, TypeError) as error:
            invalid = error

        trainable = unfreezing.params_by_group(self.param_groups, lambda p: p.requires_grad)
        if not any(trainable):
            raise ValueError("ZeroOptimizer got no trainable params (all have requires_grad=False)")
        self._frozen = unfreezing.FrozenAtBuild(self.param_groups)  # laid out once unfrozen
        self.device = next(p for group in trainable for _, p in group).device
        self.comm = collectives_for(self.device, process_group, backend, timeout)
        if invalid is not None and self.comm.world_size == 1:
            raise invalid
        check_ranks_agree(self.comm, describe_params(self.param_groups), dict(
            optimizer=self.rule.name, stage=stage, average_grads=average_grads,
            bucket_numel=bucket_numel, reduce_dtype=str(reduce_dtype), shard_size=shard_size,
            skip_nonfinite=skip_nonfinite, grad_compression=grad_compression,
            overlap_param_gather=overlap_param_gather),
            problem=str(invalid) if invalid is not None else page_dir_problem(page_dir))
        if shard_size is not None:  # shard within groups, replicate across them
            self.comm = split(self.comm, shard_size)
        if grad_compression is not None:
            self.comm = compressed(self.comm, grad_compression)

        # The closure holds the groups and the rule, not self: the layout outlives a dropped
        # optimizer only as long as its gradient hooks do (then nothing keeps self alive).
        groups, rule = self.param_groups, self.rule
        self.layout = Layout(trainable, self.comm.world_size, self.comm.rank, bucket_numel,
                             kind_of=lambda g, p: kinds.kind_of(
                                 groups[g], p.numel(), rule.whole_tensors(groups[g])),
                             placement_cost=rule.placement_cost)
        self.layout.allocate_param_buffers(allocate=self.comm.allocate)
        for buffer in self.layout.buffers:  # every rank starts from rank 0's params, as DDP does
            self.comm.broadcast(buffer.data, src=0)
        self.param_gather = ParamGather(self.layout, self.comm, overlap_param_gather)
        self.window_numel = shard_windows.window_numel_for(window_numel, self.device)
        self._gradient_options = dict(stage=stage, average_grads=average_grads,
                                      reduce_dtype=reduce_dtype)
        self.grads = self._gradient_source()
        self.shard = Shard(self.rule, self.param_groups, self.layout, self.grads.shard,
                           self.device, self.window_numel, page_dir, skip_nonfinite)
        gradient_source.connect_layerwise(self.grads, self.shard.whole)
        self._inputs: StepInputs | None = None  # agreed by clip_grad_norm_, reused by step()
        self._skipped_steps = 0
        self._last_step_skipped = False
        # Only a fully built optimizer takes the params over (one that raised above leaves the
        # older holder as it was).
        ownership.take_over([p for group in trainable for _, p in group], self)
        self._constructed = True

    def add_param_group(self, param_group: dict) -> None:
        """torch.optim's, during construction only.

        Raises:
            RuntimeError: after construction: the flat buffers are laid out once (build a new
                ZeroOptimizer with every group; it takes over the params).
        """
        if getattr(self, "_constructed", False):
            raise RuntimeError("ZeroOptimizer cannot add a param group after construction: the "
                               "flat buffers are laid out once. Build a new ZeroOptimizer with "
                               "every group instead.")
        if self.rule.group_defaults is not None:  # before torch.optim fills in its defaults
            self.rule.group_defaults(param_group, self.defaults)
        super().add_param_group(param_group)

    # -- the training-loop API ------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure=None):
        """Update this rank's shard with the averaged gradients and all-gather the params.

        As torch.optim: a param with no gradient on any rank since ``zero_grad()`` is left as
        it is (no weight decay, no momentum, its step count unchanged). Gradients are taken
        however they arrived: through backward, assigned to ``p.grad`` by hand, or from
        ``closure`` (re-evaluates the model and returns the loss; run with grad enabled).

        Returns:
            The closure's loss, or None.

        Raises:
            RuntimeError: in eval mode (schedule-free), after a newer ZeroOptimizer took over
                these params, or when the model was moved or cast after the optimizer was
                built. (A param frozen at construction that gets a gradient is laid out and
                trained from fresh state, as torch.optim would.) On XLA replicas also at the
                step after one in which the replicas disagreed on which params have gradients,
                on every replica, with that step undone (step_inputs.py says why).
        """
        self._check_can_step("step()")
        self.param_gather.finish()  # a second step() with no forward between
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not all(group.get("train_mode", True) for group in self.param_groups):
            raise RuntimeError("ZeroOptimizer.step() in eval mode: call opt.train() before "
                               "training again (and opt.eval() before evaluating)")
        self.layout.check_params_in_place()
        inputs, self._inputs = self._inputs, None
        if inputs is None:
            inputs = self._settle(2.0 if self.skip_nonfinite else None)
        norm = inputs.norm
        agreeing = inputs.used_counts is not None  # XLA replicas: agreement checked on device
        # XLA: no host read here; the step is kept on the device or not (lazy_skip.py)
        lazy = self.comm.lazy or self.device.type == "xla"  # (one XLA device: no XLA comm)
        on_device = lazy and (norm is not None or agreeing)
        skipped = norm is not None and not on_device and not bool(torch.isfinite(norm))
        self._last_step_skipped = skipped
        if not inputs.active and not skipped and self.comm.rank == 0:
            log.warning("zeroopt: step() found no gradient on any rank, so nothing was "
                        "updated (as torch.optim). Call loss.backward() before step(), "
                        "and zero_grad() after it, not before it")
        if skipped or not (inputs.active or agreeing):  # a replica alone may not return
            if skipped:
                self._count_skipped(f"gradient norm is {norm.item()}")
            self.shard.whole.end_step()
            self.grads.consume()
            return loss
        self.shard.sync_masters()
        if on_device:  # kept below only where the verdict holds
            held = lazy_skip.HeldStep(self.shard, self.param_groups)
        for group in self.param_groups:
            if self.rule.before_step:
                self.rule.before_step(group)
        plan = self.shard.plan(inputs.active)
        statistics = self._whole_param_statistics(plan)
        for group, classes, stats in zip(self.param_groups, plan, statistics):
            # States are decoded in the phase that uses them (LAMB's moments move in phase 1).
            uses = stats is None or not self.rule.statistics_use_states
            for step, windows in classes:
                def update(shard: ShardTensors) -> None:
                    """The rule's fused step on one window (an empty one is skipped)."""
                    if shard.params:
                        self.rule.fused_step(group, shard, step, stats)

                # 8-bit plain Adam(W) windows: decoded, stepped and encoded in one call
                shard_windows.run(windows, update, load=uses, store=uses,
                                  direct=shard_windows.one_pass_adam(self.rule, group, step,
                                                                     stats))
        self.shard.whole.step({self.layout.slots[k].index for k in inputs.active})
        if on_device:
            self.shard.deferred = held.decide(
                inputs, self.comm.world_size, self.layout.slots,
                lambda: self._count_skipped("gradient norm is not finite"))
        self.grads.consume()  # a rule may have overwritten them (as DeepSpeed zeroes them)
        self.publish_params(wait=False)
        return loss

    @property
    def skipped_steps(self) -> int:
        """How many steps ``skip_nonfinite`` skipped (inf/nan gradient norm). On XLA the last
        step's is counted when first asked (a host read; see lazy_skip.py): read it after
        ``mark_step()``, or on every replica, since before it the read runs the step's graph,
        collectives included, which a replica alone would wait in."""
        self.shard.settle_deferred()
        return self._skipped_steps

    @skipped_steps.setter
    def skipped_steps(self, count: int) -> None:
        """Set the count (a loaded checkpoint's), after settling the last step's."""
        self.shard.settle_deferred()
        self._skipped_steps = int(count)

    @property
    def last_step_skipped(self) -> bool:
        """Whether the last ``step()`` was skipped (``skip_nonfinite``). On XLA a host read of
        the step's decision, made on the device (lazy_skip.py): as ``skipped_steps``, read it
        after ``mark_step()`` or on every replica."""
        self.shard.settle_deferred()
        return self._last_step_skipped

    def _count_skipped(self, why: str) -> None:
        self._skipped_steps += 1
        self._last_step_skipped = True
        if self.comm.rank == 0:
            log.warning("zeroopt: %s; step skipped, states untouched (%d skipped so far)", why,
                        self._skipped_steps)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Drop the gradients taken since the last step, as torch.optim: after
        ``set_to_none=False`` a param that had one is stepped with a zero gradient (weight
        decay, momentum) in later steps that give it none, until a ``zero_grad()``. A no-op on
        a superseded optimizer."""
        if self._retired:
            return
        self.grads.zero(set_to_none)
        self._frozen.zero_grad(set_to_none)
        self._inputs = None

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
        """Clip the averaged gradients by their global norm over all ranks' shards, as
        ``torch.nn.utils.clip_grad_norm_`` over the whole unsharded model.

        Args:
            max_norm: the largest norm allowed; gradients are scaled by
                ``min(1, max_norm / (norm + 1e-6))``.
            norm_type: p of the p-norm (default 2.0; ``float('inf')`` for the max norm).

        Returns:
            The global norm before clipping (fp32, 0-d), the same on every rank.

        Raises:
            RuntimeError: with a layerwise rule (no global norm exists during backward).
        """
        self._check_can_step("clip_grad_norm_()")
        self.param_gather.finish()
        if self.shard.whole.any_layerwise:
            raise RuntimeError("clip_grad_norm_ with a layerwise optimizer: it steps each param "
                               "during backward, before any global gradient norm exists (as "
                               "Transformers' layerwise optimizers). To clip, "
                               f"{without_layerwise(self.rule)}")
        self._inputs = self._settle(float(norm_type))
        norm = self._inputs.norm
        coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        self.grads.shard.mul_(coef)
        return norm

    def retire(self) -> None:
        """Stop taking gradients: a newer ZeroOptimizer was built over these params (see
        ``zeroopt.ownership``). Its ``state_dict()`` still reads; ``step()`` then raises."""
        self._retired = True
        self.param_gather.finish()
        self.grads.remove_hooks()

    def eval(self) -> None:
        """Put the model's params where they are evaluated (schedule-free: the average x);
        a no-op for rules that train at the point they evaluate (modes.py)."""
        self.param_gather.finish()
        if modes.switch(self.rule, self.param_groups, self.shard, self.layout, train=False):
            self.publish_params()

    def train(self) -> None:
        """Put the params back where training steps them (schedule-free: y)."""
        self.param_gather.finish()
        if modes.switch(self.rule, self.param_groups, self.shard, self.layout, train=True):
            self.publish_params()

    def refresh_masters(self) -> None:
        """Take the fp32 masters of 16-bit params from the params again, wholly: after a
        write through ``p.data``, which no version counter sees (``step()`` takes every other
        write into the params by itself)."""
        self.param_gather.finish()
        self.shard.refresh_masters()

    def no_sync(self):
        """Context for gradient-accumulation micro-steps: backward accumulates locally and the
        next backward outside the context reduces the sum once."""
        return self.grads.no_sync()

    def memory(self) -> StateBytes:
        """This rank's optimizer memory by part, in bytes (``zeroopt.memory.StateBytes``):
        ``states`` on the device, ``paged_states``, fp32 ``masters``, and the ``scratch``
        windows states are decoded into; ``.held`` and ``.on_device`` are the two totals."""
        return self.shard.memory()

    def wait_seconds(self) -> dict[str, float]:
        """Seconds this rank has spent blocked on communication since construction:
        ``{"reduction": ..., "gather": ...}``, waiting for gradient reductions (in backward
        and step) and for param gathers (in step, or in the next forward when overlapped).
        What overlap hid is not counted; ``benchmarks/bench_zero.py`` reads it per step."""
        return {"reduction": self.grads.wait_seconds, "gather": self.param_gather.wait_seconds}

    def state_bytes(self) -> int:
        """Bytes of optimizer state this rank holds, wherever it lives (device, host or a
        paged file): states (8-bit codes and absmax included), paged states and fp32
        masters (``memory().held``)."""
        return self.memory().held

    def device_state_bytes(self) -> int:
        """Bytes kept on the compute device for the optimizer: resident states, fp32 masters
        and the fp32 windows non-resident states are decoded into (``memory().on_device``;
        it exceeds ``state_bytes`` by the windows when no state is paged)."""
        return self.memory().on_device

    def state_dict(self) -> dict:
        """The full optimizer state, per param and in its shape, as torch.optim lays it out.
        A collective: every rank must call it; every rank gets the whole dict."""
        self.param_gather.finish()
        return state_io.gather_state_dict(self)

    def load_state_dict(self, state_dict: dict) -> None:
        """Load what ``state_dict()`` returned (at any world size), or a torch.optim
        optimizer's state dict (AdamW, Adam, SGD, Adagrad, RMSprop, Muon)."""
        self.param_gather.finish()
        state_io.load_state_dict(self, state_dict)

    # -- internals ------------------------------------------------------------------------

    def _check_can_step(self, what: str) -> None:
        if self._retired:
            raise RuntimeError(
                f"ZeroOptimizer.{what} on an optimizer that a newer ZeroOptimizer, built over "
                "the same params, has taken over: the newest one takes the gradients (as with "
                "torch.optim, use the optimizer you built last). To carry this one's state "
                "over: new_opt.load_state_dict(old_opt.state_dict())")

    def _gradient_source(self):
        """A new source of the averaged gradients for the layout (gradient_source.py)."""
        grads = gradient_source.new_source(self.layout, self.comm, self.device,
                                           **self._gradient_options)
        weakref.finalize(self, grads.remove_hooks)  # a dead optimizer takes no more grads
        grads.before_launch = self.param_gather.finish  # every gather done before a reduction
        return grads

    def _settle(self, norm_type: float | None) -> StepInputs:
        """Reduce the rest of this step's gradients and agree with every rank on which params
        have one, and on the norm (step_inputs.py: one small all-reduce). Params frozen at
        construction that have a gradient now are laid out first (unfreezing.py)."""
        self.shard.settle_deferred()  # the last step's counts first (lazy_skip.py)
        inputs = settle(self.grads, self.comm, norm_type, self._frozen.with_grads())
        if inputs.unfrozen:
            params = self._frozen.take(inputs.unfrozen)
            ownership.take_over(params, self)
            self.grads = unfreezing.lay_out(params, self.param_groups, self.layout, self.comm,
                                            self.shard, self.grads, self._gradient_source)
            inputs = settle(self.grads, self.comm, norm_type, self._frozen.with_grads())
        return inputs

    def _whole_param_statistics(self, plan) -> list[torch.Tensor | None]:
        """Every tensor-wise group's partial sums, all-reduced together in one collective."""
        partials = self.shard.statistics_partials(plan)
        present = [p for p in partials if p is not None]
        if not present:
            return partials
        flat = torch.cat([p.reshape(-1) for p in present])
        self.comm.all_reduce(flat)
        totals = iter(flat.split([p.numel() for p in present]))
        return [None if p is None else next(totals).view_as(p) for p in partials]

    def publish_params(self, wait: bool = True) -> None:
        """Put this rank's updated chunks into the model: 16-bit masters rounded into the
        flat buffers, then every bucket all-gathered. A collective.

        Args:
            wait: True (default): return once the model holds every rank's chunks. False:
                as ``step()``, return with the gathers in flight when overlapping
                (``finish_param_gather``).
        """
        self.param_gather.finish()
        self.shard.write_masters_into_params()
        self.param_gather.start(wait=wait)

    def finish_param_gather(self) -> None:
        """Wait for the all-gathers ``step()`` left in flight (``overlap_param_gather``):
        afterwards every param holds its stepped value. Never needed for correctness (a
        forward, or any torch call on a param, waits for what it touches); for code that
        reads the params' memory outside torch (a C extension, ``p.data_ptr()``)."""
        self.param_gather.finish()
