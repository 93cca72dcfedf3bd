"""One MPI rank of ``distributed.mpi_ranks``: ``python mpi_entry.py module:function OUT_DIR``
(module: a dotted name under tests/, e.g. ranks.equivalence).

Runs ``function()`` with ZEROOPT_BACKEND=mpi (set by the caller), then writes the result (or
the traceback) to OUT_DIR/rank<R>.pt (.err). MPI is finalized before exit, as mpirun expects.
"""

import importlib
import io
import os
import sys
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from mpi4py import MPI  # noqa: E402

torch.set_num_threads(1)
target, out_dir = sys.argv[1], sys.argv[2]
rank = MPI.COMM_WORLD.Get_rank()
try:
    module, function = target.split(":")
    result = getattr(importlib.import_module(module), function)()
    blob = io.BytesIO()
    torch.save(result, blob)
    with open(os.path.join(out_dir, f"rank{rank}.pt"), "wb") as f:
        f.write(blob.getvalue())
except BaseException:  # noqa: BLE001 - everything goes back to the test process
    with open(os.path.join(out_dir, f"rank{rank}.err"), "w") as f:
        f.write(traceback.format_exc())
    MPI.COMM_WORLD.Abort(1)  # the other ranks may be waiting in a collective
MPI.Finalize()
