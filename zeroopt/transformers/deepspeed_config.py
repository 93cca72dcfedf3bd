"""ZeroTrainer with ``--deepspeed ds.json`` (``TrainingArguments(deepspeed=...)``): the config
runs on zeroopt's sharding, and the Trainer runs without DeepSpeed's engine.

Source of the behaviour: transformers 5.x ``integrations/deepspeed.py``
(``HfTrainerDeepSpeedConfig.trainer_config_process``, which TrainingArguments runs when it is
built; ``trainer_config_finalize``, which ``deepspeed_init`` runs when training starts;
``deepspeed_optim_sched``), DeepSpeed 0.19.8 ``runtime/engine.py`` (``_scheduler_from_config``,
the default ``gradient_clipping``) and ``runtime/lr_schedules.py``.

1. "auto": Transformers' own code fills it and checks every other value against the arguments
   (a mismatch is Transformers' ValueError, listing them). The optimizer's part is finalized at
   construction on a copy without the "scheduler" (``reduce_bucket_size`` from the model's
   hidden size); the scheduler's when training starts, when the step count is known
   (``total_num_steps``, ``warmup_num_steps``), on a fresh copy each time (a second ``train()``
   with another step count is not a mismatch).
2. The optimizer: ``zeroopt.deepspeed.config.plan`` maps "optimizer", "zero_optimization",
   "communication_data_type", "bf16" and the "zeroopt" section to ZeroOptimizer's arguments,
   which win over TrainingArguments (ZeroTrainer's ``zeroopt={...}`` wins over both). With an
   "optimizer" section every param is decayed, biases and norms too, as there: Transformers
   hands DeepSpeed's optimizer one group of every trainable param. Without one, the Trainer's
   ``optim``/``optim_args`` choose the optimizer and the Trainer's grouping applies (no decay
   on biases and norms), as Transformers builds it and hands it to DeepSpeed.
3. "bf16" enabled: the params are cast to bf16 before the ZeroOptimizer is built, which keeps
   fp32 masters (DeepSpeed's bf16); the Trainer's autocast (``bf16=True``, which Transformers
   requires to agree) stays on.
4. "gradient_clipping" is ``max_grad_norm``; absent, DeepSpeed's default (1.0) applies, as
   DeepSpeed would clip by it whatever ``max_grad_norm`` says (one log line when they differ).
5. "scheduler": the DeepSpeed class of that name (``WarmupLR``, ``WarmupDecayLR``,
   ``WarmupCosineLR``, ``OneCycle``, ``LRRangeTest``; else ``torch.optim.lr_scheduler``'s, as
   DeepSpeed resolves it) over the ZeroOptimizer, stepped by the Trainer after each optimizer
   step as DeepSpeed's engine steps it. Without one, ``lr_scheduler_type``.
"""

from __future__ import annotations

import copy
import logging

import torch

from ..deepspeed.config import ConfigError, Plan, plan
from .arguments import optimizer_arguments, parse_optim_args

log = logging.getLogger("zeroopt")

# Keys TrainingArguments matches ("auto" or equal), the scheduler built here, the sections plan()
# maps, and steps_per_print (Accelerate adds it): the rest tunes only DeepSpeed's engine (named
# in one line).
HANDLED = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
           "gradient_clipping", "scheduler", "fp16", "bf16", "bfloat16", "optimizer",
           "zero_optimization", "communication_data_type", "zeroopt", "gradient_allreduce_op",
           "prescale_gradients", "gradient_predivide_factor", "steps_per_print")
# Sections that change what training computes and that nothing runs without DeepSpeed's engine.
REFUSED = {
    "amp": "apex AMP: use bf16=True in TrainingArguments and \"bf16\": {\"enabled\": \"auto\"}",
    "torch_autocast": "DeepSpeed's autocast: the Trainer autocasts with bf16=True in "
                      "TrainingArguments; remove torch_autocast",
    "curriculum_learning": "it changes the data each step sees; the Trainer's dataloader runs "
                           "here, remove it",
    "data_efficiency": "it changes the data each step sees; the Trainer's dataloader runs here, "
                       "remove it",
    "compression_training": "it changes the model; remove it",
}


