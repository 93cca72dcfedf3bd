"""ZeroTrainer: Transformers' Trainer with a ZeroOptimizer, and the Trainer's habits that do not
fit a sharded optimizer turned to ones that do.

What differs from the Trainer, and why:
- The optimizer is a ZeroOptimizer built from ``optim``/``optim_args``/``optim_target_modules``
  (arguments.py), or the one passed as ``optimizers=(opt, scheduler)``.
- Multi-process: the model is not wrapped in DistributedDataParallel. The ZeroOptimizer
  averages the gradients itself, bucket by bucket during backward; DDP would average them a
  second time and hold a full gradient copy. (A ZeroOptimizer built with
  ``average_grads=False`` keeps the Trainer's DDP wrapper and takes DDP's averaged grads.)
- Clipping (``max_grad_norm``): the Trainer clips ``param.grad``, which the ZeroOptimizer has
  already taken into its shard during backward, so it would clip nothing and log a norm of 0.
  Here the ZeroOptimizer clips by the global norm over all ranks' shards, and that norm is
  logged. Layerwise names step during backward, before a global norm exists: they need
  ``max_grad_norm=0`` (Transformers' layerwise optimizers ignore it silently).
- LOMO and AdaLomo (``optim="lomo"``/``"adalomo"``) step during backward by construction. The
  Trainer hands their backward a ``learning_rate`` for lomo_optim's ``fused_backward``; here
  plain backward runs (the hooks step with the groups' lr, which the scheduler set to that
  value). ``max_grad_norm`` is not applied, as the Trainer does not apply it to lomo_optim
  (nothing is left to clip): a warning says so, and the norm logged is that of the averaged
  gradient the step applied.
- torchrun on CPU without ``use_cpu=True``: Transformers alone would run each rank as a
  separate one-process job (every rank on all the data, every rank writing checkpoints); the
  arguments are set up as ``use_cpu=True`` sets them, so the data is split (cpu_parallel.py).
- ``--deepspeed ds.json`` (TrainingArguments(deepspeed=...)): the config's "auto" values are
  resolved by Transformers' own code, its optimizer, ZeRO, bf16, clipping and scheduler run on
  zeroopt, and the Trainer runs without DeepSpeed's engine (deepspeed_config.py).
- Gradient accumulation: micro-steps run inside ``opt.no_sync()``, so the sum is reduced once
  (and layerwise names step once, on it).
- Checkpoints: the optimizer state is saved by every rank in parallel with
  ``zeroopt.save_checkpoint`` (a collective; the Trainer would call ``state_dict()`` on the main
  process only, where a collective hangs) and can be resumed at another world size. Resuming
  from a plain Trainer's ``optimizer.pt`` also works (torch.optim's layout loads directly).
- Accelerate does not round-trip the optimizer state through ``state_dict()`` to "place" it:
  the state is already on the params' device, and the round trip would gather the whole state
  on every rank.

The params become views of the optimizer's flat buffers: the model must not be moved or cast
after the ZeroOptimizer is built (the Trainer moves it to ``args.device`` in ``__init__``; when
passing ``optimizers=``, move the model there first). ZeroTrainer checks this and says so.
"""

from __future__ import annotations

import contextlib
import logging
import os

import torch
from transformers import Trainer

from ..checkpoint import load_checkpoint, save_checkpoint
from ..ddp_gradients import LocalGradients
from ..optimizer import ZeroOptimizer
from ..step_inputs import finish_norm, local_norm_part
from ..whole_tensors import layerwise_by_construction, without_layerwise
from .arguments import create_optimizer
from .cpu_parallel import make_data_parallel
from .deepspeed_config import TrainerDeepSpeedConfig, resume_scheduler

log = logging.getLogger("zeroopt")

OPTIMIZER_DIR = "zeroopt_optimizer"  # in each checkpoint-N folder
SCHEDULER_NAME = "scheduler.pt"  # as the Trainer names it

# Trainer methods ZeroTrainer overrides. The private ones may change between Transformers
# versions: if one is gone, the override would silently never run, so refuse to start.
_HOOKED = ("create_accelerator_and_postprocess", "create_optimizer", "create_scheduler",
           "_move_model_to_device", "training_step", "_clip_grad_norm", "_get_grad_norm",
           "_save_optimizer_and_scheduler", "_load_optimizer_and_scheduler")


