"""A static cost model of a kernel's main loops, read from its SASS (`cuobjdump -sass` of the cubin).

    loops = innermost_loops(parse_sass(text))        # the hot loops, found by back-edges
    cost = loop_costs(text, arch, num_warps, described)   # per loop: classes, MMA FLOPs, three lower bounds

What it does, per innermost loop of the machine code:
- counts the instructions of one iteration (static: every instruction between the loop's head and its back-edge,
  both sides of a branch inside the loop counted once; out-of-line cold blocks, such as the retry of an mbarrier
  wait that ptxas places after the kernel's EXIT, are left out) by class: MMA (HGMMA/HMMA, with their shapes),
  MUFU, FP32, conversions, shared memory, TMA, cp.async, global, local (spills), waits and barriers, int/other;
- the MMA FLOPs one iteration issues for the whole CTA, and, where the kernel describes the loop (the "loops" key
  of an inspect case: the FLOPs its dots need), issued / needed: above 1.00 the warps compute the same tile twice;
- three lower bounds on the cycles of one iteration on one SM (one CTA alone on it):
    tensor cores: issued MMA FLOPs / (2 x FMA per clock per SM)  (dense fp16/bf16: 1024 FMA/clk on sm_90,
                  512 on sm_80; tf32 half that)
    SFU:          MUFU warp-instructions x 32 lanes / 16 SFU lanes per SM
    issue:        warp-instructions / 4 (one warp-instruction per clock per scheduler, 4 schedulers per SM)
  and the largest of them, named: the predicted bound of the loop;
- warp-instructions per 128x64 tile of the score matrix: instructions per iteration x num_warps x 128*64 / the
  tile one iteration covers (the loop's description).

What it ignores: latency (dependent MMAs, exponentials waiting for their scores), memory stalls and bandwidth,
occupancy effects (several CTAs sharing an SM), dynamic trip counts and branches taken or not (a masked branch
inside a loop counts whole). It is a screening tool for comparing machine code, not a timer.
"""
import re

# dense MMA throughput per SM, in FMA per clock, for fp16/bf16 inputs (tf32 runs at half, 8-bit at twice)
TENSOR_FMA_PER_CLK = {"sm_90": 1024, "sm_80": 512}
SFU_LANES_PER_SM = 16
SCHEDULERS_PER_SM = 4
TILE = (128, 64)  # the reference tile of the per-tile figure

CLASSES = ("mma", "mufu", "fp32", "convert", "shared", "tma", "cp_async", "global", "local", "sync", "int_other")

_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_PRED = re.compile(r"^@!?U?P(?:[0-6]|T)\s+")
_HEX = re.compile(r"0x([0-9a-f]+)")

_CLASS_OF = {
    "MUFU": "mufu",
    **{op: "fp32" for op in ("FADD", "FMUL", "FFMA", "FMNMX", "FSEL", "FSET", "FSETP", "FCHK", "FRND", "FSWZADD",
                             "HADD2", "HMUL2", "HFMA2", "HMNMX2", "HSET2", "HSETP2", "FADD2", "FMUL2", "FFMA2")},
    **{op: "convert" for op in ("F2F", "F2FP", "F2I", "I2F", "I2FP", "F2IP")},
    **{op: "shared" for op in ("LDS", "STS", "LDSM", "STSM", "ATOMS")},
    **{op: "tma" for op in ("UTMALDG", "UTMASTG", "UTMAREDG", "UTMAPF", "UBLKCP", "UBLKRED", "UBLKPF")},
    "LDGSTS": "cp_async",
    **{op: "global" for op in ("LDG", "STG", "LD", "ST", "RED", "REDG", "ATOM", "ATOMG")},
    **{op: "local" for op in ("LDL", "STL")},
    **{op: "sync" for op in ("BAR", "SYNCS", "WARPGROUP", "DEPBAR", "WARPSYNC", "MEMBAR", "FENCE", "ARRIVES",
                             "LDGDEPBAR", "UTMACMDFLUSH", "UTMACCTL", "ERRBAR", "CCTL", "NANOSLEEP")},
}
_MMA_OPS = ("HGMMA", "HMMA", "IMMA", "IGMMA", "QGMMA", "DMMA")


