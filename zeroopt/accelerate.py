"""zeroopt in an Accelerate script (``accelerate launch train.py``; docs/ACCELERATE.md).

    accelerator = Accelerator(gradient_accumulation_steps=2)       # first: it joins the job
    model.to(accelerator.device)                                    # then build the optimizer
    opt = zeroopt.ZeroOptimizer(model.parameters(), "adamw", stage=2, lr=3e-4)
    model, opt, loader, sched = zeroopt.accelerate.prepare(accelerator, model, opt, loader, sched)
    for x, y in loader:
        with accelerator.accumulate(model):
            accelerator.backward(loss_fn(model(x), y))
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(model.parameters(), 1.0)
            opt.step(); sched.step(); opt.zero_grad()
    accelerator.save_state("ckpt")                                  # load_state("ckpt") resumes

``prepare`` is ``accelerator.prepare`` with five of the Accelerator's methods taught, on that
Accelerator only and from then on, what a ZeroOptimizer does differently from torch.optim:

- ``prepare_model``: a model whose trainable params a ZeroOptimizer steps is not wrapped in
  DistributedDataParallel, because the ZeroOptimizer averages the gradients itself, bucket by
  bucket during backward (``grad_sync.py``); DDP would average them a second time and hold a
  full gradient copy. Mixed precision's autocast and ``torch.compile`` still apply (Accelerate's
  ``evaluation_mode``). Nor is the model moved: its params are views of the optimizer's flat
  buffers, and on a CPU job Accelerate's device is ``cpu:0``, where ``.to()`` copies. (With
  ``average_grads=False``, stage 1, the model keeps Accelerate's DDP wrapper.)
- ``prepare_optimizer``: without device placement, which would round-trip the whole state
  through ``state_dict()`` (a collective, every rank given all of it) to move what is already
  on the params' device.
- ``clip_grad_norm_(parameters, max_norm)``: Accelerate clips ``param.grad``, which the
  ZeroOptimizer has already taken into its shard, so it would clip nothing and return 0. Here
  the ZeroOptimizer clips its averaged gradient shards by the global norm over all ranks
  (``ZeroOptimizer.clip_grad_norm_``), and that norm is returned.
- ``no_sync(model)``, which ``accumulate(model)`` enters on micro-steps: the ZeroOptimizer's
  ``no_sync()``, so the accumulated sum is reduced once, at the last micro-step.
- ``save_state`` / ``load_state`` (and ``save_model``): the model's state dict holds views of
  the flat buffers, which safetensors (Accelerate's default) refuses to load and deduplicates
  away on save (keeping one param). While these run, such a model's ``state_dict()`` returns
  copies (tied weights stay tied). The optimizer goes through Accelerate's own path,
  ``ZeroOptimizer.state_dict()``: every rank gathers the whole state, rank 0 writes it, and it
  loads at any world size. For states larger than one rank's memory, save with
  ``zeroopt.save_checkpoint`` instead (each rank writes its own shard).

Not combined: Accelerate's DeepSpeed, FSDP, Megatron-LM and XLA modes (they shard or reduce
themselves: ``zeroopt.deepspeed`` is the DeepSpeed way), and ``mixed_precision="fp16"``
(its GradScaler unscales ``param.grad``, which the ZeroOptimizer has already taken).
"""

from __future__ import annotations

import contextlib

import torch

from . import ownership
from .ddp_gradients import LocalGradients
from .optimizer import ZeroOptimizer

try:
    import accelerate  # noqa: F401 - the Accelerator this module adapts
except ImportError as error:  # pragma: no cover - the extras install it
    raise ImportError("zeroopt.accelerate needs Accelerate: pip install accelerate") from error

__all__ = ["prepare"]

# Accelerate's modes that shard or reduce the gradients themselves.
_REFUSED = {"DEEPSPEED": "use zeroopt.deepspeed.initialize for DeepSpeed's engine",
            "FSDP": "FSDP shards the params itself",
            "MEGATRON_LM": "Megatron-LM shards the model itself",
            "XLA": "Accelerate all-reduces the gradients itself on XLA"}