class ZeroTrainer(Trainer):
    """``Trainer`` with a ZeroOptimizer. Takes the Trainer's arguments, plus ``zeroopt``: a
    dict of settings that win over TrainingArguments (the keys ``optim_args`` takes, values
    typed: ``{"optimizer": "lamb", "stage": 2}``) and over a ``--deepspeed`` config.

    Raises (at construction):
        ValueError: ``optimizers=`` with ``--deepspeed``; Accelerate's DeepSpeed plugin or
            FSDP; ``optimizer_cls_and_kwargs``; a ``--deepspeed`` config value that contradicts
            the arguments (Transformers' error) or that zeroopt cannot run (``ConfigError``,
            naming the fix; deepspeed_config.py).
    """

    def __init__(self, *args, zeroopt: dict | None = None, **kwargs):
        missing = [name for name in _HOOKED if not hasattr(Trainer, name)]
        if missing:
            import transformers

            raise ImportError(f"ZeroTrainer overrides Trainer.{', '.join(missing)}, which "
                              f"transformers {transformers.__version__} does not have; it was "
                              f"written for transformers 5.x (tested with 5.23)")
        self.zeroopt_settings = dict(zeroopt or {})
        training_args = kwargs.get("args", args[1] if len(args) > 1 else None)
        self.deepspeed_config = None  # --deepspeed: the config, run on zeroopt
        if training_args is not None and training_args.deepspeed:
            # optimizers: the Trainer's 11th argument after self
            given = kwargs.get("optimizers", args[10] if len(args) > 10 else None)
            if any(item is not None for item in given or ()):
                raise ValueError("ZeroTrainer with --deepspeed builds the optimizer and scheduler "
                                 "from the DeepSpeed config (as Transformers does): drop "
                                 "optimizers=, or drop deepspeed= and pass your ZeroOptimizer")
            self.deepspeed_config = TrainerDeepSpeedConfig.take(training_args)
        if training_args is not None:
            make_data_parallel(training_args)  # torchrun on CPU without use_cpu=True
        super().__init__(*args, **kwargs)
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            raise ValueError("ZeroTrainer shards the optimizer state itself; it does not combine "
                             "with Accelerate's DeepSpeed plugin (accelerate launch "
                             "--use_deepspeed, ACCELERATE_USE_DEEPSPEED=true) or FSDP. Launch "
                             "with torchrun (or accelerate launch without DeepSpeed) and pass "
                             "the DeepSpeed config as TrainingArguments(deepspeed=...) "
                             "(--deepspeed ds.json), drop fsdp, or use Trainer with them and no "
                             "zeroopt")
        if self.deepspeed_config is not None:  # every config error here, before training
            self.deepspeed_config.prepare(self.args, self.model,
                                          is_main=self.args.process_index == 0)
        if self.optimizer_cls_and_kwargs is not None:
            raise ValueError("ZeroTrainer builds a ZeroOptimizer: optimizer_cls_and_kwargs would "
                             "be ignored. Pass optim/optim_args, zeroopt={...}, or optimizers="
                             "(ZeroOptimizer(...), None)")
        self._views_checked = False

    # -- the optimizer ----------------------------------------------------------------------

    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        """Build the ZeroOptimizer from the TrainingArguments and ``zeroopt={...}`` (Trainer's
        hook), unless one was passed in ``optimizers=``.

        Args:
            model: the model (default ``self.model``).

        Returns:
            ``self.optimizer``.

        With ``--deepspeed``: built from the config (deepspeed_config.py), its params cast
        to bf16 first when the config's "bf16" is enabled.

        Raises:
            ValueError: a layerwise optimizer with ``max_grad_norm > 0`` (it cannot clip);
                with ``--deepspeed``, ``optim_args`` next to a config that names the optimizer.
            TypeError: ``optimizers=`` held another optimizer than a ZeroOptimizer.
            RuntimeError: a param is no longer a view of the optimizer's flat buffer (the
                model was moved or cast after the optimizer was built).
        """
        model = self.model if model is None else model
        if self.optimizer is None and self.deepspeed_config is not None:
            self.deepspeed_config.cast(model)  # "bf16": bf16 params, fp32 masters
            name, groups, options = self.deepspeed_config.optimizer_arguments(
                self.args, model, self.get_decay_parameter_names(model), self.zeroopt_settings)
            self.optimizer = ZeroOptimizer(groups, name, **options)
        elif self.optimizer is None:
            self.optimizer = create_optimizer(
                self.args, model, decay_parameter_names=self.get_decay_parameter_names(model),
                **self.zeroopt_settings)
        zero = self.zero_optimizer
        if layerwise_by_construction(zero.rule) and self.args.max_grad_norm > 0:
            log.warning("zeroopt: %s steps each param during backward, before a global gradient "
                        "norm exists: max_grad_norm=%s is not applied (Transformers' Trainer "
                        "does not apply it to lomo_optim either). The logged grad_norm is that of "
                        "the averaged gradient each step applied. Set max_grad_norm=0 to silence "
                        "this", zero.rule.name, self.args.max_grad_norm)
        elif is_layerwise(zero) and self.args.max_grad_norm > 0:
            raise ValueError(
                f"{zero.rule.name} with layerwise=True steps each matrix during backward, before "
                f"a global gradient norm exists, so it cannot clip: set max_grad_norm=0 in "
                f"TrainingArguments (got {self.args.max_grad_norm}); to clip, "
                f"{without_layerwise(zero.rule)}")
        check_params_are_views(zero)
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        """The DeepSpeed config's "scheduler" (DeepSpeed's class, "auto" values filled as
        Transformers fills them) over the ZeroOptimizer; without --deepspeed or without one,
        the Trainer's ``lr_scheduler_type`` (Trainer's hook).

        Args:
            num_training_steps (int): the run's optimizer steps.
            optimizer: what the scheduler drives (default: the ZeroOptimizer).

        Returns:
            ``self.lr_scheduler``.

        Raises:
            ValueError: Transformers' mismatch error for the scheduler's values.
        """
        ds = self.deepspeed_config
        if self.lr_scheduler is None and ds is not None and ds.has_scheduler():
            self.lr_scheduler = ds.scheduler(self.args, self.model,
                                             optimizer or self.zero_optimizer, num_training_steps)
            self._created_lr_scheduler = True  # the Trainer builds it again for the next train()
        return super().create_scheduler(num_training_steps, optimizer)

    @property
    def zero_optimizer(self) -> ZeroOptimizer:
        """The ZeroOptimizer inside Accelerate's wrapper."""
        opt = self.optimizer
        while not isinstance(opt, ZeroOptimizer) and hasattr(opt, "optimizer"):
            opt = opt.optimizer
        if not isinstance(opt, ZeroOptimizer):
            raise TypeError(f"ZeroTrainer trains with a ZeroOptimizer, got {type(opt).__name__}: "
                            f"pass optimizers=(zeroopt.ZeroOptimizer(...), None) or "
                            f"zeroopt.wrap(your_optimizer), or use Trainer")
        return opt

    def create_accelerator_and_postprocess(self) -> None:
        """Trainer's Accelerate setup, with two changes: the model is prepared without the
        data-parallel wrapper where the ZeroOptimizer averages the gradients itself (and is
        not moved when already on the device: the move would copy it away from the flat
        buffers), and the optimizer is prepared without device placement."""
        super().create_accelerator_and_postprocess()
        accelerator = self.accelerator
        prepare_model, prepare_optimizer = accelerator.prepare_model, accelerator.prepare_optimizer

        def prepare_model_without_ddp(model, device_placement=None, evaluation_mode=False):
            # evaluation_mode: Accelerate's preparation without the data-parallel wrapper
            # (autocast and compilation still apply)
            averages = self.optimizer is not None and averages_grads(self.zero_optimizer)
            if is_on(model, accelerator.device):
                device_placement = False  # a no-op move that copies (see is_on)
            return prepare_model(model, device_placement=device_placement,
                                 evaluation_mode=evaluation_mode or averages)

        def prepare_optimizer_in_place(optimizer, device_placement=None):
            return prepare_optimizer(optimizer, device_placement=False)

        backward = accelerator.backward

        def backward_without_learning_rate(loss, **kwargs):
            # The Trainer passes it for optim="lomo"/"adalomo", for lomo_optim's
            # fused_backward(loss, lr); a ZeroOptimizer's hooks step with its groups' lr,
            # which the scheduler set to that value, and plain backward takes no such argument.
            kwargs.pop("learning_rate", None)
            return backward(loss, **kwargs)

        accelerator.prepare_model = prepare_model_without_ddp
        accelerator.prepare_optimizer = prepare_optimizer_in_place
        accelerator.backward = backward_without_learning_rate

    def _move_model_to_device(self, model, device) -> None:
        if not is_on(model, device):  # a real move (before the optimizer is built, or an error)
            super()._move_model_to_device(model, device)

    # -- the training step ------------------------------------------------------------------

    def training_step(self, model, inputs, num_items_in_batch=None):
        """Trainer's training step, inside ``no_sync()`` while gradients accumulate (the
        reduction waits for the last micro-batch). The first call checks that the params are
        still views of the optimizer's flat buffers.

        Args:
            model, inputs, num_items_in_batch: as ``Trainer.training_step`` takes them.

        Returns:
            Trainer's result: the loss, detached.

        Raises:
            RuntimeError: a param is no longer a view of the flat buffer.
        """
        if not self._views_checked:  # after Accelerate's preparation, which may move the model
            check_params_are_views(self.zero_optimizer)
            self._views_checked = True
        accumulating = not self.accelerator.sync_gradients
        with self.zero_optimizer.no_sync() if accumulating else contextlib.nullcontext():
            return super().training_step(model, inputs, num_items_in_batch)

    def _clip_grad_norm(self, model):
        zero = self.zero_optimizer
        if layerwise_by_construction(zero.rule):  # stepped already: nothing to clip (warned)
            return applied_grad_norm(zero)
        return zero.clip_grad_norm_(self.args.max_grad_norm)

    def _get_grad_norm(self, model, grad_norm=None):
        zero = self.zero_optimizer
        if grad_norm is None and layerwise_by_construction(zero.rule):
            grad_norm = applied_grad_norm(zero)
        elif grad_norm is None and not is_layerwise(zero):
            # max_grad_norm=0: the norm, for the logs (step() reuses it for its inf/nan check;
            # clipping at inf costs one multiply by 1 over this rank's shard)
            grad_norm = zero.clip_grad_norm_(float("inf"))
        return grad_norm

    # -- checkpoints ------------------------------------------------------------------------

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        save_checkpoint(os.path.join(output_dir, OPTIMIZER_DIR), None, self.zero_optimizer)
        if self.args.should_save:
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_NAME))

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if checkpoint is None:
            return
        path = os.path.join(checkpoint, OPTIMIZER_DIR)
        if not os.path.isdir(path):  # a plain Trainer's optimizer.pt, or nothing to load
            return super()._load_optimizer_and_scheduler(checkpoint)
        load_checkpoint(path, None, self.zero_optimizer)
        scheduler = os.path.join(checkpoint, SCHEDULER_NAME)
        if os.path.isfile(scheduler):
            self.lr_scheduler.load_state_dict(torch.load(scheduler, weights_only=True))
            if self.deepspeed_config is not None:
                resume_scheduler(self.lr_scheduler)


