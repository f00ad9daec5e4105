"""The held-out tasks a method fails most, with every other row's score on the same tasks.

``python -m experiments.hardest RESULTS_JSON [--row ROW ...] [--from-episode E] [--top N]``

Reads the raw per-(seed, task, episode) success a ``results.json`` stores, ranks the held-out
tasks by the first ``--row``'s mean success over seeds and the episodes from ``E`` on (the
part of a reward-mode trial after the search; 0 for instruction mode), and prints the ``N``
lowest as a markdown table beside the other given rows (default: every row of the document).
It answers "is a method's shortfall spread over all tasks, or concentrated on a few that every
learner fails?" — the second points at the tasks (layouts, compositions), not the method.
Nothing is written.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def late_success(doc: dict, row: str, from_episode: int) -> np.ndarray:
    """(tasks,) mean success of ``row`` over seeds and episodes ``from_episode``.."""
    s = np.asarray(doc["scores"]["methods"][row]["success"], dtype=float)  # (seed, task, episode)
    return s[:, :, from_episode:].mean(axis=(0, 2))


def hardest_table(doc: dict, rows: list[str], from_episode: int = 0, top: int = 10) -> str:
    """Markdown: the ``top`` tasks with the lowest late success of ``rows[0]``, every row's
    score on them, and each row's count of tasks below 0.5 and mean over all tasks."""
    late = {r: late_success(doc, r, from_episode) for r in rows}
    tasks = doc["heldout_tasks"]
    order = np.argsort(late[rows[0]], kind="stable")[:top]
    lines = [
        "| task | " + " | ".join(rows) + " |",
        "|---|" + "---|" * len(rows),
    ]
    for i in order:
        lines.append(f"| {tasks[i]} | " + " | ".join(f"{late[r][i]:.2f}" for r in rows) + " |")
    lines.append(
        "| tasks below 0.5 / mean over all | "
        + " | ".join(f"{int((late[r] < 0.5).sum())} / {late[r].mean():.3f}" for r in rows)
        + " |"
    )
    return (
        f"Mean success over seeds and episodes >= {from_episode}, the {len(order)} held-out tasks "
        f"where {rows[0]} scores lowest:\n\n" + "\n".join(lines) + "\n"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", type=Path, help="a results.json (compo heldout, merge)")
    p.add_argument(
        "--row", action="append", default=None, help="a row (repeatable; the first ranks)"
    )
    p.add_argument("--from-episode", type=int, default=0, help="first episode index counted")
    p.add_argument("--top", type=int, default=10, help="tasks listed")
    a = p.parse_args(argv)
    try:
        doc = json.loads(a.results.read_text())
        methods = doc["scores"]["methods"]
    except (OSError, ValueError, KeyError) as e:
        p.error(f"{a.results}: not a results.json with raw scores ({e!r})")
    rows = a.row or list(methods)
    for r in rows:
        if r not in methods:
            p.error(f"--row {r!r} is not in {a.results}; allowed: {', '.join(methods)}")
    n_ep = np.asarray(methods[rows[0]]["success"]).shape[-1]
    if not 0 <= a.from_episode < n_ep:
        p.error(f"--from-episode {a.from_episode}; allowed: 0..{n_ep - 1}")
    if a.top < 1:
        p.error(f"--top {a.top}; allowed: an integer >= 1")
    print(hardest_table(doc, rows, a.from_episode, a.top), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
