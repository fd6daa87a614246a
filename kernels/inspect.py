"""See the GPU code from the CPU: compile every shipped kernel x launch config for a GPU target and report what
the GPU would run.

    python -m kernels.inspect                      # sm_90 (H100/H200): the table on stdout
    python -m kernels.inspect --arch sm_80         # A100
    python -m kernels.inspect --json rows.json --dump DIR --jobs 2 --kernel attention_bwd

No GPU is needed: Triton compiles for a `GPUTarget` without one, and the wheel's `cuobjdump` reads the cubin.
Per row (kernel, config, problem): registers per thread, spill bytes (the stack frame: ptxas spills to the stack,
so STACK bytes, not LOCAL, are the spills), shared memory, the MMA instructions the dots became (`wgmma`: Hopper's
warpgroup tensor-core MMA; `mma.sync`: the Ampere-style one), whether loads use TMA (`cp.async.bulk.tensor`), and
the theoretical CTAs per SM (registers, shared memory, threads). Exit status 1, naming the rows, when a shipped
config exceeds the architecture's limits (255 registers per thread; 227 KB of shared memory per CTA on sm_90,
163 KB on sm_80); 2 on bad input.

The contract with the kernel modules
------------------------------------
A kernel module joins by defining `inspect_cases()` and being named in `MODULES` below. `inspect_cases()` returns
a list of dicts, one per (kernel, launch config, representative problem):

    {"kernel": "attention_fwd",                 # the kernel's name in the table
     "fn": _attn_fwd,                           # the @triton.jit function (not the autotuner)
     "signature": {"Q": "*bf16", "seed": "i32", "sm_scale": "fp32", ..., "BLOCK_M": "constexpr"},
     "constexprs": {"CAUSAL": True, "BLOCK_M": 128, ...},   # every constexpr parameter's value
     "config": {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3},
     "problem": {"dtype": "bf16", "head_dim": 64, ...} or {"dtype": ..., "width": 768, ...},
     "values": {"stride_qm": 2304, ...},        # optional: integer arguments' values at that problem
     "loops": [{"name": "dkdv", "masked": False, "mma_flops": ..., "tile": [64, 32]}, ...]}   # optional, below

with the configs taken from the same lists (or helpers) the launcher uses, never copied. `values` lets the
inspection specialize integer arguments the way Triton's JIT does at launch (a multiple of 16 is compiled with
`tt.divisibility=16`, which decides vectorized and TMA-able accesses); pointer arguments are taken as 16-byte
aligned (torch's allocations are), except parameters the kernel marks `do_not_specialize`. `launch_case()` in
kernels/_common.py builds such a dict from the arguments as the launcher passes them (torch dtypes for tensors, ints,
floats); the kernel modules import it from there, never from this module, which loads them.

`loops` describes the kernel's innermost runtime loops that hold a tl.dot, in source order, for the static cost
model (kernels/cost_model.py; `--loops`): per loop a short name, `masked` (a variant kept for diagonal or boundary
tiles: reported, left out of the per-tile sum), `mma_flops` (the useful MMA FLOPs of one iteration for the whole
CTA: 2*M*N*K summed over its dots) and `tile` (rows x cols of the score matrix one iteration covers). The model
matches them in address order to the SASS's innermost loops holding MMA instructions and reports issued / needed
FLOPs (above 1.00: a tile computed twice); when the counts differ the row says so instead of guessing. `[]` says
the kernel has no dot loop; without the key the loops are reported undescribed.
"""
import argparse
import importlib
import inspect as inspect_module
import json
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from kernels._common import interpreting
from kernels.cost_model import class_summary, loop_costs

# the kernel modules, each with an inspect_cases(): a new module joins here
MODULES = ["kernels.attention", "kernels.decode_attention", "kernels.layer_norm", "kernels.gelu",
           "kernels.linear_cross_entropy", "kernels.rotary"]

# per architecture: compute capability, registers per SM, registers per thread (max), shared memory per SM and
# per CTA (bytes), threads per SM, CTAs per SM (the CUDA occupancy tables; 1 KB per CTA is reserved by the system)
ARCHS = {
    "sm_90": dict(capability=90, regs_per_sm=65536, max_regs=255, smem_per_sm=228 * 1024, smem_per_cta=227 * 1024,
                  threads_per_sm=2048, ctas_per_sm=32),
    "sm_80": dict(capability=80, regs_per_sm=65536, max_regs=255, smem_per_sm=164 * 1024, smem_per_cta=163 * 1024,
                  threads_per_sm=2048, ctas_per_sm=32),
}
ROW_KEYS = ("id", "kernel", "config", "arch", "problem", "registers", "spill_bytes", "shared_bytes", "mma", "tma",
            "ctas_per_sm", "cost")

