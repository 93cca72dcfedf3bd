"""Choosing the backend: from the device, the launcher, ``backend=`` or ZEROOPT_BACKEND, with
errors that name the fix. NCCL across GPUs, HCCL (Ascend) and XLA devices are not here: their
selection and setup are tested, their collectives are not (see README, "What was run")."""

import pytest
import torch

import zeroopt
from distributed import run_ranks
from zeroopt.comm import backends, environment, local_device


def small_model():
    return torch.nn.Linear(4, 3)


@pytest.mark.parametrize("name, suggestion", [("mpl", "mpi"), ("ncl", "nccl"), ("glo", "gloo")])
def test_unknown_backend_suggests_the_closest(name, suggestion):
    with pytest.raises(ValueError, match=f"unknown backend '{name}'. Did you mean '{suggestion}'"):
        zeroopt.ZeroOptimizer(small_model().parameters(), backend=name)


def test_unknown_backend_from_the_environment_names_the_variable(monkeypatch):
    monkeypatch.setenv("ZEROOPT_BACKEND", "hcl")
    with pytest.raises(ValueError, match="unknown ZEROOPT_BACKEND 'hcl'. Did you mean 'hccl'"):
        zeroopt.ZeroOptimizer(small_model().parameters())


@pytest.mark.parametrize("name, device", [("nccl", "cuda"), ("hccl", "npu"), ("xla", "xla")])
def test_backend_for_another_device_names_the_device_and_the_alternative(name, device):
    with pytest.raises(ValueError, match=f"moves tensors on {device}.*params are on 'cpu'.*"
                                         "backend='gloo'"):
        zeroopt.ZeroOptimizer(small_model().parameters(), backend=name)


def test_missing_xla_names_what_to_install():
    if backends._missing("xla") is None:
        pytest.skip("torch_xla is installed in this environment")
    with pytest.raises(RuntimeError, match="torch_xla is not installed.*pip install torch_xla=="):
        backends.check_usable("xla", torch.device("xla"))
    with pytest.raises(RuntimeError, match="torch_xla is not installed"):
        zeroopt.comm.init_distributed("xla")


def test_missing_torch_npu_names_what_to_install():
    if backends._missing("hccl") is None:
        pytest.skip("torch_npu is installed in this environment")
    with pytest.raises(RuntimeError, match="torch_npu is not installed.*pip install torch_npu"):
        zeroopt.comm.init_distributed("hccl")


def test_nccl_without_gpus_says_so():
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    with pytest.raises(RuntimeError, match="backend 'nccl' is not available here"):
        zeroopt.comm.init_distributed("nccl")


def test_device_picks_the_backend():
    assert [backends.backend_for(torch.device(d)) for d in ("cuda", "xla", "cpu")] == \
        ["nccl", "xla", "gloo"]


def test_each_rank_computes_on_its_local_device():
    launch = environment.Launch("torchrun", rank=5, world_size=8, local_rank=1,
                                local_world_size=4)
    assert local_device("nccl", launch) == torch.device("cuda", 1)
    assert local_device("gloo", launch) == local_device("mpi", launch) == torch.device("cpu")


@pytest.mark.parametrize("env, expected", [
    ({}, ("none", 0, 1, 0, 1)),
    ({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"},
     ("torchrun", 3, 4, 1, 2)),
    ({"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "6",
      "OMPI_COMM_WORLD_LOCAL_RANK": "0", "OMPI_COMM_WORLD_LOCAL_SIZE": "3"}, ("mpi", 2, 6, 0, 3)),
    ({"PMI_RANK": "1", "PMI_SIZE": "2", "MPI_LOCALRANKID": "1"}, ("mpi", 1, 2, 1, 2)),
    # torchrun started under mpirun: torchrun's variables describe the ranks it started
    ({"RANK": "0", "WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2"},
     ("torchrun", 0, 2, 0, 2)),
])
def test_launch_read_from_the_launchers_environment(env, expected):
    launch = environment.detect(env)
    assert (launch.launcher, launch.rank, launch.world_size, launch.local_rank,
            launch.local_world_size) == expected


def test_plain_process_is_a_single_rank(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "ZEROOPT_BACKEND"):
        monkeypatch.delenv(key, raising=False)
    comm, device = zeroopt.comm.init_distributed()
    assert (comm.world_size, comm.backend, device.type) == (1, "none", "cpu")


def _groups_as_given() -> dict:
    import torch.distributed as dist

    group = dist.new_group([0, 1])
    given = zeroopt.ZeroOptimizer(small_model().parameters(), process_group=group)
    named = zeroopt.ZeroOptimizer(small_model().parameters(), backend="gloo")
    try:
        zeroopt.ZeroOptimizer(small_model().parameters(), process_group=group, backend="gloo")
        both = "no error"
    except ValueError as e:
        both = str(e)
    return {"given": given.comm.group is group, "named": (named.comm.group, named.comm.backend),
            "both": both}


def test_process_group_is_used_as_given_and_named_backend_joins_the_job():
    for r in run_ranks(2, _groups_as_given, shared=True):
        assert r["given"] and r["named"] == (None, "gloo")
        assert "pass process_group or backend, not both" in r["both"]