class Instr:
    """One SASS instruction: address, predicate (or ""), opcode with modifiers (e.g. HGMMA.64x64x16.F32.BF16),
    operands text."""
    __slots__ = ("addr", "op", "operands", "pred")

    def __init__(self, addr, pred, op, operands):
        self.addr, self.pred, self.op, self.operands = addr, pred, op, operands

    @property
    def base(self):
        return self.op.split(".")[0]

    def __repr__(self):
        return f"{self.addr:#06x} {self.pred + ' ' if self.pred else ''}{self.op} {self.operands}"


def parse_sass(text):
    """The instructions of the (first) function in `cuobjdump -sass` / `nvdisasm` text, in address order."""
    instrs = []
    for line in text.splitlines():
        m = _LINE.search(line)
        if not m:
            continue
        body = m.group(2).strip()
        p = _PRED.match(body)
        pred = p.group(0).strip() if p else ""
        body = body[p.end():] if p else body
        op, _, operands = body.partition(" ")
        if instrs and int(m.group(1), 16) <= instrs[-1].addr:
            break  # a second function begins: the cubins inspected hold one kernel
        instrs.append(Instr(int(m.group(1), 16), pred, op, operands.strip()))
    return instrs


def classify(instr):
    """The class of an instruction (one of CLASSES)."""
    base = instr.base
    if base in _MMA_OPS:
        return "mma"
    return _CLASS_OF.get(base, "int_other")


def mma_shape(instr):
    """(M, N, K, input type) of an MMA instruction: HGMMA.64x128x16.F32.BF16 -> (64, 128, 16, 'BF16') per
    warpgroup; HMMA.16816.F32.BF16 -> (16, 8, 16, 'BF16') per warp; None for other instructions."""
    parts = instr.op.split(".")
    if parts[0] in ("HGMMA", "IGMMA", "QGMMA"):
        m, n, k = (int(x) for x in parts[1].split("x"))
        return m, n, k, parts[3] if len(parts) > 3 else parts[-1]
    if parts[0] in ("HMMA", "IMMA", "DMMA"):
        shape = parts[1]
        known = {"16816": (16, 8, 16), "1688": (16, 8, 8), "884": (8, 8, 4), "16832": (16, 8, 32),
                 "8816": (8, 8, 16)}
        if shape not in known:
            return None
        itype = parts[3] if len(parts) > 3 else (parts[2] if len(parts) > 2 else "")
        return (*known[shape], itype)
    return None


# ------------------------------------------------------------------------------------------------ loops


def _is_branch(instr):
    return instr.base in ("BRA", "JMP")


def _ends_block(instr):
    return instr.base in ("BRA", "JMP", "BRX", "JMX", "EXIT", "RET", "KILL")


def _conditional(instr):
    """A branch that may fall through: predicated, or with an operand besides its target (BRA.U !UP0, 0x..;
    BRA.DIV UR4, 0x..: taken on a condition)."""
    if instr.pred and instr.pred != "@PT":
        return True
    return "," in instr.operands or instr.base in ("BRX", "JMX")


def _target(instr):
    hexes = _HEX.findall(instr.operands)
    return int(hexes[-1], 16) if hexes else None


def basic_blocks(instrs):
    """[(first index, last index)] and the successor lists (by block index) of the control-flow graph."""
    if not instrs:
        return [], []
    index = {ins.addr: i for i, ins in enumerate(instrs)}
    leaders = {0}
    for i, ins in enumerate(instrs):
        if _is_branch(ins):
            t = _target(ins)
            if t in index:
                leaders.add(index[t])
        if _ends_block(ins) and i + 1 < len(instrs):
            leaders.add(i + 1)
    starts = sorted(leaders)
    blocks = [(s, (starts[j + 1] - 1 if j + 1 < len(starts) else len(instrs) - 1)) for j, s in enumerate(starts)]
    block_of = {s: j for j, (s, _) in enumerate(blocks)}
    succs = []
    for j, (s, e) in enumerate(blocks):
        last = instrs[e]
        out = []
        if _is_branch(last):
            t = _target(last)
            if t in index:
                out.append(block_of[index[t]])
        falls = not _ends_block(last) or (_conditional(last) and last.base != "RET")
        if falls and j + 1 < len(blocks):
            out.append(j + 1)
        succs.append(out)
    return blocks, succs


