#!/usr/bin/env bash
# Sets up .venv with the dev extras and runs the whole test suite (CPU; Triton through its interpreter).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh dev
exec .venv/bin/python -m pytest tests/ bench/ -q "$@"
