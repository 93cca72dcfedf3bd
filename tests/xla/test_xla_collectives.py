"""zeroopt's XLA backend on real XLA:CPU replicas (run by .ci/xla.sh in its own venv with
torch_xla; the main suite, without torch_xla, skips this file).

Each case runs tests/xla/replicas.py in a subprocess with CPU_NUM_DEVICES=W: one process, one
thread per XLA:CPU device (the way torch_xla runs CPU replicas), under a timeout, since XLA
aborts the whole process when a collective's rendezvous times out.
"""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

pytest.importorskip("torch_xla", reason="torch_xla is not installed (see .ci/xla.sh)")

HERE = pathlib.Path(__file__).resolve().parent
TIMEOUT = int(os.environ.get("ZEROOPT_XLA_CASE_TIMEOUT", "240"))


def run_replicas(world: int, check: str, args: dict | None = None) -> dict[int, dict]:
    env = dict(os.environ, PJRT_DEVICE="CPU", CPU_NUM_DEVICES=str(world),
               XLA_THREAD_POOL_SIZE=str(max(world, os.cpu_count() or 1)))
    cmd = [sys.executable, str(HERE / "replicas.py"), check] + ([json.dumps(args)] if args else [])
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    except subprocess.TimeoutExpired as error:
        pytest.fail(f"{check} at W={world} did not finish in {TIMEOUT} s: "
                    f"{(error.stderr or '')[-3000:]}")
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        pytest.fail(f"{check} at W={world} failed (exit {proc.returncode}):\n"
                    f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return {int(rank): value for rank, value in json.loads(lines[-1][len("RESULT "):]).items()}


@pytest.mark.parametrize("world", [2, 3, 4])
def test_collectives(world):
    results = run_replicas(world, "collectives")
    assert sorted(results) == list(range(world))
    w = world
    for r, got in results.items():
        assert got["rank"] == r and got["world_size"] == w
        # reduce_bucket: chunk r of the bucket holds the sum over ranks of arange * (rank + 1)
        total = sum(k + 1 for k in range(w))
        assert got["reduced_chunk"] == [float(total * i) for i in range(5 * r, 5 * r + 5)]
        # gather_bucket: every chunk holds its owner's chunk
        assert got["gathered"] == [float(i + 10 * k) for k in range(w) for i in range(4)]
        values = [[i - 3.0 * k for i in range(7)] for k in range(w)]
        assert got["all_reduce_sum"] == [sum(col) for col in zip(*values)]
        assert got["all_reduce_max"] == [max(col) for col in zip(*values)]
        assert got["all_reduce_min"] == [min(col) for col in zip(*values)]
        assert got["all_reduce_sum_scalar"] == float(sum(k + 1 for k in range(w)))
        assert got["all_reduce_max_scalar"] == float(w)
        assert got["all_reduce_min_scalar"] == 1.0
        assert got["broadcast"] == [[float(w - 1 + 7)] * 2] * 3
        assert got["broadcast_int"] == [1]
        assert got["objects"] == [{"rank": k, "pad": "x" * (3 * k)} for k in range(w)]
        assert got["after_steps"] == [3.0 * w] * (2 * w)


# ZeroOptimizer on XLA:CPU replicas: not yet reliable. Some multi-step runs deadlock in a
# collective that one replica never reaches (XLA aborts after 10 s), so these run only when
# asked for (ZEROOPT_XLA_OPTIMIZER=1), never as a flaky CI step. Observed: W=2 passes, W=3 and
# W=4 deadlock now and then.
OPT_IN = pytest.mark.skipif(
    os.environ.get("ZEROOPT_XLA_OPTIMIZER") != "1",
    reason="ZeroOptimizer on XLA:CPU thread replicas deadlocks intermittently (known limit, "
           "see zeroopt/comm/xla.py); run with ZEROOPT_XLA_OPTIMIZER=1")


@OPT_IN
@pytest.mark.parametrize("world,args", [
    (2, {"steps": 4}),
    (2, {"steps": 6, "stage": 2, "clip": 0.05}),
    (3, {"steps": 6}),
    (4, {"steps": 6, "stage": 2, "clip": 0.05}),
])
def test_adamw_matches_torch_on_cpu(world, args):
    results = run_replicas(world, "adamw", args)
    for got in results.values():
        assert got["world_size"] == world
        assert got["adam_updates_views"]  # adam.py's foreach path (no fused kernel on XLA)
        assert got["moved"] > 1e-2  # the params did train
        assert got["max_abs_diff"] < 1e-6, got
