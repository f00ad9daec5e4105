"""Benchmarks run by ``make bench`` (``python -m benchmarks.run``).

Every benchmark measures our code and its reference *in the same run* (the machine is shared,
so absolute numbers drift; ratios taken minutes apart would not mean much), prints its rows and
appends them to ``benchmarks/results.csv``. Speed is measured only here, never in the tests.

Timing habits: ``time.perf_counter``, warm-up runs first, medians over repeats, torch on one
thread (``OMP_NUM_THREADS=1`` and ``torch.set_num_threads(1)``).

This package file holds the pieces every benchmark shares: the ``Row`` record, the CSV format,
target checking and the timing helper.
"""

from __future__ import annotations

import csv
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

#: columns of ``benchmarks/results.csv`` (one row per measured metric)
CSV_COLUMNS = [
    "date",
    "git_commit",
    "benchmark",
    "metric",
    "value",
    "reference",
    "ratio",
    "target",
    "meets_target",
    "notes",
    "command",
]

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CSV = ROOT / "benchmarks" / "results.csv"

#: the composition of the single-task benchmarks (CompoGrid's default)
COMPOSITION = "pickup(red ball) > open(door)"


@dataclass
class Row:
    """One measured metric: ``value`` (ours) against ``reference``; ``ratio = value/reference``.

    ``target`` is a condition on the ratio such as ``">=1.5"`` or ``"<=1.5"`` ("" = none).
    """

    benchmark: str
    metric: str
    value: float | None
    reference: float | None = None
    target: str = ""
    notes: str = ""

    @property
    def ratio(self) -> float | None:
        if self.value is None or self.reference is None or self.reference == 0:
            return None
        return self.value / self.reference

    @property
    def meets_target(self) -> bool | None:
        return check_target(self.ratio, self.target)


def check_target(ratio: float | None, target: str) -> bool | None:
    """Whether ``ratio`` satisfies ``target`` (``">=x"`` or ``"<=x"``); None if either is
    missing.

    Examples:
        >>> check_target(2.0, ">=1.5"), check_target(2.0, "<=1.5"), check_target(None, ">=1")
        (True, False, None)
    """
    if ratio is None or not target:
        return None
    if target.startswith(">="):
        return ratio >= float(target[2:])
    if target.startswith("<="):
        return ratio <= float(target[2:])
    raise ValueError(f"target={target!r}; allowed: '>=NUMBER', '<=NUMBER' or ''")


def _fmt(x: float | bool | None) -> str:
    if x is None:
        return ""
    if isinstance(x, bool):
        return "yes" if x else "no"
    return f"{x:.6g}"


def row_to_csv(row: Row, *, date: str, commit: str, command: str) -> dict[str, str]:
    """The CSV record of ``row`` (empty strings for missing numbers)."""
    return {
        "date": date,
        "git_commit": commit,
        "benchmark": row.benchmark,
        "metric": row.metric,
        "value": _fmt(row.value),
        "reference": _fmt(row.reference),
        "ratio": _fmt(row.ratio),
        "target": row.target,
        "meets_target": _fmt(row.meets_target),
        "notes": row.notes,
        "command": command,
    }


def append_rows(path: str | os.PathLike, rows: list[Row], *, command: str) -> None:
    """Append ``rows`` to the CSV at ``path``, writing the header first if the file is new."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.is_file() or path.stat().st_size == 0
    date = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    commit = git_commit()
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        if new:
            w.writeheader()
        for r in rows:
            w.writerow(row_to_csv(r, date=date, commit=commit, command=command))


def format_row(row: Row) -> str:
    """One human-readable line: ``benchmark/metric: value vs reference -> ratio (target)``."""
    text = f"{row.benchmark}/{row.metric}: {_fmt(row.value) or 'n/a'}"
    if row.reference is not None:
        text += f" vs {_fmt(row.reference)}"
    if row.ratio is not None:
        text += f" -> ratio {row.ratio:.3f}"
    if row.target:
        met = row.meets_target
        text += f" (target {row.target}: {'n/a' if met is None else ('met' if met else 'NOT met')})"
    if row.notes:
        text += f"  [{row.notes}]"
    return text


def git_commit(root: Path = ROOT) -> str:
    """HEAD's commit id read from ``.git`` files (no git process); "" if not a checkout."""
    git = root / ".git"
    try:
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref: "):
            return head
        ref = head[5:]
        if (git / ref).is_file():
            return (git / ref).read_text().strip()
        packed = git / "packed-refs"
        if packed.is_file():
            for line in packed.read_text().splitlines():
                parts = line.split()
                if len(parts) == 2 and parts[1] == ref:
                    return parts[0]
    except OSError:
        pass
    return ""


def median_seconds(fn: Callable[[], object], *, repeats: int, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` over ``repeats`` calls, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def load_note() -> str:
    """Machine load at measurement time (the cores are shared)."""
    try:
        la = os.getloadavg()[0]
    except OSError:
        return ""
    return f"load avg {la:.1f} on {os.cpu_count()} cores"
