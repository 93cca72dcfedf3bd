"""A real two-node job on one machine: two network namespaces (tests/netns.py), each a "node"
with its own address, running launchers/torchrun_multinode.sh (torchrun, c10d rendezvous,
2 ranks per node, gloo over the veth pair). It must train exactly what a single-node 4-rank
run trains: with --reduce_dtype fp64 the gradient average is exact, so neither the order of
the sum nor the placement of the ranks on nodes changes a bit of the params.

What it takes to make torchrun + gloo work across the namespaces (each found by leaving it
out; the same applies to real clusters whose hostname resolves to loopback, see the top of
launchers/torchrun_multinode.sh). Here `hostname` is shared by both namespaces and resolves
to 127.0.0.1, and socket.getfqdn() is "localhost":
1. RDZV_CONF=is_host=1 on node 0. torchrun decides who hosts the c10d rendezvous store by
   comparing the endpoint host with the hostname, the FQDN and the addresses the HOSTNAME
   resolves to, not with the addresses of the interfaces; 10.77.0.1 matches nothing, so no
   node listens and both agents fail after read_timeout: "The client socket has timed out
   after 60000ms while trying to connect to (10.77.0.1, <port>)".
2. LOCAL_ADDR=<the node's own address> (torchrun --local_addr) on every node. The agent that
   the rendezvous made rank 0 opens a second TCPStore for the workers (the shared store,
   unless TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1) at local_addr or socket.getfqdn() and hands
   that to every worker as MASTER_ADDR; "localhost" sends the other node's workers to their
   own loopback, and the job dies in init_process_group ("Failed to recv, got 0 bytes").
   LOCAL_ADDR also names the nodes in the rendezvous ("10.77.0.1_<pid>_0"), and the nodes
   are ranked by sorting those names, so node a gets ranks 0-1 (torchrun ignores
   --node_rank with c10d and warns so).
3. GLOO_SOCKET_IFNAME=<the node's veth>. Otherwise gloo binds to the address of the
   hostname, 127.0.0.1, advertises it, and the peers fail at once: "Gloo connectFullMesh
   failed ... Connection refused, remote=[127.0.0.1]". (TP_SOCKET_IFNAME is TensorPipe's,
   for torch.distributed.rpc only; the example does not use it. NCCL_SOCKET_IFNAME for NCCL.)
Harmless here: "[c10d] The hostname of the client socket cannot be retrieved. err=-3" (no
reverse DNS for 10.77.0.x) and torchrun's "node_rank is only used for static rdzv_backend".

A fresh namespace has no listeners, so the fixed rendezvous port cannot be taken, and the
addresses exist only inside the namespaces made here. On 2 cores: ~15-20 s per two-node job
(torchrun, then the DeepSpeed launcher with --no_ssh), ~13 s for the single-node reference.
"""

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

import netns
import watch

pytestmark = pytest.mark.slow  # each test starts two namespaces' worth of launchers: ~60 s

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["--config", "configs/multinode.json", "--steps", "5", "--reduce_dtype", "fp64",
        "--data_max_bytes", "2000000"]
PORT = 29400


@pytest.fixture(scope="module")
def namespaces_possible():
    # The only reason to skip: no root / no `ip` / no CAP_NET_ADMIN (checked by making one).
    reason = netns.unavailable()
    if reason is not None:
        pytest.skip(f"cannot create network namespaces here: {reason}")


@pytest.fixture
def two_nodes(namespaces_possible):
    with netns.two_nodes() as nodes:  # torn down on exit, whatever happens in the test
        yield nodes


def _env(**extra):
    # PYTHONFAULTHANDLER: on a hang, watch's SIGABRT makes every Python process print its stacks
    return watch.faulthandler_env(OMP_NUM_THREADS="1", PYTHON=sys.executable, **extra)


