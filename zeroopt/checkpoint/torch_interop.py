"""Moving between zeroopt and torch.optim, in both directions.

``export_torch_state_dict(opt)`` gives the state dict the equivalent torch.optim optimizer (the
rule's ``torch_class``: AdamW, Adam, SGD, Adagrad, RMSprop, Muon) saves: states decoded to fp32
in each param's shape (8-bit and bf16 states are decoded; fp32 masters are dropped: torch.optim
keeps none), the group keys torch's class knows, and a per-param ``step`` only where torch's
class keeps one (not SGD's, not Muon's). A hybrid Muon optimizer (groups with
``use_muon=False``, stepped by AdamW) is refused: torch.optim has no one class for it (torch
runs it as a Muon and an AdamW optimizer), so no single state dict is what torch would load;
so are params torch.optim.Muon refuses (not 2-D: a convolution's weight).
``ZeroOptimizer.load_state_dict`` takes such a dict (``from_torch`` fills in what torch.optim
leaves out), so state moves either way.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..algorithms import registered_rules
from ..states.blockwise import BLOCK, dequantize

# torch.optim classes whose per-param state has no "step" (SGD: momentum_buffer; Muon:
# momentum_buffer): their state dicts must not gain one.
NO_STEP_COUNT = (torch.optim.SGD, torch.optim.Muon)

# Keys torch.optim puts in param groups that choose an implementation, not the math.
IMPLEMENTATION_KEYS = {"foreach", "fused", "capturable", "differentiable",
                       "decoupled_weight_decay", "initial_lr"}


def export_torch_state_dict(optimizer) -> dict | None:
    """The optimizer's whole state as torch.optim's equivalent class saves it, on rank 0
    (None on the others). A collective: call it on every rank.

    Args:
        optimizer: a ZeroOptimizer whose rule's ``torch_class`` is a torch.optim class.

    Returns:
        ``{"state": {index: {name: fp32 tensor in the param's shape, "step": ...}},
        "param_groups": [...]}`` on rank 0, exactly the keys torch's class saves; None on the
        other ranks.

    Raises:
        ValueError: (on every rank, before any collective) the rule has no torch.optim
            equivalent, a zeroopt-only option is on, a Muon group has ``use_muon=False``
            (hybrid: torch has no one optimizer for it), or a Muon param is not 2-D.
    """
    rule = optimizer.rule
    torch_class = _torch_optim_class(rule)
    if torch_class is None:
        exportable = sorted(r.name for r in registered_rules() if _torch_optim_class(r))
        raise ValueError(f"optimizer {rule.name!r} has no torch.optim equivalent (those are "
                         f"{', '.join(exportable)}); use optimizer.state_dict() "
                         "or zeroopt.save_checkpoint to save it")
    for group in optimizer.param_groups:
        on = [k for k, off in rule.zeroopt_only.items() if group.get(k, off) != off]
        if on:
            raise ValueError(f"torch.optim.{torch_class.__name__} has no {on[0]!r}: a state "
                             f"trained with {on[0]}=True is not what it would continue")
    _refuse_what_torch_cannot_continue(optimizer, torch_class)
    full = optimizer.state_dict()  # every rank takes part in the gather
    if (dist.get_rank() if dist.is_initialized() else optimizer.comm.rank) != 0:
        return None
    torch_keys = set(torch_class([torch.zeros(1, 1)]).defaults)  # Muon takes matrices only
    groups = [{k: v for k, v in group.items() if k in torch_keys or k == "params"}
              for group in full["param_groups"]]
    state = {}
    for index, entry in full["state"].items():
        names = [k for k in entry if k not in ("step", "master_param")
                 and not k.endswith("_absmax")]
        out = {name: _decoded(entry, name, optimizer) for name in names}
        if torch_class not in NO_STEP_COUNT:
            out["step"] = torch.tensor(float(entry["step"]))
        state[index] = out
    return {"state": state, "param_groups": groups}


def _refuse_what_torch_cannot_continue(optimizer, torch_class: type) -> None:
    """ValueError (on every rank alike, before any collective) for Muon's hybrid groups
    (``use_muon=False``: AdamW's step and states, which torch.optim.Muon has not) and for
    params torch.optim.Muon refuses (not 2-D)."""
    for index, group in enumerate(optimizer.param_groups):
        if group.get("use_muon", True) is False:
            raise ValueError(
                f"export_torch_state_dict: param group {index} has use_muon=False (AdamW's "
                f"step): torch.optim has no one optimizer for a hybrid Muon run (torch runs it "
                f"as torch.optim.{torch_class.__name__} over the use_muon groups plus "
                f"torch.optim.AdamW over the others), so no single state dict is what torch "
                f"would load. Save it with optimizer.state_dict() or zeroopt.save_checkpoint "
                f"(both load at any world size), or give each part a ZeroOptimizer of its own")
    if torch_class is not torch.optim.Muon:
        return
    for index, group in enumerate(optimizer.param_groups):
        for param in group["params"]:
            if param.dim() != 2:
                raise ValueError(
                    f"export_torch_state_dict: torch.optim.Muon takes 2-D params only, and "
                    f"param group {index} has one of shape {tuple(param.shape)} (zeroopt "
                    f"steps it as its flattened matrix); save it with optimizer.state_dict() "
                    f"or zeroopt.save_checkpoint")


def _torch_optim_class(rule) -> type | None:
    """The rule's ``torch_class`` if it is torch.optim's (not another package's)."""
    spec = rule.torch_class
    return spec if isinstance(spec, type) and spec.__module__.startswith("torch.optim") else None


def is_torch_state_dict(state_dict: dict) -> bool:
    """Whether ``state_dict`` is a torch.optim state dict rather than ZeroOptimizer's own.

    Args:
        state_dict: what ``load_state_dict`` was given.

    Returns:
        True for a dict with ``"state"`` and ``"param_groups"`` and no ``"zeroopt"`` key.
    """
    return isinstance(state_dict, dict) and "zeroopt" not in state_dict \
        and "state" in state_dict and "param_groups" in state_dict


def from_torch(optimizer, state_dict: dict) -> dict:
    """A torch.optim state dict in the form ZeroOptimizer saves: the implementation keys
    dropped, a step count where torch keeps none (SGD: 1 once a momentum buffer exists)."""
    known = set(optimizer.defaults)
    groups = []
    for saved in state_dict["param_groups"]:
        group = {k: v for k, v in saved.items() if k not in IMPLEMENTATION_KEYS}
        unknown = sorted(set(group) - known - {"params", "param_names"})
        if unknown:
            raise ValueError(f"cannot load this torch.optim state into {optimizer.rule.name!r}: "
                             f"its param groups have {unknown}, which this rule does not take")
        groups.append(group)
    state = {}
    for index, entry in state_dict["state"].items():
        entry = {k: v for k, v in entry.items() if v is not None}
        if "step" not in entry:
            entry["step"] = torch.tensor(1.0 if entry else 0.0)
        state[index] = entry
    return {"state": state, "param_groups": groups}


def _decoded(entry: dict, name: str, optimizer) -> torch.Tensor:
    value = entry[name]
    if value.dtype != torch.uint8:
        return value.float()
    absmax = entry[name + "_absmax"].reshape(-1).float()
    codes = torch.zeros(absmax.numel() * BLOCK, dtype=torch.uint8, device=value.device)
    codes[:value.numel()] = value.reshape(-1)
    signed = name not in optimizer.rule.nonnegative_states
    return dequantize(codes, absmax, signed)[:value.numel()].view(value.shape)
