"""examples/pretrain_llama.py and its tools, run as docs/EXAMPLES.md runs them.

The driver (launchers/compare_optimizers.sh) trains the tiny Llama twice for real on 2 ranks
(torchrun, gloo): AdamW at stage 2 and GaLore-AdamW at stage 1, then plots both runs. The tests
below read what those runs wrote. The model itself is held to transformers' LlamaForCausalLM
with the same weights (when transformers is installed) and to hand-written RMSNorm and rotary.
"""
import csv
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
STEPS, LOG_INTERVAL = 40, 2
COMMON_ARGS = ["--steps", str(STEPS), "--log_interval", str(LOG_INTERVAL), "--warmup_steps", "5",
               "--data_max_bytes", "1000000", "--eval_batches", "2", "--tensorboard", "true"]
# run directory (the driver names it after the run's words) -> the run's own arguments
ADAMW = "adamw_stage_2_save_every_20"
RUNS = {ADAMW: "adamw --stage 2 --save_every 20",
        "galore_adamw_galore_rank_16_galore_update_proj_gap_10":
            "galore_adamw --galore_rank 16 --galore_update_proj_gap 10"}


def load_example(name):
    """Import examples/<name>.py (the examples are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(ROOT / "examples"))  # for the examples' own imports
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(ROOT / "examples"))
    return module


def run_env():
    # The repository on the path too, for a checkout that is not pip-installed.
    pythonpath = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHON": sys.executable,
            "PYTHONPATH": pythonpath}


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    """Both runs' log dirs and the driver's stdout."""
    out = tmp_path_factory.mktemp("compare")
    run = subprocess.run(
        ["bash", "launchers/compare_optimizers.sh", "--nproc", "2", "--out_dir", str(out),
         *COMMON_ARGS, "--", *RUNS.values()],
        cwd=ROOT, env=run_env(), capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return out, run.stdout


def read_log(run_dir: Path, rank: int) -> list[dict]:
    with open(run_dir / f"log_rank{rank}.csv", newline="") as f:
        return list(csv.DictReader(f))


def summary(run_dir: Path, rank: int) -> dict:
    return json.loads((run_dir / f"summary_rank{rank}.json").read_text())


@pytest.mark.parametrize("run", RUNS)
def test_every_rank_logs_its_steps_speed_and_memory(compared, run):
    run_dir = compared[0] / run
    for rank in (0, 1):
        rows = read_log(run_dir, rank)
        assert {"rank", "step", "loss", "loss_all_ranks", "lr", "tokens_per_s_total",
                "tokens_per_s_per_rank", "rss_mb", "peak_rss_mb", "state_mb",
                "cuda_max_allocated_mb"} <= set(rows[0])
        assert [int(r["step"]) for r in rows] == list(range(LOG_INTERVAL, STEPS + 1, LOG_INTERVAL))
        for r in rows:
            assert int(r["rank"]) == rank
            assert math.isfinite(float(r["loss"])) and math.isfinite(float(r["loss_all_ranks"]))
            assert float(r["lr"]) > 0 and float(r["tokens_per_s_per_rank"]) > 0
            # the total is the 2 ranks' (rounded to 0.1 each)
            assert abs(float(r["tokens_per_s_total"]) - 2 * float(r["tokens_per_s_per_rank"])) \
                <= 0.2
            assert 0 < float(r["rss_mb"]) <= float(r["peak_rss_mb"])
            assert float(r["state_mb"]) > 0
            assert r["cuda_max_allocated_mb"] == ""  # CPU run: no CUDA figure to give


@pytest.mark.parametrize("run", RUNS)
def test_loss_falls_and_is_averaged_over_ranks(compared, run):
    rank0, rank1 = (read_log(compared[0] / run, rank) for rank in (0, 1))
    mean = [float(r["loss_all_ranks"]) for r in rank0]
    # Byte-level loss starts near ln(256) = 5.5; 40 steps bring it well below 4.5.
    assert sum(mean[-5:]) / 5 < sum(mean[:3]) / 3 - 1.0, mean
    # Each rank trains on its own batches, and both log the same mean over ranks.
    assert [r["loss"] for r in rank0] != [r["loss"] for r in rank1]
    assert mean == [float(r["loss_all_ranks"]) for r in rank1]
    for r0, r1 in zip(rank0, rank1):
        own = (float(r0["loss"]) + float(r1["loss"])) / 2
        assert abs(own - float(r0["loss_all_ranks"])) < 1e-4


@pytest.mark.parametrize("run", RUNS)
def test_ranks_end_with_identical_params(compared, run):
    s0, s1 = summary(compared[0] / run, 0), summary(compared[0] / run, 1)
    assert s0["world_size"] == 2 and s0["rank"] == 0 and s1["rank"] == 1
    assert s0["params_sha256"] == s1["params_sha256"]
    assert math.isfinite(s0["val_loss"]) and s0["tokens_per_s_per_rank"] > 0
    assert s0["tokens_per_s_total"] == pytest.approx(2 * s0["tokens_per_s_per_rank"], rel=1e-12)
    for s in (s0, s1):  # opt.memory()'s parts add up to the two totals
        m = s["optimizer_memory"]
        assert m["held"] == m["states"] + m["paged_states"] + m["masters"] == s["state_bytes"]
        assert m["on_device"] == m["states"] + m["masters"] + m["scratch"] \
            == s["device_state_bytes"]


def test_runs_differ_and_stage_2_shards_the_adam_states(compared):
    out = compared[0]
    shas = {summary(out / run, 0)["params_sha256"] for run in RUNS}
    assert len(shas) == len(RUNS)  # the digest tells different trainings apart
    adamw = [summary(out / ADAMW, rank) for rank in (0, 1)]
    # fp32 params, so no master copies: the two Adam moments, 8 bytes/param, split in two.
    full = 8 * adamw[0]["num_params"]
    assert abs(sum(s["state_bytes"] for s in adamw) - full) <= 0.01 * full
    assert max(s["state_bytes"] for s in adamw) <= 0.51 * full


def test_driver_output_names_the_job_speed_memory_and_files(compared):
    """What rank 0 prints for each run: the header (ranks, backend, launcher), a line per log
    interval with tokens/s in all and per rank and the ETA, the "done:" line, the optimizer
    memory by part, and where the logs went; then the plot's path."""
    out, stdout = compared
    runs = stdout.split("=== ")[1:]
    assert len(runs) == len(RUNS)
    for run, text in zip(RUNS, runs):
        assert "pretrain_llama.py: 2 ranks over gloo, launched by torchrun, device cpu" in text
        assert f"optimizer: {RUNS[run].split()[0]}, ZeRO stage " in text
        logged = [line for line in text.splitlines() if line.startswith("step ")]
        assert len(logged) == STEPS // LOG_INTERVAL
        assert all(" tok/s (" in line and "/rank) | " in line and "| ETA " in line
                   for line in logged), logged[:2]
        assert logged[-1].startswith(f"step    {STEPS}/{STEPS} |")
        assert "tokens_per_s_total=" in text and "tokens_per_s_per_rank=" in text
        assert "optimizer memory (rank " in text and "decode scratch" in text
        assert f"wrote: {out / run}/log_rank{{0..1}}.csv and summary_rank{{0..1}}.json" in text
    assert f"wrote: the plot {out / 'loss_curves.png'}" in stdout


