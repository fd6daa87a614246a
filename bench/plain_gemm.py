"""A plain Triton GEMM with the loss head's tile, and the SASS of both K-loops side by side: how much of the loss
head's machine code is MMA, next to the simplest kernel that multiplies the same tile.

    python -m bench.plain_gemm                     # sm_90: plain GEMM and every loss-head config, counted
    python -m bench.plain_gemm --arch sm_80 --dump DIR

No GPU is needed: both kernels are compiled for the target with kernels.inspect (ptxas), and the wheel's cuobjdump
disassembles them. Per row: registers, spill bytes, shared memory, stages, CTAs per SM (kernels.inspect), then, read
from the SASS, the K-loop (the innermost loop, found by its backward branch, that holds MMA instructions):
instructions per iteration, the MMA instructions (HGMMA on sm_90, HMMA on sm_80) with their shapes, the loads
(UTMALDG: TMA; LDGSTS: cp.async), the barriers (BAR, SYNCS: mbarrier), the MMA FLOPs issued per warp-instruction,
and the instructions outside the K-loop per output tile (after it: the epilogue; before it: the set-up), counted
statically. The out-of-line retry paths of mbarrier waits that ptxas moves past the function's end are left out.

`_plain_gemm` is the tutorial GEMM (C = A @ B^T, B given as (N, K) rows like the loss head's W, through TMA
descriptors on sm_90 and masked pointers elsewhere), written only for this comparison: it is not used by the model.
"""
import argparse
import os
import re
import subprocess
import sys
from collections import Counter

import triton
import triton.language as tl

from kernels.linear_cross_entropy import CONFIGS as LOSS_HEAD_CONFIGS

# the loss head's fp16/bf16 forward tiles, from its own list: (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages)
CONFIGS = [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_V"], c.kwargs["BLOCK_K"], c.num_warps, c.num_stages)
           for c in LOSS_HEAD_CONFIGS["fwd", False]]
M, N, K = 16 * 1024, 50304, 768  # GPT-2 124M's head as a GEMM: the logits of 16K rows


@triton.jit
def _plain_gemm(A, B, Out, M, N, K, stride_am, stride_bn, stride_om,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_TMA: tl.constexpr):
    """Out[m, n] = sum_k A[m, k] B[n, k]: one (BLOCK_M, BLOCK_N) tile per program, fp32 accumulator."""
    off_m = tl.program_id(0) * BLOCK_M
    off_n = tl.program_id(1) * BLOCK_N
    rows = off_m + tl.arange(0, BLOCK_M)
    cols = off_n + tl.arange(0, BLOCK_N)
    if USE_TMA:
        a_desc = tl.make_tensor_descriptor(A, shape=[M, K], strides=[stride_am, 1], block_shape=[BLOCK_M, BLOCK_K])
        b_desc = tl.make_tensor_descriptor(B, shape=[N, K], strides=[stride_bn, 1], block_shape=[BLOCK_N, BLOCK_K])
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if USE_TMA:
            a = a_desc.load([off_m, k0])
            b = b_desc.load([off_n, k0])
        else:
            ks = k0 + tl.arange(0, BLOCK_K)
            a = tl.load(A + rows[:, None] * stride_am + ks[None, :], mask=(rows[:, None] < M) & (ks[None, :] < K),
                        other=0.0)
            b = tl.load(B + cols[:, None] * stride_bn + ks[None, :], mask=(cols[:, None] < N) & (ks[None, :] < K),
                        other=0.0)
        acc = tl.dot(a, tl.trans(b), acc)
    out = acc.to(Out.dtype.element_ty)
    if USE_TMA:
        o_desc = tl.make_tensor_descriptor(Out, shape=[M, N], strides=[stride_om, 1], block_shape=[BLOCK_M, BLOCK_N])
        o_desc.store([off_m, off_n], out)
    else:
        tl.store(Out + rows[:, None] * stride_om + cols[None, :], out, mask=(rows[:, None] < M) & (cols[None, :] < N))


def inspect_cases(arch="sm_90"):
    """The plain GEMM at each loss-head tile, bf16, GPT-2's head shape, in kernels.inspect's case format (with the
    "loops" description the cost model reads: one BLOCK_K slice of the tile per K-loop iteration)."""
    import torch

    from kernels.inspect import ARCHS, launch_case
    cases = []
    for bm, bn, bk, warps, stages in CONFIGS:
        config = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "num_warps": warps, "num_stages": stages}
        case = launch_case("plain_gemm", _plain_gemm, config, {"dtype": "bf16", "m": M, "n": N, "k": K}, dict(
            A=torch.bfloat16, B=torch.bfloat16, Out=torch.bfloat16, M=M, N=N, K=K, stride_am=K, stride_bn=K,
            stride_om=N, USE_TMA=ARCHS[arch]["capability"] >= 90))
        case["loops"] = [{"name": "k", "masked": False, "mma_flops": 2 * bm * bn * bk, "tile": [bm, bn]}]
        cases.append(case)
    return cases


# ------------------------------------------------------------------------------------------------ the SASS

_INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+([^;]*?)\s*;")
_CLASSES = ("UTMALDG", "LDGSTS", "LDG", "STG", "LDS", "LDSM", "STS", "BAR", "SYNCS", "MUFU")


def sass(cubin_path):
    """[(address, opcode, text)] of the cubin's one kernel."""
    from kernels.inspect import _cuobjdump
    out = subprocess.run([_cuobjdump(), "-sass", cubin_path], capture_output=True, text=True, check=True).stdout
    result = []
    for m in _INSTRUCTION.finditer(out):
        text = m.group(2).strip()
        opcode = re.sub(r"^@!?U?P[T0-9]+\s+", "", text).split()[0]
        result.append((int(m.group(1), 16), opcode, text))
    return result


