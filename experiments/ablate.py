"""``compo ablate``: one switch of the compositional agent changed at a time, same protocol.

Rows: the full agent (``base``) and one variant per switch — composer {uniform, soft}, graph
{none, state}, inner loop {on}, primitives {supervised, discovered, random-frozen} (the row equal to
``base`` repeats it under its own name) — trained with the same budget and seeds and evaluated
on the same held-out tasks as ``compo heldout``.
"""

from __future__ import annotations

from pathlib import Path

from experiments.heldout import HeldoutConfig, run_heldout
from rl.config import config_from_dict, merge

#: (row name, config override of the compositional agent)
ABLATIONS: dict[str, dict] = {
    "full": {},
    "composer=uniform": {"composer": "uniform"},
    "composer=soft": {"composer": "soft"},
    "graph=none": {"graph": "none"},
    "graph=state": {"graph": "state"},
    "inner_loop=on": {"inner_loop": "on"},
    "primitives=supervised": {"primitives": "supervised"},
    "primitives=discovered": {"primitives": "discovered"},
    "primitives=random-frozen": {"primitives": "random-frozen"},
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
    if not isinstance(base, dict):
        raise ValueError(f"base={base!r}; allowed: a mapping of compositional config keys")
    if not isinstance(variants, list) or not variants:
        raise ValueError(
            f"variants={variants!r}; allowed: a non-empty list of {', '.join(ABLATIONS)}"
        )
    unknown = [v for v in variants if not isinstance(v, str) or v not in ABLATIONS]
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


def run_ablate(
    raw: dict, out: str | Path, *, overwrite: bool = False, resume: bool = False, **kwargs
) -> dict:
    """``run_heldout`` on the ablation rows of ``raw`` (``--resume`` keeps finished rows)."""
    return run_heldout(ablation_config(raw), out, overwrite=overwrite, resume=resume, **kwargs)
