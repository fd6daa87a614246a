"""The GPU verdict in one budgeted call: `python3 -m bench.gpu` (what `bash scripts/gpu.sh` runs).

    bash scripts/gpu.sh [--out DIR] [--budget SECONDS] [--only STEP,...] [--skip STEP,...] [--plan]

Steps run in order of value (STEPS below), each in its own process with its own time cap, so a step that hangs or
crashes (a CUDA fault, a compiler that never returns) costs its cap and nothing else. A step whose cap does not fit
in what is left of the budget (counted from the start: torch.compile and autotuning happen inside the steps) is
skipped, and the summary says so. The last two steps take "what is left" instead of a fixed cap.

Everything is written to DIR as soon as it is known, so a run cut short keeps all that finished before the cut:
  gpu.log         every line of every step, as it is printed
  steps.jsonl     one JSON object per step (status, seconds, its measures), appended when the step ends
  step-partial.json  the running step's measures, rewritten after each one (removed when the step ends)
  summary.md      the summary table (measure, figure, goal, pass/short/not measured), rewritten after each step
  inspect-<arch>.json / .md   step `inspect`;  bench.json   step `bench` (pytest-benchmark)
At most 7 files, two folders deep at most: the device tool brings back 8 files from $OUT.

--plan runs every step's code path on this machine at toy sizes (the kernels through Triton's interpreter, fp32 and
fp16) with the same budget arithmetic, streaming and summary: CI's guard that the GPU run fails for no Python
reason. Exit status: 0 when every step that ran passed, 1 otherwise, 2 on bad input or (without --plan) no GPU.
"""
import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_BUDGET_S = 540  # the device tool's 10-minute command limit, less a minute for start-up and the copy back
RESERVE_S = 5  # kept back from every step for writing the summary after it
REST = "rest"  # a cap that takes what is left of the budget


@dataclass(frozen=True)
class Step:
    name: str
    cap_s: int | str  # seconds, or REST (a share of what is left: `share` of it)
    what: str
    writes: str = "steps.jsonl, summary.md, gpu.log"
    share: float = 1.0  # for a REST step: the fraction of what is left it may take
    min_s: int = 0      # for a REST step: skipped when less than this is left


# In the order of value. The first four must fit the default budget even if each runs to its cap
# (tests/test_gpu_verdict.py checks it); torch.compile and Triton's autotuning happen inside these caps.
STEPS = [
    Step("env", 30, "device, capability, SMs, clocks, driver, versions; roofline: bf16 matmul, device copy"),
    Step("correctness", 110, "attention fwd+bwd bf16/fp16 vs float64 (GPT-2 shape, T 1/7/257/1000, D 64/96/128, "
                             "causal or not, dropout, TMA and pointer loads); LayerNorm, add+LayerNorm, GELU, "
                             "loss head, decode attention in bf16"),
    Step("attention", 110, "attention TFLOP/s: triton vs sdpa[flash/cudnn/efficient] and FlexAttention, fwd and "
                           "fwd+bwd, bf16 causal, (16,12,1024,64) and (4,16,4096,128)"),
    Step("train", 180, "GPT-2 124M training step, B=16 T=1024 bf16 compiled: attn=sdpa vs attn=triton"),
    Step("rowwise", 90, "LayerNorm, GELU, loss head vs torch eager and torch.compile: GB/s, memory"),
    Step("decode", 120, "GPT-2 124M decode, batch 1 and 8, compiled (CUDA graph): tokens/s, copy-bandwidth share"),
    Step("inspect", 60, "python -m kernels.inspect for the device's architecture",
         writes="inspect-<arch>.json, inspect-<arch>.md"),
    Step("tests", REST, "the test suite on the GPU (what fits)", share=0.5, min_s=30),
    Step("bench", REST, "pytest bench/ --benchmark (what fits)", writes="bench.json", min_s=30),
]
STEP_NAMES = [s.name for s in STEPS]


