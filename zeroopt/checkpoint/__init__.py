"""The shard in saved form, and back: everything zeroopt persists lives here.

- ``state_dict.py``: ``ZeroOptimizer.state_dict()`` / ``load_state_dict()``, torch.optim's
  form (per param, in its shape), gathered on every rank;
- ``torch_interop.py``: that form as torch.optim's own classes save it, both ways;
- ``save_load.py``: ``save_checkpoint`` / ``load_checkpoint``, the model and the sharded state
  written by every rank in parallel with torch.distributed.checkpoint (DCP), read at any world
  size; its parts: ``optimizer_items.py`` (the optimizer's DCP items), ``ranges.py`` (a rank's
  ranges of a flat tensor), ``directory.py`` (atomic saves, verified loads), ``compat.py``
  (refusing another model's checkpoint), ``job.py`` and ``errors.py`` (one error on every
  rank);
- ``pieces.py``: the one walk from the shard's pieces to each param's saved tensors, and
  back, that both forms use; ``encoding.py``: a saved state converted into the form a region
  keeps (8-bit, bf16, fp32).
"""

from .errors import CheckpointError
from .save_load import load_checkpoint, save_checkpoint
from .torch_interop import export_torch_state_dict

__all__ = ["CheckpointError", "export_torch_state_dict", "load_checkpoint", "save_checkpoint"]