def _dominators(succs):
    """dom[b]: the blocks that dominate b (None for blocks unreachable from the entry)."""
    n = len(succs)
    preds = [[] for _ in range(n)]
    for a, out in enumerate(succs):
        for b in out:
            preds[b].append(a)
    reach, stack = {0}, [0]
    while stack:
        for b in succs[stack.pop()]:
            if b not in reach:
                reach.add(b)
                stack.append(b)
    dom = [None] * n
    dom[0] = {0}
    for b in reach - {0}:
        dom[b] = set(reach)
    changed = True
    while changed:
        changed = False
        for b in sorted(reach - {0}):
            new = set.intersection(*[dom[p] for p in preds[b] if p in reach]) | {b}
            if new != dom[b]:
                dom[b], changed = new, True
    return dom, preds


def find_loops(instrs):
    """The natural loops of the code: [{"header": block, "body": set of blocks, "latches": [blocks]}], one per
    loop head (back-edges to the same head merged), with the blocks of basic_blocks()."""
    blocks, succs = basic_blocks(instrs)
    if not blocks:
        return blocks, []
    dom, preds = _dominators(succs)
    loops = {}
    for u, out in enumerate(succs):
        for h in out:
            if dom[u] is not None and h in dom[u]:  # u -> h with h dominating u: a back-edge
                body, stack = {h, u}, ([u] if u != h else [])  # the walk stops at the head
                while stack:
                    for p in preds[stack.pop()]:
                        if p not in body and dom[p] is not None:
                            body.add(p)
                            stack.append(p)
                loop = loops.setdefault(h, {"header": h, "body": set(), "latches": []})
                loop["body"] |= body
                loop["latches"].append(u)
    return blocks, sorted(loops.values(), key=lambda lp: lp["header"])


def _is_wait_loop(loop, blocks, instrs):
    """A spin on a barrier (the retry of `SYNCS.PHASECHK.TRANS64.TRYWAIT`, sometimes with a register move to
    rematerialize the phase): a few instructions, a wait among them, no compute and no memory access."""
    body = [instrs[i] for b in loop["body"] for i in range(blocks[b][0], blocks[b][1] + 1)]
    kinds = {classify(i) for i in body}
    return len(body) <= 8 and "sync" in kinds and kinds <= {"sync", "int_other"}


def innermost_loops(instrs):
    """The innermost loops (those containing no other loop but spin-waits), in address order, each as
    {"start": address of its head, "end": address of its last back-edge, "instrs": [the instructions of one
    iteration: the loop's blocks that lie between start and end; cold blocks placed elsewhere are left out]}."""
    blocks, loops = find_loops(instrs)
    real = [lp for lp in loops if not _is_wait_loop(lp, blocks, instrs)]
    found = []
    for lp in real:
        if any(other is not lp and other["header"] in lp["body"] for other in real):
            continue  # holds another loop
        start = instrs[blocks[lp["header"]][0]].addr
        end = max(instrs[blocks[u][1]].addr for u in lp["latches"])
        body = [instrs[i] for b in sorted(lp["body"]) for i in range(blocks[b][0], blocks[b][1] + 1)
                if start <= instrs[i].addr <= end]
        found.append({"start": start, "end": end, "instrs": body})
    return sorted(found, key=lambda lp: lp["start"])


# ------------------------------------------------------------------------------------------------ costs


def _fma_rate(arch, itype):
    rate = TENSOR_FMA_PER_CLK[arch]
    itype = itype.upper()
    if itype in ("TF32",):
        return rate / 2
    if itype in ("S8", "U8", "E4M3", "E5M2", "S4"):
        return rate * 2
    return rate