@dataclass(frozen=True)
class Goal:
    key: str        # the measure it holds
    text: str       # as the README states it
    op: str         # ">=" or "<="
    bound: float
    source: str     # the issue that set it


# The project's speed goals (README, "On a GPU"), each held against one measure of a step.
GOALS = [
    Goal("correctness.failed", "0 cases off tolerance", "<=", 0, "issue 22"),
    Goal("attention.fwd.gpt2.vs_flash", ">= 1.1x sdpa[flash], fwd, (16,12,1024,64)", ">=", 1.1, "issue 12"),
    Goal("attention.fwd_bwd.gpt2.vs_flash", ">= 1.0x sdpa[flash], fwd+bwd, (16,12,1024,64)", ">=", 1.0,
         "issues 12, 23"),
    Goal("attention.fwd_bwd.gpt2.vs_cudnn", ">= 0.8x sdpa[cudnn], fwd+bwd, (16,12,1024,64)", ">=", 0.8, "issue 12"),
    Goal("attention.fwd_bwd.long.vs_flash", ">= 1.0x sdpa[flash], fwd+bwd, (4,16,4096,128)", ">=", 1.0,
         "issues 12, 23"),
    Goal("train.tokens_per_s.triton_vs_sdpa", "attn=triton >= 1.0x attn=sdpa tokens/s (compiled)", ">=", 1.0,
         "issues 12, 14"),
    Goal("train.peak_memory.triton_vs_sdpa", "attn=triton peak memory <= 0.7x attn=sdpa's", "<=", 0.7, "issue 14"),
    Goal("rowwise.layer_norm.vs_eager", "LayerNorm fwd+bwd >= 1.3x F.layer_norm, 16384x768 bf16", ">=", 1.3,
         "issue 12"),
    Goal("rowwise.layer_norm.vs_compile", "LayerNorm fwd+bwd >= 1.0x torch.compile(naive)", ">=", 1.0, "issue 12"),
    Goal("rowwise.gelu.copy_fraction", "GELU(+bias) fwd+bwd >= 85% of copy bandwidth", ">=", 0.85, "issue 12"),
    Goal("decode.b1.triton.copy_fraction", "decode, batch 1, triton: >= 60% of copy bandwidth", ">=", 0.6,
         "issue 13"),
    Goal("decode.b1.triton_vs_sdpa", "decode, batch 1: attn=triton >= 1.0x attn=sdpa tokens/s", ">=", 1.0,
         "issue 13"),
    Goal("inspect.flagged", "0 shipped configs over the limits, spilling or off wgmma", "<=", 0, "issue 11"),
    Goal("tests.failed", "0 failed tests", "<=", 0, "issue 22"),
]
GOAL_BY_KEY = {g.key: g for g in GOALS}


def goal_verdict(goal, value):
    ok = value >= goal.bound if goal.op == ">=" else value <= goal.bound
    return "pass" if ok else "short"


# ------------------------------------------------------------------------------------------------ budget

def cap_text(step):
    """The cap as the README's budget table writes it."""
    if step.cap_s == REST:
        share = "" if step.share == 1.0 else f"{step.share:g} of "
        return f"{share}what is left (min {step.min_s})"
    return str(step.cap_s)


def step_limit(step, remaining_s):
    """(seconds the step may run, None) or (None, why it is skipped), given the budget left before it."""
    usable = remaining_s - RESERVE_S
    if step.cap_s == REST:
        limit = int(usable * step.share)
        if limit < step.min_s:
            return None, f"{usable:.0f} s left, it needs at least {step.min_s} s"
        return limit, None
    if step.cap_s > usable:
        return None, f"its cap of {step.cap_s} s exceeds the {max(usable, 0):.0f} s left of the budget"
    return step.cap_s, None


def plan_table(steps, budget_s):
    """Each step's cap and whether it fits, if every step before it ran to its full cap (the worst case)."""
    rows, used = [], 0.0
    for step in steps:
        limit, why = step_limit(step, budget_s - used)
        if limit is not None:
            used += limit
        rows.append((step, limit, why, used))
    return rows


