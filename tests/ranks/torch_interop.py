"""Moving state between torch.optim and a sharded ZeroOptimizer, run on every rank.

Both directions, for every rule torch.optim has: train a few steps with one, hand the state to
the other, continue both, compare. Every rank trains on the step's same batch (as in
ranks/checkpoint.py), so the single-process torch.optim sees the gradient the ranks average.
"""

from __future__ import annotations

import copy

import torch

import zeroopt
from training import EXACT, batch, loss_of, max_rel_err, models

RULES = {  # zeroopt name -> (torch.optim class, hyperparameters)
    "adamw": (torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.1)),
    "adam": (torch.optim.Adam, dict(lr=1e-2, weight_decay=0.01)),
    "sgd": (torch.optim.SGD, dict(lr=1e-2, momentum=0.9, dampening=0.1, weight_decay=0.01)),
    "nesterov": (torch.optim.SGD, dict(lr=1e-2, momentum=0.9, nesterov=True)),
    "adagrad": (torch.optim.Adagrad, dict(lr=1e-2, lr_decay=0.01)),
    "rmsprop": (torch.optim.RMSprop, dict(lr=1e-3, momentum=0.5, centered=True)),
}
FIRST, THEN = range(1, 4), range(4, 7)


def _train(model, opt, steps: range) -> None:
    for t in steps:
        loss_of(model, *batch(t, 0)).backward()
        opt.step()
        opt.zero_grad()


def _torch_optimizer(name: str, model):
    cls, hp = RULES[name]
    if name == "nesterov":
        hp = {**hp, "momentum": 0.9}
    return cls(model.parameters(), **hp)


def both_directions(name: str) -> dict[str, float] | None:
    """Relative errors, on rank 0, of (zeroopt -> torch.optim) and (torch.optim -> zeroopt)
    runs against the run that never switched."""
    _, hp = RULES[name]
    results = {}
    # zeroopt first, then torch.optim from its exported state
    model, _ = models()
    opt = zeroopt.ZeroOptimizer(model.parameters(), name, **EXACT, **hp)
    _train(model, opt, FIRST)
    exported = zeroopt.export_torch_state_dict(opt)
    switched = copy.deepcopy(model)
    _train(model, opt, THEN)
    if exported is not None:  # rank 0
        torch_opt = _torch_optimizer(name, switched)
        torch_opt.load_state_dict(exported)
        _train(switched, torch_opt, THEN)
        results["zeroopt->torch"] = max_rel_err(switched, model)
    # torch.optim first, then zeroopt from its state dict
    _, reference = models()
    torch_opt = _torch_optimizer(name, reference)
    _train(reference, torch_opt, FIRST)
    model = copy.deepcopy(reference)
    opt = zeroopt.ZeroOptimizer(model.parameters(), name, **EXACT, **hp)
    opt.load_state_dict(torch_opt.state_dict())
    _train(model, opt, THEN)
    _train(reference, torch_opt, THEN)
    results["torch->zeroopt"] = max_rel_err(model, reference)
    return results
