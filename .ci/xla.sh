#!/usr/bin/env bash
# CI step: zeroopt's XLA backend on real XLA:CPU replicas, in a venv of its own
# (torch==2.9.0 + torch_xla==2.9.0 from PyPI, ~3 GB; the main suite's torch is another version).
#
#   bash .ci/xla.sh            # builds or reuses ${ZEROOPT_XLA_VENV:-$HOME/.cache/zeroopt/xla-venv}
#
# When the environment cannot be built (no network, pip fails, no python3.11/venv), it prints
#   SKIPPED: XLA environment could not be built: <reason>
# and exits 0. Every step runs under `timeout`; nothing here can hang.
set -uo pipefail
cd "$(dirname "$0")/.."

VENV="${ZEROOPT_XLA_VENV:-$HOME/.cache/zeroopt/xla-venv}"
PY_FOR_VENV="${ZEROOPT_XLA_PYTHON:-python3.11}"
TORCH_PIN="torch==2.9.0"
XLA_PIN="torch_xla==2.9.0"
LOG="$(mktemp -t zeroopt-xla-pip.XXXXXX)"

skip() {
  echo "SKIPPED: XLA environment could not be built: $1"
  exit 0
}

if [[ ! -x "$VENV/bin/python" ]]; then
  command -v "$PY_FOR_VENV" >/dev/null 2>&1 || skip "$PY_FOR_VENV not found (set ZEROOPT_XLA_PYTHON)"
  timeout 120 "$PY_FOR_VENV" -m venv "$VENV" >"$LOG" 2>&1 \
    || { rm -rf "$VENV"; skip "python -m venv failed: $(tail -n 1 "$LOG")"; }
fi
PY="$VENV/bin/python"

# Install only what is missing: a warm venv costs two quick checks, no network.
if ! timeout 120 "$PY" -c "import torch, torch_xla, pytest; assert torch.__version__.startswith('2.9.0') and torch_xla.__version__.startswith('2.9.0')" >/dev/null 2>&1; then
  timeout 1500 "$PY" -m pip install --disable-pip-version-check -q --timeout 60 \
      "$TORCH_PIN" "$XLA_PIN" pytest >"$LOG" 2>&1 \
    || skip "pip install $TORCH_PIN $XLA_PIN pytest failed: $(grep -m1 -E 'ERROR|error' "$LOG" || tail -n 1 "$LOG")"
fi
if ! timeout 120 "$PY" -c "import zeroopt, pathlib, sys; sys.exit(pathlib.Path(zeroopt.__file__).resolve().parents[1] != pathlib.Path('$PWD').resolve())" >/dev/null 2>&1; then
  timeout 300 "$PY" -m pip install --disable-pip-version-check -q --no-deps -e . >"$LOG" 2>&1 \
    || skip "pip install -e . (zeroopt) failed: $(tail -n 1 "$LOG")"
fi
timeout 120 "$PY" -c "import torch_xla" >"$LOG" 2>&1 || skip "torch_xla does not import: $(tail -n 1 "$LOG")"

export PJRT_DEVICE=CPU
# Up to 4 replicas per case; torch_xla's execution pool must hold one thread per replica.
export XLA_THREAD_POOL_SIZE="${XLA_THREAD_POOL_SIZE:-$(( $(nproc) > 8 ? $(nproc) : 8 ))}"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-1}"
timeout "${ZEROOPT_XLA_TEST_TIMEOUT:-1800}" "$PY" -m pytest -q -p no:cacheprovider tests/xla "$@"
rc=$?
[[ $rc -eq 124 ]] && echo "FAILED: tests/xla did not finish within ${ZEROOPT_XLA_TEST_TIMEOUT:-1800} s"
exit $rc
