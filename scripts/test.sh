#!/usr/bin/env bash
# Sets up .venv with the dev extras, lints (ruff) and runs the whole test suite (CPU; Triton through its interpreter).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh dev
.venv/bin/ruff check .  # pyflakes + import order (pyproject.toml [tool.ruff]): fails before the tests run
# -n auto: one pytest-xdist worker per core; --dist loadfile: a file's tests run on one worker, so a module's
# fixtures (the inspection's GPU compiles, a trained model) are built once
exec .venv/bin/python -m pytest tests/ bench/ -q -n auto --dist loadfile "$@"
