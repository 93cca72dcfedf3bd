"""The layout: every element of every param is owned by exactly one rank, at any world size."""

import random

import pytest
import torch

from zeroopt.layout import Layout


def random_params(seed: int):
    rng = random.Random(seed)
    shapes = [tuple(rng.randint(1, 60) for _ in range(rng.randint(0, 3))) for _ in range(12)]
    return [torch.nn.Parameter(torch.randn(s)) for s in shapes]


@pytest.mark.parametrize("world_size", range(1, 9))
@pytest.mark.parametrize("bucket_numel", [1, 500, 10**9])
@pytest.mark.parametrize("seed", range(3))
def test_every_element_is_owned_exactly_once(world_size, bucket_numel, seed):
    params = random_params(seed)
    groups = [list(enumerate(params[:5])), list(enumerate(params[5:], start=5))]
    layouts = [Layout(groups, world_size, r, bucket_numel, pad_multiple=8)
               for r in range(world_size)]
    owners = {i: torch.zeros(p.numel(), dtype=torch.int64) for i, p in enumerate(params)}
    for layout in layouts:
        assert layout.shard_numel == layouts[0].shard_numel  # equal shards on every rank
        covered = torch.zeros(layout.shard_numel, dtype=torch.int64)
        for piece in layout.pieces:
            owners[piece.slot.index][piece.param_offset:piece.param_offset + piece.numel] += 1
            covered[piece.shard_offset:piece.shard_offset + piece.numel] += 1
            bucket = layout.buckets[piece.slot.bucket]
            lo, hi = bucket.owned_range(layout.rank)
            assert lo <= piece.buffer_start and piece.buffer_start + piece.numel <= hi
        assert covered.max() <= 1  # no two pieces share shard storage
        for bucket in layout.buckets:
            assert bucket.numel % (world_size * 8) == 0
            assert bucket.slots[0].start == bucket.start  # a bucket starts at its first param
    for index, count in owners.items():
        assert torch.all(count == 1), f"param {index} elements owned {count.tolist()} times"


def test_params_become_views_of_one_flat_buffer_and_keep_their_values():
    params = random_params(0)
    values = [p.detach().clone() for p in params]
    layout = Layout([list(enumerate(params))], 3, 0, bucket_numel=100)
    layout.allocate_param_buffers()
    data = layout.buffers[0].data
    for p, v in zip(params, values):
        assert torch.equal(p, v)
        assert p.untyped_storage().data_ptr() == data.untyped_storage().data_ptr()


def test_buckets_follow_reverse_registration_order():
    params = [torch.nn.Parameter(torch.zeros(10)) for _ in range(6)]
    layout = Layout([list(enumerate(params))], 2, 0, bucket_numel=20)
    assert [[s.index for s in b.slots] for b in layout.buckets] == [[5, 4], [3, 2], [1, 0]]


def test_runs_never_cross_a_bucket_or_a_group():
    params = random_params(1)
    groups = [[(i, p)] for i, p in enumerate(params)]
    layout = Layout(groups, 2, 1, bucket_numel=300, pad_multiple=1)
    total = 0
    for group, bucket, offset, numel in layout.runs():
        assert bucket.shard_offset <= offset and offset + numel <= bucket.shard_offset + bucket.chunk_numel
        assert all(p.slot.group == group for p in layout.pieces
                   if offset <= p.shard_offset < offset + numel)
        total += numel
    assert total == sum(p.numel for p in layout.pieces)


def test_mixed_dtypes_get_separate_buffers():
    params = [torch.nn.Parameter(torch.zeros(5)), torch.nn.Parameter(torch.zeros(7, dtype=torch.bfloat16))]
    layout = Layout([list(enumerate(params))], 2, 0)
    assert sorted(str(b.dtype) for b in layout.buffers) == ["torch.bfloat16", "torch.float32"]
    assert layout.buffers[1].shard_offset == layout.buffers[0].shard_numel
