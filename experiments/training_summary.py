"""Training-side numbers of a ``compo heldout``/``compo ablate`` run folder.

``python -m experiments.training_summary RUN_DIR`` reads each method's
``<method>/seed<k>/train_log.jsonl`` and prints, per method, the mean training success (on
*train* compositions, as logged in ``charts/success``) over the last ``--last`` logged
iterations, with the spread over seeds, and the env steps reached. ``--metric`` picks another
logged scalar (e.g. ``charts/disc_accuracy`` for a folder of ``discovery`` runs laid out as
``<variant>/seed<k>/train_log.jsonl``). ``--phase N`` keeps only iterations logged with
``charts/phase`` = N (the compositional agent: 1 = library training, 2 = meta-training), e.g.
the supervised skills' success on their own primitives at the end of phase 1. ``--first N``
averages the first N (kept) iterations instead of the last ones, e.g. the success at the start
of the compositional agent's meta-training, to set beside its end. ``--max-steps S`` keeps
only iterations logged at or before S env steps (a run's state part-way, e.g. plain PPO after
as many steps as the agent's phase 2 had).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from rl.io import read_jsonl


def summarize_run(
    run: Path,
    last: int = 10,
    metric: str = "charts/success",
    phase: int | None = None,
    first: bool = False,
    max_steps: int | None = None,
) -> list[dict]:
    """Per method: ``metric`` averaged over the last ``last`` logged iterations (the first
    ``last`` if ``first``) of each seed, then mean / min / max over seeds."""
    rows = []
    for method_dir in sorted(p for p in run.iterdir() if p.is_dir()):
        seeds = sorted(method_dir.glob("seed*/train_log.jsonl"))
        if not seeds:
            continue
        per_seed, steps = [], []
        for log in seeds:
            hist = read_jsonl(log)  # a torn last line (a killed run) is skipped
            rows_ = [
                h
                for h in hist
                if (phase is None or h.get("charts/phase") == phase)
                and (max_steps is None or h["env_steps"] <= max_steps)
            ]
            vals = [h[metric] for h in rows_ if metric in h]
            vals = vals[:last] if first else vals[-last:]
            if vals:
                per_seed.append(float(np.mean(vals)))
            steps.append(max(h["env_steps"] for h in hist) if hist else 0)
        rows.append(
            {
                "method": method_dir.name,
                "train_success": float(np.mean(per_seed)) if per_seed else None,
                "min": float(np.min(per_seed)) if per_seed else None,
                "max": float(np.max(per_seed)) if per_seed else None,
                "seeds": len(seeds),
                "env_steps": int(np.max(steps)),
            }
        )
    return rows


def markdown(
    rows: list[dict], last: int, metric: str = "charts/success", first: bool = False
) -> str:
    what = "training success" if metric == "charts/success" else f"`{metric}`"
    out = [
        f"| method | {what}, {'first' if first else 'last'} {last} iterations (mean over seeds) [min, max] | seeds | env steps |",
        "|---|---|---|---|",
    ]
    for r in rows:
        s = (
            "n/a"
            if r["train_success"] is None
            else f"{r['train_success']:.2f} [{r['min']:.2f}, {r['max']:.2f}]"
        )
        out.append(f"| {r['method']} | {s} | {r['seeds']} | {r['env_steps']:,} |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path, help="a compo heldout / ablate run folder")
    p.add_argument("--last", type=int, default=10, help="iterations averaged at the end")
    p.add_argument("--metric", default="charts/success", help="logged scalar to summarise")
    p.add_argument(
        "--phase", type=int, default=None, help="only iterations logged with charts/phase = N"
    )
    p.add_argument(
        "--first",
        type=int,
        default=None,
        metavar="N",
        help="average the first N iterations instead of the last (overrides --last)",
    )
    p.add_argument(
        "--max-steps",
        type=int,
        default=None,
        metavar="S",
        help="only iterations logged at or before S env steps",
    )
    a = p.parse_args(argv)
    if a.first is not None and a.first < 1:
        raise SystemExit(f"training_summary: error: --first {a.first}; allowed: an integer >= 1")
    if not a.run.is_dir():
        raise SystemExit(f"training_summary: error: run folder {str(a.run)!r} does not exist")
    n, first = (a.first, True) if a.first is not None else (a.last, False)
    rows = summarize_run(a.run, n, a.metric, a.phase, first, a.max_steps)
    print(markdown(rows, n, a.metric, first), end="")


if __name__ == "__main__":
    main()
