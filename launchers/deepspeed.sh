#!/usr/bin/env bash
# Launch examples/train_gpt.py with the DeepSpeed launcher (`deepspeed`, deepspeed.launcher.runner).
# Only the launcher is DeepSpeed's: the example still trains with zeroopt (no
# deepspeed.initialize, no ds_config); it joins the job from the RANK/WORLD_SIZE/LOCAL_RANK/
# MASTER_ADDR/MASTER_PORT variables that DeepSpeed's launch.py sets. Needs: pip install deepspeed
# Add --deepspeed_config configs/deepspeed_zeroopt.json to train through DeepSpeed's engine too
# (zeroopt.deepspeed.initialize: docs/DEEPSPEED.md).
#
#   bash launchers/deepspeed.sh [--num_gpus N] [train_gpt.py args...]
#   bash launchers/deepspeed.sh --num_gpus 2 --steps 50 --stage 2          # 2 ranks on this node
#   HOSTFILE=hosts bash launchers/deepspeed.sh --num_gpus 8 --steps 200    # all nodes, from node 0
#                                                                          # (pdsh/ssh to each)
#   HOSTFILE=hosts NODE_RANK=K MASTER_ADDR=node0 bash launchers/deepspeed.sh --num_gpus 8 ...
#                                 # no ssh: run this on every node, K = its line in the hostfile
#
# Environment:
#   NUM_GPUS      ranks per node, as --num_gpus (default 2 on CPU; on GPUs all visible ones).
#                 On CPU DeepSpeed counts one "device" per NUMA node (or $LOCAL_SIZE) unless
#                 --num_gpus says otherwise, so without it a 1-socket machine gets 1 rank.
#   HOSTFILE      MPI-style hostfile ("node0 slots=8" lines) for several nodes; without it
#                 the job is this node only. With it DeepSpeed ssh-es into every host (pdsh by
#                 default, DEEPSPEED_ARGS="--launcher openmpi" etc.) and needs passwordless ssh
#                 even for "localhost", unless NODE_RANK is set (then --no_ssh: one launcher
#                 per node, like torchrun).
#   NUM_NODES     --num_nodes: use the first N hosts of HOSTFILE
#   NODE_RANK     with HOSTFILE: launch only this node's ranks (--no_ssh --node_rank)
#   MASTER_ADDR   rank 0's address, reachable from every node (default: DeepSpeed's guess,
#                 `hostname -I`'s first address; 127.0.0.1 for one node)
#   MASTER_PORT   default 29500; choose another one to run two jobs on one machine
#   DS_ACCELERATOR cpu is set here when torch sees no CUDA (DeepSpeed would guess it too, with
#                 a warning); on CPU the ranks use gloo and configs/deepspeed_cpu.json
#   DS_BIND_CORES=1  --bind_cores_to_rank: pin each rank to its share of the cores (uses
#                 numactl if installed) and set OMP_NUM_THREADS to that share
#   CONFIG        the example's JSON config (default configs/deepspeed_cpu.json on CPU,
#                 configs/gpt_tiny.json on GPUs)
#   SCRIPT        the example (default examples/train_gpt.py; examples/deepspeed_train.py
#                 trains one DeepSpeed config with DeepSpeed alone and with zeroopt). The
#                 first run on a machine that goes through DeepSpeed's engine compiles its CPU
#                 comm op (a few minutes); the example says so first.
#   PYTHON        the interpreter (default python); the launcher and the ranks use it
#   DEEPSPEED_ARGS  further launcher flags (word-split), e.g. "--enable_each_rank_log /tmp/l"
#
# What the DeepSpeed launcher needs here (found running it on CPU):
# - --no_local_rank: otherwise it appends --local_rank=<i> to the script's arguments and
#   train_gpt.py stops with "unrecognized arguments: --local_rank=0" (the rank is read from
#   LOCAL_RANK in the environment instead).
# - no hostfile for a one-node job: with one (even "localhost slots=2") it checks ssh to each
#   host first and fails without passwordless ssh ("host=localhost was not reachable via ssh");
#   the default /job/hostfile is used if it exists.
# - --num_gpus on CPU (see NUM_GPUS). A hostfile's slots=N also sets the ranks per node.
# - GLOO_SOCKET_IFNAME on several nodes when the hostname resolves to loopback (see
#   launchers/torchrun_multinode.sh); DeepSpeed passes the environment on to the ranks (and
#   to remote nodes, the variables listed in ~/.deepspeed_env).
set -euo pipefail

