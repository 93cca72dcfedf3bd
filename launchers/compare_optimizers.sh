#!/usr/bin/env bash
# Compare optimizers on examples/pretrain_llama.py: the same config, seed and data for every
# run, one run after another on N local ranks (torchrun), then one plot of their loss curves.
#
#   bash launchers/compare_optimizers.sh [--nproc N] [--out_dir DIR] [pretrain_llama.py args...]
#                                        [-- RUN...]
#   bash launchers/compare_optimizers.sh --steps 300
#   bash launchers/compare_optimizers.sh --steps 100 --stage 2 -- adamw "lion --lr 4e-4"
#
# Arguments before `--` go to every run. Each RUN after it is an optimizer name followed by
# flags for that run only, as one quoted word; without `-- RUN...` the runs are DEFAULT_RUNS.
# Writes DIR/<run>/ (each rank's CSV log and summary JSON; <run> is the RUN with spaces as
# underscores and dashes dropped, e.g. lion_lr_4e-4) and DIR/loss_curves.png, and prints a
# table of the runs. Environment: CONFIG (default configs/llama_tiny.json), PYTHON (default
# python), OMP_NUM_THREADS (default: the cores divided among the ranks).
set -euo pipefail
shopt -s extglob  # for ${word##*(-)} below

# The lrs of Lion and GaLore come from a 300-step sweep of the tiny config (val loss):
# Lion's update is a sign, lr in every coordinate, so it wants a smaller lr (4e-4: 2.01, 8e-4:
# 2.01, 1.5e-3: 2.21) and its paper's beta2; GaLore scales its projected updates by
# galore_scale (0.25), so it wants a larger one (2e-3: 2.25, 6e-3: 1.80, 1.2e-2: 1.65).
# AdamW and Adafactor run at the config's lr (2e-3).
DEFAULT_RUNS=("adamw" "adamw_8bit" "lion --lr 4e-4 --beta2 0.99" "galore_adamw --lr 1.2e-2"
              "adafactor")

NPROC=2
OUT_DIR=runs/compare
COMMON=()
RUNS=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --nproc) [[ $# -ge 2 ]] || { echo "error: --nproc needs a value" >&2; exit 2; }
             NPROC="$2"; shift 2 ;;
    --nproc=*) NPROC="${1#*=}"; shift ;;
    --out_dir) [[ $# -ge 2 ]] || { echo "error: --out_dir needs a value" >&2; exit 2; }
               OUT_DIR="$2"; shift 2 ;;
    --out_dir=*) OUT_DIR="${1#*=}"; shift ;;
    --) shift; RUNS=("$@"); break ;;
    *) COMMON+=("$1"); shift ;;
  esac
done
[[ ${#RUNS[@]} -gt 0 ]] || RUNS=("${DEFAULT_RUNS[@]}")
if ! [[ "$NPROC" =~ ^[1-9][0-9]*$ ]]; then
  echo "error: --nproc must be a positive integer, got '$NPROC'" >&2
  exit 2
fi

# Run from the repository root so the relative paths below resolve wherever we are called from.
cd "$(dirname "${BASH_SOURCE[0]}")/.."
CONFIG="${CONFIG:-configs/llama_tiny.json}"
PYTHON="${PYTHON:-python}"
if [[ -z "${OMP_NUM_THREADS:-}" ]]; then
  CORES=$(nproc 2>/dev/null || getconf _NPROCESSORS_ONLN 2>/dev/null || echo 1)
  THREADS=$(( CORES / NPROC ))
  (( THREADS >= 1 )) || THREADS=1
  export OMP_NUM_THREADS="$THREADS"
fi

RUN_DIRS=()
for run in "${RUNS[@]}"; do
  read -r -a words <<< "$run"
  stripped=()
  for word in "${words[@]}"; do stripped+=("${word##*(-)}"); done
  name=$(IFS=_; echo "${stripped[*]}" | tr -c 'A-Za-z0-9_.=+\n-' '_')
  echo "=== $name: ${words[*]} ==="
  "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$NPROC" \
    examples/pretrain_llama.py --config "$CONFIG" ${COMMON[@]+"${COMMON[@]}"} \
    --optimizer "${words[@]}" --log_dir "$OUT_DIR/$name"
  RUN_DIRS+=("$OUT_DIR/$name")
done

"$PYTHON" examples/plot_losses.py "${RUN_DIRS[@]}" --out "$OUT_DIR/loss_curves.png"
