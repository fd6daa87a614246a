"""`python -m kernels.inspect`: every shipped kernel config compiled for sm_90 and sm_80 (no GPU needed) stays
inside the architecture's limits, does not spill and, for fp16/bf16 attention on sm_90, keeps its dots on wgmma,
except the configs of ALLOWED below.

The compilation runs in a subprocess: this test process runs Triton through its interpreter, and compiling for a
GPU target needs Triton's real frontend (TRITON_INTERPRET unset before triton is imported).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from kernels.inspect import ROW_KEYS, duplicated_work, over_limits, problems_of  # noqa: E402  (no compile at import)

ARCHS = ("sm_90", "sm_80")

# Configs that still spill or leave wgmma, and why they are still shipped. (The attention redesign, issue 12:
# transposed dK/dV orientation and the one-launch backward, emptied the attention entries; configs that spill on
# one architecture or with dropout are skipped there by the lists in kernels/attention.py.)
# Keys: (kernel, arch, BLOCK_D, (the config's BLOCK_* values..., num_warps, num_stages)).
# One since issue 21's masks (causal aligned bottom-right: the offsets are runtime values): on sm_80 the causal
# dropout backward at BLOCK_D=64, 64x32/4w, the only config shipped there, sat at 255 registers with 0 B and now
# spills 8 B, outside the main loops (no LDL/STL in them: bench/results/NOTES.md, session 32).
# And the rotary embedding's bf16 rows on sm_80: 8 B of local memory written and read in the precise sin/cos
# (libdevice's argument reduction), before the per-head loop, never inside it (the fp32 rows and sm_90 have none).
# The backward at BLOCK_D=256 with dropout (whose mask takes registers): 16 B (64x16/4w) and 24 B (128x16/8w) on
# sm_90, 8 B on sm_80 (64x32/8w), all outside the main loops (no_local_access_in_main_loops below holds them
# to it); without dropout they are clean (bench/results/NOTES.md, session 33).
ALLOWED = {("attention_bwd", "sm_80", 64, (64, 32, 4, 3)),
           ("rotary", "sm_80", 64, (64, 32, 8, 1)), ("rotary", "sm_80", 128, (32, 64, 8, 1)),
           ("attention_bwd", "sm_90", 256, (64, 16, 4, 2)), ("attention_bwd", "sm_90", 256, (128, 16, 8, 2)),
           ("attention_bwd", "sm_80", 256, (64, 32, 8, 2))}

# Configs allowed to spill on the problems that turn every attention option on together (GQA group 4, window 256,
# softcap 30: kernels.attention.inspect_cases' OPTIONS), never on the plain ones. Since the backward's flat GQA walk
# (session 32) no sm_90 row spills; on sm_80 (mma.sync, no TMA: the pointer path) two still do. The lent GPU
# is sm_90. bench/results/NOTES.md (sessions 31-32) has the numbers.
ALLOWED_WITH_OPTIONS = {
    ("attention_bwd", "sm_80", 64, (128, 64, 8, 3)),
    ("attention_bwd", "sm_80", 128, (64, 32, 4, 3)),
}

# Shipped configs allowed to issue more MMA FLOPs than their tiles need (the static cost model, --loops: issued /
# needed > 1.00, warps computing the same tile twice). The backward redesign (issue 23) removed the 8-warp,
# 64-owned-row configs whose two warpgroups computed the same S^T and dP^T tiles on sm_90. One is left, on sm_80:
# the BLOCK_D=256 backward's 64x32/8w (1.5x in the dV walk, 1.67x in dK and dQ), the only config there without
# spills in its loops (4 warps spill 416 B). Keys as ALLOWED's.
DUPLICATES_ALLOWED = {("attention_bwd", "sm_80", 256, (64, 32, 8, 2))}

# The problems compiled here: bf16 attention at head dims 64 and 128, causal or not, dropout off or on (fp16
# compiles like bf16, and D=96 like D=128: they add rows, not code), the backward at head dim 256 (its own walk:
# dV, then dK), and every other kernel's cases. Every shipped config is compiled at every (head dim, dropout) it
# is shipped for among these (checked below).
SCRIPT = r"""
import json, os, sys
from kernels.inspect import collect, inspect
def select(case):
    p = case["problem"]
    if not case["kernel"].startswith("attention"):
        return True
    return p["dtype"] == "bf16" and (p["head_dim"] in (64, 128) or
                                     (p["head_dim"] == 256 and case["kernel"] == "attention_bwd"))
