"""A DeepSpeed config's own sections in zeroopt's terms: "optimizer" (Adam, AdamW, Lamb, Lion,
Muon, with DeepSpeed's parameter names and defaults), "zero_optimization", and the precision
and communication keys that have a zeroopt counterpart. ``config.plan`` calls ``translate``.

Source of the behaviour: DeepSpeed 0.19.8, runtime/engine.py (``_configure_basic_optimizer``,
``get_optimizer_configuration``, ``_muon_param_groups``), ops/adam/fused_adam.py and
cpu_adam.py, ops/lamb/fused_lamb.py with csrc/lamb/fused_lamb_cuda_kernel.cu, ops/lion
(csrc/lion/multi_tensor_lion.cu), runtime/zero/muon/original_muon.py and muon_optimizer.py,
runtime/zero/config.py and offload_config.py.

Each DeepSpeed setting is mapped (it has a zeroopt counterpart that computes the same thing),
moot (it tunes how DeepSpeed's own ZeRO runs, which zeroopt replaces: named in one info line),
or refused with the reason and the fix (zeroopt would compute something else).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..validation import closest_name


class ConfigError(ValueError):
    """A DeepSpeed config that zeroopt cannot run as it is; the message names the fix."""


# -- "optimizer" -----------------------------------------------------------------------------

# DeepSpeed's implementation switches: which kernel runs, not what it computes.
IMPLEMENTATION = ("torch_adam", "set_grad_none", "fp32_optimizer_states", "foreach",
                  "capturable", "differentiable", "fused")
ADAM_KEYS = ("lr", "betas", "eps", "weight_decay", "bias_correction", "adam_w_mode", "amsgrad",
             "maximize", "decoupled_weight_decay", *IMPLEMENTATION)
LAMB_KEYS = ("lr", "betas", "eps", "weight_decay", "bias_correction", "eps_inside_sqrt",
             "max_coeff", "min_coeff", "amsgrad", "max_grad_norm")
LION_KEYS = ("lr", "betas", "weight_decay", "set_grad_none", "fp32_optimizer_states")
MUON_KEYS = ("lr", "muon_lr", "adam_lr", "momentum", "weight_decay", "betas", "eps",
             "ns_method", "per_head_muon", "adam_w_mode", *IMPLEMENTATION)

LAMB_DIFFERS = (
    "DeepSpeed's Lamb (FusedLamb) and zeroopt's lamb (apex's FusedLAMB, exact per-tensor) "
    "compute different updates: DeepSpeed clamps the trust ratio to [min_coeff, max_coeff] "
    "(default [0.01, 10]), takes it of m / (sqrt(v) + eps) + wd x before bias correction and "
    "applies the correction to the step size, and applies it with weight_decay 0 too; zeroopt's "
    "ratio is ||x|| / ||m^ / (sqrt(v^) + eps) + wd x||, unclamped, and 1 without weight decay. "
    'To train with zeroopt\'s lamb and this section\'s lr, betas, eps and weight_decay, add '
    '"zeroopt": {"optimizer": "lamb"}; to keep DeepSpeed\'s Lamb, call deepspeed.initialize')


@dataclass
class Translation:
    """What a DeepSpeed config's own sections say, in zeroopt's terms.

    Attributes:
        optimizer_kwargs: ZeroOptimizer keyword arguments: ``optimizer`` and its
            hyperparameters from "optimizer" (DeepSpeed's defaults made explicit where they
            differ from zeroopt's); ``stage``, ``bucket_numel``, ``paged``, ``page_dir`` from
            "zero_optimization"; ``reduce_dtype`` from "communication_data_type";
            ``state_precision`` from bf16.bf16_optimizer_states.
        adamw_group: Muon only: the settings of the ``use_muon=False`` groups, which DeepSpeed
            steps with its auxiliary AdamW (``lr``, ``betas``, ``eps``, ``weight_decay``).
        ignored: dotted paths of the moot keys the config sets, for the one info line.
        differs: why zeroopt's rule of that name computes another update than DeepSpeed's
            optimizer (Lamb), or None; ``plan`` refuses it unless "zeroopt" names the optimizer.
    """

    optimizer_kwargs: dict = field(default_factory=dict)
    adamw_group: dict = field(default_factory=dict)
    ignored: list = field(default_factory=list)
    differs: str | None = None


def translate(config: dict) -> Translation:
    """Read a DeepSpeed config's "optimizer", "zero_optimization", "bf16" and
    "communication_data_type" as zeroopt's settings.

    Args:
        config: the DeepSpeed config (a dict, "auto" values already refused by ``plan``).

    Returns:
        A ``Translation``; empty when the config has none of these sections.

    Raises:
        ConfigError: a setting zeroopt would compute otherwise (ZeRO-3, offload_param, Lamb's
            coefficient clamp, Muon's per-head split...), an unknown key or optimizer type;
            the message names the fix.
    """
    out = Translation()
    if config.get("optimizer") is not None:
        _optimizer(config["optimizer"], out)
    _zero(config.get("zero_optimization"), out)
    _precision_and_communication(config, out)
    return out


def _optimizer(section, out: Translation) -> None:
    if not isinstance(section, dict) or "type" not in section:
        raise ConfigError(f'"optimizer" must be a dict with a "type" (and "params"), got '
                          f"{section!r}")
    extra = [k for k in section if k not in ("type", "params", "legacy_fusion")]
    if extra:
        raise ConfigError(f'"optimizer" takes "type" and "params"; unknown: {", ".join(extra)}')
    if "legacy_fusion" in section:
        out.ignored.append("optimizer.legacy_fusion")
    kind, params = str(section["type"]), dict(section.get("params") or {})
    mappers = {"adam": _adam, "adamw": _adam, "lamb": _lamb, "lion": _lion, "muon": _muon}
    if kind.lower() not in mappers:
        raise ConfigError(
            f'optimizer type "{kind}": zeroopt maps DeepSpeed\'s Adam, AdamW, Lamb, Lion and '
            f'Muon. For another rule, name it in the "zeroopt" section ("zeroopt": '
            f'{{"optimizer": NAME, ...}}, NAME from zeroopt.available_optimizers()) and delete '
            f'"optimizer"')
    if "max_grad_norm" in params:  # DeepSpeed refuses it too (engine.py)
        raise ConfigError('"optimizer.params.max_grad_norm": clip with the top-level '
                          '"gradient_clipping" instead (DeepSpeed refuses it as well)')
    mappers[kind.lower()](kind.lower(), params, out)


def _check_keys(kind: str, params: dict, known: tuple) -> None:
    for key in params:
        if key not in known:
            close = closest_name(key, known)
            hint = f' Did you mean "{close}"?' if close else ""
            raise ConfigError(f'unknown key "{key}" in the {kind} optimizer\'s "params".{hint} '
                              f"DeepSpeed's {kind} takes: {', '.join(known)}")


def _refuse_if(condition: bool, message: str) -> None:
    if condition:
        raise ConfigError(message)


def _moot(kind: str, params: dict, out: Translation, keys) -> None:
    out.ignored += [f"optimizer.params.{k}" for k in keys if k in params]


def _tuple(value):
    return tuple(value) if isinstance(value, list) else value


def _adam(kind: str, params: dict, out: Translation) -> None:
    """Adam/AdamW: DeepSpeed's FusedAdam (DeepSpeedCPUAdam with offload; torch.optim's with
    torch_adam). "AdamW" always decouples the weight decay; "Adam" too unless
    adam_w_mode=false (then L2, as torch.optim.Adam)."""
    _check_keys(kind, params, ADAM_KEYS)
    _refuse_if(params.get("bias_correction", True) is not True,
               "bias_correction=false: zeroopt's adam and adamw always bias-correct (as "
               "torch.optim's); remove it")
    decoupled = (kind == "adamw" or bool(params.get("adam_w_mode", True))
                 or bool(params.get("decoupled_weight_decay", False)))
    torch_adamw = bool(params.get("torch_adam", False)) and decoupled
    hyper = {"optimizer": "adamw" if decoupled else "adam", "lr": params.get("lr", 1e-3),
             "betas": _tuple(params.get("betas", (0.9, 0.999))), "eps": params.get("eps", 1e-8),
             # FusedAdam's and DeepSpeedCPUAdam's default is 0; torch.optim.AdamW's is 0.01
             "weight_decay": params.get("weight_decay", 1e-2 if torch_adamw else 0.0)}
    for key in ("amsgrad", "maximize"):
        if key in params:
            hyper[key] = params[key]
    _moot(kind, params, out, (*IMPLEMENTATION, "adam_w_mode", "bias_correction",
                              "decoupled_weight_decay"))
    out.optimizer_kwargs.update(hyper)


def _lamb(kind: str, params: dict, out: Translation) -> None:
    """Lamb (FusedLamb): lr, betas, eps and weight_decay mean what zeroopt's lamb takes; its
    coefficient clamp and its bias-correction placement are not what zeroopt computes."""
    _check_keys(kind, params, LAMB_KEYS)
    clamp = [k for k in ("max_coeff", "min_coeff") if k in params]
    _refuse_if(bool(clamp), f"{' and '.join(clamp)}: zeroopt's lamb does not clamp the trust "
                            f"ratio (apex's FusedLAMB does not either); remove "
                            f"{'them' if len(clamp) > 1 else 'it'}, or keep DeepSpeed's Lamb "
                            f"with deepspeed.initialize")
    _refuse_if(params.get("bias_correction", True) is not True,
               "bias_correction=false: zeroopt's lamb always bias-corrects; remove it")
    _refuse_if(bool(params.get("eps_inside_sqrt", False)),
               "eps_inside_sqrt=true: zeroopt's lamb adds eps outside the square root; remove it")
    _refuse_if(bool(params.get("amsgrad", False)),
               "amsgrad=true: neither DeepSpeed's FusedLamb nor zeroopt's lamb has it")
    _moot(kind, params, out, ("bias_correction", "eps_inside_sqrt", "amsgrad"))
    out.optimizer_kwargs.update(optimizer="lamb", lr=params.get("lr", 1e-3),
                                betas=_tuple(params.get("betas", (0.9, 0.999))),
                                eps=params.get("eps", 1e-8),
                                weight_decay=params.get("weight_decay", 0.0))
    out.differs = LAMB_DIFFERS


def _lion(kind: str, params: dict, out: Translation) -> None:
    """Lion (FusedLion, DeepSpeedCPULion): the same update as zeroopt's lion (sign of the
    interpolated momentum, decoupled decay); DeepSpeed's defaults made explicit."""
    _check_keys(kind, params, LION_KEYS)
    _moot(kind, params, out, ("set_grad_none", "fp32_optimizer_states"))
    out.optimizer_kwargs.update(optimizer="lion", lr=params.get("lr", 1e-3),
                                betas=_tuple(params.get("betas", (0.9, 0.999))),
                                weight_decay=params.get("weight_decay", 0.0))


