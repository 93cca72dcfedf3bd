"""zeroopt: ZeRO-style optimizer-state sharding for data-parallel PyTorch training."""

from . import comm
from .algorithms import ReferenceOptimizer, available_optimizers
from .optimizer import ZeroOptimizer
from .param_groups import galore_param_groups
from .wrap import wrap

__version__ = "0.1.0"

__all__ = ["ReferenceOptimizer", "comm", "ZeroOptimizer", "available_optimizers", "galore_param_groups",
           "wrap"]