# ------------------------------------------------------------------------------------------------ output

class Output:
    """DIR: the log (appended line by line), steps.jsonl (a line per finished step), summary.md (rewritten)."""

    def __init__(self, out_dir, budget_s, plan, left_out=()):
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.dir / "gpu.log"
        self.steps_path = self.dir / "steps.jsonl"
        self.partial_path = self.dir / "step-partial.json"
        self.summary_path = self.dir / "summary.md"
        for p in (self.log_path, self.steps_path, self.partial_path):
            p.unlink(missing_ok=True)
        self.lock = threading.Lock()
        self.budget_s, self.plan, self.left_out = budget_s, plan, tuple(left_out)
        self.results = []  # one dict per step, in order
        self.header = {}

    def log(self, line):
        with self.lock:
            print(line, flush=True)
            with open(self.log_path, "a") as f:
                f.write(line + "\n")

    def step_done(self, result):
        self.results.append(result)
        with open(self.steps_path, "a") as f:
            f.write(json.dumps(result) + "\n")
        self.write_summary()

    def write_summary(self):
        text = summary_markdown(self.header, self.results, self.budget_s, self.plan, self.left_out)
        tmp = self.summary_path.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(self.summary_path)  # a reader (or a cut) never sees half a table


def _fmt(value, unit):
    if isinstance(value, str):
        return value
    if unit == "x":
        return f"{value:.2f}x"
    if unit == "%":
        return f"{value * 100:.1f}%"
    if abs(value) >= 100 or float(value).is_integer():
        return f"{value:,.0f} {unit}".strip()
    return f"{value:.3g} {unit}".strip()


def summary_rows(results, plan=False, left_out=(), brief=False):
    """(step, measure, figure, goal, verdict) for every measure, and a row per goal no step measured. In the plan
    no figure is held against a goal (toy sizes on a CPU say nothing of a GPU). brief: only the measures held
    against a goal and those the step marked as headline (the one-screen verdict)."""
    rows, seen = [], set()
    status_of = {r["step"]: r for r in results}
    for r in results:
        if r["status"] != "passed" and not r.get("measures"):
            rows.append((r["step"], "(step)", "-", "-", f"{r['status']}: {r.get('why', '')}".rstrip(": ")))
        for m in r.get("measures", []):
            seen.add(m["key"])
            goal = GOAL_BY_KEY.get(m["key"])
            if brief and not goal and not m.get("headline"):
                continue
            if m.get("value") is None:
                verdict = f"not measured ({m.get('why', 'no figure')})"
                figure = "-"
            else:
                figure = _fmt(m["value"], m.get("unit", ""))
                verdict = ("not judged (plan)" if plan else goal_verdict(goal, m["value"])) if goal else "info"
                if goal and not plan and r["status"] != "passed":
                    verdict += f" (partial: step {r['status']})"  # e.g. counts of a step cut at its cap
            rows.append((r["step"], m.get("label", m["key"]), figure, goal.text if goal else "-", verdict))
    for goal in GOALS:
        if goal.key in seen:
            continue
        step = goal.key.split(".")[0]
        r = status_of.get(step)
        if r is None:
            why = "left out by --only/--skip" if step in left_out else "not run yet"
        else:
            why = r.get("why") or r["status"]
        if r is not None and r["status"] == "passed":
            why = "the step gave no figure: see gpu.log"
        rows.append((step, goal.key, "-", goal.text, f"not measured ({why})"))
    return rows


