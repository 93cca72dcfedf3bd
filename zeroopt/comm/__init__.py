"""Collectives: one small interface (``base.Collectives``), chosen from the environment."""

from __future__ import annotations

import torch

from .base import Collectives, Done, Handle, SingleRank
from .torch_dist import TorchDistributed, init_from_environment


def collectives_for(device: torch.device, process_group=None) -> Collectives:
    """The collectives for params on ``device``: the given process group as it is, else the
    default group (initialised from torchrun's environment if needed), else a single rank."""
    if process_group is not None:
        return TorchDistributed(process_group)
    if init_from_environment(device):
        return TorchDistributed(None)
    return SingleRank()


__all__ = ["Collectives", "Done", "Handle", "SingleRank", "TorchDistributed", "collectives_for"]
