"""Compile attention configs that are not (or not yet) shipped and count their main loops with bench/sass_loops.py:
how the backward's configs were chosen (bench/results/NOTES.md, issue 23).

    python -m bench.sass_loops_try sm_90 bwd "[(128, 32, 4, 3), (64, 64, 4, 3)]" "[('bf16', 64, True, False)]"

configs: (BLOCK_OWN, BLOCK_WALK, num_warps, num_stages) for bwd, (BLOCK_M, BLOCK_N, num_warps, num_stages) for fwd;
problems: (dtype, head dim, causal, dropout). Cubins go to $DUMP if set, else a temporary folder.
"""
import ast
import importlib
import os
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)


def main(argv):
    if len(argv) != 4 or argv[1] not in ("fwd", "bwd"):
        print("error: expected ARCH fwd|bwd CONFIGS PROBLEMS (see the module docstring)", file=sys.stderr)
        return 2
    import torch

    from bench.sass_loops import describe_row, print_row
    from kernels import inspect as kinspect
    attention = importlib.import_module("kernels.attention")
    arch, kind = argv[0], argv[1]
    configs, problems = ast.literal_eval(argv[2]), ast.literal_eval(argv[3])
    keys = attention.BLOCK_KEYS[kind]
    entries = [dict(zip(keys, c[:2]), num_warps=c[2], num_stages=c[3], block_ds=attention.ALL_BLOCK_DS)
               for c in configs]
    setattr(attention, "FWD_CONFIGS" if kind == "fwd" else "BWD_CONFIGS", entries)
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16}
    problems = [(dtypes[d], hd, causal, dropout) for d, hd, causal, dropout in problems]
    dump = os.environ.get("DUMP") or tempfile.mkdtemp()
    os.makedirs(dump, exist_ok=True)
    for case in attention.inspect_cases(problems, arch):
        if case["kernel"] != f"attention_{kind}":
            continue
        row = kinspect.compile_case(case, arch, dump)
        print_row(row, *describe_row(row, case, os.path.join(dump, row["id"] + ".cubin")))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
