#!/usr/bin/env bash
# Everything a machine with an NVIDIA GPU can tell us, in one command (under 20 minutes on one H100):
#   1. the test suite on the GPU (real kernels, bf16 attention included)
#   2. `python -m kernels.inspect` for the device's own architecture (sm_80 / sm_90)
#   3. the benchmark suite, timed (`pytest bench/ --benchmark`), with its JSON
#   4. the report of it: Markdown table and PNG chart
#   5. the GPT-2 124M training step for attn in {sdpa, triton} x compile in {False, True}: tokens/s and MFU
# Results land in bench/results/<device>-<date>/ : env.json (device, versions, command, date, each step's status),
# inspect-<arch>.{json,md}, bench.json, bench.md, bench.png, train_step.txt, gpu.log.
#
# For machines with a preinstalled torch/triton and no package index: no virtual environment, no installs; it uses
# `python3` as found (override with PYTHON=...) and skips a step whose optional package is absent.
# On a machine without a GPU it says so and exits 2. Exit status: 0 when every step passed, 1 otherwise.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"

if ! command -v nvidia-smi >/dev/null 2>&1 && ! ls /dev/nvidia0 >/dev/null 2>&1; then
    echo "error: no NVIDIA GPU on this machine (no nvidia-smi, no /dev/nvidia0): scripts/gpu.sh needs one; on a CPU run bash scripts/test.sh" >&2
    exit 2
fi
if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1; then
    echo "error: $PYTHON has no torch that sees a CUDA GPU: scripts/gpu.sh needs one (set PYTHON=/path/to/python3)" >&2
    exit 2
fi

has() { "$PYTHON" -c "import $1" >/dev/null 2>&1; }
DEVICE_SLUG=$("$PYTHON" -c "import re, torch; print(re.sub(r'[^a-z0-9]+', '-', torch.cuda.get_device_name().lower()).strip('-'))")
ARCH=$("$PYTHON" -c "import torch; print('sm_%d%d' % torch.cuda.get_device_capability())")
DATE=$(date -u +%Y-%m-%d)
OUT="bench/results/${DEVICE_SLUG}-${DATE}"
mkdir -p "$OUT"
LOG="$OUT/gpu.log"
STEP_OUT=$(mktemp)
trap 'rm -f "$STEP_OUT"' EXIT
: > "$LOG"
STATUS=()   # "step: passed|failed (rc)|skipped (why)"
FAILED=0

run_step() {  # run_step NAME TIMEOUT_S COMMAND...: runs it, logs it, records its status
    local name="$1" limit="$2"; shift 2
    echo "=== $name: $*" | tee -a "$LOG"
    local start=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee "$STEP_OUT" | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    local took=$((SECONDS - start))
    if [ "$rc" -eq 0 ]; then
        STATUS+=("$name: passed in ${took}s")
    else
        local why="exit $rc"
        [ "$rc" -eq 124 ] && why="timed out after ${limit}s"
        STATUS+=("$name: failed ($why) after ${took}s")
        FAILED=1
    fi
    echo "=== $name: exit $rc after ${took}s" | tee -a "$LOG"
}
skip_step() { STATUS+=("$1: skipped ($2)"); echo "=== $1: skipped ($2)" | tee -a "$LOG"; }

export PYTHONUNBUFFERED=1
echo "device: $DEVICE_SLUG ($ARCH), results in $OUT" | tee -a "$LOG"

# 1. tests (a test file whose optional package is absent is left out)
if has pytest; then
    ignore=()
    has hypothesis || ignore+=(--ignore=tests/test_fuzz.py)
    run_step tests 420 "$PYTHON" -m pytest tests/ -q -p no:cacheprovider ${ignore[@]+"${ignore[@]}"}
else
    skip_step tests "pytest is not installed"
fi

# 2. inspection for this device's architecture
if "$PYTHON" -c "import sys, kernels.inspect as k; sys.exit(0 if '$ARCH' in k.ARCHS else 1)" >/dev/null 2>&1; then
    run_step inspect 240 "$PYTHON" -m kernels.inspect --arch "$ARCH" --jobs "$(nproc)" \
        --json "$OUT/inspect-$ARCH.json" --markdown "$OUT/inspect-$ARCH.md"
else
    skip_step inspect "kernels.inspect knows no $ARCH"
fi

# 3-4. benchmarks and their report
if has pytest_benchmark; then
    run_step bench 480 "$PYTHON" -m pytest bench/ -q -p no:cacheprovider --benchmark --benchmark-json="$OUT/bench.json"
    if [ -s "$OUT/bench.json" ]; then
        has matplotlib || echo "matplotlib is not installed: the report is the Markdown table only" | tee -a "$LOG"
        run_step report 120 "$PYTHON" -m bench.report "$OUT/bench.json" --out "$OUT"
    else
        skip_step report "no bench.json"
    fi
else
    skip_step bench "pytest-benchmark is not installed"
    skip_step report "no benchmark JSON"
fi

# 5. GPT-2 124M training step: attn x compile
: > "$OUT/train_step.txt"
for attn in sdpa triton; do
    for compile in False True; do
        cmd=("$PYTHON" -m bench --n_layer=12 --n_head=12 --n_embd=768 --block_size=1024 --batch_size=16
             --vocab_size=50304 --dropout=0.0 --bias=False --dtype=bfloat16 --attn=$attn --compile=$compile
             --warmup_steps=10 --num_steps=20)
        echo "\$ ${cmd[*]}" >> "$OUT/train_step.txt"
        run_step "train attn=$attn compile=$compile" 240 "${cmd[@]}"
        grep -E "parameters, attn=|tokens/s" "$STEP_OUT" >> "$OUT/train_step.txt" || echo "(failed: see gpu.log)" >> "$OUT/train_step.txt"
    done
done

# the record: device, versions, command, date, steps
STEPS=$(printf '%s\n' "${STATUS[@]}")
STEPS="$STEPS" "$PYTHON" - "$OUT/env.json" "$0 $*" <<'EOF'
import json, os, platform, sys
from datetime import datetime, timezone
import torch
try:
    import triton
    triton_version = triton.__version__
except ImportError:
    triton_version = None
env = {"device": torch.cuda.get_device_name(), "capability": "sm_%d%d" % torch.cuda.get_device_capability(),
       "torch": torch.__version__, "triton": triton_version, "cuda": torch.version.cuda,
       "python": platform.python_version(), "command": "bash " + sys.argv[2].strip(),
       "date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
       "steps": [s for s in os.environ["STEPS"].splitlines() if s]}
open(sys.argv[1], "w").write(json.dumps(env, indent=1) + "\n")
EOF
echo | tee -a "$LOG"
printf '%s\n' "${STATUS[@]}" | tee -a "$LOG"
echo "results: $OUT" | tee -a "$LOG"
exit $FAILED
