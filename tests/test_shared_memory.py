"""The shared-memory bucket collectives (zeroopt/comm/shared_memory.py) against the ring.

On the shared pools of W = 2 and 3 gloo ranks (one host), every reduce and gather goes through
/dev/shm and is compared with the ring of gloo messages on the same data: bit for bit, since
a reduce sums the peers' chunks in the ring's order (r+1, r+2, ..., then its own), in every
dtype; integer-valued data also checks the sums against the exact total. Training with
ZeroOptimizer (stages 1 and 2, fp64/fp32/bf16 reduction) equals the ring's run bit for bit.
A job of two fresh ranks, run as a script, checks what a normal exit and a killed rank leave.
"""

import json
import os
import sys

import pytest

import watch
from distributed import run_ranks
from ranks import shared_memory

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module", params=[2, 3], ids=lambda w: f"W{w}")
def results(request):
    return request.param, run_ranks(request.param, shared_memory.suite, shared=True)


def cases(per_rank, name):
    return {key: value for r in per_rank for key, value in r.items()
            if isinstance(key, tuple) and key[0] == name}


def test_auto_picks_shared_memory_on_one_host_and_buffers_are_shared(results):
    _, per_rank = results
    for r in per_rank:
        assert r["chosen"] == ("shared_memory", "ring", "ring", "shared_memory")
        assert r["allocated"] == (True, True, True)  # not a view, zeros, located in its file


def test_reduce_equals_the_ring_bit_for_bit(results):
    _, per_rank = results
    got = cases(per_rank, "reduce_as_ring")
    assert len(got) == 3 * 3 * 4 * 2 and all(got.values()), [k for k, v in got.items() if not v]


def test_reduce_of_integer_values_is_the_exact_sum(results):
    _, per_rank = results
    got = cases(per_rank, "reduce_exact")
    assert len(got) == 3 * 3 * 4 and all(got.values()), [k for k, v in got.items() if not v]


def test_gather_gives_every_chunk_its_owners(results):
    _, per_rank = results
    got = cases(per_rank, "gather")
    assert all(got.values()), [k for k, v in got.items() if not v]


def test_is_completed_does_not_block_and_timeout_names_the_rank(results):
    _, per_rank = results
    assert per_rank[0]["early"] is False
    assert all(r["late"] for r in per_rank)
    assert per_rank[0]["timeout"].startswith("CollectiveTimeout:"), per_rank[0]["timeout"]
    assert "did not finish within 0.3 s" in per_rank[0]["timeout"]
    assert "rank 1" in per_rank[0]["timeout"]


def test_torch_function_modes_do_not_see_the_transports_own_copies(results):
    _, per_rank = results
    for r in per_rank:
        assert r["modes_see"] == (True, 0)  # the test's own copies seen, none of the transport's


def test_ranks_launching_different_collectives_get_an_error(results):
    _, per_rank = results
    for r in per_rank:
        assert "the ranks' bucket collectives differ" in r["differ"], r["differ"]


@pytest.mark.parametrize("stage", [1, 2])
@pytest.mark.parametrize("reduce_dtype", ["torch.float64", "torch.float32", "torch.bfloat16"])
def test_training_equals_the_ring_bit_for_bit(results, stage, reduce_dtype):
    _, per_rank = results
    for r in per_rank:
        assert r["train", stage, reduce_dtype] == ("shared_memory", True)


def test_an_unknown_choice_is_refused(results):
    _, per_rank = results
    assert "use one of auto, ring, native, all_reduce, shared_memory" in per_rank[0]["bad_choice"]


def test_refusals_name_the_ranks_and_the_reason():
    why = shared_memory.refusals()
    assert why["same"] == []
    assert "rank(s) 1 are not on rank 0's host" in why["host"][0]
    assert "under 1024 MiB free on rank(s) 1" in why["small_auto"][0]
    assert why["small_forced"] == []  # forced: no minimum
    assert "rank(s) 1 are not x86-64" in why["arm"][0]


def run_job(mode):
    done = watch.run([sys.executable, os.path.join(HERE, "ranks", "shared_memory.py"), mode],
                     cwd=HERE)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_normal_job_leaves_no_files_in_dev_shm():
    job = run_job("exit")
    assert job["exit_codes"] == [0, 0] and job["errors"] == [None, None], job
    assert job["left"] == [], job


def test_a_killed_rank_stops_its_peer_with_an_error_naming_it():
    job = run_job("kill")
    assert job["exit_codes"][1] == -9, job
    assert "rank 1" in job["errors"][0] and "has died" in job["errors"][0], job
    assert job["left"] == [], job  # the dead rank's files removed by the survivor
