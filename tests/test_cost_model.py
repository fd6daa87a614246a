"""The static cost model (kernels/cost_model.py): the loop finder and the classifier on hand-written SASS of known
structure, the bounds' arithmetic, and one tiny Triton kernel compiled for sm_90 and sm_80 whose one dot loop the
model must find with the MMA work the dot needs (issued / needed = 1.00)."""
import json
import os
import subprocess
import sys
from pathlib import Path

from kernels.cost_model import class_summary, classify, find_loops, innermost_loops, loop_costs, mma_shape, parse_sass

ROOT = Path(__file__).resolve().parent.parent


def sass(*lines, start=0):
    """cuobjdump-style text: one instruction a line, addresses 16 bytes apart from `start`."""
    out = ["\tcode for sm_90a", "\t\tFunction : k"]
    for i, line in enumerate(lines):
        out.append(f"        /*{start + 16 * i:04x}*/                   {line} ;   /* 0x000 */")
        out.append("                                                        /* 0x000 */")
    return "\n".join(out)


# entry, a main loop at 0x30..0xc0 whose mbarrier wait retries out of line (after EXIT), an epilogue, the cold
# retry block (a spin-loop and a jump back into the loop), and the trailing self-branch ptxas pads with
MAIN = sass(
    "S2R R0, SR_TID.X",                               # 0x00
    "ISETP.GE.AND P0, PT, R0, 0x10, PT",              # 0x10
    "@P0 BRA 0xe0",                                   # 0x20  skip the loop
    "SYNCS.PHASECHK.TRANS64.TRYWAIT P1, [UR4], R3",   # 0x30  loop head
    "@!P1 BRA 0x110",                                 # 0x40  retry out of line
    "WARPGROUP.ARRIVE",                               # 0x50
    "HGMMA.64x64x16.F32.BF16 R24, gdesc[UR8], RZ, !UPT",  # 0x60
    "HGMMA.64x64x16.F32.BF16 R24, gdesc[UR12], R24",  # 0x70
    "WARPGROUP.DEPBAR.LE gsb0, 0x0",                  # 0x80
    "MUFU.EX2 R5, R4",                                # 0x90
    "FFMA R6, R5, R7, R8",                            # 0xa0
    "IADD3 R3, R3, 0x1, RZ",                          # 0xb0
    "@P2 BRA 0x30",                                   # 0xc0  back-edge
    "F2FP.BF16.F32.PACK_AB R9, R6, R6",               # 0xd0
    "STG.E [R10], R9",                                # 0xe0
    "EXIT",                                           # 0xf0
    "NOP",                                            # 0x100
    "SYNCS.PHASECHK.TRANS64.TRYWAIT P1, [UR4], R3",   # 0x110 retry
    "@!P1 BRA 0x110",                                 # 0x120
    "BRA 0x50",                                       # 0x130 back into the loop
    "BRA 0x140",                                      # 0x140 padding self-loop
)


def test_parse_and_classify():
    instrs = parse_sass(MAIN)
    assert len(instrs) == 21 and instrs[2].pred == "@P0" and instrs[2].op == "BRA" and instrs[2].operands == "0xe0"
    kinds = [classify(i) for i in instrs]
    assert kinds[:10] == ["int_other", "int_other", "int_other", "sync", "int_other", "sync", "mma", "mma", "sync",
                          "mufu"]
    assert kinds[10] == "fp32" and kinds[13] == "convert" and kinds[14] == "global"
    assert mma_shape(instrs[6]) == (64, 64, 16, "BF16")
    assert classify(parse_sass(sass("LDSM.16.M88.4 R4, [R2]"))[0]) == "shared"
    assert classify(parse_sass(sass("UTMALDG.2D [UR8], [UR4]"))[0]) == "tma"
    assert classify(parse_sass(sass("LDGSTS.E.BYPASS.128 [R3], [R4.64]"))[0]) == "cp_async"
    assert classify(parse_sass(sass("STL [R1+0x4], R5"))[0]) == "local"
    hmma = parse_sass(sass("HMMA.16816.F32.BF16 R4, R8, R12, R4"))[0]
    assert classify(hmma) == "mma" and mma_shape(hmma) == (16, 8, 16, "BF16")