NUM_GPUS="${NUM_GPUS:-}"
if [[ "${1:-}" == "--num_gpus" ]]; then
  [[ $# -ge 2 ]] || { echo "usage: $0 [--num_gpus N] [train_gpt.py args...]" >&2; exit 2; }
  NUM_GPUS="$2"
  shift 2
elif [[ "${1:-}" == --num_gpus=* ]]; then
  NUM_GPUS="${1#--num_gpus=}"
  shift
fi
if [[ -n "$NUM_GPUS" ]] && ! [[ "$NUM_GPUS" =~ ^[1-9][0-9]*$ ]]; then
  echo "error: --num_gpus must be a positive integer, got '$NUM_GPUS'" >&2
  exit 2
fi

# Run from the repository root so the relative paths below resolve wherever we are called from.
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON="${PYTHON:-python}"
if ! "$PYTHON" -c "import deepspeed" 2>/dev/null; then
  echo "error: deepspeed is not installed for $PYTHON (pip install deepspeed)" >&2
  exit 2
fi

if [[ -z "${DS_ACCELERATOR:-}" ]] && \
   ! "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  export DS_ACCELERATOR=cpu
fi
if [[ "${DS_ACCELERATOR:-}" == "cpu" ]]; then
  CONFIG="${CONFIG:-configs/deepspeed_cpu.json}"
  NUM_GPUS="${NUM_GPUS:-2}"
else
  CONFIG="${CONFIG:-configs/gpt_tiny.json}"
fi

# Share the CPU cores among this node's ranks (at least one thread each), unless the user chose.
if [[ -z "${OMP_NUM_THREADS:-}" ]]; then
  CORES=$(nproc 2>/dev/null || getconf _NPROCESSORS_ONLN 2>/dev/null || echo 1)
  THREADS=$(( CORES / ${NUM_GPUS:-1} ))
  (( THREADS >= 1 )) || THREADS=1
  export OMP_NUM_THREADS="$THREADS"
fi

LAUNCH=(--no_local_rank)
[[ -n "$NUM_GPUS" ]] && LAUNCH+=(--num_gpus "$NUM_GPUS")
[[ -n "${HOSTFILE:-}" ]] && LAUNCH+=(--hostfile "$HOSTFILE")
[[ -n "${NUM_NODES:-}" ]] && LAUNCH+=(--num_nodes "$NUM_NODES")
[[ -n "${NODE_RANK:-}" ]] && LAUNCH+=(--no_ssh --node_rank "$NODE_RANK")
[[ -n "${MASTER_ADDR:-}" ]] && LAUNCH+=(--master_addr "$MASTER_ADDR")
[[ -n "${MASTER_PORT:-}" ]] && LAUNCH+=(--master_port "$MASTER_PORT")
[[ "${DS_BIND_CORES:-0}" == "1" ]] && LAUNCH+=(--bind_cores_to_rank)
# shellcheck disable=SC2206  # word-splitting DEEPSPEED_ARGS is intended
[[ -n "${DEEPSPEED_ARGS:-}" ]] && LAUNCH+=(${DEEPSPEED_ARGS})

# `python -m deepspeed.launcher.runner` is the `deepspeed` command, for this interpreter.
SCRIPT="${SCRIPT:-examples/train_gpt.py}"
exec "$PYTHON" -m deepspeed.launcher.runner "${LAUNCH[@]}" \
  "$SCRIPT" --config "$CONFIG" "$@"
