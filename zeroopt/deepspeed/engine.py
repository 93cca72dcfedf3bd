"""What zeroopt changes on the DeepSpeed engine it hands back (the engine stays DeepSpeed's own,
with the ZeroOptimizer as its client optimizer and DeepSpeed's ZeRO off).

- Gradients: ZeroOptimizer reduce-scatters them in its backward hooks and consumes param.grad,
  so the engine's own all-reduce is turned off (``enable_backward_allreduce``, the flag that
  guards it in ``_backward_epilogue``). Left on, it would find every param.grad None, give each
  param a zero gradient and all-reduce those: a whole model of zeros at every boundary.
- Accumulation: ``engine.backward`` scales the loss by 1/gradient_accumulation_steps as always.
  At stage 1, micro-steps before the boundary run in ``ZeroOptimizer.no_sync()``: they add into
  the full gradient buffer stage 1 keeps anyway, and the boundary's backward reduces the sum once.
  Stage 2 reduces every micro-step (deferring would hold a full gradient buffer, which stage 2
  exists to avoid), as DeepSpeed's ZeRO-2 does. ``engine.no_sync()`` defers at either stage.
- Clipping and the norm: before each step, ``clip_grad_norm_`` clips by the config's
  gradient_clipping (or only measures, without it) and leaves the norm where the engine reads it
  (``get_global_grad_norm()``); step() then reuses it, so this costs no extra collective. A step
  skipped for a non-finite gradient is reported as DeepSpeed's ``overflow``: the engine counts it
  in ``skipped_steps`` and leaves the LR scheduler where it is.
- Checkpoints: the optimizer state is saved sharded, by every rank, to ``<tag>/zeroopt`` beside
  DeepSpeed's own files (``zeroopt.save_checkpoint``: reshardable to any world size), and loaded
  from there. DeepSpeed saves the model, LR scheduler, counters and client state as usual but not
  the optimizer: for a non-ZeRO engine it would gather the whole ZeroOptimizer state on every rank
  (``state_dict()``) and write it into rank 0's one file.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os

from .. import checkpoint
from ..optimizer import ZeroOptimizer

OPTIMIZER_DIR = "zeroopt"  # inside each checkpoint tag's directory


def save_optimizer_state(path: str, optimizer: ZeroOptimizer) -> None:
    """The one place that says how the optimizer state is saved (a collective)."""
    checkpoint.save_checkpoint(path, None, optimizer)


def load_optimizer_state(path: str, optimizer: ZeroOptimizer) -> None:
    """Load the optimizer state ``save_optimizer_state`` wrote (a collective).

    Args:
        path: the directory it was saved to (``<tag dir>/zeroopt``).
        optimizer: the ZeroOptimizer to load into, on every rank.
    """
    checkpoint.load_checkpoint(path, None, optimizer)


def attach(engine, optimizer: ZeroOptimizer, stage: int, gradient_clipping: float) -> None:
    """Make a DeepSpeed engine run ``optimizer`` in place of its own ZeRO.

    The engine's own backward all-reduce is turned off; its ``backward`` reduces gradients
    through the optimizer, deferred (``optimizer.no_sync()``) inside the engine's no_sync
    context and, at stage 1, between gradient accumulation boundaries. Before each step the
    gradients are clipped (or only their norm is computed) and the norm and the step's skip
    are reported in the attributes DeepSpeed's engine reads; not with layerwise rules, which
    step during backward. The engine's ``save_checkpoint`` and ``load_checkpoint`` also save
    and load the optimizer state in the tag's ``zeroopt`` directory.

    Args:
        engine: the ``deepspeed.DeepSpeedEngine``, changed in place.
        optimizer: the ZeroOptimizer it runs.
        stage: the zeroopt section's ZeRO stage (1 or 2).
        gradient_clipping: the max norm; 0 or less computes the norm without clipping.
    """
    engine.enable_backward_allreduce = False
    _reduce_at_accumulation_boundaries(engine, optimizer, stage)
    _clip_and_report_before_each_step(optimizer, gradient_clipping)
    _checkpoint_optimizer_beside_deepspeed(engine, optimizer)


def _reduce_at_accumulation_boundaries(engine, optimizer: ZeroOptimizer, stage: int) -> None:
    backward = engine.backward

    @functools.wraps(backward)
    def backward_reducing_at_boundaries(loss, *args, **kwargs):
        defer = engine.inside_no_sync_ctxt or (
            stage == 1 and not engine.is_gradient_accumulation_boundary())
        with optimizer.no_sync() if defer else contextlib.nullcontext():
            return backward(loss, *args, **kwargs)

    engine.backward = backward_reducing_at_boundaries


def _clip_and_report_before_each_step(optimizer: ZeroOptimizer, max_norm: float) -> None:
    if optimizer.shard.whole.any_layerwise:  # steps during backward: no global norm ever exists
        return

    def clip(opt, args, kwargs) -> None:
        # DeepSpeed's engine reads these two after optimizer.step() (_take_model_step)
        opt._global_grad_norm = opt.clip_grad_norm_(max_norm if max_norm > 0 else math.inf)

    def report_skip(opt, args, kwargs) -> None:
        opt.overflow = opt.last_step_skipped

    optimizer.register_step_pre_hook(clip)
    optimizer.register_step_post_hook(report_skip)


def _checkpoint_optimizer_beside_deepspeed(engine, optimizer: ZeroOptimizer) -> None:
    save, load = engine.save_checkpoint, engine.load_checkpoint

    @functools.wraps(save)
    def save_checkpoint(save_dir, tag=None, client_state={}, save_latest=True,  # noqa: B006
                        exclude_frozen_parameters=False):
        tag = f"global_step{engine.global_steps}" if tag is None else str(tag)  # DeepSpeed's
        save_optimizer_state(os.path.join(save_dir, tag, OPTIMIZER_DIR), optimizer)
        with _optimizer_hidden(engine):  # written last: DeepSpeed's "latest" then means complete
            return save(save_dir, tag, client_state=client_state, save_latest=save_latest,
                        exclude_frozen_parameters=exclude_frozen_parameters)

    @functools.wraps(load)
    def load_checkpoint(load_dir, tag=None, load_module_strict=True, load_optimizer_states=True,
                        load_lr_scheduler_states=True, load_module_only=False,
                        custom_load_fn=None):
        with _optimizer_hidden(engine):
            path, client_state = load(
                load_dir, tag, load_module_strict=load_module_strict,
                load_optimizer_states=load_optimizer_states,
                load_lr_scheduler_states=load_lr_scheduler_states,
                load_module_only=load_module_only, custom_load_fn=custom_load_fn)
        if path is None:  # DeepSpeed found nothing to load (it has logged why)
            return path, client_state
        if load_optimizer_states and not load_module_only:
            load_optimizer_state(os.path.join(os.path.dirname(path), OPTIMIZER_DIR), optimizer)
        else:  # the model's weights changed under the optimizer: masters follow them
            optimizer.refresh_masters()
        return path, client_state

    engine.save_checkpoint, engine.load_checkpoint = save_checkpoint, load_checkpoint


@contextlib.contextmanager
def _optimizer_hidden(engine):
    optimizer, engine.optimizer = engine.optimizer, None
    try:
        yield
    finally:
        engine.optimizer = optimizer
