#!/usr/bin/env bash
# The GPU benchmark (issue 17): one H100, ≤ 8 minutes. `bench/gpu.sh --toy` runs it on CPU at a toy shape.
# Figures go to stdout (a Markdown table) and to bench/out/gpu.json; copy them into bench/RESULTS.md
# with the card's name.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
mkdir -p bench/out
exec timeout 480 "$PY" bench/gpu.py --json bench/out/gpu.json "$@"