class TrainerDeepSpeedConfig:
    """A ``--deepspeed`` config, taken from TrainingArguments, which then run without it.

    Attributes:
        source: Transformers' ``HfTrainerDeepSpeedConfig`` as TrainingArguments left it
            ("auto" filled from the arguments, mismatches recorded, not yet finalized).
        plan (Plan | None): the optimizer's part (``prepare``).
        chooses_optimizer (bool): the config names the optimizer ("optimizer", or "zeroopt"
            with an ``optimizer`` key); else the Trainer's ``optim`` does.
    """

    def __init__(self, source):
        self.source = source
        self.plan: Plan | None = None
        config = source.config
        self.chooses_optimizer = (config.get("optimizer") is not None
                                  or "optimizer" in (config.get("zeroopt") or {}))

    @classmethod
    def take(cls, args) -> TrainerDeepSpeedConfig:
        """The config of ``args`` (a TrainingArguments with ``deepspeed`` set), and ``args``
        switched off DeepSpeed in place: ``deepspeed``, ``hf_deepspeed_config`` and
        ``deepspeed_plugin`` cleared, Transformers' global DeepSpeed config unset, and the
        devices set up again (next read of ``args.device``) if they were set up for DeepSpeed."""
        from transformers.integrations.deepspeed import (HfTrainerDeepSpeedConfig,
                                                         unset_hf_deepspeed_config)

        source = getattr(args, "hf_deepspeed_config", None)
        if source is None:  # deepspeed set after the arguments were built: as they would have
            source = HfTrainerDeepSpeedConfig(args.deepspeed)
            source.trainer_config_process(args)
        taken = cls(source)
        args.deepspeed, args.deepspeed_plugin = None, None
        vars(args).pop("hf_deepspeed_config", None)
        unset_hf_deepspeed_config()  # is_deepspeed_zero3_enabled() and deepspeed_config() off
        state = vars(args).get("distributed_state")
        if "_setup_devices" in vars(args) and state is not None and \
                str(state.distributed_type).endswith("DEEPSPEED"):
            vars(args).pop("_setup_devices")  # set up again, without DeepSpeed
        return taken

    def prepare(self, args, model: torch.nn.Module, is_main: bool = True) -> Plan:
        """Finalize the optimizer's part of the config as Transformers does (on a copy, without
        the scheduler), check it, and map it (``self.plan``). Sets ``args.max_grad_norm`` to the
        config's clipping.

        Raises:
            ValueError: Transformers' mismatch error (a value that contradicts the arguments).
            ConfigError: an "auto" Transformers does not fill; a section nothing runs here
                (``REFUSED``); what ``plan`` refuses (ZeRO-3, fp16...). Each names the fix.
            ValueError: see ``check_optim_args``.
        """
        hf = copy.deepcopy(self.source)
        hf.config.pop("scheduler", None)
        hf.trainer_config_finalize(args, model, 0)  # Transformers' fill and mismatch error
        config = hf.config
        refuse_auto(config)
        refuse_unrun(config)
        if config.get("optimizer") is None and "zeroopt" not in config:
            config = {**config, "zeroopt": {}}  # the Trainer's optim chooses (plan needs one)
        self.plan = plan(config)
        self.check_optim_args(args)
        clipping = self.plan.gradient_clipping
        if clipping is None:
            from deepspeed.runtime.constants import GRADIENT_CLIPPING_DEFAULT

            clipping = float(GRADIENT_CLIPPING_DEFAULT)
            if clipping != args.max_grad_norm:
                log.info("zeroopt: the DeepSpeed config has no gradient_clipping: clipping at "
                         "DeepSpeed's default %s, as DeepSpeed would (max_grad_norm=%s is not "
                         "used)", clipping, args.max_grad_norm)
        args.max_grad_norm = clipping
        if is_main:
            for line in (self.plan.info(), engine_only(config)):
                if line:
                    log.info(line)
        return self.plan

    def optimizer_arguments(self, args, model: torch.nn.Module, decay_parameter_names,
                            settings: dict) -> tuple[str, list, dict]:
        """(name, param groups, keyword arguments) for ZeroOptimizer: the config's, over the
        Trainer's grouping and the arguments; ``settings`` (ZeroTrainer's ``zeroopt={...}``)
        win over both.

        Raises:
            ValueError: see ``check_optim_args``.
        """
        self.check_optim_args(args)
        if self.source.config.get("optimizer") is not None:  # DeepSpeed's: one group, decayed
            decay_parameter_names = [name for name, _ in model.named_parameters()]
        name, groups, options = optimizer_arguments(
            args, model, decay_parameter_names, {**self.plan.optimizer_kwargs, **settings})
        adamw = self.plan.adamw_group  # DeepSpeed's Muon: its AdamW half's settings
        if adamw:  # the config's, where the group's own come from the arguments (not its decay)
            groups = [{k: v for k, v in g.items() if g.get("use_muon") is not False
                       or k not in adamw or k == "weight_decay"} for g in groups]
            groups = self.plan.param_groups(model, groups)
        return name, groups, options

    def check_optim_args(self, args) -> None:
        """Raise ValueError for ``optim_args`` next to a config that names the optimizer
        (Transformers would ignore them), or for a key that ``optim_args`` and the config both
        set, differently."""
        given, mapped = parse_optim_args(args.optim_args), self.plan.optimizer_kwargs
        if self.chooses_optimizer and given:
            raise ValueError(f"optim_args={args.optim_args!r} with a DeepSpeed config that names "
                             f"the optimizer: Transformers ignores optim_args then. Move the keys "
                             f"to the config's \"zeroopt\" section (or ZeroTrainer(zeroopt="
                             f"{{...}})), or remove optim_args")
        clash = {k: (given[k], mapped[k]) for k in given if k in mapped and given[k] != mapped[k]}
        if clash:
            raise ValueError(f"optim_args and the DeepSpeed config set these differently "
                             f"(optim_args, config): {clash}; set each in one place")

    def cast(self, model: torch.nn.Module) -> None:
        """bf16 enabled: the floating params to bf16, as DeepSpeed's engine casts them (before
        the ZeroOptimizer is built: it keeps fp32 masters and makes the params views)."""
        dtype = self.plan.param_dtype
        if dtype is None:
            return
        with torch.no_grad():
            for p in model.parameters():
                if p.is_floating_point() and p.dtype != dtype:
                    p.data = p.data.to(dtype)

    def has_scheduler(self) -> bool:
        return self.source.config.get("scheduler") is not None

    def scheduler(self, args, model: torch.nn.Module, optimizer, num_training_steps: int):
        """The config's "scheduler" as DeepSpeed builds it (``_scheduler_from_config``), its
        "auto" values filled by Transformers' ``trainer_config_finalize``.

        Args:
            args: the TrainingArguments.
            model: the model (for "auto" sizes).
            optimizer: what the scheduler drives (the ZeroOptimizer).
            num_training_steps (int): the Trainer's ``max_steps``.

        Returns:
            The scheduler (DeepSpeed's class, or torch.optim.lr_scheduler's of that name).

        Raises:
            ValueError: Transformers' mismatch error (e.g. a ``total_num_steps`` that is not
                the run's).
            ConfigError: an unknown type, or an "auto" Transformers does not fill.
        """
        hf = copy.deepcopy(self.source)
        hf.trainer_config_finalize(args, model, num_training_steps)
        section = hf.config["scheduler"]
        refuse_auto(section, "scheduler")
        from deepspeed.runtime import lr_schedules

        kind, params = section.get("type"), dict(section.get("params") or {})
        cls = getattr(lr_schedules, str(kind), None) or getattr(torch.optim.lr_scheduler,
                                                                 str(kind), None)
        if not isinstance(cls, type):
            raise ConfigError(f"scheduler type {kind!r}: DeepSpeed takes "
                              f"{', '.join(lr_schedules.VALID_LR_SCHEDULES)} or a class of "
                              f"torch.optim.lr_scheduler")
        return cls(optimizer, **params)


