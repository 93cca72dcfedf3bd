"""Hierarchical (HSDP-style) sharding against flat sharding, over gloo and over MPI."""

import pytest

from ranks import hierarchical
from distributed import mpi_ranks, run_ranks

RUNS = [(2, "gloo"), (4, "gloo"), pytest.param((4, "mpi"), marks=pytest.mark.slow)]


@pytest.fixture(scope="module", params=RUNS, ids=lambda run: f"W{run[0]}-{run[1]}")
def results(request):
    world_size, backend = request.param
    per_rank = (run_ranks(world_size, hierarchical.suite, shared=True) if backend == "gloo"
                else mpi_ranks(world_size, "ranks.hierarchical:suite"))
    return world_size, backend, per_rank


def shard_sizes(world_size):
    return [s for s in range(1, world_size) if world_size % s == 0]


@pytest.mark.parametrize("stage", [1, 2])
def test_hierarchical_equals_flat_sharding_bit_for_bit(results, stage):
    world_size, _, per_rank = results
    for shard_size in shard_sizes(world_size):
        assert all(r["same_as_flat", shard_size, stage] for r in per_rank), shard_size


@pytest.mark.parametrize("stage", [1, 2])
def test_hierarchical_matches_torch_adamw(results, stage):
    world_size, _, per_rank = results
    for shard_size in shard_sizes(world_size):
        err = max(r["reference", shard_size, stage] for r in per_rank)
        assert err < 1e-6, (shard_size, err)


@pytest.mark.parametrize("stage", [1, 2])
def test_state_is_split_shard_size_ways_and_grads_averaged_over_all(results, stage):
    """Each rank holds 1/S of the (padded) AdamW state, 2 fp32 states per element; the
    gradients are averaged over all W ranks."""
    world_size, _, per_rank = results
    for shard_size in shard_sizes(world_size):
        for r in per_rank:
            chunks, averaged_over, state_bytes, padded = r["split", shard_size, stage]
            assert (chunks, averaged_over) == (shard_size, world_size)
            assert state_bytes * shard_size == 2 * 4 * padded


def test_the_stage_across_replicas_finishes_from_polls_alone(results):
    """The cross-replica all-reduce is a stage of its own (hierarchical.py): started by the
    reducer's launches and polls, without a wait(), over gloo's ring (unpollable send/recv)
    and the default transport, and done right: an fp32 sum of at most 4
    fp32 terms is within 3 x 2^-24 of the sum of their magnitudes of the exact sum (3
    roundings), below 2^-22."""
    world_size, _, per_rank = results
    for shard_size in shard_sizes(world_size):
        for collectives in ("auto", "ring"):
            for r in per_rank:
                polled, before, after = r["async", shard_size, collectives]
                assert polled, "polls alone never saw the cross-replica stage finish"
                assert before < 2**-22 and after < 2**-22, (shard_size, before, after)


def test_bad_or_disagreeing_shard_size_is_an_error_on_every_rank(results):
    world_size, _, per_rank = results
    for r in per_rank:
        assert "shard_size must be a positive divisor of the world size" in r["bad_shard_size"]
        assert "ranks disagree about shard_size" in r["disagree"], r["disagree"]


def test_process_group_pair_equals_flat(results):
    world_size, backend, per_rank = results
    if backend != "gloo":
        pytest.skip("(sharding group, replication group) pairs are torch.distributed groups")
    assert all(r["tuple_groups"] for r in per_rank)
