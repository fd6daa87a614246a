"""bench/plain_gemm.py: the comparison GEMM computes A @ B^T on both load paths, and its SASS K-loop counter finds
the loop, its MMAs and what lies outside it on a listing of known structure."""
import re

import pytest
import torch
import triton

from bench.plain_gemm import _plain_gemm, k_loop
from helpers import DEVICE


@pytest.mark.parametrize("use_tma", [False, True], ids=["pointer", "tma"])
def test_plain_gemm_matches_torch(use_tma):
    M, N, K = 37, 72, 80  # no multiple of the 32 blocks (masks or zero-fill at every edge); rows 16-byte aligned
    g = torch.Generator().manual_seed(0)
    a = torch.randn(M, K, generator=g).half().to(DEVICE)
    b = torch.randn(N, K, generator=g).half().to(DEVICE)
    out = torch.empty(M, N, dtype=torch.float32, device=DEVICE)
    grid = (triton.cdiv(M, 32), triton.cdiv(N, 32))
    _plain_gemm[grid](a, b, out, M, N, K, a.stride(0), b.stride(0), out.stride(0), BLOCK_M=32, BLOCK_N=32,
                      BLOCK_K=32, USE_TMA=use_tma)
    torch.testing.assert_close(out, a.float() @ b.float().t(), rtol=1e-3, atol=1e-3)


def _listing(ops):
    """[(address, opcode, text)] as bench.plain_gemm.sass() gives them: 16 bytes an instruction, no predicate."""
    return [(16 * i, re.sub(r"^@!?U?P[T0-9]+\s+", "", op).split()[0], op) for i, op in enumerate(ops)]


def test_k_loop_counts_a_known_listing():
    """A tile loop around a K-loop of 2 HGMMA.64x128x16 (8 warps: 2 warpgroups), an mbarrier-wait stub past EXIT
    that branches back (not a loop), and a spin loop in the stub."""
    ops = ["S2R R0", "MOV R1",                                   # 0x00-0x10: set-up before the tile loop
           "IMAD R2", "SYNCS.EXCH.64 URZ",                       # 0x20: tile loop starts; 0x30
           "UTMALDG.2D [UR8]", "HGMMA.64x128x16.F32.BF16 R24", "HGMMA.64x128x16.F32.BF16 R24",  # 0x40: K-loop
           "@!P0 BRA 0x200", "@P1 BRA 0x40",                     # 0x70: to the stub; 0x80: K-loop back-edge
           "MUFU.EX2 R3", "FADD R4", "@P2 BRA 0x20",             # 0x90-0xa0: epilogue; 0xb0: tile back-edge
           "EXIT"] + ["NOP"] * 19 + [                            # 0xc0; padding to 0x200
           "SYNCS.PHASECHK.TRANS64.TRYWAIT P0", "@!P0 BRA 0x200", "BRA 0x80"]
    loop = k_loop(_listing(ops), num_warps=8)
    assert loop["instructions"] == 5  # 0x40..0x80
    assert loop["mma"] == {"HGMMA.64x128x16": 2}
    assert loop["classes"] == {"UTMALDG": 1}
    assert loop["mma_flops"] == 2 * (2 * 64 * 128 * 16) * 2  # 2 instructions, 2 warpgroups
    assert loop["prologue"] == 2 and loop["epilogue"] == 3  # 0x20-0x30; 0x90-0xb0


def test_k_loop_without_a_tile_loop_counts_to_exit():
    ops = ["S2R R0", "HMMA.16816.F32.BF16 R4", "LDGSTS.E [R1]", "@P0 BRA 0x10", "F2FP R5", "STG.E [R2]", "EXIT",
           "BRA 0x70"]
    loop = k_loop(_listing(ops), num_warps=4)
    assert loop["instructions"] == 3 and loop["mma"] == {"HMMA.16816": 1} and loop["classes"] == {"LDGSTS": 1}
    assert loop["mma_flops"] == 2 * 16 * 8 * 16 * 4
    assert loop["prologue"] == 1 and loop["epilogue"] == 3  # F2FP, STG, EXIT