def test_loop_finder_skips_cold_blocks_and_spin_loops():
    instrs = parse_sass(MAIN)
    _, loops = find_loops(instrs)
    # natural loops: the main loop, the retry spin, the padding self-branch (unreachable: no loop)
    assert len(loops) == 2
    found = innermost_loops(instrs)
    assert len(found) == 1  # the spin-loop inside the main loop's body does not make it an outer loop
    lp = found[0]
    assert (lp["start"], lp["end"]) == (0x30, 0xc0)
    assert [i.addr for i in lp["instrs"]] == list(range(0x30, 0xd0, 0x10))  # 10 instructions, no cold block


def test_nested_and_sequential_loops():
    text = sass(
        "MOV R0, RZ",                       # 0x00
        "MOV R1, RZ",                       # 0x10  outer head
        "HMMA.16816.F32.BF16 R4, R8, R12, R4",  # 0x20  inner head
        "IADD3 R1, R1, 0x1, RZ",            # 0x30
        "@P0 BRA 0x20",                     # 0x40  inner back-edge
        "FADD R2, R2, R4",                  # 0x50
        "@P1 BRA 0x10",                     # 0x60  outer back-edge
        "FMUL R3, R3, R3",                  # 0x70  second loop head
        "MUFU.EX2 R3, R3",                  # 0x80
        "@P2 BRA 0x70",                     # 0x90
        "EXIT")
    found = innermost_loops(parse_sass(text))
    assert [(lp["start"], lp["end"], len(lp["instrs"])) for lp in found] == [(0x20, 0x40, 3), (0x70, 0x90, 3)]


def test_costs_bounds_and_matching():
    described = [{"name": "main", "masked": False, "mma_flops": 2 * 2 * 64 * 64 * 16, "tile": [64, 64]}]
    cost = loop_costs(MAIN, "sm_90", 4, described)
    assert cost["note"] == ""
    (c,) = cost["loops"]
    assert c["name"] == "main" and c["instructions"] == 10 and c["mma_shapes"] == {"HGMMA.64x64x16": 2}
    assert c["classes"]["sync"] == 3 and c["classes"]["mufu"] == 1 and c["classes"]["fp32"] == 1
    assert c["mma_flops_issued"] == 2 * 2 * 64 * 64 * 16 and c["issued_over_needed"] == 1.0
    # tensor: 262144 FLOPs / (2 * 1024) = 128 cycles; SFU: 1 MUFU x 4 warps x 32 / 16 = 8; issue: 10 x 4 / 4 = 10
    assert c["cycles"] == {"tensor": 128.0, "sfu": 8.0, "issue": 10.0} and c["bound"] == "tensor"
    assert c["warp_instr_per_tile"] == 10 * 4 * 2 and cost["warp_instr_per_tile"] == 80
    assert class_summary(c).startswith("HGMMA.64x64x16 2, MUFU 1, FP32 1")
    # 8 warps run the same warpgroup MMAs twice: the duplicated work shows, the tensor bound doubles (sm_80: half
    # the rate, twice the cycles)
    c8 = loop_costs(MAIN, "sm_90", 8, described)["loops"][0]
    assert c8["issued_over_needed"] == 2.0 and c8["cycles"]["tensor"] == 256.0
    assert loop_costs(MAIN, "sm_80", 4, described)["loops"][0]["cycles"]["tensor"] == 256.0
    # a description that does not match the machine code's MMA loops is reported, not guessed
    two = described + [{"name": "other", "masked": True, "mma_flops": 1, "tile": [64, 64]}]
    unmatched = loop_costs(MAIN, "sm_90", 4, two)
    assert unmatched["note"] == "loops: 2 described, 1 found" and unmatched["loops"][0]["name"] is None
    assert unmatched["warp_instr_per_tile"] is None
    # no description: the innermost loops are still reported, unnamed
    assert loop_costs(MAIN, "sm_90", 4)["loops"][0]["instructions"] == 10


def test_masked_loops_stay_out_of_the_tile_sum():
    text = sass("HMMA.16816.F32.BF16 R4, R8, R12, R4", "@P0 BRA 0x0",
                "HMMA.16816.F32.BF16 R4, R8, R12, R4", "FSEL R1, R1, RZ, P1", "@P0 BRA 0x20", "EXIT")
    flops = 2 * 16 * 8 * 16 * 4
    described = [{"name": "a", "masked": False, "mma_flops": flops, "tile": [32, 32]},
                 {"name": "a_diag", "masked": True, "mma_flops": flops, "tile": [32, 32]}]
    cost = loop_costs(text, "sm_80", 4, described)
    assert [c["issued_over_needed"] for c in cost["loops"]] == [1.0, 1.0]
    assert cost["warp_instr_per_tile"] == 2 * 4 * 8  # the unmasked loop only: 2 instr x 4 warps x 8 tiles