def _muon(kind: str, params: dict, out: Translation) -> None:
    """Muon (MuonWithAuxAdam): the matrices get Muon's update (momentum, nesterov, 5 quintic
    Newton-Schulz steps with Keller Jordan's coefficients, lr scaled by sqrt(max(1, rows /
    cols)), decoupled decay): zeroopt's muon with its defaults; the rest DeepSpeed's AdamW,
    whose lr, betas, eps and weight_decay go to the use_muon=False groups."""
    _check_keys(kind, params, MUON_KEYS)
    _refuse_if(bool(params.get("per_head_muon", False)),
               "per_head_muon=true: zeroopt's muon orthogonalizes each matrix whole; remove it, "
               "or keep DeepSpeed's Muon with deepspeed.initialize")
    _refuse_if(not params.get("adam_w_mode", True),
               "adam_w_mode=false: zeroopt's muon steps the non-Muon params with AdamW "
               "(decoupled weight decay); remove it")
    method = params.get("ns_method", "gram")
    _refuse_if(method not in ("gram", "standard"),
               f'ns_method must be "gram" or "standard" (DeepSpeed\'s), got {method!r}')
    lr, weight_decay = params.get("lr"), params.get("weight_decay", 0.0)
    # MuonWithAuxAdam's defaults where neither the half's lr nor the shared one is set
    out.optimizer_kwargs.update(
        optimizer="muon", lr=params.get("muon_lr", 0.02 if lr is None else lr),
        momentum=params.get("momentum", 0.95), weight_decay=weight_decay, nesterov=True,
        ns_steps=5, adjust_lr_fn="original")
    out.adamw_group = {"lr": params.get("adam_lr", 3e-4 if lr is None else lr),
                       "betas": _tuple(params.get("betas", (0.9, 0.95))),
                       "eps": params.get("eps", 1e-10), "weight_decay": weight_decay}
    # both methods run the same quintic iteration; zeroopt runs it as torch.optim.Muon does
    _moot(kind, params, out, (*IMPLEMENTATION, "ns_method", "adam_w_mode", "per_head_muon"))


