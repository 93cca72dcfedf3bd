"""What a checkpoint was saved from, and the first way the model or optimizer at hand differs.

The manifest records the model's entries (name, shape) and the optimizer's rule and params
(group sizes, each param's shape and, where the model names it, its name). A load compares them
before reading anything, so loading another model's or optimizer's checkpoint is an error that
names the first difference, not a silent partial load or a shape error deep inside DCP.
"""

from __future__ import annotations

import torch

from .directory import CheckpointError


def describe(model: torch.nn.Module | None, optimizer) -> dict:
    """What the manifest records of ``model`` and ``optimizer``, for ``check_matches``.

    Args:
        model: the module (each ``state_dict()`` entry's name and shape), or None.
        optimizer: the ZeroOptimizer (its rule's name, the number of params in each group,
            and each param's shape and, where ``model`` names it, its name), or None.

    Returns:
        A JSON-serialisable dict with ``"model"``: ``[[name, shape], ...]`` and
        ``"optimizer"``: ``{"rule": ..., "groups": [params per group], "params":
        [[name or None, shape], ...]}``, each key only for what was given.
    """
    out = {}
    if model is not None:
        out["model"] = [[name, list(value.shape)] for name, value in _entries(model).items()]
    if optimizer is not None:
        names = {id(p): n for n, p in model.named_parameters()} if model is not None else {}
        out["optimizer"] = {
            "rule": optimizer.rule.name,
            "groups": [len(g["params"]) for g in optimizer.param_groups],
            "params": [[names.get(id(p)), list(p.shape)]
                       for g in optimizer.param_groups for p in g["params"]],
        }
    return out


def check_matches(path: str, saved: dict, model, optimizer) -> None:
    """Refuse a checkpoint whose model or optimizer differs from the ones at hand.

    Args:
        path: the checkpoint's directory, for the message.
        saved: its manifest (``describe``'s keys among them).
        model: the module to load into, or None (not compared).
        optimizer: the ZeroOptimizer to load into, or None (not compared).

    Raises:
        CheckpointError: naming the first difference: a model entry missing, extra or of
            another shape; no model or no optimizer state saved where one is given; another
            rule, other group sizes, or a param of another shape.
    """
    why = _model_mismatch(saved, model) or _optimizer_mismatch(saved, optimizer)
    if why:
        raise CheckpointError(f"checkpoint {path} does not fit: {why}. Load it into the model "
                              "and optimizer it was saved from (same architecture, same param "
                              "groups, same optimizer)")


def _entries(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return model.state_dict()


def _model_mismatch(saved: dict, model) -> str | None:
    if model is None:
        return None
    if "model" not in saved:
        return "it holds no model (it was saved with model=None); pass model=None to load it"
    have = {name: list(value.shape) for name, value in _entries(model).items()}
    for name, shape in saved["model"]:
        if name not in have:
            return f"the checkpoint's model has {name!r} {shape}, this model has no such entry"
        if have[name] != shape:
            return (f"model entry {name!r} has shape {shape} in the checkpoint and "
                    f"{have[name]} here")
    extra = [name for name in have if name not in {n for n, _ in saved["model"]}]
    if extra:
        return f"this model has {extra[0]!r} {have[extra[0]]}, which the checkpoint lacks"
    return None


def _optimizer_mismatch(saved: dict, optimizer) -> str | None:
    if optimizer is None:
        return None
    if "optimizer" not in saved:
        return "it holds no optimizer state (it was saved with optimizer=None)"
    mine = describe(None, optimizer)["optimizer"]
    theirs = saved["optimizer"]
    if theirs["rule"] != mine["rule"]:
        return (f"it was saved by optimizer {theirs['rule']!r}, this one is {mine['rule']!r}")
    if theirs["groups"] != mine["groups"]:
        return (f"its param groups hold {theirs['groups']} params, this optimizer's hold "
                f"{mine['groups']}")
    for index, ((name, shape), (_, here)) in enumerate(zip(theirs["params"], mine["params"])):
        if shape != here:
            label = f"param {index}" + (f" ({name})" if name else "")
            return f"{label} has shape {shape} in the checkpoint and {here} here"
    return None