def key(c):  # num_stages left out: a launch that names none gets Triton's default, which the rows then show
    p = c["problem"]
    config = {k: v for k, v in c["config"].items() if k != "num_stages"}
    return (c["kernel"], json.dumps(config, sort_keys=True), p.get("head_dim"), p.get("dropout"))
# the shipped configs per architecture: attention's lists skip some configs on sm_80
shipped = {arch: sorted({key(c) for c in collect(arch=arch) if select(c)}) for arch in sys.argv[1:]}
jobs = max(2, min(8, os.cpu_count() or 2))
# cost="mma": the static cost model only where the dots are on MMA instructions, the rows the checks below read
rows = {arch: inspect(arch, jobs=jobs, select=select, cost="mma") for arch in sys.argv[1:]}
print(json.dumps({"rows": rows, "shipped": shipped}))
"""


def _env():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = env.get("TRITON_DEFAULT_FP_FUSION", "1")  # 3.9's default; silences a warning
    return env


@pytest.fixture(scope="module")
def inspected():
    r = subprocess.run([sys.executable, "-c", SCRIPT, *ARCHS], cwd=ROOT, env=_env(), capture_output=True, text=True,
                       timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.splitlines()[-1])


def allow_key(row):
    c = row["config"]
    block_d = max(16, 1 << (row["problem"]["head_dim"] - 1).bit_length()) if "head_dim" in row["problem"] else None
    blocks = tuple(v for k, v in c.items() if k.startswith("BLOCK_"))
    return (row["kernel"], row["arch"], block_d, blocks + (c["num_warps"], c["num_stages"]))


def offending(rows, allowed=ALLOWED, allowed_with_options=ALLOWED_WITH_OPTIONS):
    """The rows that fail: over the limits (never allowed), or spilling / off wgmma and not in `allowed` (nor,
    on an all-options problem, in `allowed_with_options`)."""
    def excused(r):
        key = allow_key(r)
        return key in allowed or ("options" in r["problem"] and key in allowed_with_options)
    return [(r["id"], problems_of(r)) for r in rows if over_limits(r) or (problems_of(r) and not excused(r))]


def _compiled(shipped, rows):
    """A row compiled this shipped (kernel, config, head dim, dropout): the rows' configs also carry the launch
    defaults the compiler filled in (num_stages where a launch names none), so the shipped config is a subset."""
    kernel, config, head_dim, dropout = shipped
    config = json.loads(config)
    return any(r["kernel"] == kernel and r["problem"].get("head_dim") == head_dim
               and r["problem"].get("dropout") == dropout and all(r["config"].get(k) == v for k, v in config.items())
               for r in rows)


@pytest.mark.parametrize("arch", ARCHS)
def test_shipped_configs_are_clean(inspected, arch):
    rows = inspected["rows"][arch]
    bad = offending(rows)
    assert not bad, "\n".join(f"{i}: {'; '.join(why)}" for i, why in bad)
    missing = [s for s in map(tuple, inspected["shipped"][arch]) if not _compiled(s, rows)]
    assert not missing, f"shipped configs not compiled by this test: {missing}"


def local_access_in_main_loops(rows, allowed_with_options=ALLOWED_WITH_OPTIONS):
    """The rows whose described main loops load or store local memory (LDL/STL: spills inside the loops, paid
    every iteration), (id, loop, count); only ALLOWED_WITH_OPTIONS's configs, on the all-options problems, may."""
    return [(r["id"], loop["name"], loop["classes"]["local"]) for r in rows if r["cost"]
            and not ("options" in r["problem"] and allow_key(r) in allowed_with_options)
            for loop in r["cost"]["loops"] if loop["name"] and loop["classes"]["local"]]