def test_tensorboard_is_used_only_when_installed(compared):
    out, stdout = compared
    if importlib.util.find_spec("tensorboard") is None:
        assert "tensorboard logging is on in the config but unavailable" in stdout
        assert not (out / ADAMW / "tensorboard").exists()
    else:
        for rank in (0, 1):
            events = list((out / ADAMW / "tensorboard" / f"rank{rank}").glob(
                "events.out.tfevents.*"))
            assert events and events[0].stat().st_size > 0


def test_driver_plots_both_runs(compared):
    out, stdout = compared
    png = out / "loss_curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = pytest.importorskip("matplotlib.image").imread(png)
    assert image.shape[0] > 300 and image.shape[1] > 600
    for run in RUNS:  # the driver's table lists both runs
        assert f"| {run} | " in stdout


def test_resumed_run_ends_with_the_same_params_as_the_uninterrupted_one(compared, tmp_path):
    """The AdamW run saved at steps 20 and 40. Resume a copy of it from step 20: the last 20
    steps see the same batches and end with the same params, and the CSV reads as one run."""
    original = compared[0] / ADAMW
    saved = sorted(p.name for p in (original / "checkpoints").iterdir())
    assert saved == ["step_000020", "step_000040"]
    resumed = tmp_path / "resumed"
    shutil.copytree(original, resumed)
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "examples/pretrain_llama.py", "--config", "configs/llama_tiny.json", *COMMON_ARGS,
         "--optimizer", *RUNS[ADAMW].split(), "--log_dir", str(resumed),
         "--resume", str(resumed / "checkpoints" / "step_000020")],
        cwd=ROOT, env=run_env(), capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "resumed from" in run.stdout and "at step 20" in run.stdout
    for rank in (0, 1):
        assert summary(resumed, rank)["params_sha256"] == summary(original, rank)["params_sha256"]
        before, after = read_log(original, rank), read_log(resumed, rank)
        assert [r["step"] for r in after] == [r["step"] for r in before]
        assert [r["loss"] for r in after] == [r["loss"] for r in before]
        elapsed = [float(r["elapsed_s"]) for r in after]
        assert elapsed == sorted(elapsed)  # the clock goes on from the checkpoint's