def summary_markdown(header, results, budget_s, plan=False, left_out=()):
    lines = [f"# GPU verdict{' (PLAN: toy sizes on the CPU, no GPU figure)' if plan else ''}", ""]
    if header:
        lines.append("; ".join(f"{k}: {v}" for k, v in header.items()))
        lines.append("")
    lines += ["| step | status | seconds | cap |", "|---|---|---|---|"]
    for r in results:
        status = r["status"] + (f" ({r['why']})" if r.get("why") else "")
        lines.append(f"| {r['step']} | {status} | {r.get('seconds', 0):.0f} | {r.get('cap', '-')} |")
    lines += ["", f"budget {budget_s:g} s"]
    for title, brief in (("Verdict", True), ("All measures", False)):
        lines += ["", f"## {title}", "", "| step | measure | figure | goal | verdict |", "|---|---|---|---|---|"]
        for row in summary_rows(results, plan, left_out, brief):
            lines.append("| " + " | ".join(str(c).replace("|", "/") for c in row) + " |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------ running a step

def run_step(out, step, limit_s, python, plan, extra_env, cmd=None):
    """Run one step in its own process group, its output streamed to the log; kill the group at the limit.
    (cmd: another command in its place, for the tests.)"""
    cmd = cmd or [python, "-u", "-m", "bench.gpu_steps", step.name, "--result", str(out.partial_path),
                  "--out", str(out.dir), "--limit", str(limit_s)] + (["--plan"] if plan else [])
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **extra_env,
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    out.log(f"=== {step.name} (cap {limit_s} s): {' '.join(cmd[1:])}")
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            errors="replace", start_new_session=True)

    def pump():
        for line in proc.stdout:
            out.log(f"  {line.rstrip()}")
    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    timed_out = False
    try:
        rc = proc.wait(timeout=limit_s)
    except subprocess.TimeoutExpired:
        timed_out = True
        _kill_group(proc)
        rc = proc.wait()
    reader.join(timeout=5)
    seconds = time.monotonic() - t0
    partial = {}
    if out.partial_path.exists():
        try:
            partial = json.loads(out.partial_path.read_text())
        except json.JSONDecodeError:
            partial = {}
        out.partial_path.unlink(missing_ok=True)
    if timed_out:
        status, why = "timed out", f"killed at its cap of {limit_s} s"
    elif rc == 0:
        status, why = "passed", ""
    else:
        status, why = "failed", f"exit {rc}" + (f": {partial['error']}" if partial.get("error") else "")
    out.log(f"=== {step.name}: {status}{' (' + why + ')' if why else ''} after {seconds:.0f} s")
    return {"step": step.name, "status": status, "why": why, "seconds": round(seconds, 1), "cap": limit_s,
            "measures": partial.get("measures", []), "info": partial.get("info", {})}


def _kill_group(proc):
    import signal
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the step's whole group: pytest workers, compile workers
    except ProcessLookupError:
        pass


# ------------------------------------------------------------------------------------------------ command line

def error(message):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def _step_list(text, option):
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in STEP_NAMES]
    if unknown or not names:
        error(f"{option} {text!r}: unknown step(s) {', '.join(unknown) or '(none given)'} "
              f"(choose from {','.join(STEP_NAMES)})")
    return names


