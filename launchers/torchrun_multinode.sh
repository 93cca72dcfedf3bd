#!/usr/bin/env bash
# Launch examples/train_gpt.py on several nodes with torchrun and the c10d rendezvous.
# Run the same command on every node; only NODE_RANK differs.
#
#   NNODES=2 NODE_RANK=0 NPROC_PER_NODE=2 RDZV_ENDPOINT=node0:29400 RDZV_ID=job42 \
#     bash launchers/torchrun_multinode.sh [train_gpt.py args...]      # on node0
#   NNODES=2 NODE_RANK=1 NPROC_PER_NODE=2 RDZV_ENDPOINT=node0:29400 RDZV_ID=job42 \
#     bash launchers/torchrun_multinode.sh [train_gpt.py args...]      # on node1
#
# or with flags (they win over the variables), e.g.
#   bash launchers/torchrun_multinode.sh --nnodes 2 --node_rank 1 --nproc_per_node 2 \
#     --rdzv_endpoint node0:29400 --rdzv_id job42 --steps 50 --reduce_dtype fp64
#
# Environment / flags:
#   NNODES          --nnodes          number of nodes (default 1)
#   NODE_RANK       --node_rank       this node's index, 0..NNODES-1 (default 0). torchrun's c10d
#                                     rendezvous IGNORES it (it warns so): it numbers the nodes
#                                     by sorting their (LOCAL_ADDR or FQDN, pid); only
#                                     RDZV_BACKEND=static uses it
#   NPROC_PER_NODE  --nproc_per_node  ranks on this node (default 2)
#   RDZV_ENDPOINT   --rdzv_endpoint   host:port of the rendezvous (default localhost:29400):
#                                     the address of one node (node 0), which hosts the c10d
#                                     store there (see is_host below)
#   RDZV_ID         --rdzv_id         the same string on every node of one job (default
#                                     zeroopt-gpt); a new one per job
#   RDZV_BACKEND                      c10d (default) or static (then RDZV_ENDPOINT is node 0's
#                                     MASTER_ADDR:MASTER_PORT and NODE_RANK fixes the order)
#   RDZV_CONF                         --rdzv_conf, e.g. "is_host=1,join_timeout=300"
#   LOCAL_ADDR                        --local_addr: the address of THIS node that the others
#                                     can reach (default: torchrun uses socket.getfqdn()); set
#                                     it where the hostname does not resolve to such an address
#   CONFIG                            JSON config (default configs/multinode.json)
#   SCRIPT                            the example (default examples/train_gpt.py; e.g.
#                                     examples/pretrain_llama.py with CONFIG=configs/llama_1b.json)
#   PYTHON                            the interpreter (default python)
#   TORCHRUN_ARGS                     any further torchrun flags (word-split)
# Everything else on the command line is passed to examples/train_gpt.py.
#
# Pitfalls on multi-node CPU/gloo (found running two network namespaces, tests/test_multinode.py):
# - gloo picks its network interface by resolving the hostname. On many machines the hostname
#   resolves to 127.0.0.1 (an /etc/hosts line), so each rank advertises loopback to the others
#   and the job hangs or fails at the first collective ("Connection refused" / timeout). Set
#   GLOO_SOCKET_IFNAME=<the interface that reaches the other nodes> (e.g. eth0, ib0). For
#   NCCL the same thing is NCCL_SOCKET_IFNAME; for the TensorPipe RPC agent TP_SOCKET_IFNAME.
# - The c10d rendezvous store is hosted by the node that takes the endpoint host for itself:
#   torch compares it with "localhost", the hostname, the FQDN and the addresses the HOSTNAME
#   resolves to -- not with the addresses of the interfaces. An endpoint given as an IP
#   address therefore often matches no node (always, where the hostname resolves to
#   127.0.0.1): every agent connects, none listens, and all fail after 60 s with "The client
#   socket has timed out ... while trying to connect to (<host>, <port>)". Pass
#   RDZV_CONF=is_host=1 on the endpoint's node (and is_host=0 on the others) to say it. If
#   several nodes match (endpoint localhost on a multi-node job), each hosts its own store.
# - The workers' process group does NOT use the endpoint: the node that the rendezvous made
#   rank 0 opens a second TCPStore on a free port at its own address, which is LOCAL_ADDR, or
#   else socket.getfqdn(), and the workers get that as MASTER_ADDR/MASTER_PORT. If the FQDN
#   resolves to 127.0.0.1 (Debian/Ubuntu's "127.0.1.1 host" /etc/hosts line, containers), the
#   other nodes' workers connect to their own loopback and time out in init_process_group.
#   Set LOCAL_ADDR to a routable address of each node (any node may become rank 0). With
#   TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 it is the same story, only the port differs.
# - Firewalls: the endpoint port, that free port and gloo's ephemeral ports must all be open
#   between the nodes.
set -euo pipefail

