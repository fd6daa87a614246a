"""Count the work in the main loops of compiled kernels, from their SASS (a screening aid, not a timer).

    python -m kernels.inspect --arch sm_90 --kernel attention_bwd --jobs 1 --dump DIR --json DIR/rows.json
    python -m bench.sass_loops DIR/rows.json DIR            # one line per row and loop

For each row of an inspect --json file, disassembles DIR/<id>.cubin (cuobjdump -sass, from the triton wheel),
finds the innermost loops (a backward branch to an address at or after which no other backward branch closes a
loop inside it), keeps those holding MMA instructions (HGMMA on sm_90, HMMA on sm_80), and matches them in address
order to the "loops" description of the row's inspect case (see kernels/inspect.py; the contract: one entry per
innermost tl.dot loop, in source order, with the useful MMA FLOPs of one iteration and the score tile it covers).
Prints per loop: instructions per iteration (NOPs included, as issued), HGMMA shapes, MUFU.EX2, issued/needed MMA
FLOPs; per row: warp-instructions per 128x64 tile of useful work = sum over unmasked loops of
instr/iter x num_warps x 128*64 / (tile rows x tile cols).
"""
import json
import os
import re
import subprocess
import sys
from collections import Counter

LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
BRANCH = re.compile(r"\bBRA\b(?:\.\S+)?\s+(?:`\(\S+\)\s*)?0x([0-9a-f]+)")
HGMMA = re.compile(r"HGMMA\.(\d+)x(\d+)x(\d+)")
HMMA = re.compile(r"HMMA\.(16)(8)(\d+)")  # HMMA.16816: m16 n8 k16


def cuobjdump():
    import triton
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def instructions(cubin):
    """[(address, text)] of the kernel's SASS."""
    return parse_sass(subprocess.run([cuobjdump(), "-sass", cubin], capture_output=True, text=True,
                                     check=True).stdout)


def parse_sass(text):
    """[(address, instruction)] from cuobjdump -sass text."""
    return [(int(m.group(1), 16), m.group(2).strip()) for m in LINE.finditer(text)]


def innermost_loops(instrs):
    """[(start, end)] address ranges (inclusive) of innermost loops that contain an MMA, in address order."""
    loops = []
    for addr, text in instrs:
        m = BRANCH.search(text)
        if m and int(m.group(1), 16) <= addr:
            loops.append((int(m.group(1), 16), addr))
    inner = [(s, e) for s, e in loops if not any((s2, e2) != (s, e) and s <= s2 and e2 <= e for s2, e2 in loops)]
    return [(s, e) for s, e in sorted(set(inner))
            if any(s <= a <= e and ("HGMMA" in t or "HMMA" in t) for a, t in instrs)]


def loop_stats(instrs, start, end, num_warps):
    body = [t for a, t in instrs if start <= a <= end]
    ops = Counter(re.sub(r"^@!?U?P\w+\s+", "", t).split()[0] for t in body)
    shapes, issued = Counter(), 0
    for t in body:
        if (m := HGMMA.search(t)):
            mm, nn, kk = map(int, m.groups())
            shapes[f"64x{nn}x{kk}"] += 1
            issued += 2 * mm * nn * kk * (num_warps // 4)  # one wgmma per warpgroup
        elif (m := HMMA.search(t)):
            mm, nn, kk = map(int, m.groups())
            shapes[f"{mm}{nn}{kk}"] += 1
            issued += 2 * mm * nn * kk * num_warps
    mufu_ex2 = sum(1 for t in body if "MUFU.EX2" in t)
    nops = ops.get("NOP", 0)
    return {"instr": len(body), "nop": nops, "shapes": dict(shapes), "mufu_ex2": mufu_ex2, "issued_flops": issued,
            "spill": sum(1 for t in body if re.search(r"\b(STL|LDL)\b", t)),
            "waits": sum(1 for t in body if "WARPGROUP.DEPBAR" in t or "WARPGROUP.ARRIVE" in t)}


def describe_row(row, case, cubin):
    """(loops, per-tile figure) of one compiled row whose inspect case is `case`."""
    described = (case or {}).get("loops", [])
    warps = row["config"]["num_warps"]
    instrs = instructions(cubin)
    stats = [loop_stats(instrs, s, e, warps) for s, e in innermost_loops(instrs)]
    per_tile, loops = 0.0, []
    for i, st in enumerate(stats):
        d = described[i] if len(described) == len(stats) else None
        if d:
            st["issued/needed"] = round(st["issued_flops"] / d["mma_flops"], 2)
            if not d["masked"]:
                per_tile += st["instr"] * warps * 128 * 64 / (d["tile"][0] * d["tile"][1])
        loops.append({"name": d["name"] if d else f"loop{i}", "masked": d["masked"] if d else None, **st})
    return loops, (round(per_tile) if len(described) == len(stats) else
                   f"loops: {len(described)} described, {len(stats)} found")


def describe_rows(rows_json, dump_dir):
    os.environ.pop("TRITON_INTERPRET", None)
    from kernels import inspect as kinspect
    with open(rows_json) as f:
        rows = json.load(f)["rows"]
    arch = rows[0]["arch"]
    cases = {kinspect.case_id(c, arch): c for c in kinspect.collect(kernels=sorted({r["kernel"] for r in rows}),
                                                                    arch=arch)}
    for row in rows:
        yield row, *describe_row(row, cases.get(row["id"]), os.path.join(dump_dir, row["id"] + ".cubin"))


def print_row(row, loops, per_tile):
    c = row["config"]
    cfg = " ".join(f"{k}{v}" for k, v in c.items() if k not in ("num_warps", "num_stages"))
    p = row["problem"]
    prob = f"{p.get('dtype')} D={p.get('head_dim')}" + (" causal" if p.get("causal") else "") + \
        (" dropout" if p.get("dropout") else "")
    print(f"{row['kernel']} | {prob} | {cfg} w{c['num_warps']} s{c['num_stages']} | regs {row['registers']} "
          f"spill {row['spill_bytes']} smem {row['shared_bytes']} | per 128x64 tile: {per_tile}")
    for lp in loops:
        shapes = " ".join(f"{n}xHGMMA.{s}" if "x" in s else f"{n}xHMMA.{s}" for s, n in lp["shapes"].items())
        print(f"    {lp['name']:<9} masked={lp['masked']!s:<5} instr/iter {lp['instr']:>5} (nop {lp['nop']}) "
              f"mufu.ex2 {lp['mufu_ex2']:>3} wg-waits {lp['waits']:>2} spill-ops {lp['spill']} issued/needed "
              f"{lp.get('issued/needed', '?')} | {shapes}", flush=True)


def main(argv):
    if len(argv) != 2:
        print("error: expected ROWS_JSON DUMP_DIR (from kernels.inspect --json/--dump)", file=sys.stderr)
        return 2
    for row, loops, per_tile in describe_rows(*argv):
        print_row(row, loops, per_tile)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