@pytest.mark.parametrize("arch", ARCHS)
def test_no_shipped_config_spills_inside_its_main_loops(inspected, arch):
    """ALLOWED's spills sit outside the main loops: none of a shipped config's described loops touches local
    memory."""
    bad = local_access_in_main_loops(inspected["rows"][arch])
    assert not bad, "\n".join(f"{i}: {n} LDL/STL in loop {loop}" for i, loop, n in bad)
    assert any(r["problem"].get("head_dim") == 256 for r in inspected["rows"][arch])


def test_the_main_loop_spill_check_catches_local_access():
    def cost(local):
        loop = {"name": "dkdv", "masked": False, "issued_over_needed": 1.0, "classes": {"local": local}}
        return {"loops": [loop, dict(loop, name=None, classes={"local": 9})], "note": "", "warp_instr_per_tile": 1.0}
    assert local_access_in_main_loops([_row(cost=cost(0))]) == []  # an undescribed loop is not a main loop
    assert local_access_in_main_loops([_row(cost=cost(3))]) == [("attention_bwd_dkdv-x", "dkdv", 3)]
    options = {"dtype": "bf16", "head_dim": 64, "causal": True, "dropout": False, "options": "group4"}
    allowed = {allow_key(_row())}
    assert local_access_in_main_loops([_row(cost=cost(3), problem=options)], allowed) == []
    assert local_access_in_main_loops([_row(cost=cost(3))], allowed) == [("attention_bwd_dkdv-x", "dkdv", 3)]


def duplicating(rows, allowed=DUPLICATES_ALLOWED):
    """The rows that fail the duplicated-work check: a described main loop issuing more MMA FLOPs than it needs
    (not in `allowed`), or described loops the cost model could not match to the machine code's MMA loops (the
    check would not see them) where the dots are on tensor cores."""
    bad = [(r["id"], f"MMA issued/needed {ratio:.2f} in loop {name}") for r in rows
           if allow_key(r) not in allowed for name, ratio in duplicated_work(r)]
    bad += [(r["id"], r["cost"]["note"]) for r in rows if r["mma"] != "none" and r["cost"]["note"]]
    return bad


@pytest.mark.parametrize("arch", ARCHS)
def test_no_shipped_config_duplicates_mma_work(inspected, arch):
    rows = inspected["rows"][arch]
    bad = duplicating(rows)
    assert not bad, "\n".join(f"{i}: {why}" for i, why in bad)
    described = [r for r in rows if r["kernel"].startswith("attention_") and r["mma"] != "none"]
    assert described and all(any(c["name"] for c in r["cost"]["loops"]) for r in described)


def test_duplicate_allow_list_is_still_needed(inspected):
    """An allowed config that no longer duplicates work (or is no longer shipped) must leave the list."""
    rows = [r for arch in ARCHS for r in inspected["rows"][arch]]
    still = {allow_key(r) for r in rows if duplicated_work(r)}
    gone = DUPLICATES_ALLOWED - still
    assert not gone, f"no duplicated work now (or unshipped), remove from the list: {sorted(gone)}"


def test_the_duplicate_check_catches_issued_over_needed():
    """The duplicated-work check on fabricated rows: a loop at 1.00 passes, above it fails unless allowed, and an
    unmatched description fails where the dots are on tensor cores."""
    def cost(ratio, note=""):
        loop = {"name": "dkdv", "masked": False, "issued_over_needed": ratio}
        return {"loops": [loop], "note": note, "warp_instr_per_tile": 1000.0}
    assert duplicating([_row(cost=cost(1.0))]) == []
    assert duplicating([_row(cost=cost(1.004))]) == []  # rounding
    assert duplicating([_row(cost=cost(1.5))]) == [("attention_bwd_dkdv-x", "MMA issued/needed 1.50 in loop dkdv")]
    assert duplicating([_row(cost=cost(1.5))], allowed={allow_key(_row())}) == []
    assert duplicating([_row(cost=cost(None, "loops: 4 described, 3 found"))])[0][1] == "loops: 4 described, 3 found"
    assert duplicating([_row(mma="none", cost=cost(None, "loops: 1 described, 0 found"))]) == []