def prepare(accelerator, *args, device_placement=None):
    """``accelerator.prepare(*args)`` for a script whose optimizer is a ZeroOptimizer: the
    model is not wrapped in DDP, and the Accelerator's ``clip_grad_norm_``, ``no_sync``/
    ``accumulate``, ``save_state``, ``load_state`` and ``save_model`` then handle the
    ZeroOptimizer (the module docstring says how and why). The patches stay on this
    Accelerator, so a later ``accelerator.prepare`` gets them too; applying them twice is a
    no-op.

    Args:
        accelerator (accelerate.Accelerator): built before the ZeroOptimizer (it joins the job).
        *args: what ``accelerator.prepare`` takes: models, optimizers (ZeroOptimizers or any
            other), data loaders, schedulers. Build each ZeroOptimizer after its model is on
            ``accelerator.device``.
        device_placement (list[bool] | None): as ``accelerator.prepare``'s. Default None.

    Returns:
        What ``accelerator.prepare(*args)`` returns: the prepared objects in order (one object
        for one argument).

    Raises:
        ValueError: Accelerate runs DeepSpeed, FSDP, Megatron-LM or XLA, or
            ``mixed_precision="fp16"``; a ZeroOptimizer averages over another number of ranks
            than Accelerate runs; a model is not on ``accelerator.device``; a model has
            trainable params no ZeroOptimizer steps next to ones one does.

    Afterwards ``accelerator.clip_grad_norm_`` raises ValueError for params that are not
    exactly one ZeroOptimizer's (a subset, two optimizers', or params with gradients it does
    not step), and RuntimeError on an accumulation micro-step (``sync_gradients`` False).
    """
    refused = _REFUSED.get(accelerator.distributed_type.name)
    if refused is not None:
        raise ValueError(f"zeroopt.accelerate: Accelerate runs in "
                         f"{accelerator.distributed_type.name} mode, which does not combine "
                         f"with a ZeroOptimizer ({refused}). Launch "
                         f"plain data parallelism (accelerate launch without --use_deepspeed/"
                         f"--use_fsdp, or an accelerate config with distributed_type MULTI_GPU/"
                         f"MULTI_CPU), or use that mode without zeroopt")
    if accelerator.mixed_precision == "fp16":
        raise ValueError("zeroopt.accelerate: mixed_precision='fp16' scales the loss with a "
                         "GradScaler, which unscales param.grad; the ZeroOptimizer has already "
                         "taken the gradients into its shard by then, so it would step with "
                         "scaled gradients. Use mixed_precision='bf16' (no scaler) or 'no'")
    for opt in args:
        if isinstance(opt, ZeroOptimizer):
            check_world(accelerator, opt)
    _patch(accelerator)
    return accelerator.prepare(*args, device_placement=device_placement)


def check_world(accelerator, opt: ZeroOptimizer) -> None:
    """A ZeroOptimizer that averages gradients must average over the processes Accelerate runs.

    Raises:
        ValueError: the two differ (e.g. Accelerate saw one process of a 2-rank CPU job).
    """
    if averages_grads(opt) and opt.comm.data_parallel_size != accelerator.num_processes:
        raise ValueError(
            f"zeroopt.accelerate: the ZeroOptimizer averages gradients over "
            f"{opt.comm.data_parallel_size} rank(s), and Accelerate runs "
            f"{accelerator.num_processes} process(es) ({accelerator.distributed_type.name}): "
            f"the data would be split over other ranks than the gradients are averaged over. "
            f"On CPU, Accelerate joins a job that torchrun "
            f"launched only with Accelerator(cpu=True) or ACCELERATE_USE_CPU=1 (accelerate "
            f"launch --cpu sets it, and starts several processes only with --mpirun_hostfile). "
            f"Build the Accelerator before the ZeroOptimizer, and the ZeroOptimizer over the "
            f"whole job (the default process_group)")


def averages_grads(opt: ZeroOptimizer) -> bool:
    """False for ``average_grads=False`` (a DDP-wrapped model averages them)."""
    return not isinstance(opt.grads, LocalGradients)


def optimizers_of(model: torch.nn.Module) -> tuple[list[ZeroOptimizer], list[str]]:
    """The ZeroOptimizers that step ``model``'s params, and the names of its trainable params
    that none steps.

    Returns:
        ``(optimizers, loose_names)``, optimizers in the order first met.
    """
    held, loose = {}, []
    for name, param in model.named_parameters():
        opt = ownership.holder(param)
        if isinstance(opt, ZeroOptimizer):
            held.setdefault(id(opt), opt)
        elif param.requires_grad:
            loose.append(name)
    return list(held.values()), loose


def is_on(model: torch.nn.Module, device) -> bool:
    """Whether every param is on ``device`` (any index for "cpu": Accelerate's "cpu:0")."""
    device = torch.device(device)
    return all(p.device.type == device.type and
               (device.type == "cpu" or p.device.index == device.index)
               for p in model.parameters())


def dealias(state_dict: dict) -> None:
    """Replace, in place, every tensor that is a view into a larger storage (a ZeroOptimizer's
    flat buffer) by a contiguous copy; entries that were the same tensor (tied weights) share
    one copy."""
    copies = {}
    for name, tensor in state_dict.items():
        if not isinstance(tensor, torch.Tensor) or tensor.device.type == "meta":
            continue
        storage = tensor.untyped_storage()
        if tensor.data_ptr() == storage.data_ptr() and \
                tensor.numel() * tensor.element_size() == storage.nbytes():
            continue  # the whole storage: safetensors takes it as it is
        key = (tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tensor.stride())
        if key not in copies:
            copies[key] = tensor.clone(memory_format=torch.contiguous_format)
        state_dict[name] = copies[key]


