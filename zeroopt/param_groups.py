"""Param groups for the rules that treat matrices apart: the low-rank rules (GaLore, APOLLO),
built as Transformers builds them from ``optim_target_modules``, and Muon's hybrid groups."""

from __future__ import annotations

import re

from torch import nn

from .algorithms import get_rule


def galore_param_groups(model: nn.Module, target_modules: str | list[str], rank: int = 128,
                        **projection) -> list[dict]:
    """``[{"params": every other param}, {"params": the target Linear weights, "rank": rank,
    **projection}]``: the groups galore-torch's and apollo-torch's optimizers take.

    ``target_modules`` picks modules by name as Transformers' ``optim_target_modules`` does: a
    list of names (a module matches if it equals one, contains one, or fully matches one as a
    regex), one regex string (full match), or ``"all-linear"``. Only ``nn.Linear`` weights are
    projected (their 2-D matrices); biases and every other param stay in the first group and
    run the rule's plain update. ``projection`` holds the other keys (``update_proj_gap``,
    ``scale``, ``proj_type``; APOLLO's ``proj``, ``scale_type``); left out, they take the
    optimizer's defaults. Example::

        groups = zeroopt.galore_param_groups(model, ["attn", "mlp"], rank=128, scale=0.25)
        opt = zeroopt.ZeroOptimizer(groups, "galore_adamw", lr=1e-3)
    """
    if not isinstance(target_modules, (str, list, tuple)):
        raise TypeError(f"target_modules must be a list of module names, a regex string, or "
                        f"'all-linear', got {target_modules!r}")
    all_linear = isinstance(target_modules, str) and \
        target_modules.replace("_", "-") == "all-linear"
    targets = set()
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and (all_linear or _matches(target_modules, name)):
            targets.add(id(module.weight))
    if not targets:
        modules = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
        raise ValueError(f"no nn.Linear module matches target_modules={target_modules!r}; the "
                         f"model's Linear modules are: {', '.join(modules) or 'none'}")
    projected = [p for p in model.parameters() if id(p) in targets]
    others = [p for p in model.parameters() if id(p) not in targets]
    return [{"params": others}, {"params": projected, "rank": rank, **projection}]


def _matches(target_modules: str | list[str], name: str) -> bool:
    """Transformers' check_target_module_exists."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return (name in target_modules or any(key in name for key in target_modules)
            or any(re.fullmatch(key, name) for key in target_modules))


# The last name of an output head's module in common models (Llama, GPT-2, ViT, BERT classifiers)
HEAD_NAMES = ("lm_head", "head", "output", "classifier", "score")


def muon_param_groups(model: nn.Module, target_modules: str | list[str] | None = None, *,
                      adamw_lr: float | None = None,
                      adamw_betas: tuple[float, float] = (0.9, 0.999),
                      adamw_eps: float = 1e-8,
                      adamw_weight_decay: float | None = None) -> list[dict]:
    """Muon's hybrid groups, as Muon is run (Keller Jordan's ``MuonWithAuxAdam``, Moonlight):
    ``[{"params": the hidden matrices}, {"params": the rest, "use_muon": False, ...}]`` for
    ``ZeroOptimizer(groups, "muon", ...)``, which steps the first group with torch.optim.Muon's
    update and the second with torch.optim.AdamW's.

    Args:
        model: the model; every param lands in exactly one group.
        target_modules: which modules' weights get Muon. None (default): a param's own
            ``use_muon`` attribute where it has one (DeepSpeed's tag: ``p.use_muon = True``),
            else every param of two or more dimensions except embeddings' (``nn.Embedding``)
            and the output head's (the module ``model.get_output_embeddings()`` returns, as
            Transformers models have, modules whose last name is one of ``HEAD_NAMES``, and any
            param tied to an embedding). Otherwise module names as Transformers' ``optim_target_modules``: a
            list (a module matches if it equals one, contains one or fully matches one as a
            regex), one regex string (full match), or ``"all-linear"``; their params of two
            or more dimensions get Muon (convolutions' as their (out, rest) matrix).
        adamw_lr, adamw_weight_decay: the AdamW group's lr and weight_decay; None (default)
            inherits the optimizer's, as Moonlight runs both with one lr (with
            ``adjust_lr_fn="match_rms_adamw"``, which scales Muon's update to AdamW's RMS).
        adamw_betas, adamw_eps: the AdamW group's betas and eps, torch.optim.AdamW's defaults
            ((0.9, 0.999) and 1e-8; muon's own eps default, 1e-7, is Newton-Schulz's).

    Returns:
        One or two groups (the AdamW group only when some param is not a Muon matrix).

    Raises:
        ValueError: no param would get Muon (the message lists the model's modules).
        TypeError: ``target_modules`` of another type.
    """
    muon_ids = _muon_matrices(model, target_modules)
    if not muon_ids:
        named = [name for name, _ in model.named_modules() if name]
        raise ValueError(f"no param of two or more dimensions is a hidden matrix of this model "
                         f"(target_modules={target_modules!r}); its modules are: "
                         f"{', '.join(named) or 'none'}")
    params = list(model.parameters())
    groups = [{"params": [p for p in params if id(p) in muon_ids]}]
    others = [p for p in params if id(p) not in muon_ids]
    if others:
        adamw = {"params": others, "use_muon": False, "betas": adamw_betas, "eps": adamw_eps}
        if adamw_lr is not None:
            adamw["lr"] = adamw_lr
        if adamw_weight_decay is not None:
            adamw["weight_decay"] = adamw_weight_decay
        groups.append(adamw)
    return groups


def _muon_matrices(model: nn.Module, target_modules) -> set[int]:
    """The ids of the params ``muon_param_groups`` gives Muon."""
    if target_modules is not None:
        if not isinstance(target_modules, (str, list, tuple)):
            raise TypeError(f"target_modules must be None, a list of module names, a regex "
                            f"string, or 'all-linear', got {target_modules!r}")
        all_linear = isinstance(target_modules, str) and \
            target_modules.replace("_", "-") == "all-linear"
        return {id(p) for name, module in model.named_modules()
                if (isinstance(module, nn.Linear) if all_linear
                    else name and _matches(target_modules, name))
                for p in module.parameters(recurse=False) if p.dim() >= 2}
    excluded = {id(p) for module in model.modules() if isinstance(module, nn.Embedding)
                for p in module.parameters(recurse=False)}
    output = getattr(model, "get_output_embeddings", None)
    head = output() if callable(output) else None
    for name, module in model.named_modules():
        if module is head or name.rsplit(".", 1)[-1] in HEAD_NAMES:
            excluded.update(id(p) for p in module.parameters(recurse=False))
    return {id(p) for p in model.parameters()
            if getattr(p, "use_muon", p.dim() >= 2 and id(p) not in excluded)}


def model_param_groups(model: nn.Module, optimizer: str) -> list:
    """What ``ZeroOptimizer(..., optimizer)`` optimizes for the whole ``model`` when no param
    groups are given (the DeepSpeed section): ``muon_param_groups(model)`` for rules with
    Muon's hybrid groups (a ``use_muon`` hyperparameter), else ``list(model.parameters())``."""
    if "use_muon" in get_rule(optimizer).defaults:
        return muon_param_groups(model)
    return list(model.parameters())
