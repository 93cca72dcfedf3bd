"""DeepSpeed with zeroopt's sharding: ``zeroopt.deepspeed.initialize`` takes what
``deepspeed.initialize`` takes and returns what it returns (engine, optimizer, dataloader,
lr_scheduler), DeepSpeed's own engine, with a ZeroOptimizer sharding the optimizer state and
averaging the gradients. The ZeroOptimizer is built from the config as DeepSpeed reads it (its
"optimizer" and "zero_optimization" sections: an unchanged DeepSpeed config runs), and from an
optional "zeroopt" section of ZeroOptimizer's own arguments, which wins::

    config = {"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 2,
              "gradient_clipping": 1.0, "bf16": {"enabled": True},
              "scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 100}},
              "zeroopt": {"optimizer": "adamw_8bit", "stage": 2, "lr": 3e-4}}
    engine, opt, loader, sched = zeroopt.deepspeed.initialize(model=model, config=config,
                                                               training_data=dataset)
    for x, y in loader:
        loss = loss_fn(engine(x), y)
        engine.backward(loss)
        engine.step()
    engine.save_checkpoint("ckpt")    # the optimizer's shards go to ckpt/<tag>/zeroopt

``config.py`` (``plan``) and ``config_mapping.py`` say what maps to what and what DeepSpeed
gets instead; ``engine.py`` what
changes on the engine. The other direction, zeroopt's 8-bit states inside DeepSpeed's ZeRO, is
``zeroopt.FusedOptimizer``. Importing this module does not import deepspeed.
"""

from __future__ import annotations

import copy
import json
import logging
import os

import torch

from ..optimizer import ZeroOptimizer
from ..whole_tensors import without_layerwise
from . import config as config_module
from .config import ConfigError
from .engine import attach

__all__ = ["ConfigError", "initialize"]

log = logging.getLogger("zeroopt")


def initialize(args=None, model: torch.nn.Module | None = None, optimizer=None,
               model_parameters=None, training_data=None, lr_scheduler=None,
               distributed_port: int = 29500, mpu=None, dist_init_required: bool | None = None,
               collate_fn=None, config=None, mesh_param=None, config_params=None):
    """deepspeed.initialize's arguments, except that the optimizer comes from the config
    (``config.plan``: DeepSpeed's "optimizer" section, a "zeroopt" section, or both):
    ``optimizer`` must be None. ``model_parameters`` (params or param-group dicts; default the
    model's, for "muon" ``zeroopt.muon_param_groups(model)``, which honours DeepSpeed's
    ``param.use_muon`` tags; ``Plan.param_groups``) are what ZeroOptimizer optimizes;
    ``lr_scheduler``, if given, is a callable that takes the optimizer (DeepSpeed's "scheduler"
    section works as well). The config's moot keys are named in one info line (logger
    "zeroopt", rank 0). Raises ``ConfigError`` (before any collective) for a config zeroopt
    cannot run as written, naming the fix."""
    if model is None:
        raise ValueError("zeroopt.deepspeed.initialize needs a model")
    if optimizer is not None:
        raise ValueError('zeroopt.deepspeed.initialize builds the optimizer from the config: '
                         'pass optimizer=None (to bring your own optimizer, '
                         "call deepspeed.initialize)")
    if lr_scheduler is not None and not callable(lr_scheduler):
        raise ValueError("lr_scheduler must be a callable that takes the optimizer, e.g. "
                         "lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, f): the ZeroOptimizer "
                         "is built inside initialize, so a scheduler made beforehand would drive "
                         "another optimizer")
    if mpu is not None or mesh_param is not None:
        raise NotImplementedError("zeroopt shards over the whole job (data parallelism only): "
                                  "model or sequence parallelism (mpu, mesh_param) is not "
                                  "supported")
    args, config = _take_config(args, config if config is not None else config_params)
    plan = config_module.plan(config)  # every config error before any collective

    import deepspeed
    from deepspeed.accelerator import get_accelerator

    deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name(),
                               distributed_port=distributed_port,
                               dist_init_required=dist_init_required)
    if plan.info() and torch.distributed.get_rank() == 0:
        log.info(plan.info())
    device_rank = getattr(args, "device_rank", int(os.environ.get("LOCAL_RANK", 0)))
    device = torch.device(get_accelerator().device_name(device_rank))
    _cast_and_place(model, plan.param_dtype, device)  # before ZeroOptimizer makes params views
    opt = ZeroOptimizer(plan.param_groups(model, model_parameters), **plan.optimizer_kwargs)
    _check_usable_in_deepspeed(opt, plan)

    engine, optimizer, loader, scheduler = deepspeed.initialize(
        args=args, model=model, optimizer=opt, training_data=training_data,
        lr_scheduler=lr_scheduler, distributed_port=distributed_port,
        dist_init_required=dist_init_required, collate_fn=collate_fn,
        config=plan.deepspeed_config)
    if optimizer is not opt:
        raise RuntimeError(f"DeepSpeed wrapped the ZeroOptimizer in {type(optimizer).__name__}, "
                           "which would keep masters and reduce gradients of its own; please "
                           "report this with your DeepSpeed version and config")
    attach(engine, opt, stage=opt.stage, gradient_clipping=_clipping(plan))
    return engine, optimizer, loader, scheduler


def _take_config(args, config):
    """The config as a dict, from ``config`` (a dict or a JSON file) or args.deepspeed_config;
    and args without it, since DeepSpeed refuses a config in both places."""
    if getattr(args, "deepspeed_config", None) is not None:
        if config is not None:
            raise ValueError("a DeepSpeed config came both as config= and as "
                             "args.deepspeed_config: pass one")
        config, args = args.deepspeed_config, copy.copy(args)
        args.deepspeed_config = None
    if config is None:
        raise ValueError('zeroopt.deepspeed.initialize needs a DeepSpeed config (config=dict '
                         'or a JSON path)')
    if not isinstance(config, dict):
        with open(config) as f:
            config = json.load(f)
    return args, config


@torch.no_grad()
def _cast_and_place(model: torch.nn.Module, dtype: torch.dtype | None,
                    device: torch.device) -> None:
    """As DeepSpeed's engine would: floating params (not buffers) to the bf16 section's dtype,
    then the model to this rank's device."""
    if dtype is not None:
        for p in model.parameters():
            if p.is_floating_point() and p.dtype != dtype:
                p.data = p.data.to(dtype)
    model.to(device)


def _clipping(plan) -> float:
    """The config's gradient_clipping, else DeepSpeed's default (which is not 0)."""
    if plan.gradient_clipping is not None:
        return plan.gradient_clipping
    from deepspeed.runtime.constants import GRADIENT_CLIPPING_DEFAULT

    return float(GRADIENT_CLIPPING_DEFAULT)


def _check_usable_in_deepspeed(opt: ZeroOptimizer, plan) -> None:
    if any(not group["params"] for group in opt.param_groups):
        raise ValueError("a param group has no params: DeepSpeed deletes such groups from its "
                         "optimizer's param_groups, which would misalign ZeroOptimizer's "
                         "per-group state. Leave empty groups out")
    if _clipping(plan) > 0 and opt.shard.whole.any_layerwise:
        raise ConfigError("gradient_clipping with a layerwise optimizer: it steps each matrix "
                          "during backward, before any global gradient norm exists. Set "
                          '"gradient_clipping": 0 (DeepSpeed\'s default is 1.0); to clip, '
                          f"{without_layerwise(opt.rule)}")
