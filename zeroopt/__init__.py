"""zeroopt: ZeRO-style optimizer-state sharding for data-parallel PyTorch training."""

from . import comm, deepspeed  # deepspeed itself is imported only when used
from .algorithms import ReferenceOptimizer, available_optimizers
from .checkpoint import CheckpointError, export_torch_state_dict, load_checkpoint, save_checkpoint
from .deepspeed.fused_optimizer import FusedOptimizer
from .optimizer import ZeroOptimizer
from .param_groups import galore_param_groups, muon_param_groups
from .wrap import wrap

__version__ = "0.1.0"

__all__ = ["CheckpointError", "FusedOptimizer", "ReferenceOptimizer", "ZeroOptimizer",
           "available_optimizers", "comm", "deepspeed", "export_torch_state_dict",
           "galore_param_groups", "load_checkpoint", "muon_param_groups", "save_checkpoint",
           "wrap"]
