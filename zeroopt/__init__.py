"""zeroopt: ZeRO-style optimizer-state sharding for data-parallel PyTorch training."""

from . import comm
from .algorithms import ReferenceOptimizer, available_optimizers
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .optimizer import ZeroOptimizer
from .param_groups import galore_param_groups
from .torch_interop import export_torch_state_dict
from .wrap import wrap

__version__ = "0.1.0"

__all__ = ["CheckpointError", "ReferenceOptimizer", "ZeroOptimizer", "available_optimizers",
           "comm", "export_torch_state_dict", "galore_param_groups", "load_checkpoint",
           "save_checkpoint", "wrap"]
