#!/usr/bin/env bash
# The GPU verdict in one budgeted call (bench/gpu.py holds the logic; `--help` lists the options):
#   bash scripts/gpu.sh [--out DIR] [--budget SECONDS] [--only STEP,...] [--skip STEP,...]
#   bash scripts/gpu.sh --plan [--out DIR]     # CI: every step's code path on the CPU at toy sizes
# Steps in order of value, each in its own process with its own time cap, skipped (and said so) when the budget
# left cannot hold it: env + roofline, correctness, attention timing, GPT-2 training step, LayerNorm/GELU/loss head,
# decode, kernels.inspect, then whatever of the test suite and the benchmark suite fits. Every step's result is
# written to DIR (default bench/results/<device>-<date>/) as soon as it ends: gpu.log, steps.jsonl, summary.md.
#
# For machines with a preinstalled torch/triton and no package index: no virtual environment, no installs; it uses
# `python3` as found (override with PYTHON=...), and an optional package that is missing is named in the summary.
# Exit status: 0 when every step that ran passed, 1 otherwise, 2 on bad input or (without --plan) no GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if ! command -v "$PYTHON" >/dev/null 2>&1; then
    echo "error: no $PYTHON on this machine (set PYTHON=/path/to/python3)" >&2
    exit 2
fi
exec "$PYTHON" -m bench.gpu --python "$PYTHON" "$@"
