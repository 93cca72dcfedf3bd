"""An unsharded, eager optimizer that runs a rule's reference step param by param.

It is the yardstick the fused, sharded step is tested against, and a readable statement of
what each rule computes. Its states are always fp32, whatever ``state_precision`` says: it is
the 32-bit yardstick the 8-bit states are measured against.
"""

from __future__ import annotations

import torch

from .base import ShardTensors, resolve_defaults


class ReferenceOptimizer(torch.optim.Optimizer):
    """``ReferenceOptimizer(params, optimizer="lion", lr=1e-4)``: plain per-tensor updates."""

    def __init__(self, params, optimizer: str = "adamw", **hyperparameters):
        from . import get_rule

        self.rule = get_rule(optimizer)
        super().__init__(params, resolve_defaults(self.rule, hyperparameters))
        for group in self.param_groups:
            self.rule.validate(group)

    def add_param_group(self, param_group: dict) -> None:
        """torch.optim's, after the rule's ``group_defaults`` (``UpdateRule``)."""
        if self.rule.group_defaults is not None:
            self.rule.group_defaults(param_group, self.defaults)
        super().add_param_group(param_group)

    @torch.no_grad()
    def step(self, closure=None):
        """One update of every param with a gradient, by the rule's ``reference_step``.

        A param whose ``grad`` is None is skipped (its step count unchanged), as in
        torch.optim. A param's states are created on its first step, fp32, at the rule's
        ``initial_values`` (zero otherwise).

        Args:
            closure: re-evaluates the model and returns the loss (optional), run with
                gradients enabled.

        Returns:
            The closure's loss, or None.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        first = 0  # the group's first state_dict index
        for group in self.param_groups:
            if self.rule.before_step:
                self.rule.before_step(group)
            names = group.get("param_names") or [None] * len(group["params"])
            for index, (p, name) in enumerate(zip(group["params"], names), start=first):
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["param_name"] = name  # for rules that exclude params by name
                    state["param_index"] = index  # its state_dict key (APOLLO's seed)
                    starts = self.rule.initial_values(group)
                    for name in self.rule.states(group):
                        start = starts.get(name, 0.0)
                        state[name] = (p.detach().float().clone() if start == "param" else
                                       torch.full_like(p, start, dtype=torch.float32))
                state["step"] += 1
                self.rule.reference_step(group, p, p.grad, state, state["step"])
            first += len(group["params"])
        return loss

    def eval(self) -> None:
        """Move the params to the point to evaluate (schedule-free's ``optimizer.eval()``).

        Does nothing for rules without ``to_eval``, or for groups already in eval mode.
        """
        self._switch_mode(train=False)

    def train(self) -> None:
        """Move the params back to the training point (schedule-free's ``optimizer.train()``).

        Does nothing for rules without ``to_train``, or for groups already in train mode.
        """
        self._switch_mode(train=True)

    @torch.no_grad()
    def _switch_mode(self, train: bool) -> None:
        move = self.rule.to_train if train else self.rule.to_eval
        if move is None:
            return
        for group in self.param_groups:
            if group["train_mode"] == train:
                continue
            for p in group["params"]:
                if self.state[p]:
                    states = {name: [self.state[p][name]] for name in self.rule.states(group)}
                    move(group, ShardTensors([p], [], states))
            group["train_mode"] = train