def parse_args(argv):
    p = argparse.ArgumentParser(prog="bash scripts/gpu.sh", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", metavar="DIR", help="results folder (default bench/results/<device>-<date>/; --plan: a temp folder)")
    p.add_argument("--budget", metavar="SECONDS", default=str(DEFAULT_BUDGET_S),
                   help=f"seconds for the whole run, compiling included (default {DEFAULT_BUDGET_S})")
    p.add_argument("--only", metavar="STEP,...", help=f"run only these steps, comma-separated: {','.join(STEP_NAMES)}")
    p.add_argument("--skip", metavar="STEP,...", help="leave these steps out, comma-separated")
    p.add_argument("--plan", action="store_true", help="CPU: every step's code at toy sizes (CI)")
    p.add_argument("--python", default=os.environ.get("PYTHON", sys.executable),
                   help="the interpreter that runs the steps (default: this one, or $PYTHON)")
    p.error = lambda message: error(f"{message} (see bash scripts/gpu.sh --help)")
    args = p.parse_args(argv)
    try:
        args.budget = float(args.budget)
    except ValueError:
        error(f"--budget {args.budget!r} is not a number of seconds (e.g. --budget 540)")
    if not args.budget > 0:
        error(f"--budget {args.budget:g} must be positive (e.g. --budget 540)")
    args.only = _step_list(args.only, "--only") if args.only is not None else None
    args.skip = _step_list(args.skip, "--skip") if args.skip is not None else []
    return args


def probe_device(python):
    """(device name, arch) of the step interpreter's first CUDA device, or None when it sees none."""
    code = ("import torch, sys\nif not torch.cuda.is_available(): sys.exit(1)\n"
            "print(torch.cuda.get_device_name()); print('sm_%d%d' % torch.cuda.get_device_capability())")
    try:
        r = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = r.stdout.strip().splitlines()
    if r.returncode != 0 or len(lines) < 2:
        return None
    return lines[-2], lines[-1]


def main(argv=None):
    start = time.monotonic()
    args = parse_args(sys.argv[1:] if argv is None else argv)
    steps = [s for s in STEPS if (args.only is None or s.name in args.only) and s.name not in args.skip]
    if args.plan:
        device, arch = "cpu (plan)", "cpu"
        extra_env = {"TRITON_INTERPRET": "1"}
    else:
        if not shutil.which("nvidia-smi") and not Path("/dev/nvidia0").exists():
            error("no NVIDIA GPU on this machine (no nvidia-smi, no /dev/nvidia0): scripts/gpu.sh needs one; on a CPU "
                  "run bash scripts/gpu.sh --plan or bash scripts/test.sh")
        found = probe_device(args.python)
        if found is None:
            error(f"{args.python} sees no CUDA GPU: scripts/gpu.sh needs one (on a CPU: bash scripts/gpu.sh --plan, "
                  f"or bash scripts/test.sh; another interpreter: PYTHON=/path/to/python3)")
        device, arch = found
        extra_env = {}
    date = datetime.now(timezone.utc)
    if args.out:
        out_dir = Path(args.out)
    elif args.plan:
        out_dir = Path(tempfile.mkdtemp(prefix="gpu-plan-"))
    else:
        slug = re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-")
        out_dir = ROOT / "bench" / "results" / f"{slug}-{date:%Y-%m-%d}"
    try:
        out = Output(out_dir, args.budget, args.plan, [s.name for s in STEPS if s not in steps])
    except OSError as e:
        error(f"cannot write to --out {out_dir}: {e.strerror} (choose a writable folder)")
    out.header = {"device": device, "arch": arch, "date": f"{date:%Y-%m-%dT%H:%M:%SZ}",
                  "command": "bash scripts/gpu.sh " + " ".join(sys.argv[1:] if argv is None else argv)}
    out.log(f"GPU verdict: {device} ({arch}), budget {args.budget:g} s, results in {out_dir}")
    out.log("plan (worst case: every step runs to its cap):")
    out.log(f"  {'step':<12} {'cap s':>28} {'cumulative':>10}  writes")
    for step, limit, why, used in plan_table(steps, args.budget):
        fits = f"{used:>10.0f}" if limit is not None else f"{'skipped':>10}"
        out.log(f"  {step.name:<12} {cap_text(step):>28} {fits}  {step.writes}" + (f"  ({why})" if why else ""))
    out.write_summary()

    failed = False
    for step in steps:
        remaining = args.budget - (time.monotonic() - start)
        limit, why = step_limit(step, remaining)
        if limit is None:
            out.log(f"=== {step.name}: skipped ({why})")
            out.step_done({"step": step.name, "status": "skipped", "why": why, "seconds": 0, "cap": cap_text(step),
                           "measures": []})
            continue
        result = run_step(out, step, limit, args.python, args.plan, extra_env)
        failed |= result["status"] != "passed"
        out.step_done(result)
    out.log("")
    for row in summary_rows(out.results, out.plan, out.left_out, brief=True):
        out.log("  " + " | ".join(str(c) for c in row))
    out.log(f"total {time.monotonic() - start:.0f} s of a {args.budget:g} s budget; results: {out_dir}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
