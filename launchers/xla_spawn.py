"""Run examples/train_gpt.py (or another script with a ``main(argv)``) on N XLA replicas.

    # N XLA:CPU replicas in one process (the way torch_xla supports CPU replicas):
    PJRT_DEVICE=CPU python launchers/xla_spawn.py --nproc 2 -- --steps 20 --log_interval 5
    python launchers/xla_spawn.py --nproc 2 --script examples/train_gpt.py -- --steps 20

    # TPU / GPU: one replica per device that PJRT finds (--nproc is ignored there)
    PJRT_DEVICE=TPU python launchers/xla_spawn.py -- --steps 200

Everything after ``--`` goes to the script; ``--backend xla`` is added unless given.

How the replicas run: ``torch_xla.distributed.xla_multiprocessing.spawn`` (as
``torch_xla.launch``). On CPU it starts one child process with ``CPU_NUM_DEVICES=N`` XLA:CPU
devices and runs the script in one thread per device; torch_xla 2.9 has no collectives between
XLA:CPU processes, so this is the only multi-replica CPU set-up whose collectives work. This
launcher also sets ``XLA_THREAD_POOL_SIZE`` >= N (each replica blocked in a collective holds a
thread of that pool; with fewer threads than replicas the run deadlocks) before torch_xla starts.
zeroopt's XLA collectives (zeroopt/comm/xla.py) give every collective an explicit channel id,
without which the threads' separately compiled graphs never meet in XLA:CPU's rendezvous (the
stall of plain ``xmp.spawn`` + ``xm.reduce_scatter`` with CPU_NUM_DEVICES=2).

The script's loop must end each iteration at a graph boundary (``torch_xla.sync()``, zeroopt's
``zeroopt.comm.xla.mark_step()``); train_gpt.py does not yet, so this launcher adds one after
every ``ZeroOptimizer.zero_grad()`` (the last call of its iteration).
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import pathlib
import sys
import threading

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_SCRIPT = ROOT / "examples" / "train_gpt.py"


def _load(script: str):
    path = pathlib.Path(script).resolve()
    sys.path.insert(0, str(path.parent))
    spec = importlib.util.spec_from_file_location(f"_xla_spawned_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # its `if __name__ == "__main__":` block does not run
    if not hasattr(module, "main"):
        raise SystemExit(f"{path} has no main(argv) to call in each replica")
    return module


_patch_lock = threading.Lock()


def _step_boundary_after_zero_grad() -> None:
    """One graph per iteration: mark_step() after each ZeroOptimizer.zero_grad()."""
    import zeroopt
    from zeroopt.comm.xla import mark_step

    with _patch_lock:
        cls = zeroopt.ZeroOptimizer
        if getattr(cls.zero_grad, "_xla_step_boundary", False):
            return
        zero_grad = cls.zero_grad

        def zero_grad_then_mark_step(self, *args, **kwargs):
            zero_grad(self, *args, **kwargs)
            mark_step()

        zero_grad_then_mark_step._xla_step_boundary = True
        cls.zero_grad = zero_grad_then_mark_step


def _replica(index: int, script: str, argv: list[str]) -> None:
    sys.path.insert(0, str(ROOT))
    _step_boundary_after_zero_grad()
    module = _load(script)
    module.main(argv)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nproc", type=int, default=2,
                        help="replicas on XLA:CPU (PJRT_DEVICE=CPU); ignored on TPU/GPU")
    parser.add_argument("--script", default=str(DEFAULT_SCRIPT))
    parser.add_argument("script_args", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    script_args = [a for a in args.script_args if a != "--"] if args.script_args[:1] == ["--"] \
        else args.script_args
    if "--backend" not in script_args:
        script_args += ["--backend", "xla"]
    if args.nproc < 1:
        parser.error(f"--nproc must be positive, got {args.nproc}")

    sys.path.insert(0, str(ROOT))
    os.environ.setdefault("PJRT_DEVICE", "CPU")
    if os.environ["PJRT_DEVICE"] == "CPU":
        from zeroopt.comm.xla import cpu_replicas_environment

        cpu_replicas_environment(args.nproc)  # before torch_xla starts its runtime
    try:
        import torch_xla.distributed.xla_multiprocessing as xmp
    except ImportError as error:
        raise SystemExit(f"torch_xla is not installed ({error}): bash .ci/xla.sh builds a venv "
                         "with it, or pip install torch_xla==<your torch version>")
    xmp.spawn(_replica, args=(args.script, script_args))


if __name__ == "__main__":
    main()
