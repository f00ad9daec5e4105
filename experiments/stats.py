"""Recompute every statistic of a ``results.json`` from the raw scores it stores.

``python -m experiments.stats RESULTS_JSON [--check] [--resamples N] [--seed S] [--out FILE.md]``

Reads the raw success and return arrays of a schema-2 document (per method, seed, task and
episode index), recomputes the curves, intervals, aggregates and the probability-of-improvement
matrix with ``rl.stats`` and the document's recorded bootstrap settings (or the ones given), and
prints the table. Nothing is written unless ``--out`` is given. ``--check`` compares the
recomputed numbers with the stored ones and exits with status 1 if any differs, so an
independent reviewer can confirm a table from its results.json alone.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np

from rl.protocol import SCHEMA, table_markdown
from rl.stats import improvement_matrix, method_statistics

#: per-method fields that are functions of the raw scores (the rest describes the run)
RECOMPUTED = (
    "success_at",
    "success_ci",
    "return_at",
    "return_ci",
    "episodes_to_80",
    "auc",
    "aggregates",
)


def recompute(doc: dict, *, resamples: int | None = None, seed: int | None = None) -> dict:
    """A copy of ``doc`` whose statistics are recomputed from its raw scores.

    Args:
        doc: a ``results.json`` document of schema 2.
        resamples: bootstrap resamples (default: the document's).
        seed: bootstrap seed (default: the document's).
    """
    if doc.get("schema") != SCHEMA:
        raise ValueError(
            f"results.json schema {doc.get('schema')!r}; allowed: {SCHEMA} (older schemas keep"
            " per-seed means only, not the raw scores)"
        )
    st = dict(doc["statistics"])
    st["resamples"] = int(st["resamples"] if resamples is None else resamples)
    st["seed"] = int(st["seed"] if seed is None else seed)
    raw = doc["scores"]["methods"]
    methods = {}
    for name, m in doc["methods"].items():
        if name not in raw:
            raise ValueError(f"method {name!r} has no raw scores in the document's 'scores'")
        fresh = method_statistics(
            np.asarray(raw[name]["success"], dtype=float),
            np.asarray(raw[name]["return"], dtype=float),
            resamples=st["resamples"],
            seed=st["seed"],
        )
        methods[name] = {**m, **fresh}
    trained = [name for name, m in methods.items() if m.get("trained")]
    poi = improvement_matrix(raw, trained, resamples=st["resamples"], seed=st["seed"])
    return {**doc, "statistics": st, "methods": methods, "probability_of_improvement": poi}


def differences(stored: dict, recomputed: dict, rel: float = 1e-9) -> list[str]:
    """Paths of the statistics whose recomputed value differs from the stored one."""
    out: list[str] = []

    def walk(a, b, path: str) -> None:
        if isinstance(b, dict):
            if not isinstance(a, dict) or set(a) != set(b):
                out.append(path)
                return
            for k in b:
                walk(a[k], b[k], f"{path}.{k}")
        elif isinstance(b, list):
            if not isinstance(a, list) or len(a) != len(b):
                out.append(path)
                return
            for i, (x, y) in enumerate(zip(a, b)):
                walk(x, y, f"{path}[{i}]")
        elif isinstance(b, float) and isinstance(a, int | float):
            if not math.isclose(a, b, rel_tol=rel, abs_tol=1e-12):
                out.append(path)
        elif a != b:
            out.append(path)

    for name, m in recomputed["methods"].items():
        for key in RECOMPUTED:
            walk(stored["methods"].get(name, {}).get(key), m[key], f"methods.{name}.{key}")
    walk(
        stored.get("probability_of_improvement"),
        recomputed["probability_of_improvement"],
        "probability_of_improvement",
    )
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", type=Path, help="a results.json of schema 2")
    p.add_argument("--check", action="store_true", help="exit 1 if a stored number differs")
    p.add_argument("--resamples", type=int, default=None, help="bootstrap resamples")
    p.add_argument("--seed", type=int, default=None, help="bootstrap seed")
    p.add_argument("--out", type=Path, default=None, help="also write the table here")
    a = p.parse_args(argv)
    try:
        doc = json.loads(a.results.read_text())
        new = recompute(doc, resamples=a.resamples, seed=a.seed)
    except (OSError, ValueError, KeyError) as e:
        raise SystemExit(f"stats: error: {a.results}: {e!r}") from None
    text = table_markdown(new)
    print(text, end="")
    if a.out is not None:
        from rl.io import atomic_write_text

        atomic_write_text(a.out, text)
        print(f"wrote {a.out}")
    if a.check:
        diff = differences(doc, new)
        if diff:
            print(f"{len(diff)} stored statistics differ from the recomputed ones:")
            print("\n".join(f"  {d}" for d in diff))
            return 1
        print("check: every stored statistic equals its recomputed value")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
