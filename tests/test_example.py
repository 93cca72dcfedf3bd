"""The main job, run as the README runs it: the launcher, torchrun, 2 ranks, gloo."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpt_example_trains_on_two_ranks(tmp_path):
    out = tmp_path / "summary.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHON": sys.executable}
    run = subprocess.run(
        ["bash", "launchers/torchrun.sh", "--nproc", "2", "--steps", "25", "--stage", "2",
         "--out_json", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "final_train_loss=" in run.stdout
    summary = json.loads(out.read_text())
    losses = summary["train_losses"]
    assert summary["world_size"] == 2
    assert losses[-1] < losses[0] - 1.0, losses  # bytes start near ln(256) = 5.5
    per_rank = summary["state_bytes_per_rank"]
    assert len(per_rank) == 2 and max(per_rank) - min(per_rank) <= 0.01 * max(per_rank)