@pytest.mark.parametrize("name, low, high", [("llama_tiny.json", 1e6, 3e6),
                                             ("llama_125m.json", 115e6, 135e6),
                                             ("llama_1b.json", 0.9e9, 1.1e9)])
def test_configs_build_models_of_their_size(name, low, high):
    """Every config has the tiny one's keys (so every override works) and builds its model
    (on the meta device: the GPU sizes are not run here)."""
    pretrain = load_example("pretrain_llama")
    tiny = json.loads((ROOT / "configs" / "llama_tiny.json").read_text())
    cfg = pretrain.parse_config(["--config", str(ROOT / "configs" / name)])
    assert cfg.keys() == tiny.keys()
    with torch.device("meta"):
        model = pretrain.build_model(cfg, torch.device("meta"))
    assert low < model.num_params() < high


def test_plot_losses_names_a_missing_log(tmp_path):
    pytest.importorskip("matplotlib")
    plot_losses = load_example("plot_losses")
    with pytest.raises(FileNotFoundError, match="log_rank0.csv"):
        plot_losses.plot([tmp_path], ["nothing"], tmp_path / "x.png")


# ----------------------------------------------------------------------------- the optimizer

def tiny_config(pretrain, *overrides):
    return pretrain.parse_config(["--config", str(ROOT / "configs" / "llama_tiny.json"),
                                  "--dim", "32", "--n_heads", "4", "--n_kv_heads", "2",
                                  "--hidden_dim", "64", "--n_layers", "2", "--max_seq_len", "16",
                                  *overrides])


@pytest.mark.parametrize("name", ["lion", "adafactor", "galore_adamw"])
def test_optimizer_gets_the_configs_groups_and_hyperparameters(name):
    """One process (world size 1): decay on matrices only; betas for the rules that have
    them; GaLore's projection on the attention and MLP matrices, not the embedding."""
    pretrain = load_example("pretrain_llama")
    cfg = tiny_config(pretrain, "--optimizer", name, "--beta2", "0.99", "--galore_rank", "4")
    torch.manual_seed(0)
    model = pretrain.build_model(cfg, torch.device("cpu"))
    opt = pretrain.build_optimizer(model, cfg)
    decay, no_decay, *projected = opt.param_groups
    assert decay["weight_decay"] == cfg["weight_decay"] and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"])
    assert all(p.dim() == 1 for p in no_decay["params"]) and len(no_decay["params"]) == 5
    if name == "galore_adamw":
        assert projected[0]["rank"] == 4 and len(projected[0]["params"]) == 2 * 7
        assert [id(p) for p in decay["params"]] == [id(model.embed_tokens.weight)]
    else:
        assert projected == [] and len(decay["params"]) == 1 + 2 * 7
    assert ("betas" in decay) == (name != "adafactor")
    if name != "adafactor":
        assert tuple(decay["betas"]) == (0.9, 0.99)
    before = [p.detach().clone() for p in model.parameters()]
    x = torch.randint(0, 256, (2, 16))
    model(x, x)[1].backward()
    opt.step()
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters()))