def _mma_flops(opcode, num_warps):
    """FLOPs one static MMA instruction issues for the whole CTA: HGMMA.64xNx16 is one warpgroup's 64xNx16 product
    (every warp of the group issues it: counted once per warpgroup); HMMA.16816 one warp's 16x8x16."""
    m = re.match(r"HGMMA\.(\d+)x(\d+)x(\d+)", opcode)
    if m:
        return 2 * int(m.group(1)) * int(m.group(2)) * int(m.group(3)) * (num_warps // 4)
    shape = {"HMMA.16816": (16, 8, 16), "HMMA.1688": (16, 8, 8)}.get(".".join(opcode.split(".")[:2]))
    if shape:
        return 2 * shape[0] * shape[1] * shape[2] * num_warps
    return 0


def k_loop(instructions, num_warps):
    """The K-loop's static counts: {instructions, mma: {shape: n}, classes, flops_per_warp_instruction, prologue,
    epilogue}. prologue/epilogue: the instructions of the enclosing loop (one per output tile: the loss head's
    forward walks its vocabulary tiles) before/after the K-loop, or, without one, from the kernel's start / to
    its EXIT."""
    exits = [a for a, op, _ in instructions if op == "EXIT"]
    end = exits[-1] if exits else instructions[-1][0]
    edges = []
    for address, op, text in instructions:
        m = re.search(r"\bBRA\s+(0x[0-9a-f]+)", text)
        if op == "BRA" and m and int(m.group(1), 16) < address <= end:  # out-of-line stubs past the end: not loops
            edges.append((int(m.group(1), 16), address))

    def body(lo, hi):
        return [i for i in instructions if lo <= i[0] <= hi]

    loops = [(lo, hi) for lo, hi in edges if any(op.startswith(("HGMMA", "HMMA")) for _, op, _ in body(lo, hi))]
    inner = [(lo, hi) for lo, hi in loops if not any((a, b) != (lo, hi) and lo <= a and b <= hi for a, b in loops)]
    if len(inner) != 1:
        raise RuntimeError(f"expected one K-loop, found {len(inner)}: {[(hex(a), hex(b)) for a, b in inner]}")
    lo, hi = inner[0]
    outer = [(a, b) for a, b in loops if (a, b) != (lo, hi) and a <= lo and hi <= b]
    if outer:
        o_lo, o_hi = min(outer, key=lambda e: e[1] - e[0])
    else:
        o_lo, o_hi = instructions[0][0], min(a for a in exits if a > hi)
    loop = body(lo, hi)
    mma = Counter(op.split(".")[0] + "." + op.split(".")[1] for _, op, _ in loop if op.startswith(("HGMMA", "HMMA")))
    classes = Counter(op.split(".")[0] for _, op, _ in loop)
    flops = sum(_mma_flops(op, num_warps) for _, op, _ in loop)
    return {"instructions": len(loop), "mma": dict(mma), "classes": {c: classes[c] for c in _CLASSES if classes[c]},
            "mma_flops": flops, "flops_per_warp_instruction": flops / (len(loop) * num_warps),
            "prologue": len(body(o_lo, lo - 1)), "epilogue": len(body(hi + 1, o_hi))}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.plain_gemm", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="sm_90", help="sm_90 or sm_80 (default sm_90)")
    parser.add_argument("--dump", metavar="DIR", help="keep the cubins and PTX in DIR")
    args = parser.parse_args(argv)
    import tempfile

    from kernels.inspect import ARCHS, compile_case
    from kernels.linear_cross_entropy import inspect_cases as loss_head_cases
    if args.arch not in ARCHS:
        print(f"error: --arch {args.arch} is not supported (choose one of {', '.join(ARCHS)})", file=sys.stderr)
        return 2
    cases = inspect_cases(args.arch) + [c for c in loss_head_cases(args.arch) if c["problem"]["dtype"] != "fp32"]
    dump = args.dump or tempfile.mkdtemp(prefix="plain_gemm-")
    os.makedirs(dump, exist_ok=True)
    header = ("kernel", "config", "regs", "spill", "smem KB", "CTAs/SM", "instr/iter", "MMA/iter", "loads/iter",
              "BAR+SYNCS/iter", "FLOP/warp-instr", "needed/issued", "set-up", "epilogue")
    lines = [header]
    for case in cases:
        row = compile_case(case, args.arch, dump)
        warps = row["config"]["num_warps"]
        loop = k_loop(sass(os.path.join(dump, row["id"] + ".cubin")), warps)
        c = loop["classes"]
        needed = case["loops"][0]["mma_flops"]
        config = " ".join(f"{k.replace('BLOCK_', '')}{v}" for k, v in row["config"].items() if k.startswith("BLOCK"))
        lines.append((row["kernel"].replace("linear_cross_entropy", "lce"),
                      f"{config} w{warps} s{row['config']['num_stages']}", str(row["registers"]),
                      str(row["spill_bytes"]), f"{row['shared_bytes'] / 1024:.0f}", str(row["ctas_per_sm"]),
                      str(loop["instructions"]), " ".join(f"{n}x{s}" for s, n in loop["mma"].items()),
                      " ".join(f"{n} {k}" for k in ("UTMALDG", "LDGSTS") if (n := c.get(k))),
                      str(c.get("BAR", 0) + c.get("SYNCS", 0)), f"{loop['flops_per_warp_instruction']:.0f}",
                      f"{needed / loop['mma_flops']:.2f}" if loop["mma_flops"] else "-",
                      str(loop["prologue"]), str(loop["epilogue"])))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    for line in lines:
        print("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip())
    return 0


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("error: TRITON_INTERPRET is set (unset it: this compiles for a GPU target)", file=sys.stderr)
        sys.exit(2)
    sys.exit(main())
