"""Render a pytest-benchmark JSON from `pytest bench/ --benchmark --benchmark-json=RESULTS.json` as a Markdown
table and a PNG chart (throughput by backend, one panel per case, the measured roofline as a line).

    python -m bench.report RESULTS.json [--out DIR]      # writes DIR/RESULTS.md and DIR/RESULTS.png
"""
import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

# the figure each kind of case is judged by: (extra_info key, column title, roofline key, scale to that unit)
FIGURES = {
    "attention": ("tflops", "TFLOP/s", "roofline_matmul_flops", 1e12),
    "layer_norm": ("gbps", "GB/s", "roofline_copy_bytes_per_s", 1e9),
    "gelu": ("gbps", "GB/s", "roofline_copy_bytes_per_s", 1e9),
    "loss_head": ("tflops", "TFLOP/s", "roofline_matmul_flops", 1e12),
    "train_step": ("tokens_per_s", "tokens/s", None, 1),
    "sampling": ("tokens_per_s", "tokens/s", None, 1),
}


def _fmt(value, digits=3):
    if value is None:
        return "—"
    if isinstance(value, float):
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.{digits}g}"
    return str(value)


def load_rows(data):
    rows = []
    for b in data.get("benchmarks", []):
        info = dict(b.get("extra_info", {}))
        info.setdefault("median_s", b["stats"]["median"])
        rows.append({"name": b["name"], "group": b.get("group") or b["name"], **info})
    for b in data.get("untimed", []):
        rows.append({"name": b["name"], "group": b.get("group") or b["name"], **b["extra_info"]})
    return rows


def _what_is_wrong(error):
    if isinstance(error, KeyError) and error.args and error.args[0] == "stats":
        return "a benchmark row has no stats"
    return f"{type(error).__name__}: {error}"


def label(row):
    parts = [row.get("backend", row["name"])]
    if row.get("kind") == "train_step":
        parts.append("compiled" if row.get("compile") else "eager")
    if row.get("kind") == "sampling":
        parts.append(f"KV cache {row.get('context') or ''}".strip() if row.get("use_cache") else "no cache")
        parts.append("compiled" if row.get("compile") else "eager")
    return " ".join(map(str, parts))


def _mib(nbytes):
    return _fmt(nbytes / 2**20 if nbytes else None)


# columns beside the figure, per kind: (titles, the cells of a row). Memory is measured on untimed rows too.
EXTRA_COLUMNS = {
    "train_step": (["MFU", "peak memory (MiB)"], lambda r: [_fmt(r.get("mfu")), _mib(r.get("peak_memory_bytes"))]),
    "loss_head": (["peak memory (MiB)", "fp32 logits (MiB)"],
                  lambda r: [_mib(r.get("peak_memory_bytes")), _mib(r.get("logits_fp32_bytes"))]),
}


def markdown(rows, data):
    env = next((r for r in rows if "device" in r), {})
    lines = ["# Benchmark results", "",
             f"- device: {env.get('device', '?')}; torch {env.get('torch', '?')}, triton {env.get('triton', '?')}",
             f"- date: {env.get('date', data.get('datetime', '?'))}",
             f"- command: `{data.get('command', 'pytest bench/ --benchmark')}`"]
    if env.get("roofline_matmul_flops"):
        lines.append(f"- measured roofline: matmul {env['roofline_matmul_flops'] / 1e12:.1f} TFLOP/s "
                     f"({env.get('roofline_matmul_dtype')}, n={env.get('roofline_matmul_n')}), "
                     f"copy {env['roofline_copy_bytes_per_s'] / 1e9:.1f} GB/s")
    groups = defaultdict(list)
    for r in rows:
        groups[r["group"]].append(r)
    for group, members in groups.items():
        kind = members[0].get("kind", "")
        key, unit, roof_key, _ = FIGURES.get(kind, ("median_s", "s", None, 1))
        titles, extra = EXTRA_COLUMNS.get(kind, ([], lambda r: []))
        lines += ["", f"## {group}", "",
                  "| " + " | ".join(["backend", "median (ms)", unit, "fraction of roofline", *titles]) + " |",
                  "|---|" + "---:|" * (3 + len(titles))]
        for r in sorted(members, key=lambda r: -(r.get(key) or 0)):
            if r.get("timed") is False:
                cells = [label(r), r.get("note", "not timed"), "—", "—"]
            else:
                cells = [label(r), _fmt(r["median_s"] * 1e3), _fmt(r.get(key)), _fmt(r.get("roofline_fraction"))]
            lines.append("| " + " | ".join(cells + extra(r)) + " |")
    return "\n".join(lines) + "\n"


def chart(rows, path):
    try:
        import matplotlib
    except ImportError:  # an optional package: the Markdown table is written without the chart
        print("matplotlib is not installed: no chart", file=sys.stderr)
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = defaultdict(list)
    for r in rows:
        if r.get("timed") is not False:
            groups[r["group"]].append(r)
    if not groups:
        return None
    n = len(groups)
    cols = 2 if n > 1 else 1
    nrows = (n + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(7 * cols, 2.2 + 0.45 * max(len(m) for m in groups.values()) * nrows),
                             squeeze=False)
    for ax, (group, members) in zip(axes.flat, groups.items()):
        kind = members[0].get("kind", "")
        key, unit, roof_key, scale = FIGURES.get(kind, ("median_s", "s", None, 1))
        members = sorted(members, key=lambda r: r.get(key) or 0)
        values = [r.get(key) or 0 for r in members]
        ax.barh([label(r) for r in members], values, color="tab:blue")
        roof = members[0].get(roof_key) if roof_key else None
        if roof:
            ax.axvline(roof / scale, color="tab:red", linestyle="--", label=f"measured roofline {roof / scale:,.3g}")
            ax.legend(loc="lower right", fontsize=8)
        ax.set_title(group, fontsize=10)
        ax.set_xlabel(unit)
        ax.tick_params(axis="y", labelsize=8)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", help="pytest-benchmark JSON (--benchmark-json)")
    parser.add_argument("--out", help="folder for the .md and .png (default: beside the JSON)")
    args = parser.parse_args(argv)
    src = Path(args.results)
    if not src.is_file():
        print(f"error: {src} does not exist or is not a file (give the JSON written by --benchmark-json)",
              file=sys.stderr)
        return 2
    try:
        data = json.loads(src.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        print(f"error: {src} is not JSON ({type(e).__name__}: {e}): give the file written by "
              f"pytest bench/ --benchmark --benchmark-json={src}", file=sys.stderr)
        return 2
    try:
        rows = load_rows(data)
    except (AttributeError, TypeError, KeyError) as e:
        print(f"error: {src} is not a pytest-benchmark JSON ({_what_is_wrong(e)}): give the file written by "
              f"pytest bench/ --benchmark --benchmark-json={src}", file=sys.stderr)
        return 2
    if not rows:
        print(f"error: {src} holds no benchmark rows (was it written with --benchmark?)", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else src.parent
    out.mkdir(parents=True, exist_ok=True)
    md_path = out / (src.stem + ".md")
    md_path.write_text(markdown(rows, data))
    png_path = chart(rows, out / (src.stem + ".png"))
    print(f"wrote {md_path}" + (f" and {png_path}" if png_path else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
