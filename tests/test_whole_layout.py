"""Whole-param placement (GaLore, Adafactor): each param whole on one rank, the buckets still
split into W equal chunks, the ranks balanced by size and by SVD work; and the errors of the
rules that step params whole."""

import pytest
import torch

import zeroopt
from zeroopt.algorithms.base import thin_svd_cost as placement_cost
from zeroopt.layout import Layout
from zeroopt.states.kinds import StateKind

WHOLE = StateKind(whole=True)


def layouts(shapes, world_size, bucket_numel=10**9):
    params = [torch.nn.Parameter(torch.zeros(s)) for s in shapes]
    groups = [list(enumerate(params))]
    return [Layout(groups, world_size, r, bucket_numel, pad_multiple=8,
                   kind_of=lambda g, p: WHOLE) for r in range(world_size)]


def owners(layout):
    return {slot.index: layout.owner(slot) for slot in layout.slots}


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("shapes", [[(64, 64)] * 4, [(37, 41), (29, 41), (5, 29), (29,), ()],
                                    [(300, 100), (10, 10), (10, 10), (7,)]])
@pytest.mark.parametrize("bucket_numel", [1, 5000, 10**9])
def test_every_param_is_owned_whole_by_one_rank(world_size, shapes, bucket_numel):
    all_ranks = layouts(shapes, world_size, bucket_numel)
    seen = {}
    for layout in all_ranks:
        assert layout.shard_numel == all_ranks[0].shard_numel
        for piece in layout.pieces:
            assert piece.param_offset == 0 and piece.numel == piece.slot.numel  # whole
            assert piece.slot.index not in seen
            seen[piece.slot.index] = layout.rank
        for bucket in layout.buckets:
            assert bucket.numel % (world_size * 8) == 0
            covered = sum(hi - lo for lo, hi in bucket.gaps) + \
                sum(s.extent for s in bucket.slots)
            assert covered == bucket.numel  # params and gaps tile the bucket
    assert sorted(seen) == list(range(len(shapes)))
    assert seen == owners(all_ranks[0])


def test_equal_matrices_are_spread_evenly_without_padding():
    for layout in layouts([(64, 64)] * 4, world_size=2):
        assert sorted(owners(layout).values()) == [0, 0, 1, 1]
        assert layout.buckets[0].gaps == []


def test_ties_go_to_the_rank_with_less_svd_work():
    # one matrix per bucket: each bucket's chunk holds one param, and the ranks take turns
    layout = layouts([(64, 64)] * 4, world_size=2, bucket_numel=1)[0]
    assert [layout.owner(s) for s in sorted(layout.slots, key=lambda s: s.index)] \
        == [1, 0, 1, 0]  # packed in reverse order: index 3 first, to rank 0


def test_a_matrix_larger_than_a_fair_share_goes_whole_to_one_rank():
    layout = layouts([(300, 100), (10, 10), (10, 10), (7,)], world_size=2)[0]
    where = owners(layout)
    assert where[1] == where[2] == where[3] != where[0]
    bucket = layout.buckets[0]
    assert bucket.chunk_numel == 30000  # the big matrix sets the chunk; the rest is padding


def test_placement_cost_is_a_thin_svds_work():
    assert placement_cost(torch.Size([10, 4])) == 160
    assert placement_cost(torch.Size([7])) == 7


def model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))


def test_galore_param_groups_picks_linear_weights():
    m = model()
    groups = zeroopt.galore_param_groups(m, "all-linear", rank=4)
    assert [p.shape for p in groups[1]["params"]] == [(16, 8), (4, 16)]
    assert groups[1]["rank"] == 4 and len(groups[0]["params"]) == 2
    assert [p.shape for p in zeroopt.galore_param_groups(m, ["2"])[1]["params"]] == [(4, 16)]
    assert [p.shape for p in zeroopt.galore_param_groups(m, r"0")[1]["params"]] == [(16, 8)]
    with pytest.raises(ValueError, match="no nn.Linear module matches.*0, 2"):
        zeroopt.galore_param_groups(m, ["attn"])


@pytest.mark.parametrize("name, group, hp, message", [
    ("galore_adamw", {"rank": 4}, {}, "only matrices can be projected"),
    ("galore_adamw", {"rank": 0}, {}, "rank must be a positive int"),
    ("galore_adamw", {"rank": 4, "proj_type": "stdd"}, {}, "Did you mean 'std'"),
    ("galore_adamw", {"rank": 4, "update_proj_gap": 0}, {}, "update_proj_gap"),
    ("apollo_adamw", {"rank": 4, "scale_type": "row"}, {}, "scale_type"),
    ("galore_adamw", {"rank": 4}, {"paged": True}, "paging is for the flat states"),
    ("adafactor", {}, {}, "relative_step=False needs an lr"),
    ("adafactor", {}, {"lr": 1e-3, "relative_step": True}, "do not combine"),
    ("adafactor", {}, {"lr": 1e-3, "beta1": 1.0}, "beta1"),
    ("adafactor", {}, {"lr": 1e-3, "eps": 1e-3}, "eps must be a pair"),
])
def test_bad_settings(name, group, hp, message):
    m = model()
    if "rank" in group and "only matrices" in message:
        groups = [{"params": list(m.parameters()), **group}]  # biases too
    elif "rank" in group:
        groups = zeroopt.galore_param_groups(m, "all-linear", **group)
    else:
        groups = m.parameters()
    with pytest.raises(ValueError, match=message):
        zeroopt.ZeroOptimizer(groups, name, **hp)


def test_clip_with_a_layerwise_optimizer_is_refused():
    m = model()
    opt = zeroopt.ZeroOptimizer(zeroopt.galore_param_groups(m, "all-linear", rank=2),
                                "galore_adamw_layerwise")
    m(torch.randn(3, 8)).sum().backward()
    with pytest.raises(RuntimeError, match="layerwise.*without '_layerwise'"):
        opt.clip_grad_norm_(1.0)


def test_state_bytes_count_the_low_rank_states():
    m = model()
    opt = zeroopt.ZeroOptimizer(zeroopt.galore_param_groups(m, "all-linear", rank=2),
                                "galore_adamw")
    m(torch.randn(3, 8)).sum().backward()
    opt.step()
    # weights 16x8 -> right projection 16x2, 4x16 -> left 2x16: two moments each, and the
    # bases 2x8 and 4x2; the biases' flat moments (padded to 256 elements) come on top
    low_rank = 4 * ((16 * 2 + 2 * 16) * 2 + 2 * 8 + 4 * 2)
    biases = 4 * 2 * 256
    assert opt.state_bytes() == low_rank + biases
