"""Bucket collectives as a ring of point-to-point messages, for backends whose own are slow.

Reduce-scatter: in step s (0..W-2) rank r sends its running sum of chunk (r-s-1) mod W to rank
r+1 and receives chunk (r-s-2) mod W from rank r-1, adding it into its own copy; after W-1 steps
it holds the total of chunk r. All-gather: in step s rank r passes chunk (r-s) mod W on and
receives chunk (r-s-1) mod W in place. Each rank sends (W-1)/W of the bucket for each, the least
any algorithm can: together 2(W-1)/W, the volume of data parallelism's all-reduce.

Why: gloo's ``all_reduce`` sends twice that and its ``reduce_scatter_tensor`` is slower still,
and Open MPI's non-blocking ``MPI_Ireduce_scatter_block`` reduces the whole bucket to rank 0
(1.25x DP's bytes at W=2). On a 4M-element fp32 bucket over gloo at W=2 the ring reduce-scatter
took 7 ms against 12.5 ms for ``all_reduce``, the ring all-gather 5 ms against 9-10 ms for the
list ``all_gather`` (benchmarks/bench_comm.py measures bytes and step times).

``is_completed()`` moves the ring on as far as the messages have arrived (so polling during
backward makes progress, which MPI needs: it has no progress thread); ``wait()`` finishes it.
gloo's send/recv ``Work`` reports ``is_completed()`` False until it is waited for (torch 2.13,
measured), so over gloo only ``wait()`` moves a ring on (a one-step ring, W=2, is carried by
gloo's own threads meanwhile; a longer one posts its later steps in ``wait()``).
Each ring's messages carry tags of their own, so several buckets can be in flight at once.
A blocking wait tells the backend what it waits for and on whom (``wait_all``), so that with a
``timeout=`` the error names the previous rank in the ring.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol

import torch


class PointToPoint(Protocol):
    """What a ring needs from a backend: tagged non-blocking send and receive."""

    rank: int
    world_size: int
    max_tag: int

    def isend(self, tensor: torch.Tensor, peer: int, tag: int) -> Any:
        """Start sending ``tensor`` to rank ``peer`` (in this group) with ``tag``
        (``0 <= tag < max_tag``); returns the backend's request."""
        ...

    def irecv(self, tensor: torch.Tensor, peer: int, tag: int) -> Any:
        """Start receiving into ``tensor`` from rank ``peer`` with ``tag``; returns the
        backend's request."""
        ...

    def test_all(self, requests: list) -> bool:
        """Whether every request has finished, without blocking."""
        ...

    def wait_all(self, requests: list, what: str, peer: int) -> None:
        """Block until every request has finished.

        Args:
            requests: from ``isend`` and ``irecv``.
            what: what is waited for, in words, for a ``CollectiveTimeout``'s message.
            peer: the rank waited on, for the same message.

        Raises:
            CollectiveTimeout: with a ``timeout=`` set, they did not finish in time.
        """
        ...


