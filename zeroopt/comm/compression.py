"""Compressed gradient reduction (ZeRO++'s qgZ idea, for stages 1 and 2):
``ZeroOptimizer(grad_compression="int8" | "int4")``.

What changes: only ``reduce_bucket``. Every other collective (the param all-gather, the
statistics' all-reduces, broadcasts) stays exact, so the params stay the same on every rank.

- Flat sharding (no ``shard_size``): rank r quantizes chunk j of its gradient bucket and sends
  it straight to rank j, the chunk's owner, for every j != r: an all-to-all, one hop, so no
  partial sum is re-quantized on its way round a ring and the error does not compound with W.
  The owner decodes the W-1 chunks it receives and adds them to its own chunk, unquantized,
  in fp32 (fp64 for fp64 buckets).
- With ``shard_size`` (hierarchical.py): the reduce-scatter within the sharding group (a node)
  stays exact; only the stage across the groups (the slow links) is quantized: the replicas
  of a chunk cut it in R pieces (R = W / shard_size), send each piece quantized to its owner
  replica, which sums them as above, quantizes the sum once more and sends it to the other
  replicas. Every replica, the owner included, keeps the decoded values of that one message,
  so the replicas' shards stay bit-identical (each steps its copy alone: copies that differed
  by a bit would drift apart).

Format (quantized.py): blocks of 256 values (int8) or 128 (int4), each with an fp32 scale (its
largest magnitude, absmax) and one linear code per value, ``round(x * L / scale)`` with L = 127
(int8) or 7 (int4; two codes a byte). Bytes on the wire per value: 1 + 4/256 = 1.016 (int8),
0.5 + 4/128 = 0.531 (int4), against 4 for fp32: per rank and step, int8 sends (W-1)/W x 1.016
bytes per gradient element for the reduction, against data parallelism's ring all-reduce of
2(W-1)/W x 4 (0.127x; benchmarks/bench_comm.py measures it).

Error bound, per element of the summed chunk (before the average divides it by W): flat,
``sum over the other ranks s of scale_s / (2L)``, where ``scale_s`` is the absmax of the block
of rank s's chunk holding the element (its own value is exact); with ``shard_size``, the same
over the other replicas (scales of their within-group sums) plus ``scale_sum / (2L)`` for the
second quantization (``scale_sum``: absmax of the summed piece's block). Add a few fp32
roundings (relative 2^-23 of each scale; the fp32 sum of W terms). The tests check these
bounds (tests/test_grad_compression.py). The rounding is to the nearest code, not stochastic:
the error of one step is bounded, and, being deterministic, it is the same on every replica.

Backends: torch.distributed (``all_to_all_single``, gloo and nccl alike), MPI (point-to-point
messages, ``ring.Exchange``); one rank: nothing to compress. XLA is refused: its
collectives are traced into the step's graph, where the messages and their host-side decoding
here cannot run.
"""

from __future__ import annotations

import copy

from .base import Collectives, SingleRank
from .hierarchical import Hierarchical

KINDS = ("int8", "int4")


def compressed(comm: Collectives, kind: str) -> Collectives:
    """``comm`` whose ``reduce_bucket`` sends blockwise-quantized chunks (see the module
    docstring); every other collective unchanged.

    Args:
        comm: the optimizer's collectives, after ``split`` (a ``Hierarchical`` quantizes its
            stage across the replicas only).
        kind: "int8" or "int4".

    Returns:
        A copy of ``comm`` with ``compression`` set (the same groups and counters; the
        same class, so everything that inspects it sees the backend it is); ``comm`` itself
        with one rank (nothing crosses ranks).

    Raises:
        ValueError: ``kind`` is not one of ``KINDS``; the backend is xla, or has no
            ``all_to_all``.
    """
    if kind not in KINDS:
        raise ValueError(f"grad_compression must be one of {KINDS} or None, got {kind!r}")
    if comm.backend == "xla":
        raise ValueError("grad_compression is not available on xla: the collectives there are "
                         "traced into the step's compiled graph, and the quantized exchange "
                         "(messages posted, decoded and summed by zeroopt as they arrive) "
                         "cannot run inside it. Leave grad_compression=None on XLA")
    if isinstance(comm, SingleRank) or (comm.world_size == 1
                                        and not isinstance(comm, Hierarchical)):
        return comm
    exchanges = comm.replicas if isinstance(comm, Hierarchical) else comm
    if type(exchanges).all_to_all is Collectives.all_to_all:
        raise ValueError(f"grad_compression needs collectives with all_to_all (torch."
                         f"distributed or MPI); {type(exchanges).__name__} (backend "
                         f"{comm.backend!r}) has none: leave grad_compression=None")
    comm = copy.copy(comm)
    comm.compression = kind
    return comm
