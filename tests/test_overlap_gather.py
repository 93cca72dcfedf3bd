"""The param all-gather overlapped with the next forward (``overlap_param_gather=True``, the
default) gives bit for bit what the blocking gather gives, at W = 1, 2, 3, stages 1 and 2,
32-bit, 8-bit, paged and bf16-param states and a schedule-free rule, through every
interleaving that touches the params between a step and the next forward: a user's loop over
``model.parameters()``, ``model.state_dict()``, ``opt.state_dict()``, weights loaded into the
model, a second step with no forward, ``opt.eval()``/``train()``, a checkpoint saved and
loaded, clipping, and a forward through part of the model (rank-side code:
ranks/overlap_gather.py).

Exact equality is the only right answer: both runs do the same arithmetic; only when the
params are waited for differs. A read that does not wait sees the previous step's chunks of
the other ranks, which differ by a whole update (checked: with the guard removed, the user's
loop over the params differs from the blocking run at W = 2).
"""

import pytest

from distributed import run_ranks
from ranks import overlap_gather

_runs: dict = {}


@pytest.fixture(scope="module", params=(1, 2, 3), ids=lambda w: f"W{w}")
def per_rank(request):
    if request.param not in _runs:
        _runs[request.param] = run_ranks(request.param, overlap_gather.suite, shared=True)
    return _runs[request.param]


@pytest.mark.parametrize("stage", (1, 2))
@pytest.mark.parametrize("kind", list(overlap_gather.KINDS))
def test_overlapped_gather_equals_the_blocking_one_bit_for_bit(per_rank, kind, stage):
    for r in per_rank:
        got = r[kind, stage]
        assert got["equal"], got


@pytest.mark.parametrize("stage", (1, 2))
@pytest.mark.parametrize("kind", list(overlap_gather.KINDS))
def test_the_forward_waits_for_the_gathers(per_rank, kind, stage):
    """With more than one rank the gathers really are left in flight, past ``zero_grad()``
    (it only sets ``p.grad``), and waited for in the forward (one rank has nothing to
    gather); afterwards torch's function-mode stack is as it was."""
    for r in per_rank:
        got = r[kind, stage]
        assert (got["waits_in_forward"] > 0) == (len(per_rank) > 1), got
        assert got["in_flight_after_zero_grad"] == (len(per_rank) > 1), got
        assert got["modes_left"] == 0, got


@pytest.mark.parametrize("collectives", ("auto", "ring"))
def test_ranks_whose_forwards_touch_different_buckets(per_rank, collectives):
    """Each rank runs its own expert (as a mixture of experts routes), so the ranks' forwards
    touch different buckets, over the default transport and over rings of point-to-point
    messages: the params equal the blocking gather's, and no rank hangs (a wait takes every
    gather launched before it too, so the ranks wait in one order; param_gather._wait)."""
    for r in per_rank:
        assert r["routed", collectives]


def test_the_default_overlaps_where_bytes_move_while_the_rank_computes(per_rank):
    """On by default over the ring (bytes move in the background); off over shared memory,
    where a gather is the rank's own copy (auto picks shared memory for ranks on one host)."""
    for r in per_rank:
        assert r["default", "ring"] == (len(per_rank) > 1)
        assert r["default", "auto"] is False
