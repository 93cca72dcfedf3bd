"""``timeout=``: a hung or dead rank stops the others with an error naming the timeout, instead
of a hang until the process group's own timeout (30 minutes by default).

Were zeroopt's timeout to fail, both ranks would wait for ever: the harness's hang detection
(tests/distributed.py) then fails the test within a minute, with both ranks' stacks. Each
scenario that hangs a rank gets fresh processes (its process group is left mid-collective)."""

import datetime
import re

import pytest
import torch

from ranks import timeout
import zeroopt
from distributed import _free_port, mpi_ranks, run_ranks


def test_a_hung_rank_stops_the_others_in_step_with_the_timeout_named(tmp_path):
    rank0, rank1 = run_ranks(2, timeout.hung_in_step, 5, str(tmp_path), "ring")
    assert rank1 == "hung"
    assert "zeroopt: a collective (ring reduce-scatter of a bucket, step 1 of 1) did not " \
           "finish within 5 s (timeout=5): rank 1 (or a rank it waits on) may be hung or " \
           "dead" in rank0, rank0
    assert "pass a larger timeout=" in rank0


def test_the_timeout_bounds_native_bucket_collectives_too(tmp_path):
    """ZEROOPT_BUCKET_COLLECTIVES=native: torch's reduce-scatter handle, waited for with the
    timeout (the NCCL path's code, over gloo); a timedelta is taken as well."""
    rank0, _ = run_ranks(2, timeout.hung_in_step, datetime.timedelta(seconds=4),
                         str(tmp_path), "native")
    assert "zeroopt: a collective (reduce-scatter of a gradient bucket) did not finish " \
           "within 4 s (timeout=4): another rank may be hung or dead" in rank0, rank0


def test_the_construction_check_waits_no_longer_than_the_timeout(tmp_path):
    rank0, rank1 = run_ranks(2, timeout.hung_before_construction, 4.5, str(tmp_path))
    assert rank1 == "hung"
    assert re.search(r"a collective \(all_gather_object: the optimizer's construction check\) "
                     r"did not finish within 4.5 s \(timeout=4.5\)", rank0), rank0


def test_init_distributed_passes_the_timeout_to_the_process_group(tmp_path):
    rank0, rank1 = run_ranks(2, timeout.init_distributed_with_timeout, _free_port(),
                             str(tmp_path))
    for out in (rank0, rank1):
        assert out["comm_timeout"] == 3.0 and out["group_timeout"] == 3.0
    assert rank1["error"] == "hung"
    assert "a collective (all_reduce) did not finish within 3 s (timeout=3)" in rank0["error"]


def test_a_timeout_that_never_runs_out_changes_nothing():
    for out in run_ranks(2, timeout.same_training_with_a_timeout, shared=True):
        assert out == {"auto": True, "native": True}


@pytest.mark.parametrize("timeout, error, message", [
    (0, ValueError, r"timeout must be a positive number of seconds, got 0"),
    (-1.0, ValueError, r"timeout must be a positive number of seconds"),
    (datetime.timedelta(0), ValueError, r"timeout must be a positive number of seconds"),
    (float("inf"), ValueError, r"timeout must be a positive number of seconds"),
    ("5", TypeError, r"timeout must be None, a number of seconds or a datetime.timedelta, "
                     r"got '5' \(str\)"),
    (True, TypeError, r"got True \(bool\)"),
])
def test_an_invalid_timeout_is_refused_at_construction(timeout, error, message):
    with pytest.raises(error, match=message):
        zeroopt.ZeroOptimizer(torch.nn.Linear(4, 3).parameters(), timeout=timeout)
    with pytest.raises(error, match=message):
        zeroopt.comm.init_distributed(timeout=timeout)


def test_a_single_rank_takes_a_timeout_and_trains():
    model = torch.nn.Linear(4, 3)
    opt = zeroopt.ZeroOptimizer(model.parameters(), "sgd", lr=0.1,
                                timeout=datetime.timedelta(seconds=30))
    assert opt.comm.timeout == 30.0
    model(torch.ones(2, 4)).sum().backward()
    opt.step()


def test_mpi_waits_are_bounded_too(tmp_path, monkeypatch):
    monkeypatch.setenv("ZEROOPT_TEST_TIMEOUT", "4")
    monkeypatch.setenv("ZEROOPT_TEST_FLAG_DIR", str(tmp_path))
    rank0, rank1 = mpi_ranks(2, "ranks.timeout:mpi_hung_in_step")
    assert rank1 == "hung"
    assert "zeroopt: a collective (ring reduce-scatter of a bucket, step 1 of 1) did not " \
           "finish within 4 s (timeout=4): rank 1 (or a rank it waits on) may be hung or " \
           "dead" in rank0, rank0
