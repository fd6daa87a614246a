"""bench/sass_loops.py: the loop finder and counter on SASS text of known structure (no compiler needed)."""
from bench.sass_loops import innermost_loops, loop_stats, parse_sass

# an outer loop (0x10..0x80) around two innermost loops holding MMAs, and one innermost loop without any
SASS = """
        /*0010*/                   MOV R1, R2 ;                                          /* 0x0 */
        /*0020*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], RZ, !UPT ;  /* 0x0 */
        /*0030*/                   MUFU.EX2 R3, R4 ;                                     /* 0x0 */
        /*0040*/               @P0 BRA 0x20 ;                                            /* 0x0 */
        /*0050*/                   HGMMA.64x32x16.F32.BF16 R24, R8, gdesc[UR4].tnspB, R24 ; /* 0x0 */
        /*0060*/                   LDL R9, [R1+0x8] ;                                    /* 0x0 */
        /*0070*/              @!P1 BRA 0x50 ;                                            /* 0x0 */
        /*0080*/                   BRA 0x10 ;                                            /* 0x0 */
        /*0090*/                   IADD3 R1, R1, 0x1, RZ ;                               /* 0x0 */
        /*00a0*/               @P2 BRA 0x90 ;                                            /* 0x0 */
        /*00b0*/                   EXIT ;                                                /* 0x0 */
"""


def test_innermost_loops_with_mma_only():
    instrs = parse_sass(SASS)
    assert len(instrs) == 11 and instrs[3] == (0x40, "@P0 BRA 0x20")
    assert innermost_loops(instrs) == [(0x20, 0x40), (0x50, 0x70)]


def test_loop_counts_shapes_mufu_spill_and_issued_flops():
    instrs = parse_sass(SASS)
    first = loop_stats(instrs, 0x20, 0x40, num_warps=8)
    assert first["instr"] == 3 and first["mufu_ex2"] == 1 and first["shapes"] == {"64x64x16": 1}
    assert first["issued_flops"] == 2 * 64 * 64 * 16 * 2  # one wgmma per warpgroup, two warpgroups
    assert first["spill"] == 0
    second = loop_stats(instrs, 0x50, 0x70, num_warps=4)
    assert second["shapes"] == {"64x32x16": 1} and second["spill"] == 1