# -- "zero_optimization" ---------------------------------------------------------------------

# How DeepSpeed's own ZeRO runs (buckets, overlap, layout, ZeRO-3's and ZeRO++'s knobs, which
# DeepSpeed ignores below stage 3): moot once zeroopt reduces and shards. Among them
# zero_quantized_gradients (ZeRO++'s qgZ): DeepSpeed 0.19.8 reads it only in ZeRO-3 (stage3.py,
# all_to_all_quant_reduce, int4), so at stages 1 and 2 it reduces exactly, and so does zeroopt;
# zeroopt's own qgZ is ZeroOptimizer(grad_compression="int8" | "int4").
ZERO_MOOT = (
    "contiguous_gradients", "reduce_scatter", "use_multi_rank_bucket_allreduce",
    "allgather_partitions", "allgather_bucket_size", "overlap_comm", "compute_grad_norm",
    "load_from_fp32_weights", "elastic_checkpoint", "sub_group_size",
    "cpu_offload_use_pin_memory", "ignore_unused_parameters", "legacy_stage1",
    "round_robin_gradients", "parameter_alignment", "zero_hpz_partition_size",
    "zero_quantized_weights", "zero_quantized_nontrainable_weights", "zero_quantized_gradients",
    "memory_efficient_linear", "pipeline_loading_checkpoint", "override_module_apply",
    "log_trace_cache_warnings", "enable_sanity_checks", "save_muon_momentum_buffer_in_memory",
    "leaf_module", "stage3_gather_fp16_weights_on_model_save",
    *(f"{prefix}{name}" for prefix in ("", "stage3_") for name in (
        "prefetch_bucket_size", "param_persistence_threshold", "model_persistence_threshold",
        "max_live_parameters", "max_reuse_distance", "gather_16bit_weights_on_model_save",
        "module_granularity_threshold", "use_all_reduce_for_fetch_params",
        "allgather_sequential")))
