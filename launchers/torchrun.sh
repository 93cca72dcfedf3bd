#!/usr/bin/env bash
# Launch examples/train_gpt.py on N local ranks (default 2; CPU/gloo unless CUDA is present).
#
#   bash launchers/torchrun.sh [--nproc N] [extra args passed to train_gpt.py]
#   bash launchers/torchrun.sh --nproc 4 --steps 50 --stage 2
#   SCRIPT=examples/pretrain_llama.py CONFIG=configs/llama_tiny.json bash launchers/torchrun.sh
#
# SCRIPT and CONFIG pick the example and its config (default examples/train_gpt.py with
# configs/gpt_tiny.json).
#
# Uses `python -m torch.distributed.run` (= torchrun) so it works without torchrun on PATH.
set -euo pipefail

NPROC=2
if [[ "${1:-}" == "--nproc" ]]; then
  [[ $# -ge 2 ]] || { echo "usage: $0 [--nproc N] [train_gpt.py args...]" >&2; exit 2; }
  NPROC="$2"
  shift 2
elif [[ "${1:-}" == --nproc=* ]]; then
  NPROC="${1#--nproc=}"
  shift
fi
if ! [[ "$NPROC" =~ ^[1-9][0-9]*$ ]]; then
  echo "error: --nproc must be a positive integer, got '$NPROC'" >&2
  exit 2
fi

# Run from the repository root so the relative paths below resolve wherever we are called from.
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# Share the CPU cores among the ranks (at least one thread each), unless the user chose.
if [[ -z "${OMP_NUM_THREADS:-}" ]]; then
  CORES=$(nproc 2>/dev/null || getconf _NPROCESSORS_ONLN 2>/dev/null || echo 1)
  THREADS=$(( CORES / NPROC ))
  (( THREADS >= 1 )) || THREADS=1
  export OMP_NUM_THREADS="$THREADS"
fi

PYTHON="${PYTHON:-python}"
SCRIPT="${SCRIPT:-examples/train_gpt.py}"
CONFIG="${CONFIG:-configs/gpt_tiny.json}"
exec "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$NPROC" \
  "$SCRIPT" --config "$CONFIG" "$@"