def collect(kernels=None, select=None, arch="sm_90"):
    """Every case of every module in MODULES (those of the named kernels only, if given; those for which
    select(case) is true, if given). A module whose inspect_cases() takes an `arch` argument gets the target's
    name, for kernels whose launch picks a different code path per architecture (attention: TMA on sm_90)."""
    if interpreting():
        raise RuntimeError("kernels.inspect compiles for a GPU target: TRITON_INTERPRET must be unset before triton is "
                           "imported (python -m kernels.inspect re-executes itself without it)")
    cases = []
    for name in MODULES:
        module = importlib.import_module(name)
        takes_arch = "arch" in inspect_module.signature(module.inspect_cases).parameters
        cases += [c for c in (module.inspect_cases(arch=arch) if takes_arch else module.inspect_cases())
                  if (not kernels or c["kernel"] in kernels) and (select is None or select(c))]
    return cases


def case_id(case, arch):
    parts = [case["kernel"]]
    parts += [f"{k}{v}" for k, v in sorted(case["problem"].items()) if not isinstance(v, bool)]
    parts += [k for k, v in sorted(case["problem"].items()) if v is True]
    short = {"BLOCK_M": "M", "BLOCK_N": "N", "BLOCK_D": "D", "num_warps": "w", "num_stages": "s"}
    parts += [f"{short.get(k, k)}{v}" for k, v in case["config"].items()]
    parts.append(arch)
    return re.sub(r"[^A-Za-z0-9_.-]", "_", "-".join(str(p) for p in parts))


# ------------------------------------------------------------------------------------------------ compiling


def _attrs(case, target_backend):
    """The specialization Triton's JIT applies at launch: 16-byte-aligned pointers, multiples of 16."""
    fn = case["fn"]
    attrs = {}
    for i, param in enumerate(fn.params):
        kind = case["signature"][param.name]
        if kind == "constexpr" or param.do_not_specialize:
            continue
        if kind.startswith("*") or case.get("values", {}).get(param.name, 1) % 16 == 0:
            attrs[(i,)] = target_backend.parse_attr("D")
    return attrs


def _cuobjdump():
    import triton
    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if path.is_file():
        return str(path)
    found = shutil.which("cuobjdump")
    if not found:
        raise RuntimeError("cuobjdump not found: neither in the triton wheel nor on PATH")
    return found


def _cuobjdump_text(cubin: bytes, flag: str) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([_cuobjdump(), flag, f.name], capture_output=True, text=True, check=True).stdout


def resource_usage(cubin: bytes):
    """(registers, stack bytes) of the cubin's one kernel, from `cuobjdump -res-usage`."""
    out = _cuobjdump_text(cubin, "-res-usage")
    match = re.search(r"REG:(\d+) STACK:(\d+)", out)
    if not match:
        raise RuntimeError(f"cannot read cuobjdump's resource usage: {out[-500:]}")
    return int(match.group(1)), int(match.group(2))


def mma_kind(ptx: str) -> str:
    wgmma = "wgmma.mma_async" in ptx
    sync = re.search(r"\bmma\.sync\.", ptx) is not None
    return {(True, True): "wgmma+mma.sync", (True, False): "wgmma", (False, True): "mma.sync"}.get((wgmma, sync),
                                                                                                     "none")