ZERO_MAPPED = ("stage", "reduce_bucket_size", "offload_optimizer", "cpu_offload",
               "offload_param", "cpu_offload_param", "zenflow")
OFFLOAD_KEYS = ("device", "nvme_path", "buffer_count", "pin_memory", "pipeline_read",
                "pipeline_write", "fast_init", "ratio", "super_offload", "cpuadam_cores_perc")


def _zero(section, out: Translation) -> None:
    if section is None:
        return
    if isinstance(section, bool):  # DeepSpeed's old form: true is stage 1
        section = {"stage": 1 if section else 0}
    if not isinstance(section, dict):
        raise ConfigError(f'"zero_optimization" must be a dict, got {section!r}')
    known = (*ZERO_MAPPED, *ZERO_MOOT)
    for key in section:
        if key not in known:
            close = closest_name(key, known)
            hint = f' Did you mean "{close}"?' if close else ""
            raise ConfigError(f'unknown key "zero_optimization.{key}".{hint} (DeepSpeed 0.19.8 '
                              f"refuses it too)")
    stage = section.get("stage", 0)
    if isinstance(stage, bool) or stage not in (0, 1, 2, 3):
        raise ConfigError(f"zero_optimization.stage must be 0, 1, 2 or 3, got {stage!r}")
    _refuse_if(stage == 3, 'zero_optimization.stage=3 partitions the params, which zeroopt does '
                           'not: set "stage": 2 (zeroopt then shards the optimizer states and the '
                           'gradients), or keep DeepSpeed\'s ZeRO-3 with deepspeed.initialize '
                           '(zeroopt.FusedOptimizer gives it 8-bit states)')
    _refuse_if(_device(section.get("offload_param")) != "none"
               or bool(section.get("cpu_offload_param")),
               "zero_optimization.offload_param: zeroopt keeps the params on the device and "
               'does not offload them; remove offload_param ("offload_optimizer" maps to '
               "zeroopt's paged states)")
    _refuse_if(bool(section.get("zenflow")),
               "zero_optimization.zenflow updates only the important gradients' share at each "
               "step, which zeroopt does not compute; remove it")
    if stage:
        out.optimizer_kwargs["stage"] = int(stage)  # DeepSpeed is then given stage 0
    if "reduce_bucket_size" in section:
        out.optimizer_kwargs["bucket_numel"] = _whole(section["reduce_bucket_size"],
                                                      "zero_optimization.reduce_bucket_size")
    _offload(section, out)
    out.ignored += [f"zero_optimization.{k}" for k in section if k in ZERO_MOOT]
    if "offload_param" in section:
        out.ignored.append("zero_optimization.offload_param")  # device "none"