@pytest.mark.parametrize("adjust", ["match_rms_adamw", "original"])
def test_muon_gets_hybrid_groups_and_steps_as_torch_muon_plus_adamw(adjust):
    """--optimizer muon: the 14 attention/MLP matrices on Muon (with --muon_adjust_lr_fn),
    the tied embedding and the 5 norms on AdamW (decay on the embedding only, the config's
    betas). Two steps at world size 1 against torch.optim.Muon + torch.optim.AdamW over the
    same groups: within 1e-6 of each param's largest magnitude (zeroopt's Muon step is
    torch's, bit for bit, observed 0.0; its AdamW runs fused over the flat shard, a few fp32
    ulps from torch's per-tensor AdamW, test_equivalence.py's bound)."""
    pretrain = load_example("pretrain_llama")
    cfg = tiny_config(pretrain, "--optimizer", "muon", "--beta2", "0.99",
                      "--muon_adjust_lr_fn", adjust)
    torch.manual_seed(0)
    model = pretrain.build_model(cfg, torch.device("cpu"))
    reference = pretrain.build_model(cfg, torch.device("cpu"))
    reference.load_state_dict(model.state_dict())
    opt = pretrain.build_optimizer(model, cfg)
    muon, embed, norms = opt.param_groups
    assert muon["use_muon"] and muon["adjust_lr_fn"] == adjust and len(muon["params"]) == 2 * 7
    assert all(p.dim() == 2 for p in muon["params"])
    assert [id(p) for p in embed["params"]] == [id(model.embed_tokens.weight)]
    assert len(norms["params"]) == 5 and all(p.dim() == 1 for p in norms["params"])
    assert not embed["use_muon"] and not norms["use_muon"]
    assert muon["weight_decay"] == embed["weight_decay"] == cfg["weight_decay"] > 0
    assert norms["weight_decay"] == 0.0 and tuple(embed["betas"]) == (0.9, 0.99)

    by_id = dict(zip(map(id, model.parameters()), reference.parameters()))
    torch_opts = [torch.optim.Muon([by_id[id(p)] for p in muon["params"]], lr=cfg["lr"],
                                   weight_decay=cfg["weight_decay"], adjust_lr_fn=adjust)]
    torch_opts += [torch.optim.AdamW([by_id[id(p)] for p in g["params"]], lr=cfg["lr"],
                                     betas=(0.9, 0.99), weight_decay=g["weight_decay"])
                   for g in (embed, norms)]
    g = torch.Generator().manual_seed(0)
    for step in range(3):
        # Each step from the same params (the ulps AdamW's fused step leaves would otherwise
        # reach the next gradients, and the bf16 Newton-Schulz can round one element the other
        # way: ~3e-4 of a matrix after two steps); the states run on apart.
        with torch.no_grad():
            for p, q in zip(model.parameters(), reference.parameters()):
                q.copy_(p)
        x = torch.randint(0, 256, (2, 16), generator=g)
        for net, opts in ((model, [opt]), (reference, torch_opts)):
            net(x, x)[1].backward()
            for o in opts:
                o.step()
                o.zero_grad()
        for (name, p), q in zip(model.named_parameters(), reference.parameters()):
            err = (p - q).abs().max() / q.abs().max()
            assert err <= 1e-6, f"step {step + 1}, {name}: {err:.2e}"