def test_allow_list_is_still_needed(inspected):
    """An allowed config that is clean now (or no longer shipped) must leave ALLOWED."""
    rows = [r for arch in ARCHS for r in inspected["rows"][arch]]
    still = {allow_key(r) for r in rows if problems_of(r)}
    assert not (ALLOWED - still), f"clean or unshipped now, remove from ALLOWED: {sorted(ALLOWED - still)}"
    with_options = {allow_key(r) for r in rows if problems_of(r) and "options" in r["problem"]}
    gone = ALLOWED_WITH_OPTIONS - with_options
    assert not gone, f"clean or unshipped now, remove from ALLOWED_WITH_OPTIONS: {sorted(gone)}"


def _row(**changes):
    row = {"id": "attention_bwd_dkdv-x", "kernel": "attention_bwd_dkdv", "arch": "sm_90",
           "config": {"BLOCK_M": 64, "BLOCK_N": 128, "num_warps": 8, "num_stages": 2},
           "problem": {"dtype": "bf16", "head_dim": 64, "causal": True, "dropout": False},
           "registers": 200, "spill_bytes": 0, "shared_bytes": 48 * 1024, "mma": "wgmma", "tma": False,
           "ctas_per_sm": 1, "cost": {"loops": [], "note": "", "warp_instr_per_tile": None}}
    row.update(changes)
    return row


def test_the_check_catches_spills_mma_sync_and_limits():
    """The checking function on fabricated rows: each defect fails unless allowed; over the limits always fails."""
    assert offending([_row()]) == []
    assert offending([_row(spill_bytes=8)]) == [("attention_bwd_dkdv-x", ["spills 8 B"])]
    assert offending([_row(mma="wgmma+mma.sync")])[0][1] == ["dots on wgmma+mma.sync, not wgmma only"]
    assert offending([_row(mma="mma.sync", arch="sm_80")]) == []  # sm_80 has no wgmma
    assert offending([_row(mma="mma.sync", problem={"dtype": "fp32", "head_dim": 64})]) == []  # fp32: no tensor cores
    assert "shared memory" in offending([_row(shared_bytes=228 * 1024)])[0][1][0]
    assert "shared memory" in offending([_row(arch="sm_80", shared_bytes=164 * 1024)])[0][1][0]
    assert offending([_row(arch="sm_80", shared_bytes=160 * 1024)]) == []
    allowed = {allow_key(_row(spill_bytes=8))}
    assert offending([_row(spill_bytes=8)], allowed) == []
    assert offending([_row(spill_bytes=8, shared_bytes=300 * 1024)], allowed)  # over the limits: never allowed
    # allowed with options: only on a problem with the options on
    options = {"dtype": "bf16", "head_dim": 64, "causal": True, "dropout": False, "options": "group4"}
    assert offending([_row(spill_bytes=8, problem=options)], set(), allowed) == []
    assert offending([_row(spill_bytes=8)], set(), allowed) == [("attention_bwd_dkdv-x", ["spills 8 B"])]


def _inspect_cli(*args, prelude=""):
    code = prelude + "import sys; from kernels.inspect import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=600)