def resume_scheduler(scheduler) -> None:
    """After ``load_state_dict``: a DeepSpeed scheduler restores its iteration only, so the lr
    it reports (``get_last_lr``, which the Trainer logs) would be its initial one. ``step(i)`` at
    the loaded iteration sets it again (the optimizer's groups get the same lr, which its
    checkpoint restored). Other schedulers are left as they are."""
    iteration = getattr(scheduler, "last_batch_iteration", None)
    if isinstance(iteration, int) and iteration >= 0:
        scheduler.step(iteration)


def refuse_auto(node, path: str = "") -> None:
    """Raise ConfigError for an "auto" left after Transformers filled the ones it knows."""
    if isinstance(node, dict):
        for key, value in node.items():
            refuse_auto(value, f"{path}.{key}" if path else str(key))
    elif node == "auto":
        raise ConfigError(f'"{path}" is "auto", which Transformers does not fill (it fills the '
                          f"batch sizes, gradient accumulation and clipping, the optimizer's "
                          f"lr/betas/eps/weight_decay, fp16/bf16, reduce_bucket_size and the "
                          f"scheduler's warmup and step counts): write a value")


def refuse_unrun(config: dict) -> None:
    """Raise ConfigError for a section that changes what training computes and that nothing
    runs without DeepSpeed's engine (``REFUSED``), or model parallelism."""
    for key, why in REFUSED.items():
        section = config.get(key)
        if section and (not isinstance(section, dict) or section.get("enabled", True)):
            raise ConfigError(f'"{key}": ZeroTrainer runs the Trainer without DeepSpeed\'s '
                              f"engine, and nothing else runs this: {why}")
    tp = (config.get("tensor_parallel") or {}).get("autotp_size", 1)
    if (tp or 1) > 1 or (config.get("sequence_parallel_size") or 1) > 1:
        raise ConfigError("tensor_parallel.autotp_size / sequence_parallel_size > 1: zeroopt is "
                          "data-parallel only; remove them (or keep DeepSpeed with Trainer)")


def engine_only(config: dict) -> str | None:
    """One line naming the config's keys that tune only DeepSpeed's engine (moot here)."""
    keys = [key for key in config if key not in HANDLED]
    if not keys:
        return None
    return (f"zeroopt: ZeroTrainer runs without DeepSpeed's engine; these keys of the DeepSpeed "
            f"config tune only the engine and are not used: {', '.join(keys)}")
