"""scripts/gpu.sh (bench/gpu.py, bench/gpu_steps.py): the GPU verdict's budget, streaming and summary, checked on
the CPU. test_plan_runs_every_step runs `bash scripts/gpu.sh --plan`, every step's code at toy sizes (the kernels
through the interpreter); the rest check the arithmetic and the files in-process, with stand-in step commands.
Also the two fixes the first GPU run would meet: the TMA scratch on the inputs' device, GH200 before H200."""
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from bench.gpu import (
    DEFAULT_BUDGET_S,
    GOALS,
    RESERVE_S,
    STEPS,
    Output,
    Step,
    cap_text,
    goal_verdict,
    plan_table,
    run_step,
    step_limit,
    summary_markdown,
    summary_rows,
)
from helpers import ROOT


def _gpu_sh(*args, timeout=600):
    env = {**os.environ, "PYTHON": sys.executable}
    return subprocess.run(["bash", str(ROOT / "scripts" / "gpu.sh"), *args], cwd=ROOT, capture_output=True,
                          text=True, env=env, timeout=timeout)


@pytest.mark.slow
def test_plan_runs_every_step(tmp_path):
    out = tmp_path / "verdict"
    r = _gpu_sh("--plan", "--out", str(out))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    # the plan table: every step with its cap, before anything runs
    for step in STEPS:
        assert re.search(rf"^  {step.name} +{re.escape(cap_text(step))} ", r.stdout, re.M), step.name
    results = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]
    assert [x["step"] for x in results] == [s.name for s in STEPS]
    assert all(x["status"] == "passed" for x in results), [(x["step"], x["why"]) for x in results]
    assert all(x["measures"] for x in results)
    assert not (out / "step-partial.json").exists()
    assert {p.name for p in out.iterdir()} <= {"gpu.log", "steps.jsonl", "summary.md", "inspect-sm_90.json",
                                               "inspect-sm_90.md", "bench.json"}
    summary = (out / "summary.md").read_text()
    assert "PLAN" in summary
    for goal in GOALS:  # every goal has its row; in the plan none is judged (toy sizes say nothing of a GPU)
        row = next(line for line in summary.splitlines() if goal.text in line)
        assert "not judged (plan)" in row or "not measured" in row, row
    correctness = next(x for x in results if x["step"] == "correctness")
    figures = {m["key"]: m["value"] for m in correctness["measures"]}
    assert figures["correctness.failed"] == 0 and figures["correctness.passed"] >= 10
    log = (out / "gpu.log").read_text()
    assert "loads through pointers" in log and "=== bench: passed" in log


def test_the_first_steps_fit_the_default_budget_and_later_ones_are_skipped_not_squeezed():
    rows = plan_table(STEPS, DEFAULT_BUDGET_S)
    fits = [step.name for step, limit, _, _ in rows if limit is not None]
    assert fits[:5] == ["env", "correctness", "attention", "train", "rowwise"]  # even if each runs to its cap
    assert sum(s.cap_s for s in STEPS[:5]) + RESERVE_S <= DEFAULT_BUDGET_S
    # a fixed cap larger than what is left: skipped, saying so
    limit, why = step_limit(Step("x", 100, ""), 60)
    assert limit is None and "cap of 100 s exceeds the 55 s left" in why
    assert step_limit(Step("x", 100, ""), 105) == (100, None)
    # a "what is left" step takes its share, or is skipped below its minimum
    assert step_limit(Step("t", "rest", "", share=0.5, min_s=30), 205) == (100, None)
    assert step_limit(Step("t", "rest", "", min_s=30), 30)[0] is None


def _fake_step(tmp_path, code, limit):
    out = Output(tmp_path, 100, plan=False)
    cmd = [sys.executable, "-c", code.replace("PARTIAL", repr(str(out.partial_path)))]
    return out, run_step(out, Step("fake", limit, ""), limit, sys.executable, False, {}, cmd=cmd)


def test_a_hung_step_is_killed_at_its_cap_and_keeps_what_it_measured(tmp_path):
    code = ("import json, time\n"
            "json.dump({'measures': [{'key': 'k', 'value': 1.5, 'unit': 'x'}]}, open(PARTIAL, 'w'))\n"
            "print('measured one', flush=True)\ntime.sleep(120)\n")
    out, result = _fake_step(tmp_path, code, 3)
    assert result["status"] == "timed out" and result["seconds"] < 30
    assert result["measures"] == [{"key": "k", "value": 1.5, "unit": "x"}]
    assert "measured one" in (tmp_path / "gpu.log").read_text()
    assert not out.partial_path.exists()


def test_a_crashed_step_is_a_failure_and_the_results_stream_to_disk(tmp_path):
    out, result = _fake_step(tmp_path, "import os; print('boom', flush=True); os.abort()", 30)
    assert result["status"] == "failed" and "exit" in result["why"]
    out.step_done(result)
    assert json.loads((tmp_path / "steps.jsonl").read_text())["status"] == "failed"
    assert "| fake | failed" in (tmp_path / "summary.md").read_text()