def ctas_per_sm(arch, registers, shared_bytes, num_warps):
    """Theoretical CTAs per SM, limited by registers (allocated per warp in units of 256), shared memory (plus the
    1 KB the system reserves per CTA), threads and the CTA count."""
    a = ARCHS[arch]
    regs_per_warp = -(-max(registers, 1) * 32 // 256) * 256
    by_regs = a["regs_per_sm"] // (regs_per_warp * num_warps)
    by_smem = a["smem_per_sm"] // (shared_bytes + 1024) if shared_bytes <= a["smem_per_cta"] else 0
    by_threads = a["threads_per_sm"] // (32 * num_warps)
    return max(0, min(by_regs, by_smem, by_threads, a["ctas_per_sm"]))


def compile_case(case, arch, dump=None, cost="all"):
    """Compile one case for `arch` and measure it: a row of the report. cost="mma" runs the static cost model
    (and the disassembly it reads: about a third of a row's time) only where the dots became MMA instructions,
    the rows the duplicated-work check reads; the others get cost None."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend

    target = GPUTarget("cuda", ARCHS[arch]["capability"], 32)
    backend = make_backend(target)
    constexprs = {(case["fn"].arg_names.index(k),): v for k, v in case["constexprs"].items()}
    source = ASTSource(fn=case["fn"], signature=case["signature"], constexprs=constexprs,
                       attrs=_attrs(case, backend))
    options = {k: case["config"][k] for k in ("num_warps", "num_stages") if k in case["config"]}
    compiled = triton.compile(source, target=target, options=options)
    ptx, cubin = compiled.asm["ptx"], compiled.asm["cubin"]
    registers, stack = resource_usage(cubin)
    mma = mma_kind(ptx)
    sass = _cuobjdump_text(cubin, "-sass") if cost == "all" or dump or mma != "none" else None
    shared = int(compiled.metadata.shared)
    num_warps = compiled.metadata.num_warps
    row_id = case_id(case, arch)
    if dump:
        Path(dump, f"{row_id}.cubin").write_bytes(cubin)
        Path(dump, f"{row_id}.ptx").write_text(ptx)
        Path(dump, f"{row_id}.sass").write_text(sass)
    config = dict(case["config"])
    config.setdefault("num_warps", num_warps)
    config.setdefault("num_stages", compiled.metadata.num_stages)
    return {"id": row_id, "kernel": case["kernel"], "config": config, "arch": arch, "problem": case["problem"],
            "registers": registers, "spill_bytes": stack, "shared_bytes": shared, "mma": mma,
            "tma": "cp.async.bulk.tensor" in ptx, "ctas_per_sm": ctas_per_sm(arch, registers, shared, num_warps),
            "cost": loop_costs(sass, arch, num_warps, case.get("loops")) if sass is not None else None}


_WORKER_CASES = None


def _worker_init(cases):
    global _WORKER_CASES
    _WORKER_CASES = cases


def _worker_compile(index, arch, dump, cost):
    return compile_case(_WORKER_CASES[index], arch, dump, cost)


def inspect(arch="sm_90", kernels=None, jobs=2, dump=None, select=None, cost="all"):
    """Compile every case for `arch` (in `jobs` processes) and return the rows, in the cases' order. `cost`: as
    compile_case's."""
    cases = collect(kernels, select, arch)
    if jobs <= 1 or len(cases) < 2:
        return [compile_case(c, arch, dump, cost) for c in cases]
    # forked workers inherit the cases (jit functions do not pickle) and are handed indices
    context = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(jobs, mp_context=context, initializer=_worker_init, initargs=(cases,)) as pool:
        rows = []
        for row in pool.map(_worker_compile, range(len(cases)), [arch] * len(cases), [dump] * len(cases),
                            [cost] * len(cases)):
            rows.append(row)
            if sys.stderr.isatty():
                print(f"\rcompiled {len(rows)}/{len(cases)}", end="", file=sys.stderr, flush=True)
        if sys.stderr.isatty():
            print(file=sys.stderr)
        return rows


# ------------------------------------------------------------------------------------------------ checking


def over_limits(row):
    """Why a row exceeds its architecture's hard limits (it could not launch), or None."""
    a = ARCHS[row["arch"]]
    why = []
    if row["registers"] > a["max_regs"]:
        why.append(f"{row['registers']} registers > {a['max_regs']}")
    if row["shared_bytes"] > a["smem_per_cta"]:
        why.append(f"{row['shared_bytes']} B shared memory > {a['smem_per_cta']} B")
    return "; ".join(why) or None


def problems_of(row):
    """Why a row would be slow or could not run: over the limits, spilling, or (fp16/bf16 attention on sm_90)
    dots off wgmma. An empty list for a clean row."""
    why = [w for w in [over_limits(row)] if w]
    if row["spill_bytes"]:
        why.append(f"spills {row['spill_bytes']} B")
    if (row["arch"] == "sm_90" and row["kernel"].startswith("attention") and row["mma"] not in ("wgmma", "none")
            and row["problem"].get("dtype") in ("fp16", "bf16")):
        why.append(f"dots on {row['mma']}, not wgmma only")
    return why


# ------------------------------------------------------------------------------------------------ the report


def _fmt_config(config):
    short = {"BLOCK_M": "M", "BLOCK_N": "N", "num_warps": "w", "num_stages": "s"}
    return " ".join(f"{short.get(k, k)}{v}" for k, v in config.items())


def _fmt_problem(problem):
    parts = []
    for k, v in problem.items():
        if isinstance(v, bool):
            if v:
                parts.append(k)
        else:
            parts.append(f"{'D=' if k == 'head_dim' else 'N=' if k == 'width' else ''}{v}")
    return " ".join(parts)


def table(rows, markdown=False):
    header = ["kernel", "problem", "config", "regs", "spill B", "smem KB", "mma", "tma", "CTAs/SM", "note"]
    body = []
    for r in rows:
        body.append([r["kernel"], _fmt_problem(r["problem"]), _fmt_config(r["config"]), str(r["registers"]),
                     str(r["spill_bytes"]), f"{r['shared_bytes'] / 1024:.1f}", r["mma"], "yes" if r["tma"] else "no",
                     str(r["ctas_per_sm"]), "; ".join(problems_of(r))])
    return _render(header, body, markdown)


def _render(header, body, markdown):
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        return "\n".join(lines + ["| " + " | ".join(b) + " |" for b in body])
    widths = [max(len(x) for x in col) for col in zip(header, *body)]
    fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([fmt(header), fmt(["-" * w for w in widths])] + [fmt(b) for b in body])


def loops_table(rows, markdown=False):
    """The static cost model, one line per innermost loop of each row (kernels/cost_model.py says what it counts
    and what it ignores), then a line per row with its warp-instructions per 128x64 tile and any note."""
    header = ["kernel", "problem", "config", "loop", "instr/iter", "classes per iteration", "MMA issued/needed",
              "TC cyc", "SFU cyc", "issue cyc", "bound", "warp-instr/128x64"]
    body = []
    for r in rows:
        cost = r.get("cost")
        if not cost:
            continue
        first = [r["kernel"], _fmt_problem(r["problem"]), _fmt_config(r["config"])]
        for c in cost["loops"]:
            name = (c["name"] or "(undescribed)") + (" (masked)" if c["masked"] else "")
            ratio = f"{c['issued_over_needed']:.2f}" if c["issued_over_needed"] is not None else "-"
            per_tile = f"{c['warp_instr_per_tile']:.0f}" if c["warp_instr_per_tile"] is not None else "-"
            body.append(first + [f"{name} {c['start']}-{c['end']}", str(c["instructions"]),
                                 class_summary(c), ratio, f"{c['cycles']['tensor']:.0f}",
                                 f"{c['cycles']['sfu']:.0f}", f"{c['cycles']['issue']:.0f}", c["bound"], per_tile])
            first = ["", "", ""]
        total = cost["warp_instr_per_tile"]
        if total is not None or cost["note"] or not cost["loops"]:
            body.append(first + ["= per 128x64 tile, unmasked loops" if total is not None else "",
                                 "", cost["note"] or ("no loop" if not cost["loops"] else ""), "", "", "", "", "",
                                 f"{total:.0f}" if total is not None else "-"])
    return _render(header, body, markdown)


def duplicated_work(row, tolerance=0.01):
    """The described loops of a row whose MMAs issue more FLOPs than the loop needs (the warps compute a tile
    twice): [(loop name, issued / needed)]."""
    cost = row.get("cost") or {"loops": []}
    return [(c["name"], c["issued_over_needed"]) for c in cost["loops"]
            if c["issued_over_needed"] is not None and c["issued_over_needed"] > 1 + tolerance]


def summary(rows):
    bad = [r for r in rows if problems_of(r)]
    return (f"{len(rows)} rows, {len({r['kernel'] for r in rows})} kernels; {len(bad)} rows spill, leave wgmma or "
            f"exceed the limits; {sum(1 for r in rows if over_limits(r))} exceed the limits")


def markdown_report(rows, args, argv):
    from datetime import datetime, timezone

    import triton
    command = " ".join(["python -m kernels.inspect", *(sys.argv[1:] if argv is None else argv)])
    return "\n".join([
        f"# {args.title or 'Kernel inspection, ' + args.arch}", "",
        f"- command: `{command}`",
        f"- compiled for {args.arch} on the CPU (no GPU) with triton {triton.__version__}, "
        f"{datetime.now(timezone.utc).strftime('%Y-%m-%d')}",
        "- columns: registers per thread; spill bytes (the stack frame); shared memory; the MMA instructions in the "
        "PTX; TMA loads; theoretical CTAs per SM; note: why the row is flagged (spills, dots off wgmma, limits)",
        f"- {summary(rows)}", "", table(rows, markdown=True)]
        + (["", "## Static cost model of the innermost loops (`--loops`)", "", *_COST_LEGEND, "",
            loops_table(rows, markdown=True)] if args.loops else []))


_COST_LEGEND = [
    ("- per innermost loop of the SASS (found by back-edges; cold out-of-line blocks and barrier spin-loops left "
    "out): static instructions per iteration (per warp) by class; MMA FLOPs issued by the SASS / needed by the "
    "kernel's own tile description (`loops` of the inspect case; above 1.00 = a tile computed twice); three lower "
    "bounds on one iteration's cycles on one SM: tensor cores (issued FLOPs / 2 / dense FMA per clock: 1024 on "
    "sm_90, 512 on sm_80), SFU (MUFU warp-instructions x 32 / 16 lanes), issue (warp-instructions / 4 "
    "schedulers); bound = the largest; warp-instructions per 128x64 score tile = instr/iter x num_warps x "
    "128*64 / the loop's tile, summed over the unmasked described loops"),
    ("- ignores latency, memory stalls and bandwidth, occupancy effects and dynamic trip counts: a screening tool, "
     "not a timer")]


def _error(message):
    print(f"error: {message}", file=sys.stderr)
    return 2


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m kernels.inspect", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="sm_90", help=f"target: {', '.join(ARCHS)} (default sm_90)")
    parser.add_argument("--json", metavar="FILE", help='write {"rows": [...]} to FILE')
    parser.add_argument("--dump", metavar="DIR", help="write each row's <id>.cubin and <id>.ptx into DIR")
    parser.add_argument("--markdown", metavar="FILE", help="write the table as Markdown to FILE")
    parser.add_argument("--title", default=None, help="the Markdown file's heading")
    parser.add_argument("--from-json", metavar="FILE", help="render the rows of an earlier --json instead of compiling")
    parser.add_argument("--kernel", action="append", help="only this kernel (repeatable), e.g. attention_fwd")
    parser.add_argument("--loops", action="store_true",
                        help="also print the static cost model of each row's innermost loops (kernels/cost_model.py)")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="compile processes (default 2)")
    args = parser.parse_args(argv)
    if args.arch not in ARCHS:
        return _error(f"--arch {args.arch} is not supported: choose one of {', '.join(ARCHS)}")
    if args.jobs < 1:
        return _error(f"--jobs {args.jobs} must be at least 1")
    if args.kernel:
        known = {c["kernel"] for c in collect()}
        unknown = sorted(set(args.kernel) - known)
        if unknown:
            return _error(f"unknown kernel {', '.join(unknown)}: choose from {', '.join(sorted(known))}")
    for path in (args.json, args.markdown):
        if path and not Path(path).resolve().parent.is_dir():
            return _error(f"the folder of {path} does not exist")
    if args.dump:
        Path(args.dump).mkdir(parents=True, exist_ok=True)

    if args.from_json:
        if not Path(args.from_json).is_file():
            return _error(f"{args.from_json} does not exist")
        rows = [r for r in json.loads(Path(args.from_json).read_text())["rows"]
                if not args.kernel or r["kernel"] in args.kernel]
        args.arch = rows[0]["arch"] if rows else args.arch
    else:
        rows = inspect(args.arch, args.kernel, args.jobs, args.dump)
    print(table(rows))
    print(summary(rows))
    if args.loops:
        print()
        print(loops_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows}, indent=1) + "\n")
    if args.markdown:
        Path(args.markdown).write_text(markdown_report(rows, args, argv) + "\n")
    failed = [r for r in rows if over_limits(r)]
    for r in failed:
        print(f"over the {r['arch']} limits: {r['id']}: {over_limits(r)}", file=sys.stderr)
    return 1 if failed else 0


def _reexec_without_interpreter():
    """Compiling for a GPU needs Triton's real frontend: TRITON_INTERPRET must be unset before triton is imported
    (`python -m kernels.inspect` imports the kernels package, hence triton, first), so run again without it."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    os.execve(sys.executable, [sys.executable, "-m", "kernels.inspect", *sys.argv[1:]], env)


if __name__ == "__main__":
    if interpreting():
        _reexec_without_interpreter()
    sys.exit(main())
