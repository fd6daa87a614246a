#!/usr/bin/env bash
# Sets up .venv with the dev extras, lints (ruff) and runs the whole test suite (CPU; Triton through its interpreter).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh dev
.venv/bin/ruff check .  # pyflakes + import order (pyproject.toml [tool.ruff]): fails before the tests run
exec .venv/bin/python -m pytest tests/ bench/ -q "$@"