class Ring:
    """A ring reduce-scatter or all-gather of one bucket, in place (see the module docstring).

    It is a ``Handle``: the first step's messages are posted at construction.

    Args:
        p2p: the backend's tagged point-to-point messages (``PointToPoint``).
        bucket: a flat tensor of ``p2p.world_size`` equal chunks.
        sequence: this ring's number, the same on every rank; it picks the ring's tags, so
            several rings can be in flight at once.
        reduce: True for a reduce-scatter (chunk ``rank`` ends as the sum over ranks),
            False for an all-gather (every chunk ends as its owner's).
        then: called once, when the last step has finished (copy a host result back), or
            None.
    """

    def __init__(self, p2p: PointToPoint, bucket: torch.Tensor, sequence: int, reduce: bool,
                 then: Callable[[], None] | None = None):
        self.p2p, self.reduce, self.then = p2p, reduce, then
        world = p2p.world_size
        self.chunks = bucket.chunk(world)
        self.incoming = torch.empty_like(self.chunks[0]) if reduce else None
        self.tag_base = (sequence % (p2p.max_tag // world)) * world
        self.step, self.requests = 0, None
        self._post()

    def _post(self) -> None:
        rank, world = self.p2p.rank, self.p2p.world_size
        if self.step == world - 1:
            self.requests = None
            if self.then is not None:
                self.then()
            return
        shift = 1 if self.reduce else 0
        send = self.chunks[(rank - self.step - shift) % world]
        into = self.incoming if self.reduce else self.chunks[(rank - self.step - 1) % world]
        tag = self.tag_base + self.step
        self.requests = [self.p2p.irecv(into, (rank - 1) % world, tag),
                         self.p2p.isend(send, (rank + 1) % world, tag)]

    def _advance(self, block: bool) -> bool:
        rank, world = self.p2p.rank, self.p2p.world_size
        while self.requests is not None:
            if block:
                kind = "reduce-scatter" if self.reduce else "all-gather"
                previous = (rank - 1) % world
                self.p2p.wait_all(self.requests, f"ring {kind} of a bucket, step "
                                  f"{self.step + 1} of {world - 1}", previous)
            elif not self.p2p.test_all(self.requests):
                return False
            if self.reduce:
                self.chunks[(rank - self.step - 2) % world].add_(self.incoming)
            self.step += 1
            self._post()
        return True

    def is_completed(self) -> bool:
        """Move the ring on as far as its messages have arrived, without blocking; whether
        it has finished."""
        return self._advance(block=False)

    def wait(self) -> None:
        """Run the ring's remaining steps to the end, blocking on each step's messages.

        Raises:
            CollectiveTimeout: with a ``timeout=`` set, a step's messages did not arrive in
                time (the message names the previous rank in the ring).
        """
        self._advance(block=True)


class Exchange:
    """An all-to-all of byte segments by point-to-point messages (MPI's
    ``Collectives.all_to_all``): every message is posted at construction, one to and one from
    each other rank, all with the exchange's own tag.

    It is a ``Handle``.

    Args:
        p2p: the backend's tagged point-to-point messages (``PointToPoint``).
        send, send_sizes, recv, recv_sizes: as ``Collectives.all_to_all``.
        sequence: this exchange's number, drawn from the same count as the rings' (so its
            tag is no ring's in flight), the same on every rank.
        then: called once, when every message has arrived (copy a host result back), or None.
    """

    def __init__(self, p2p: PointToPoint, send: torch.Tensor, send_sizes: list[int],
                 recv: torch.Tensor, recv_sizes: list[int], sequence: int,
                 then: Callable[[], None] | None = None):
        self.p2p, self.then = p2p, then
        rank, world = p2p.rank, p2p.world_size
        tag = (sequence % (p2p.max_tag // world)) * world
        sends, recvs = send.split(send_sizes), recv.split(recv_sizes)
        recvs[rank].copy_(sends[rank])
        self.requests = []  # (request, peer): a blocking wait names the peer it waits on
        for step in range(1, world):  # rank r talks to r+1 first, then r+2...: no hot spot
            peer = (rank + step) % world
            source = (rank - step) % world
            if recv_sizes[source]:
                self.requests.append((p2p.irecv(recvs[source], source, tag), source))
            if send_sizes[peer]:
                self.requests.append((p2p.isend(sends[peer], peer, tag), peer))

    def _finish(self) -> None:
        self.requests = []
        if self.then is not None:
            self.then()
            self.then = None

    def is_completed(self) -> bool:
        """Whether every message has arrived, without blocking."""
        if self.requests and not self.p2p.test_all([r for r, _ in self.requests]):
            return False
        self._finish()
        return True

    def wait(self) -> None:
        """Block until every message has arrived.

        Raises:
            CollectiveTimeout: with a ``timeout=`` set, a peer's message did not arrive in
                time (the message names that peer).
        """
        for request, peer in self.requests:
            self.p2p.wait_all([request], "all-to-all of compressed gradient chunks", peer)
        self._finish()
