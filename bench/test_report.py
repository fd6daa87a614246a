"""The timed JSON carries every derived figure; the report renders it; `python -m bench` runs one config."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kernels._common import interpreting

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    # one timed kernel's rows through the real --benchmark path (the compile(naive) rows are left out: their
    # torch.compile costs ~10 s here and adds no field to check; bench/test_kernels.py runs them untimed)
    out = tmp_path_factory.mktemp("bench") / "results.json"
    r = subprocess.run([sys.executable, "-m", "pytest", "bench/test_kernels.py", "-q", "-p", "no:cacheprovider",
                        "-k", "gelu and float32 and not compile", "--benchmark", f"--benchmark-json={out}"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600,
                       # under pytest-xdist the worker's variables would make the inner run's pytest-benchmark
                       # think it is a worker too, and then it writes no JSON
                       env={k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return out


def test_json_has_the_derived_figures(results):
    data = json.loads(results.read_text())
    timed = data["benchmarks"]
    assert timed and "--benchmark" in data["command"]
    for row in timed:
        info = row["extra_info"]
        for key in ("device", "torch", "triton", "dtype", "shape", "backend", "passes", "median_s", "gbps",
                    "roofline_fraction", "roofline_matmul_flops", "roofline_copy_bytes_per_s", "date"):
            assert info.get(key) is not None, (row["name"], key)
        assert info["gbps"] > 0 and 0 < info["roofline_fraction"] < 10
    triton_rows = [r for r in timed if r["extra_info"]["backend"] == "triton"]
    if interpreting():
        assert not triton_rows  # interpreted: never timed...
        assert {r["extra_info"]["backend"] for r in data["untimed"]} == {"triton"}  # ...but listed, checked


def test_report_renders_a_table_and_a_chart(results, tmp_path):
    r = subprocess.run([sys.executable, "-m", "bench.report", str(results), "--out", str(tmp_path)], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    md = (tmp_path / "results.md").read_text()
    assert "## gelu fwd" in md and "| backend | median (ms) | GB/s | fraction of roofline |" in md
    assert "| sdpa |" in md and "measured roofline" in md
    png = (tmp_path / "results.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_report_errors():
    r = subprocess.run([sys.executable, "-m", "bench.report", "/no/such.json"], cwd=ROOT, capture_output=True,
                       text=True)
    assert r.returncode == 2 and "error: /no/such.json does not exist" in r.stderr


def test_one_shot_bench_command(tmp_path):
    trace = tmp_path / "trace.json"
    r = subprocess.run([sys.executable, "-m", "bench", "--device=cpu", "--n_layer=1", "--n_head=2", "--n_embd=32",
                        "--block_size=16", "--batch_size=2", "--vocab_size=64", "--warmup_steps=1", "--num_steps=2",
                        "--profile=True", f"--profile_file={trace}"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "time per iteration:" in r.stdout and "tokens/s" in r.stdout and "MFU: n/a" in r.stdout
    assert json.loads(trace.read_text())["traceEvents"]
    r = subprocess.run([sys.executable, "-m", "bench", "--n_lyer=1"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "unknown config key 'n_lyer' (did you mean 'n_layer'?)" in r.stderr


def test_report_has_the_loss_head_rows():
    """The loss head's rows reach the table: TFLOP/s, and the peak memory beside the fp32 logits it may avoid, on
    the untimed (interpreted) rows too."""
    from bench.report import load_rows, markdown
    info = dict(kind="loss_head", shape=[256, 128, 50304], peak_memory_bytes=3 * 2**20,
                logits_fp32_bytes=256 * 50304 * 4)
    data = {"benchmarks": [{"name": "test_loss_head[sdpa]", "group": "loss head", "stats": {"median": 0.002},
                            "extra_info": dict(info, backend="sdpa", timed=True, tflops=0.5)}],
            "untimed": [{"name": "test_loss_head[triton]", "group": "loss head",
                         "extra_info": dict(info, backend="triton", timed=False, note="interpreted")}]}
    md = markdown(load_rows(data), data)
    assert "| backend | median (ms) | TFLOP/s | fraction of roofline | peak memory (MiB) | fp32 logits (MiB) |" in md
    assert "| sdpa | 2 | 0.5 | — | 3 | 49.1 |" in md
    assert "| triton | interpreted | — | — | 3 | 49.1 |" in md