def _start(argv, env, log):
    # Its own session, so that on a timeout the launcher, torchrun and its workers all go.
    with open(log, "w") as out:
        return subprocess.Popen(argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def _kill(proc):
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def _wait_all(procs, logs):
    """Wait for all; on a hang (watch.Watch: none of their processes used CPU for a minute;
    their Python stacks go to the logs) or a failure kill them all, then fail with the logs."""
    watcher = watch.Watch([p.pid for p in procs], what="the launchers")
    try:
        while any(p.poll() is None for p in procs):
            try:
                watcher.check()
            except watch.Hung as hung:
                pytest.fail(f"{hung}\n" + _tails(logs))
            if any(p.poll() not in (None, 0) for p in procs):
                time.sleep(5)  # let the others report their side, then stop them
                break
            time.sleep(0.2)
    finally:
        for p in procs:
            _kill(p)
    codes = [p.returncode for p in procs]
    assert codes == [0] * len(procs), f"exit codes {codes}\n" + _tails(logs)


def _tails(logs):
    return "\n".join(f"--- {log}\n{Path(log).read_text()[-4000:]}" for log in logs)


def _one_node_run(tmp, extra=()):
    """The reference: the same job on one node, 4 ranks, launchers/torchrun.sh."""
    t0 = time.monotonic()
    single = _start(["bash", "launchers/torchrun.sh", "--nproc", "4", *ARGS, *extra,
                     "--out_json", str(tmp / "single.json")], _env(), tmp / "single.log")
    _wait_all([single], [tmp / "single.log"])
    print(f"one node x 4 ranks: {time.monotonic() - t0:.1f}s")
    return json.loads((tmp / "single.json").read_text())


@pytest.fixture(scope="module")
def one_node(namespaces_possible, tmp_path_factory):
    return _one_node_run(tmp_path_factory.mktemp("one_node"))


def _same_training(multi, ref):
    # World size 4 from 2 ranks per node: both nodes' workers are in the job.
    assert multi["world_size"] == 4 and ref["world_size"] == 4
    assert multi["config"] == ref["config"]
    assert len(multi["train_losses"]) == 5
    assert multi["train_losses"] == ref["train_losses"]
    assert multi["val_loss"] == ref["val_loss"]
    assert multi["params_sha256"] == ref["params_sha256"]


def _summary_from_node_a(tmp_path, logs):
    """Only global rank 0 writes the summary, and it must be on node a (10.77.0.1)."""
    assert (tmp_path / "node0.json").exists() and not (tmp_path / "node1.json").exists(), \
        _tails(logs)
    for log in logs:  # no rank or agent failed (and was restarted)
        assert "Traceback" not in Path(log).read_text(), _tails(logs)
    return json.loads((tmp_path / "node0.json").read_text())


def _torchrun_two_nodes(two_nodes, tmp_path, extra=()):
    """launchers/torchrun_multinode.sh in each namespace, 2 ranks each; node a's summary."""
    rdzv_id = f"zeroopt-{uuid.uuid4().hex[:12]}"
    head = two_nodes[0]
    procs, logs = [], []
    t0 = time.monotonic()
    for k, node in enumerate(two_nodes):
        env = _env(NNODES="2", NODE_RANK=str(k), NPROC_PER_NODE="2",
                   RDZV_ENDPOINT=f"{head.addr}:{PORT}", RDZV_ID=rdzv_id,
                   LOCAL_ADDR=node.addr,                           # pitfall 2
                   GLOO_SOCKET_IFNAME=node.ifname,                 # pitfall 3
                   RDZV_CONF="is_host=1,join_timeout=60" if k == 0  # pitfall 1
                   else "is_host=0,join_timeout=60")
        log = tmp_path / f"node{k}.log"
        logs.append(log)
        argv = node.wrap(["bash", "launchers/torchrun_multinode.sh", *ARGS, *extra,
                          "--out_json", str(tmp_path / f"node{k}.json")])
        procs.append(_start(argv, env, log))
    _wait_all(procs, logs)
    print(f"torchrun, two nodes x 2 ranks: {time.monotonic() - t0:.1f}s")
    # Node a has rank 0: nodes are ranked by sorting their LOCAL_ADDR (see pitfall 2).
    return _summary_from_node_a(tmp_path, logs)


def test_torchrun_two_nodes_train_the_same_params_as_one_node(two_nodes, one_node, tmp_path):
    _same_training(_torchrun_two_nodes(two_nodes, tmp_path), one_node)


def test_hierarchical_sharding_across_two_nodes_equals_flat_sharding(two_nodes, tmp_path):
    """--shard_size 2: the optimizer state is sharded within each node (the 2 ranks of a
    node, consecutive ranks) and replicated across the nodes, whose chunks are all-reduced
    over the veth link. It trains the params of flat 4-way sharding on one node, bit for bit,
    with twice the state per rank. (Without clipping: the clip coefficient's fp32 norm
    partials follow the chunking, so with clipping the two differ in the last bits.)"""
    no_clip = ["--grad_clip", "0"]
    (tmp_path / "flat").mkdir()
    (tmp_path / "nodes").mkdir()
    flat = _one_node_run(tmp_path / "flat", no_clip)
    hybrid = _torchrun_two_nodes(two_nodes, tmp_path / "nodes", [*no_clip, "--shard_size", "2"])
    assert hybrid["world_size"] == flat["world_size"] == 4
    assert hybrid["config"]["shard_size"] == 2 and flat["config"]["shard_size"] == 0
    assert hybrid["train_losses"] == flat["train_losses"]
    assert hybrid["params_sha256"] == flat["params_sha256"]
    per_rank = hybrid["state_bytes_per_rank"]
    assert min(per_rank) >= 1.9 * max(flat["state_bytes_per_rank"])


def test_deepspeed_two_nodes_train_the_same_params_as_one_node(two_nodes, one_node, tmp_path):
    """launchers/deepspeed.sh on each node without ssh (--no_ssh --node_rank K, a hostfile
    with both addresses): DeepSpeed's launch.py numbers the ranks from the hostfile's order
    and points every rank at MASTER_ADDR, so only pitfall 3 (GLOO_SOCKET_IFNAME) applies."""
    pytest.importorskip("deepspeed", reason="the DeepSpeed launcher needs `pip install deepspeed`")
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("".join(f"{node.addr} slots=2\n" for node in two_nodes))
    procs, logs = [], []
    t0 = time.monotonic()
    for k, node in enumerate(two_nodes):
        env = _env(HOSTFILE=str(hostfile), NODE_RANK=str(k), MASTER_ADDR=two_nodes[0].addr,
                   MASTER_PORT=str(PORT), GLOO_SOCKET_IFNAME=node.ifname)
        env.pop("DS_ACCELERATOR", None)
        log = tmp_path / f"node{k}.log"
        logs.append(log)
        argv = node.wrap(["bash", "launchers/deepspeed.sh", *ARGS,
                          "--out_json", str(tmp_path / f"node{k}.json")])
        procs.append(_start(argv, env, log))
    _wait_all(procs, logs)
    print(f"deepspeed, two nodes x 2 ranks: {time.monotonic() - t0:.1f}s")
    _same_training(_summary_from_node_a(tmp_path, logs), one_node)
