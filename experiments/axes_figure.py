"""One picture of generalisation along the split axes: zero-shot held-out success per method
(bars) on each split, with the 95% stratified-bootstrap interval stored in each
``results.json`` (no interval for fewer than 3 seeds: the bar is hatched and its seed count is
written on it).

``python -m experiments.axes_figure LABEL=RESULTS_DIR ... --out results/axes.png``

e.g. ``default=results/headline_instruction order=results/axes_order pair=results/axes_pair
length=results/axes_length``. Every part must be an instruction-mode (zero-shot) table; methods
missing from a part leave a gap.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

from rl.io import atomic_write_bytes
from rl.stats import MIN_RUNS_FOR_INTERVAL

#: the methods drawn, in this order (others in the tables are left out)
METHODS = (
    "ppo", "rl2", "maml", "pearl", "compositional[discovered]", "compositional[supervised]",
)  # fmt: skip


def read_parts(specs: list[str]) -> list[tuple[str, dict]]:
    """``LABEL=DIR`` -> (label, that folder's results.json); one-line ValueError otherwise."""
    parts = []
    for spec in specs:
        label, sep, folder = spec.partition("=")
        if not sep or not label or not folder:
            raise ValueError(f"{spec!r}; allowed: LABEL=RESULTS_DIR (e.g. pair=results/axes_pair)")
        path = Path(folder) / "results.json"
        if not path.is_file():
            raise ValueError(f"{spec!r}: {path} does not exist")
        doc = json.loads(path.read_text())
        if doc.get("schema") != 2:
            raise ValueError(f"{path}: schema {doc.get('schema')!r}; allowed: 2")
        parts.append((label, doc))
    return parts


def bar(doc: dict, method: str) -> tuple[float, tuple[float, float] | None, int] | None:
    """(zero-shot mean, its interval or None, seeds) of ``method`` in one table."""
    m = doc["methods"].get(method)
    if m is None:
        return None
    z = m["aggregates"]["zero_shot"]
    n = len(m["seeds"])
    ci = z.get("mean_ci") if n >= MIN_RUNS_FOR_INTERVAL else None
    return float(z["mean"]), (None if ci is None else (float(ci[0]), float(ci[1]))), n


def draw(parts: list[tuple[str, dict]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [m for m in METHODS if any(m in d["methods"] for _, d in parts)]
    width = 0.8 / max(len(methods), 1)
    fig, ax = plt.subplots(figsize=(11, 4.6))
    colours = plt.get_cmap("tab10").colors
    for j, method in enumerate(methods):
        for i, (_, doc) in enumerate(parts):
            b = bar(doc, method)
            if b is None:
                continue
            mean, ci, n = b
            x = i + (j - (len(methods) - 1) / 2) * width
            ax.bar(x, mean, width, color=colours[j % 10], label=method if i == 0 else None,
                   hatch=None if ci else "//", edgecolor="white" if ci else "black", lw=0.5)  # fmt: skip
            if ci:
                ax.errorbar(x, mean, yerr=[[mean - ci[0]], [ci[1] - mean]], color="black",
                            capsize=2, lw=0.8)  # fmt: skip
            else:
                ax.text(x, mean + 0.02, f"{n}s", ha="center", fontsize=7)
    ax.set_xticks(range(len(parts)), [label for label, _ in parts])
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("held-out success, zero-shot")
    ax.set_title(
        "Generalisation along the split axes (instruction mode; 95% stratified-bootstrap "
        f"intervals;\nhatched: fewer than {MIN_RUNS_FOR_INTERVAL} seeds, no interval, seeds written on the bar)"
    )
    ax.legend(fontsize=8, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.08), frameon=False)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(out, buf.getvalue())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("parts", nargs="+", metavar="LABEL=RESULTS_DIR")
    ap.add_argument("--out", required=True, help="the picture (.png)")
    a = ap.parse_args(argv)
    try:
        if not a.out.endswith(".png"):
            raise ValueError(f"--out {a.out!r}; allowed: a .png path")
        parts = read_parts(a.parts)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    draw(parts, out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