def test_cli_json_dump_and_table(tmp_path):
    out = tmp_path / "rows.json"
    r = _inspect_cli("--arch", "sm_80", "--kernel", "gelu_fwd", "--json", str(out), "--dump", str(tmp_path / "d"),
                     "--jobs", "1", "--loops")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "gelu_fwd" in r.stdout and "CTAs/SM" in r.stdout and "instr/iter" in r.stdout
    rows = json.loads(out.read_text())["rows"]
    assert rows and all(tuple(row) == ROW_KEYS for row in rows)
    for row in rows:
        assert row["arch"] == "sm_80" and row["mma"] == "none" and row["tma"] is False and row["registers"] > 0
        assert {"dtype", "width"} <= set(row["problem"]) and row["ctas_per_sm"] >= 1
        assert (tmp_path / "d" / f"{row['id']}.cubin").stat().st_size > 0
        assert ".target sm_80" in (tmp_path / "d" / f"{row['id']}.ptx").read_text()
        assert "Function : _gelu_fwd" in (tmp_path / "d" / f"{row['id']}.sass").read_text()
        # _gelu_fwd has no loop (one tile per program): the cost model finds none, and no per-tile figure
        assert row["cost"] == {"loops": [], "note": "", "warp_instr_per_tile": None}


def test_cli_exits_1_naming_rows_over_the_limits():
    """With the shared-memory limit lowered below what the forward uses, the rows are named and the exit is 1."""
    r = _inspect_cli("--kernel", "layer_norm_sum_partials", "--jobs", "1",
                     prelude="import kernels.inspect as k; k.ARCHS['sm_90']['smem_per_cta'] = 16; ")
    assert r.returncode == 1, r.stderr[-2000:]
    assert "over the sm_90 limits: layer_norm_sum_partials-" in r.stderr


def test_cli_bad_input_is_one_line_and_exit_2():
    for args, message in ((["--arch", "sm_75"], "error: --arch sm_75 is not supported: choose one of sm_90, sm_80"),
                          (["--kernel", "nope"], "error: unknown kernel nope: choose from "),
                          (["--json", "/no/such/dir/x.json"], "error: the folder of /no/such/dir/x.json does not")):
        r = _inspect_cli(*args)
        assert r.returncode == 2 and r.stderr.startswith(message), r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def test_python_m_under_the_interpreter_reexecs(tmp_path):
    """`python -m kernels.inspect` with TRITON_INTERPRET=1 in the environment (as the test suite sets it) still
    compiles for the GPU target."""
    env = dict(_env(), TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-m", "kernels.inspect", "--kernel", "gelu_bwd", "--jobs", "1"], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "gelu_bwd" in r.stdout and "rows" in r.stdout


TANH_SCRIPT = r"""
import importlib, tempfile, torch
from pathlib import Path
from kernels.inspect import compile_case
attention_module = importlib.import_module("kernels.attention")  # `kernels.attention` is also the function
out = Path(tempfile.mkdtemp())
for dtype in (torch.bfloat16, torch.float32):
    problem = [(dtype, 64, True, False, {"softcap": 30.0})]
    case = next(c for c in attention_module.inspect_cases(problem, "sm_90") if c["kernel"] == "attention_fwd")
    row = compile_case(case, "sm_90", dump=str(out))
    print(dtype, "tanh.approx.f32" in (out / (row["id"] + ".ptx")).read_text(),
          "MUFU.TANH" in (out / (row["id"] + ".sass")).read_text())
"""


def test_half_precision_softcap_compiles_to_the_hardware_tanh():
    """bf16 attention with a softcap: one MUFU.TANH per score (tanh.approx.f32 in the PTX); fp32 inputs keep the
    tanh of exp2 and a reciprocal (kernels._common.softcap_mode)."""
    r = subprocess.run([sys.executable, "-c", TANH_SCRIPT], cwd=ROOT, env=_env(), capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split("\n")[:2] == ["torch.bfloat16 True True", "torch.float32 False False"], r.stdout


def test_gpu_script_refuses_cleanly_without_a_gpu():
    """scripts/gpu.sh on a machine without an NVIDIA GPU: one error line, exit 2, nothing written."""
    import shutil
    if shutil.which("nvidia-smi") or Path("/dev/nvidia0").exists():
        pytest.skip("this machine has an NVIDIA GPU")
    before = set((ROOT / "bench" / "results").iterdir())
    r = subprocess.run(["bash", str(ROOT / "scripts" / "gpu.sh")], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.startswith("error: no NVIDIA GPU on this machine") and len(r.stderr.splitlines()) == 1
    assert set((ROOT / "bench" / "results").iterdir()) == before