NNODES="${NNODES:-1}"
NODE_RANK="${NODE_RANK:-0}"
NPROC_PER_NODE="${NPROC_PER_NODE:-2}"
RDZV_ENDPOINT="${RDZV_ENDPOINT:-localhost:29400}"
RDZV_ID="${RDZV_ID:-zeroopt-gpt}"
RDZV_BACKEND="${RDZV_BACKEND:-c10d}"
RDZV_CONF="${RDZV_CONF:-}"
LOCAL_ADDR="${LOCAL_ADDR:-}"

usage() { echo "usage: $0 [--nnodes N] [--node_rank K] [--nproc_per_node P]" \
                "[--rdzv_endpoint HOST:PORT] [--rdzv_id ID] [train_gpt.py args...]" >&2; exit 2; }
ARGS=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --nnodes|--node_rank|--nproc_per_node|--rdzv_endpoint|--rdzv_id)
      [[ $# -ge 2 ]] || usage
      case "$1" in
        --nnodes) NNODES="$2" ;; --node_rank) NODE_RANK="$2" ;;
        --nproc_per_node) NPROC_PER_NODE="$2" ;; --rdzv_endpoint) RDZV_ENDPOINT="$2" ;;
        --rdzv_id) RDZV_ID="$2" ;;
      esac
      shift 2 ;;
    --nnodes=*) NNODES="${1#*=}"; shift ;;
    --node_rank=*) NODE_RANK="${1#*=}"; shift ;;
    --nproc_per_node=*) NPROC_PER_NODE="${1#*=}"; shift ;;
    --rdzv_endpoint=*) RDZV_ENDPOINT="${1#*=}"; shift ;;
    --rdzv_id=*) RDZV_ID="${1#*=}"; shift ;;
    *) ARGS+=("$1"); shift ;;
  esac
done

for name in NNODES NPROC_PER_NODE; do
  if ! [[ "${!name}" =~ ^[1-9][0-9]*$ ]]; then
    echo "error: $name must be a positive integer, got '${!name}'" >&2
    exit 2
  fi
done
if ! [[ "$NODE_RANK" =~ ^[0-9]+$ ]] || (( NODE_RANK >= NNODES )); then
  echo "error: NODE_RANK must be in 0..$((NNODES - 1)), got '$NODE_RANK'" >&2
  exit 2
fi
if ! [[ "$RDZV_ENDPOINT" =~ ^.+:[0-9]+$ ]]; then
  echo "error: RDZV_ENDPOINT must be host:port, got '$RDZV_ENDPOINT'" >&2
  exit 2
fi

# Run from the repository root so the relative paths below resolve wherever we are called from.
cd "$(dirname "${BASH_SOURCE[0]}")/.."
CONFIG="${CONFIG:-configs/multinode.json}"
SCRIPT="${SCRIPT:-examples/train_gpt.py}"

# Share this node's CPU cores among its ranks (at least one thread each), unless the user chose.
if [[ -z "${OMP_NUM_THREADS:-}" ]]; then
  CORES=$(nproc 2>/dev/null || getconf _NPROCESSORS_ONLN 2>/dev/null || echo 1)
  THREADS=$(( CORES / NPROC_PER_NODE ))
  (( THREADS >= 1 )) || THREADS=1
  export OMP_NUM_THREADS="$THREADS"
fi

EXTRA=()
[[ -n "$RDZV_CONF" ]] && EXTRA+=(--rdzv_conf "$RDZV_CONF")
[[ -n "$LOCAL_ADDR" ]] && EXTRA+=(--local_addr "$LOCAL_ADDR")
# shellcheck disable=SC2206  # word-splitting TORCHRUN_ARGS is intended
[[ -n "${TORCHRUN_ARGS:-}" ]] && EXTRA+=(${TORCHRUN_ARGS})

PYTHON="${PYTHON:-python}"
exec "$PYTHON" -m torch.distributed.run \
  --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$NPROC_PER_NODE" \
  --rdzv_backend "$RDZV_BACKEND" --rdzv_endpoint "$RDZV_ENDPOINT" --rdzv_id "$RDZV_ID" \
  ${EXTRA[@]+"${EXTRA[@]}"} \
  "$SCRIPT" --config "$CONFIG" ${ARGS[@]+"${ARGS[@]}"}