def test_summary_holds_each_measure_against_its_goal():
    results = [
        {"step": "attention", "status": "passed", "seconds": 50, "cap": 110, "measures": [
            {"key": "attention.fwd_bwd.gpt2.vs_flash", "value": 1.05, "unit": "x", "label": "ratio"},
            {"key": "attention.fwd.gpt2.vs_flash", "value": 0.9, "unit": "x", "label": "fwd ratio"},
            {"key": "attention.fwd_bwd.gpt2.vs_cudnn", "value": None, "why": "not available: no cuDNN"},
            {"key": "attention.fwd.gpt2.triton", "value": 300.0, "unit": "TFLOP/s", "label": "triton fwd"}]},
        {"step": "train", "status": "skipped", "why": "its cap of 180 s exceeds the 20 s left", "measures": []},
        {"step": "correctness", "status": "timed out", "why": "killed at its cap of 110 s", "measures": [
            {"key": "correctness.failed", "value": 0, "unit": "cases", "label": "failed cases"}]},
    ]
    rows = {r[1]: r for r in summary_rows(results)}
    assert rows["ratio"][2:] == ("1.05x", GOALS[2].text, "pass")
    assert rows["fwd ratio"][4] == "short"
    assert rows["attention.fwd_bwd.gpt2.vs_cudnn"][4] == "not measured (not available: no cuDNN)"
    assert rows["triton fwd"][4] == "info"
    assert rows["failed cases"][4] == "pass (partial: step timed out)"
    assert rows["train.tokens_per_s.triton_vs_sdpa"][4] == "not measured (its cap of 180 s exceeds the 20 s left)"
    assert rows["decode.b1.triton_vs_sdpa"][4] == "not measured (not run yet)"
    assert "triton fwd" not in {r[1] for r in summary_rows(results, brief=True)}  # not a headline
    assert goal_verdict(GOALS[6], 0.7) == "pass" and goal_verdict(GOALS[6], 0.71) == "short"  # "<=" goal
    assert "| train | skipped (its cap" in summary_markdown({}, results, 540)


def _readme_table(heading):
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## On a GPU"):]
    section = section[:section.index("\n## ", 5)]
    lines = section[section.index(heading):].splitlines()[2:]  # after the header and its separator
    rows = []
    for line in lines:
        if not line.startswith("|"):
            break
        rows.append([c.strip().strip("`") for c in line.strip("|").split("|")])
    return rows


def test_readme_budget_and_goal_tables_match_the_code():
    assert [row[:2] for row in _readme_table("| step | cap (s) |")] == [[s.name, cap_text(s)] for s in STEPS]
    assert [row[:2] for row in _readme_table("| measure | goal |")] == [[g.key, g.text] for g in GOALS]
    assert f"`--budget` seconds (default {DEFAULT_BUDGET_S})" in (ROOT / "README.md").read_text()


@pytest.mark.parametrize("args,message", [
    (["--budget", "soon"], "--budget 'soon' is not a number of seconds"),
    (["--budget", "-5"], "--budget -5 must be positive"),
    (["--only", "env,warp"], "unknown step(s) warp (choose from env,correctness"),
    (["--skip", ","], "unknown step(s) (none given)"),
    (["--frobnicate"], "unrecognized arguments: --frobnicate"),
])
def test_bad_input_is_one_line(args, message):
    r = subprocess.run([sys.executable, "-m", "bench.gpu", *args], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and message in r.stderr
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without a GPU")
def test_without_a_gpu_it_says_so():
    r = subprocess.run([sys.executable, "-m", "bench.gpu", "--out", "/nonexistent/never"], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "--plan" in r.stderr
    assert r.stderr.count("\n") == 1 and not os.path.exists("/nonexistent/never")


def test_tma_scratch_is_allocated_on_the_inputs_device():
    from kernels._common import tma_scratch
    scratch = tma_scratch(torch.device("cpu"))(256, 128, 0)  # "cuda" here would fail: this machine has none
    assert scratch.device.type == "cpu" and scratch.numel() == 256 and scratch.dtype == torch.int8


def test_gpu_names_match_their_own_entry_first():
    from nanogpt.hardware import GPU_PEAK_BF16_FLOPS
    keys = [k for k, _ in GPU_PEAK_BF16_FLOPS]
    # the first key found in a name wins: a key inside another (H200 in GH200) must come after it
    for i, short in enumerate(keys):
        for longer in keys[i + 1:]:
            assert short not in longer, f"{longer!r} must come before {short!r}"
    assert next(k for k in keys if k in "NVIDIA GH200 480GB") == "GH200"
    assert next(k for k in keys if k in "NVIDIA H200") == "H200"
