"""``compo ablate``: one switch of the compositional agent changed at a time, same protocol.

Rows: the full agent and one variant per switch — composer {hard, uniform}, graph {none},
primitives {supervised, random-frozen}, inner loop {off} — trained with the same budget and
seeds and evaluated on the same held-out tasks as ``compo heldout``.
"""

from __future__ import annotations

from pathlib import Path

from experiments.heldout import HeldoutConfig, run_heldout
from rl.config import config_from_dict, merge

#: (row name, config override of the compositional agent)
ABLATIONS: dict[str, dict] = {
    "full": {},
    "composer=hard": {"composer": "hard"},
    "composer=uniform": {"composer": "uniform"},
    "graph=none": {"graph": "none"},
    "primitives=supervised": {"primitives": "supervised"},
    "primitives=random-frozen": {"primitives": "random-frozen"},
    "inner_loop=off": {"inner_loop": "off"},
}


def ablation_config(raw: dict) -> HeldoutConfig:
    """A ``HeldoutConfig`` whose methods are the chosen ablation rows.

    ``raw`` takes the keys of ``HeldoutConfig`` (except ``methods``) plus ``variants`` (row names
    of ``ABLATIONS``; default all) and ``base`` (config of the full compositional agent).
    """
    raw = dict(raw)
    if "methods" in raw:
        raise ValueError("'methods' is fixed by compo ablate; choose rows with 'variants'")
    variants = raw.pop("variants", list(ABLATIONS))
    base = raw.pop("base", {})
    unknown = [v for v in variants if v not in ABLATIONS]
    if unknown:
        raise ValueError(f"unknown ablation {unknown[0]!r}; allowed: {', '.join(ABLATIONS)}")
    raw.setdefault("references", ["random"])
    seed = raw.pop("seed", None)
    if seed is not None:
        raw["seeds"] = [seed]
    raw["methods"] = [
        {
            "name": f"compositional[{v}]",
            "method": "compositional",
            "config": merge(base, ABLATIONS[v]),
        }
        for v in variants
    ]
    return config_from_dict(HeldoutConfig, raw)


def run_ablate(raw: dict, out: str | Path, *, overwrite: bool = False) -> dict:
    return run_heldout(ablation_config(raw), out, overwrite=overwrite)
