"""Train and eval modes, for rules whose params are evaluated at another point than the one
training steps (schedule-free: training steps y, evaluation uses the average x).

``ZeroOptimizer.eval()`` and ``train()`` move this rank's shard of each group not in the mode
yet with the rule's ``to_eval`` or ``to_train`` (``switch``), then gather the params into the
model. Rules without them train where they evaluate: both are no-ops.
"""

from __future__ import annotations

import torch

from . import shard_windows
from .algorithms import ShardTensors
from .algorithms.base import UpdateRule
from .layout import Layout
from .shard import Shard


@torch.no_grad()
def switch(rule: UpdateRule, param_groups: list[dict], shard: Shard, layout: Layout,
           train: bool) -> bool:
    """Move this rank's shard of every group whose ``train_mode`` is not ``train`` yet, and
    set its ``train_mode``.

    Args:
        rule: the optimizer's update rule (its ``to_train`` or ``to_eval``).
        param_groups: the optimizer's groups.
        shard: the optimizer's ``Shard`` (masters, states, windows).
        layout: its ``Layout`` (which group each stepped param is in).
        train: True for train mode, False for eval mode.

    Returns:
        Whether anything moved (the same on every rank): then the caller gathers the params
        into the model (a collective).
    """
    move = rule.to_train if train else rule.to_eval
    # Already there: nothing to gather (the Trainer calls train() before every micro-step).
    if move is None or all(group["train_mode"] == train for group in param_groups):
        return False
    shard.sync_masters()
    stepped = shard.stepped()
    for g, group in enumerate(param_groups):
        if group["train_mode"] != train:
            def step_to(tensors: ShardTensors) -> None:
                if tensors.params:
                    move(group, tensors)

            # Reads the states (schedule-free's z), leaves them as they are. Params never
            # stepped have no z yet (torch.optim: no state) and stay where they are.
            windows = shard.windows_for(g, [k for k in stepped if layout.slots[k].group == g])
            shard_windows.run(windows, step_to, load=True, store=False)
            group["train_mode"] = train
    return True
