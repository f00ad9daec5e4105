"""Merge the rows of several ``compo heldout`` runs into one table.

``python -m experiments.merge RUN_A RUN_B ... --out DIR [--replace ROW ...] [--drop ROW ...]``

A table can be run in parts — one method (or seed set) per process, per core or per session —
and merged afterwards, because every part evaluates on the same held-out tasks with the same
protocol. The parts must agree on the split, the held-out tasks, the eval settings, the env and
the env-step budget (checked: one clear error otherwise); a row present in two parts must come
from disjoint seeds and is then joined. Statistics are recomputed from the raw scores
(``experiments.stats.recompute``), so the merged table is what one run of all rows would give.
Writes ``results.json`` (with ``merged_from``: each part's folder, command and commit, and a
merged part's own ``merged_from``), ``table.md`` and ``curves.png`` into ``--out``.
``--replace ROW`` keeps a row only from the last part that has it (a row re-run from scratch in
a later part, e.g. with a new library, replaces the earlier parts' row instead of clashing with
its seeds). ``--drop ROW`` leaves a row out of the merged table (e.g. a variant that became the
default and was re-run under the default's name); the parts' commands in ``merged_from`` keep
its history.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from experiments.stats import recompute
from rl.io import atomic_write_text, prepare_run_dir
from rl.protocol import plot_curves, results_json_text, table_markdown

#: what every part must share (paths into the document)
SHARED = (
    ("split",),
    ("heldout_tasks",),
    ("statistics",),
    ("config", "eval"),
    ("config", "env_id"),
    ("config", "env_kwargs"),
    ("config", "total_env_steps"),
)


def _get(doc: dict, path: tuple[str, ...]):
    for k in path:
        doc = doc.get(k) if isinstance(doc, dict) else None
    return doc


def replace_rows(docs: list[dict], rows: list[str]) -> list[dict]:
    """The parts with each row of ``rows`` kept only in the last part that has it."""
    last = {}
    for r in rows:
        holders = [i for i, d in enumerate(docs) if r in d["methods"]]
        if not holders:
            raise ValueError(f"--replace {r!r}: no part has that row")
        last[r] = holders[-1]
    out = []
    for i, d in enumerate(docs):
        keep = [m for m in d["methods"] if last.get(m, i) == i]
        scores = {**d["scores"], "methods": {m: d["scores"]["methods"][m] for m in keep}}
        out.append({**d, "methods": {m: d["methods"][m] for m in keep}, "scores": scores})
    return out


def drop_rows(docs: list[dict], rows: list[str]) -> list[dict]:
    """The parts without the rows of ``rows`` (each must be in some part)."""
    for r in rows:
        if not any(r in d["methods"] for d in docs):
            raise ValueError(f"--drop {r!r}: no part has that row")
    out = []
    for d in docs:
        keep = [m for m in d["methods"] if m not in rows]
        scores = {**d["scores"], "methods": {m: d["scores"]["methods"][m] for m in keep}}
        out.append({**d, "methods": {m: d["methods"][m] for m in keep}, "scores": scores})
    return out


def merge(docs: list[dict], names: list[str]) -> dict:
    """One schema-2 document with every part's rows (see the module docstring)."""
    if not docs:
        raise ValueError("nothing to merge; give at least one results.json")
    base = docs[0]
    for doc, name in zip(docs[1:], names[1:]):
        for path in SHARED:
            if _get(doc, path) != _get(base, path):
                raise ValueError(
                    f"{name} differs from {names[0]} in {'.'.join(path)}; allowed: parts of "
                    "one table (same split, tasks, eval, env and budget)"
                )
    methods: dict[str, dict] = {}
    scores: dict[str, dict] = {}
    for doc, name in zip(docs, names):
        for m, entry in doc["methods"].items():
            raw = doc["scores"]["methods"][m]
            if m not in methods:
                methods[m] = dict(entry)
                scores[m] = {k: list(v) for k, v in raw.items()}
                continue
            clash = set(scores[m]["seeds"]) & set(raw["seeds"])
            if clash:
                raise ValueError(
                    f"row {m!r} has seeds {sorted(clash)} in {name} and in an earlier part; "
                    "allowed: disjoint seeds"
                )
            for k in ("seeds", "success", "return"):
                scores[m][k] = scores[m][k] + list(raw[k])
            methods[m]["seeds"] = scores[m]["seeds"]
            methods[m]["per_seed_success_at"] = {
                **methods[m]["per_seed_success_at"],
                **entry["per_seed_success_at"],
            }
            methods[m]["wall_s"] = (methods[m]["wall_s"] + entry["wall_s"]) / 2
    if not methods:
        raise ValueError("no rows to merge")
    for m in scores:  # seeds in order, scores alongside
        order = sorted(range(len(scores[m]["seeds"])), key=lambda i: scores[m]["seeds"][i])
        for k in ("seeds", "success", "return"):
            scores[m][k] = [scores[m][k][i] for i in order]
        methods[m]["seeds"] = scores[m]["seeds"]
    doc = {
        **base,
        "methods": methods,
        "scores": {**base["scores"], "methods": scores},
        "merged_from": [
            {"run": n, "command": d.get("command"), "git": d.get("git")}
            | ({"merged_from": d["merged_from"]} if "merged_from" in d else {})
            for d, n in zip(docs, names)
        ],
        "command": "python -m experiments.merge " + " ".join(names),
    }
    return recompute(doc)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path, help="run folders (or results.json files)")
    p.add_argument("--out", type=Path, required=True, help="folder for the merged table")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    p.add_argument(
        "--replace", action="append", default=[], metavar="ROW",
        help="take this row only from the last part that has it",
    )  # fmt: skip
    p.add_argument(
        "--drop", action="append", default=[], metavar="ROW",
        help="leave this row out of the merged table",
    )  # fmt: skip
    a = p.parse_args(argv)
    try:
        paths = [r / "results.json" if r.is_dir() else r for r in a.runs]
        docs = replace_rows([json.loads(path.read_text()) for path in paths], a.replace)
        doc = merge(drop_rows(docs, a.drop), [str(r) for r in a.runs])
        doc["command"] += "".join(f" --replace {shlex.quote(r)}" for r in a.replace)
        doc["command"] += "".join(f" --drop {shlex.quote(r)}" for r in a.drop)
        out = prepare_run_dir(a.out, overwrite=a.overwrite)
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as e:
        print(f"merge: error: {e}", file=sys.stderr)
        return 2
    atomic_write_text(out / "results.json", results_json_text(doc))
    atomic_write_text(out / "table.md", table_markdown(doc))
    plot_curves(doc["methods"], out / "curves.png", title="Held-out compositions (merged)")
    print(table_markdown(doc), end="")
    print(f"wrote {out}/results.json, table.md, curves.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
