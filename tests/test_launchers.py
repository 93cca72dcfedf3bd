"""The launchers other than torchrun.sh, each run as documented at its top: the SLURM batch
script (with stand-ins for SLURM's commands) and the DeepSpeed launcher. The multi-node
torchrun launcher is run across two network namespaces in tests/test_multinode.py."""

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import watch

ROOT = Path(__file__).resolve().parents[1]
LAUNCHERS = ["launchers/torchrun_multinode.sh", "launchers/slurm_torchrun.sbatch",
             "launchers/deepspeed.sh"]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(argv, env, cwd=ROOT):
    # watch.run: a hung launcher (no CPU used for a minute) is killed with its ranks, and its
    # Python stacks are in the failure.
    run = watch.run(argv, cwd=cwd, env=env, merge=True)
    return run.returncode, run.stdout


def _trained(summary_path, world_size, steps):
    summary = json.loads(Path(summary_path).read_text())
    assert summary["world_size"] == world_size
    losses = summary["train_losses"]
    assert len(losses) == steps and all(0 < x < 6 for x in losses), losses
    assert losses[-1] < losses[0]  # bytes start near ln(256) = 5.5
    assert 0 < summary["val_loss"] < 6
    return summary


@pytest.mark.parametrize("script", LAUNCHERS)
def test_launcher_parses(script):
    check = subprocess.run(["bash", "-n", script], cwd=ROOT, capture_output=True, text=True)
    assert check.returncode == 0, check.stderr


def test_configs_have_the_examples_keys():
    """parse_config only knows the keys of the config it loads: a config without one of
    gpt_tiny.json's keys would make that command-line override an error."""
    tiny = json.loads((ROOT / "configs/gpt_tiny.json").read_text())
    for name in ("multinode.json", "deepspeed_cpu.json", "mpi.json"):
        config = json.loads((ROOT / "configs" / name).read_text())
        assert config.keys() == tiny.keys(), name
    assert json.loads((ROOT / "configs/multinode.json").read_text())["reduce_dtype"] == "fp64"


def test_multinode_launcher_rejects_bad_settings():
    env = {**os.environ, "NNODES": "2", "NODE_RANK": "2"}
    code, out = _run(["bash", "launchers/torchrun_multinode.sh", "--steps", "1"], env)
    assert code == 2 and "NODE_RANK must be in 0..1" in out, out
    env = {**os.environ, "RDZV_ENDPOINT": "no-port"}
    code, out = _run(["bash", "launchers/torchrun_multinode.sh", "--steps", "1"], env)
    assert code == 2 and "host:port" in out, out


# SLURM is not installed here and cannot run a job without its daemons, so `scontrol` and
# `srun` are replaced by the two stand-ins below: the ONLY stubs in these tests. Everything
# they hand on is real: the batch script, torchrun_multinode.sh, torchrun, 2 ranks, gloo.
SCONTROL = """#!/usr/bin/env bash
# stand-in for `scontrol show hostnames LIST`, for a comma-separated LIST without ranges
echo "scontrol $*" >&2
[[ "$1 $2" == "show hostnames" ]] || { echo "stub scontrol: unsupported: $*" >&2; exit 1; }
tr ',' '\\n' <<< "$3"
"""
SRUN = """#!/usr/bin/env bash
# stand-in for srun on a one-node allocation: drop srun's options, then run the command once,
# as task 0 of node 0, with the environment (srun's default --export=ALL)
echo "srun $*" >&2
while [[ "${1:-}" == -* ]]; do shift; done
export SLURM_NODEID=0 SLURM_PROCID=0 SLURM_LOCALID=0 SLURM_STEP_ID=0
exec "$@"
"""


def test_slurm_batch_script_launches_the_example(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("scontrol", SCONTROL), ("srun", SRUN)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    # sbatch runs a copy of the script from its spool directory, elsewhere: do the same, so
    # the script must find the repository through SLURM_SUBMIT_DIR.
    spool = tmp_path / "spool"
    spool.mkdir()
    job = spool / "slurm_script"
    job.write_text((ROOT / "launchers/slurm_torchrun.sbatch").read_text())
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
           "PYTHON": sys.executable, "OMP_NUM_THREADS": "1",
           "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "zeroopt-gpt",
           "SLURM_JOB_NODELIST": socket.gethostname(), "SLURM_NNODES": "1",
           "SLURM_SUBMIT_DIR": str(ROOT), "SLURM_GPUS_PER_NODE": "cpu:2",  # 2 ranks
           "RDZV_PORT": str(_free_port())}
    out_json = tmp_path / "summary.json"
    code, out = _run(["bash", str(job), "--steps", "2", "--data_max_bytes", "2000000",
                      "--out_json", str(out_json)], env, cwd=spool)
    assert code == 0, out[-4000:]
    assert f"scontrol show hostnames {socket.gethostname()}" in out
    assert "srun --nodes=1 --ntasks-per-node=1" in out
    assert "1 node(s) x 2 ranks" in out
    summary = _trained(out_json, world_size=2, steps=2)
    assert summary["config"]["reduce_dtype"] == "fp64"  # configs/multinode.json


def test_deepspeed_launcher_trains_the_example(tmp_path):
    pytest.importorskip("deepspeed", reason="the DeepSpeed launcher needs `pip install deepspeed`")
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1",
           "MASTER_PORT": str(_free_port())}
    env.pop("DS_ACCELERATOR", None)  # the launcher picks cpu itself when there is no CUDA
    out_json = tmp_path / "summary.json"
    code, out = _run(["bash", "launchers/deepspeed.sh", "--num_gpus", "2", "--steps", "2",
                      "--data_max_bytes", "2000000", "--out_json", str(out_json)], env)
    assert code == 0, out[-4000:]
    assert "deepspeed.launcher.launch" in out  # it went through DeepSpeed's launcher
    summary = _trained(out_json, world_size=2, steps=2)
    if summary["device"] == "cpu":
        assert summary["config"]["backend"] == "gloo"  # configs/deepspeed_cpu.json


def test_deepspeed_op_build_is_announced_only_when_it_will_happen(tmp_path, monkeypatch):
    """examples/common.py's note before DeepSpeed compiles its CPU comm op (deepspeed_shm_comm,
    ~1-3 silent minutes on a machine's first DeepSpeed run): said when torch's extension cache
    lacks the op's library, not once it is there. (That the real build writes the library
    where this looks was checked by running it into an empty TORCH_EXTENSIONS_DIR.)"""
    pytest.importorskip("deepspeed", reason="needs `pip install deepspeed`")
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() != "cpu":
        pytest.skip("DeepSpeed picked a non-CPU accelerator earlier in this process")
    spec = importlib.util.spec_from_file_location("examples_common", ROOT / "examples/common.py")
    common = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(common)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    said = []
    common.note_deepspeed_build(said.append)
    assert common.deepspeed_ops_to_build() == (["deepspeed_shm_comm"], str(tmp_path))
    assert len(said) == 1 and "deepspeed_shm_comm" in said[0] and str(tmp_path) in said[0]
    (tmp_path / "deepspeed_shm_comm").mkdir()
    (tmp_path / "deepspeed_shm_comm" / "deepspeed_shm_comm.so").write_bytes(b"")
    common.note_deepspeed_build(said.append)
    assert common.deepspeed_ops_to_build() == ([], str(tmp_path)) and len(said) == 1