def loop_cost(loop, arch, num_warps, described=None):
    """The cost of one iteration of `loop` (from innermost_loops) for a CTA of num_warps warps on `arch`, compared
    with its description ({"name", "masked", "mma_flops", "tile"}) when given."""
    counts = {c: 0 for c in CLASSES}
    shapes = {}
    issued = 0.0
    tensor_cycles = 0.0
    for ins in loop["instrs"]:
        cls = classify(ins)
        counts[cls] += 1
        shape = mma_shape(ins) if cls == "mma" else None
        if shape:
            m, n, k, itype = shape
            name = f"{ins.base}.{m}x{n}x{k}" if ins.base.endswith("GMMA") else f"{ins.base}.{m}{n}{k}"
            shapes[name] = shapes.get(name, 0) + 1
            # a warpgroup MMA is one instruction in each of the warpgroup's 4 warps: num_warps / 4 warpgroups
            # execute the static instruction; a warp MMA (HMMA) is executed by every warp
            executors = num_warps / 4 if ins.base.endswith("GMMA") else num_warps
            flops = 2 * m * n * k * executors
            issued += flops
            tensor_cycles += flops / (2 * _fma_rate(arch, itype))
    n_instr = len(loop["instrs"])
    warp_instr = n_instr * num_warps
    bounds = {"tensor": tensor_cycles, "sfu": counts["mufu"] * num_warps * 32 / SFU_LANES_PER_SM,
              "issue": warp_instr / SCHEDULERS_PER_SM}
    cost = {"name": described["name"] if described else None, "masked": bool(described and described["masked"]),
            "start": f"{loop['start']:#x}", "end": f"{loop['end']:#x}", "instructions": n_instr,
            "classes": counts, "mma_shapes": shapes, "mma_flops_issued": int(issued),
            "mma_flops_needed": None, "issued_over_needed": None,
            "cycles": {k: round(v, 1) for k, v in bounds.items()}, "bound": max(bounds, key=bounds.get),
            "tile": None, "warp_instr_per_tile": None}
    if described:
        needed = described["mma_flops"]
        cost["mma_flops_needed"] = int(needed)
        cost["issued_over_needed"] = round(issued / needed, 3) if needed else None
        tile = described["tile"]
        cost["tile"] = list(tile)
        cost["warp_instr_per_tile"] = round(warp_instr * TILE[0] * TILE[1] / (tile[0] * tile[1]), 1)
    return cost


def loop_costs(sass_text, arch, num_warps, described=None):
    """The cost model of one kernel: {"loops": [loop_cost per loop], "note": why loops are unmatched or "",
    "warp_instr_per_tile": the sum over the unmasked described loops (None without a description)}.

    With a description (the case's "loops", dot loops in source order), the innermost loops holding MMA
    instructions are matched to it one-to-one in address order; the other innermost loops are reported unnamed
    after them. When the counts differ nothing is matched and the note says so."""
    loops = innermost_loops(parse_sass(sass_text))
    with_mma = [lp for lp in loops if any(classify(i) == "mma" for i in lp["instrs"])]
    note = ""
    costs = []
    if described is not None and len(described) != len(with_mma):
        note = f"loops: {len(described)} described, {len(with_mma)} found"
        described = None
    if described:
        pairs = dict(zip((id(lp) for lp in with_mma), described))
        costs = [loop_cost(lp, arch, num_warps, pairs[id(lp)]) for lp in with_mma]
        costs += [loop_cost(lp, arch, num_warps) for lp in loops if id(lp) not in pairs]
    else:
        costs = [loop_cost(lp, arch, num_warps) for lp in loops]
    per_tile = None
    if described:
        per_tile = round(sum(c["warp_instr_per_tile"] for c in costs if c["name"] and not c["masked"]), 1)
    return {"loops": costs, "note": note, "warp_instr_per_tile": per_tile}


def class_summary(cost):
    """'HGMMA.64x64x16 16, MUFU 68, FP32 200, ...': one loop's instruction classes, the zero ones left out."""
    parts = [f"{s} {n}" for s, n in sorted(cost["mma_shapes"].items())]
    other_mma = cost["classes"]["mma"] - sum(cost["mma_shapes"].values())
    if other_mma:
        parts.append(f"mma(other) {other_mma}")
    names = {"mufu": "MUFU", "fp32": "FP32", "convert": "cvt", "shared": "LDS/STS", "tma": "TMA",
             "cp_async": "cp.async", "global": "LDG/STG", "local": "LDL/STL", "sync": "sync/wait",
             "int_other": "int/other"}
    parts += [f"{names[c]} {cost['classes'][c]}" for c in CLASSES[1:] if cost["classes"][c]]
    return ", ".join(parts)