def check_params_are_views(zero: ZeroOptimizer) -> None:
    """Each param the ZeroOptimizer steps must still be a view of its flat buffer: a moved or
    cast model trains copies the optimizer never reads."""
    for slot in zero.layout.slots:
        buffer = zero.layout.buffers[slot.buffer].data
        expected = buffer.data_ptr() + slot.start * buffer.element_size()
        if slot.param.data_ptr() != expected:
            raise RuntimeError(
                f"a param of shape {list(slot.param.shape)} is no longer a view of the "
                f"ZeroOptimizer's flat buffer: the model was moved or cast (model.to(...)) after "
                f"the optimizer was built. Build the ZeroOptimizer after the model is on its "
                f"device and in its dtype (the Trainer moves it to args.device: do that first), "
                f"or let ZeroTrainer build it from TrainingArguments")


def is_layerwise(zero: ZeroOptimizer) -> bool:
    """Whether some param group steps layerwise (during backward: ``layerwise=True``)."""
    return any(group.get("layerwise", False) for group in zero.param_groups)


def applied_grad_norm(zero: ZeroOptimizer) -> torch.Tensor:
    """The global L2 norm of this step's averaged gradient, for a rule that steps with it
    during backward (LOMO, AdaLomo): the gradient shard still holds it. A collective.

    Returns:
        The norm (fp32, 0-d), the same on every rank.
    """
    zero.grads.complete([])  # reductions in flight harvested (their buckets stepped)
    total = local_norm_part(zero.grads.shard, 2.0)
    zero.comm.all_reduce(total)
    return finish_norm(total, 2.0)


def averages_grads(zero: ZeroOptimizer) -> bool:
    """False for ``average_grads=False``: a model that DDP wraps averages them."""
    return not isinstance(zero.grads, LocalGradients)


def is_on(model: torch.nn.Module, device) -> bool:
    """Whether every param is already on ``device``. Moving there anyway is not free: in a
    multi-process CPU job Accelerate's device is "cpu:0", and ``tensor.to("cpu:0")`` copies a
    "cpu" tensor, which would cut the params loose from the optimizer's flat buffers."""
    device = torch.device(device)
    return all(p.device.type == device.type and
               (device.type == "cpu" or p.device.index == device.index)
               for p in model.parameters())