def _patch(accelerator) -> None:
    """Install the five patches on ``accelerator`` (once)."""
    if getattr(accelerator.prepare_model, "zeroopt", False):
        return
    prepare_model, prepare_optimizer = accelerator.prepare_model, accelerator.prepare_optimizer
    clip_grad_norm, no_sync = accelerator.clip_grad_norm_, accelerator.no_sync
    models = []  # the prepared models a ZeroOptimizer steps

    def prepare_model_without_ddp(model, device_placement=None, evaluation_mode=False):
        optimizers, loose = optimizers_of(model)
        if not optimizers:
            return prepare_model(model, device_placement=device_placement,
                                 evaluation_mode=evaluation_mode)
        if loose:
            raise ValueError(
                f"zeroopt.accelerate: {type(model).__name__} has trainable params that no "
                f"ZeroOptimizer steps ({', '.join(loose[:3])}{'...' if len(loose) > 3 else ''}), "
                f"next to ones one does: the model is not wrapped in DDP, so nothing would "
                f"average their gradients across ranks. Give them to the ZeroOptimizer (a param "
                f"group of their own) or freeze them (requires_grad_(False))")
        if not is_on(model, accelerator.device):
            raise ValueError(
                f"zeroopt.accelerate: the model is not on accelerator.device "
                f"({accelerator.device}); it cannot be moved now, since its params are views of "
                f"the ZeroOptimizer's flat buffers. Move it first (model.to(accelerator.device)), "
                f"then build the ZeroOptimizer")
        ddp = not all(averages_grads(opt) for opt in optimizers)
        models.append(model)
        return prepare_model(model, device_placement=False,
                             evaluation_mode=evaluation_mode or not ddp)

    def prepare_optimizer_in_place(optimizer, device_placement=None):
        if isinstance(optimizer, ZeroOptimizer):
            check_world(accelerator, optimizer)
            device_placement = False
        return prepare_optimizer(optimizer, device_placement=device_placement)

    def clip_grad_norm_(parameters, max_norm, norm_type=2):
        params = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
        opt = _one_optimizer(params)
        if opt is None:
            return clip_grad_norm(params, max_norm, norm_type=norm_type)
        if not accelerator.sync_gradients:
            raise RuntimeError(
                "zeroopt.accelerate: clip_grad_norm_ on an accumulation micro-step: the "
                "ZeroOptimizer reduces the gradients at the last micro-step, so no global norm "
                "exists yet. Clip under `if accelerator.sync_gradients:`, as Accelerate's "
                "examples do")
        return opt.clip_grad_norm_(max_norm, norm_type)

    def no_sync_of_zeroopt(model):
        optimizers, _ = optimizers_of(model)
        optimizers = [opt for opt in optimizers if averages_grads(opt)]
        if not optimizers:
            return no_sync(model)
        stack = contextlib.ExitStack()
        for opt in optimizers:
            stack.enter_context(opt.no_sync())
        return stack

    def copies_in_state_dicts(method):
        def run(*args, **kwargs):
            handles = [model.register_state_dict_post_hook(
                lambda module, state_dict, prefix, metadata: dealias(state_dict))
                for model in models]
            try:
                return method(*args, **kwargs)
            finally:
                for handle in handles:
                    handle.remove()
        return run

    prepare_model_without_ddp.zeroopt = True
    accelerator.prepare_model = prepare_model_without_ddp
    accelerator.prepare_optimizer = prepare_optimizer_in_place
    accelerator.clip_grad_norm_ = clip_grad_norm_
    accelerator.no_sync = no_sync_of_zeroopt
    for name in ("save_state", "load_state", "save_model"):
        setattr(accelerator, name, copies_in_state_dicts(getattr(accelerator, name)))


def _one_optimizer(params: list) -> ZeroOptimizer | None:
    """The ZeroOptimizer that steps ``params`` (None when none does), checked to be all of
    what it steps: it clips by the norm over all its params at once.

    Raises:
        ValueError: the params are stepped by two ZeroOptimizers, leave out some of one's, or
            mix in params with gradients that none steps.
    """
    holders = {}
    for p in params:
        opt = ownership.holder(p)
        if isinstance(opt, ZeroOptimizer):
            holders.setdefault(id(opt), opt)
    if not holders:
        return None
    if len(holders) > 1:
        raise ValueError(f"zeroopt.accelerate: clip_grad_norm_ got the params of "
                         f"{len(holders)} ZeroOptimizers; each clips by its own global norm: "
                         f"call it once per optimizer, with that optimizer's params")
    (opt,) = holders.values()
    given = {id(p) for p in params}
    left_out = sum(1 for group in opt.param_groups for p in group["params"]
                   if ownership.holder(p) is opt and id(p) not in given)
    others = sum(1 for p in params if ownership.holder(p) is None and p.grad is not None)
    if left_out or others:
        raise ValueError(
            "zeroopt.accelerate: clip_grad_norm_ clips a ZeroOptimizer's gradients by the "
            "global norm over all the params it steps; the params given "
            + (f"leave out {left_out} of them" if left_out else
               f"include {others} with gradients it does not step")
            + ". Pass exactly its model's params (model.parameters()), or call "
              "opt.clip_grad_norm_(max_norm) on the ZeroOptimizer")
    return opt