# A K loop of 64x64x32 bf16 dots on 4 warps: per iteration the dot needs 2*64*64*32 FLOPs; on sm_90 one warpgroup
# issues 2 x HGMMA.64x64x16, on sm_80 each warp 16 x HMMA.16816.
SCRIPT = r"""
import json, sys
import triton, triton.language as tl
from kernels.inspect import compile_case

@triton.jit
def gemm(A, B, C, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rm = tl.arange(0, BLOCK_M)
    rn = tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        a = tl.load(A + rm[:, None] * K + (k0 + rk)[None, :])
        b = tl.load(B + (k0 + rk)[:, None] * BLOCK_N + rn[None, :])
        acc = tl.dot(a, b, acc)
    tl.store(C + rm[:, None] * BLOCK_N + rn[None, :], acc)

case = {"kernel": "gemm", "fn": gemm, "signature": {"A": "*bf16", "B": "*bf16", "C": "*fp32", "K": "i32",
        "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "BLOCK_K": "constexpr"},
        "constexprs": {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32}, "config": {"num_warps": 4, "num_stages": 2},
        "problem": {"dtype": "bf16"}, "values": {"K": 1024},
        "loops": [{"name": "k", "masked": False, "mma_flops": 2 * 64 * 64 * 32, "tile": [64, 64]}]}
print(json.dumps({arch: compile_case(case, arch)["cost"] for arch in sys.argv[1:]}))
"""


def test_a_compiled_dot_loop_is_found_with_its_mma_work(tmp_path):
    script = tmp_path / "gemm.py"  # @triton.jit reads its source from a file
    script.write_text(SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = env.get("TRITON_DEFAULT_FP_FUSION", "1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    r = subprocess.run([sys.executable, str(script), "sm_90", "sm_80"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    costs = json.loads(r.stdout.splitlines()[-1])
    for arch, shapes in (("sm_90", {"HGMMA.64x64x16": 2}), ("sm_80", {"HMMA.16816": 16})):
        cost = costs[arch]
        assert cost["note"] == "", cost["note"]
        named = [c for c in cost["loops"] if c["name"] == "k"]
        assert len(named) == 1, cost
        assert named[0]["mma_shapes"] == shapes and named[0]["issued_over_needed"] == 1.0
        assert named[0]["classes"]["local"] == 0 and named[0]["instructions"] > sum(shapes.values())


def test_conditional_branches_without_a_predicate_fall_through():
    """BRA.DIV / BRA.U with a condition operand may fall through: the code after them stays reachable."""
    text = sass("MOV R0, RZ",                      # 0x00
                "FFMA R1, R1, R1, R1",             # 0x10 head
                "BRA.DIV UR4, 0x60",               # 0x20
                "HMMA.16816.F32.BF16 R4, R8, R12, R4",  # 0x30
                "BRA.U !UP0, 0x10",                # 0x40 back-edge
                "EXIT",                            # 0x50
                "BRA 0x30")                        # 0x60 the divergent path rejoins
    (lp,) = innermost_loops(parse_sass(text))
    assert (lp["start"], lp["end"]) == (0x10, 0x40) and len(lp["instrs"]) == 4


def test_a_spin_wait_with_a_register_move_is_not_a_loop_of_its_own():
    """ptxas sometimes rematerializes the mbarrier phase inside the retry: still a spin-wait, so the main loop
    that branches to it stays innermost."""
    text = sass("MOV R0, RZ",                                        # 0x00
                "SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [UR4], R3",      # 0x10 head
                "@!P0 BRA 0x70",                                     # 0x20
                "HGMMA.64x64x16.F32.BF16 R24, gdesc[UR8], RZ, !UPT",  # 0x30
                "@P1 BRA 0x10",                                      # 0x40 back-edge
                "EXIT",                                              # 0x50
                "NOP",                                               # 0x60
                "IMAD.U32 R3, RZ, RZ, UR7",                          # 0x70 retry
                "SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [UR4], R3",      # 0x80
                "@!P0 BRA 0x70",                                     # 0x90
                "BRA 0x30")                                          # 0xa0
    (lp,) = innermost_loops(parse_sass(text))
    assert (lp["start"], lp["end"], len(lp["instrs"])) == (0x10, 0x40, 4)