def _device(offload) -> str:
    if offload is None:
        return "none"
    if not isinstance(offload, dict):
        raise ConfigError(f"an offload section must be a dict with a device, got {offload!r}")
    return str(offload.get("device", "none"))


def _offload(section: dict, out: Translation) -> None:
    """offload_optimizer: the optimizer states off the device, as zeroopt's paged states;
    "nvme" keeps their files in nvme_path (page_dir), "cpu" in the temp directory."""
    offload = section.get("offload_optimizer")
    if offload is None and section.get("cpu_offload"):  # DeepSpeed's deprecated form
        offload = {"device": "cpu"}
    device = _device(offload)
    if offload is not None:
        for key in offload:
            if key not in OFFLOAD_KEYS:
                raise ConfigError(f'unknown key "zero_optimization.offload_optimizer.{key}"; '
                                  f"it takes: {', '.join(OFFLOAD_KEYS)}")
        out.ignored += [f"zero_optimization.offload_optimizer.{k}" for k in offload
                        if k not in ("device", "nvme_path")]
    if device == "none":
        return
    _refuse_if(device not in ("cpu", "nvme"),
               f'zero_optimization.offload_optimizer.device must be "cpu", "nvme" or "none", '
               f"got {device!r}")
    out.optimizer_kwargs["paged"] = True
    if device == "nvme":
        _refuse_if(not offload.get("nvme_path"),
                   'offload_optimizer "nvme" needs "nvme_path" (the directory of the paged '
                   "states' files)")
        out.optimizer_kwargs["page_dir"] = str(offload["nvme_path"])


def _whole(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value) \
            or value < 1:
        raise ConfigError(f"{name} must be a positive whole number of elements, got {value!r}")
    return int(value)


# -- precision and communication -------------------------------------------------------------

COMM_DTYPES = {"fp32": "fp32", "float32": "fp32", "bf16": "bf16", "bfloat16": "bf16"}
BF16_KEYS = ("enabled", "bf16_master_weights_and_grads", "bf16_optimizer_states",
             "immediate_grad_update", "check_grad_overflow", "auto_cast")


def _precision_and_communication(config: dict, out: Translation) -> None:
    """communication_data_type: the dtype gradients are reduced in (zeroopt's reduce_dtype);
    bf16.bf16_optimizer_states: zeroopt's bf16 states; the other bf16 keys are moot (zeroopt
    keeps fp32 masters and reduces the gradients itself)."""
    if "communication_data_type" in config and config["communication_data_type"] is not None:
        name = str(config["communication_data_type"]).lower()
        _refuse_if(name not in COMM_DTYPES,
                   f'communication_data_type {config["communication_data_type"]!r}: zeroopt '
                   f'reduces gradients in "fp32" or "bf16" (fp16 would need a loss scaler)')
        out.optimizer_kwargs["reduce_dtype"] = COMM_DTYPES[name]
    if config.get("gradient_allreduce_op", "mean") != "mean":
        raise ConfigError('gradient_allreduce_op "sum": zeroopt averages the gradients over the '
                          "ranks; remove it (or scale the loss by the world size)")
    for key in ("prescale_gradients", "gradient_predivide_factor"):
        if key in config:
            out.ignored.append(key)  # the average is the same; zeroopt computes it in one place
    bf16 = config.get("bf16") or config.get("bfloat16")
    if not isinstance(bf16, dict) or not bf16.get("enabled"):
        return
    if bf16.get("bf16_optimizer_states"):
        out.optimizer_kwargs["state_precision"] = "bf16"
    out.ignored += [f"bf16.{k}" for k in bf16 if k not in ("enabled", "bf16_optimizer_states")]
