#!/usr/bin/env bash
# The GPU check (benchmarks/gpu_check.py): every path CUDA changes in cstar, recorded as JSON.
#
#   bash benchmarks/gpu_check.sh OUT_DIR            on a GPU machine: at most 8 minutes
#   bash benchmarks/gpu_check.sh OUT_DIR --tiny     on the CPU, tiny settings (what CI runs)
#
# Writes OUT_DIR/gpu_check.json and OUT_DIR/gpu_check.md after every item, so a run cut
# short by the time limit keeps what it measured. Exit code: 0 when no item failed, 1 when
# one did (the JSON says which and why), 124 when the time limit was reached.
# GPU_CHECK_SECONDS overrides the limit (default 480).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 1 ] || [[ "$1" == -* ]]; then
  echo "usage: bash benchmarks/gpu_check.sh OUT_DIR [--tiny] [--only ITEM,...] [--device cuda:N]" >&2
  exit 2
fi
out="$1"; shift
# cstar must be importable with the machine's own torch (a CUDA build): install without deps
python -c "import cstar" 2>/dev/null || python -m pip install -q --no-deps -e .
exec timeout --signal=TERM --kill-after=20 "${GPU_CHECK_SECONDS:-480}" \
  python benchmarks/gpu_check.py --out "$out" "$@"