def test_low_rank_optimizer_without_a_rank_is_refused(capsys):
    pretrain = load_example("pretrain_llama")
    with pytest.raises(SystemExit):
        tiny_config(pretrain, "--optimizer", "galore_adamw", "--galore_rank", "0")
    assert "set --galore_rank to a positive rank" in capsys.readouterr().err


# ----------------------------------------------------------------------------- the model

def small_config(llama_model, **overrides):
    kwargs = dict(vocab_size=256, max_seq_len=24, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                  hidden_dim=96, rope_theta=500.0)
    return llama_model.LlamaConfig(**{**kwargs, **overrides})


@pytest.mark.parametrize("tied, n_kv_heads", [(True, 2), (False, 4), (False, 1)])
def test_model_matches_transformers_llama(tied, n_kv_heads):
    transformers = pytest.importorskip("transformers")
    llama_model = load_example("llama_model")
    cfg = small_config(llama_model, n_kv_heads=n_kv_heads, tie_embeddings=tied)
    torch.manual_seed(0)
    model = llama_model.Llama(cfg)
    with torch.no_grad():  # norms away from 1, so a missing norm weight would show
        for p in model.parameters():
            if p.dim() == 1:
                p.normal_(1.0, 0.2)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        **llama_model.hf_config_kwargs(cfg), attn_implementation="eager"))
    hf.load_state_dict(llama_model.hf_state_dict(model), strict=True)
    assert sum(p.numel() for p in hf.parameters()) == model.num_params()
    idx = torch.randint(0, 256, (2, cfg.max_seq_len))
    with torch.no_grad():
        ours, theirs = model(idx)[0], hf(idx).logits
    assert ours.abs().max() > 0.1  # not a trivially small output
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_rmsnorm_matches_its_formula():
    llama_model = load_example("llama_model")
    norm = llama_model.RMSNorm(8, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 2.0, 8))
    x = torch.randn(3, 8, dtype=torch.float64)
    expected = torch.stack([row / math.sqrt(sum(v * v for v in row.tolist()) / 8 + 1e-5)
                            for row in x]) * torch.linspace(0.5, 2.0, 8, dtype=torch.float64)
    torch.testing.assert_close(norm.double()(x), expected)


def test_rotary_rotates_channel_pairs_by_position_times_frequency():
    llama_model = load_example("llama_model")
    T, head_dim, theta = 5, 8, 100.0
    cos, sin = llama_model.rotary_cos_sin(T, head_dim, theta)
    x = torch.randn(1, 1, T, head_dim, dtype=torch.float64)
    rotated = llama_model.apply_rotary(x, cos.double(), sin.double())
    half = head_dim // 2
    for pos in range(T):
        for i in range(half):  # pair (i, i + half) as one complex number, turned by its angle
            angle = pos * theta ** (-2 * i / head_dim)
            z = complex(x[0, 0, pos, i], x[0, 0, pos, i + half]) * complex(math.cos(angle),
                                                                           math.sin(angle))
            assert rotated[0, 0, pos, i].item() == pytest.approx(z.real, abs=1e-6)
            assert rotated[0, 0, pos, i + half].item() == pytest.approx(z.imag, abs=1e-6)


def test_rotary_scores_depend_on_relative_position_only():
    llama_model = load_example("llama_model")
    cos, sin = llama_model.rotary_cos_sin(12, 16, 10000.0)
    q, k = torch.randn(16), torch.randn(16)
    # The same q and k at every position: q_m . k_n must depend on m - n only.
    rq = llama_model.apply_rotary(q.expand(12, 16), cos, sin)
    rk = llama_model.apply_rotary(k.expand(12, 16), cos, sin)
    scores = rq @ rk.T
    for shift in (1, 3, 7):
        torch.testing.assert_close(scores[shift:, :-shift].diagonal(),
                                   scores[shift, 0].expand(12 - shift), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(scores[1, 0], scores[3, 0])  # but it does depend on m - n
