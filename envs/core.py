"""Family-agnostic vocabulary: primitives, compositions, tasks and train/held-out splits.

A *primitive* is an atomic sub-task ``verb(object)``; a *composition* is an ordered tuple of
primitives written ``pickup(blue key) > open(door)``; a *task* is a composition plus a
layout/goal seed; a *split* partitions compositions into train and held-out such that every
primitive, and every primitive at every position it occurs in, is covered by train.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

_PRIMITIVE_RE = re.compile(r"^\s*([a-z][a-z_-]*)\s*\(\s*([^()]*?)\s*\)\s*$")


@dataclass(frozen=True, order=True)
class Primitive:
    """An atomic sub-task ``verb(object)``, e.g. ``pickup(blue key)``."""

    verb: str
    obj: str

    @classmethod
    def parse(cls, text: str) -> Primitive:
        """Parse ``verb(object)``; raises ``ValueError`` naming the text on bad syntax."""
        m = _PRIMITIVE_RE.match(text)
        if m is None or not m.group(2):
            raise ValueError(
                f"cannot parse primitive {text!r}: expected 'verb(object)', e.g. 'pickup(blue key)'"
            )
        return cls(m.group(1), " ".join(m.group(2).split()))

    def __str__(self) -> str:
        return f"{self.verb}({self.obj})"


@dataclass(frozen=True, order=True)
class Composition:
    """An ordered tuple of primitives; canonical text ``a(x) > b(y)``.

    Examples:
        >>> c = Composition.parse("pickup(blue key) >  open(door)")
        >>> str(c)
        'pickup(blue key) > open(door)'
        >>> len(c)
        2
    """

    primitives: tuple[Primitive, ...]

    @classmethod
    def parse(cls, text: str | Composition) -> Composition:
        """Parse the canonical text form; accepts an existing ``Composition`` unchanged."""
        if isinstance(text, Composition):
            return text
        if not isinstance(text, str) or not text.strip():
            raise ValueError(
                f"cannot parse composition {text!r}: expected text like 'pickup(blue key) > open(door)'"
            )
        return cls(tuple(Primitive.parse(part) for part in text.split(">")))

    def __str__(self) -> str:
        return " > ".join(str(p) for p in self.primitives)

    def __len__(self) -> int:
        return len(self.primitives)

    def __iter__(self):
        return iter(self.primitives)

    def __getitem__(self, i: int) -> Primitive:
        return self.primitives[i]


@dataclass(frozen=True)
class Task:
    """A composition plus a layout/goal seed (``None``: a fresh layout every episode)."""

    composition: Composition
    layout_seed: int | None = None

    def __str__(self) -> str:
        return f"{self.composition} @ {self.layout_seed}"


@dataclass(frozen=True)
class Split:
    """Train vs held-out compositions of one task family.

    Attributes:
        family: ``"grid"`` or ``"metaworld"`` (or a Meta-World benchmark name).
        train: train compositions.
        heldout: held-out compositions, disjoint from ``train``.
        primitives: every primitive of the family's vocabulary used by the split.
        seed: the seed the split was drawn from.
        meta: family-specific extras (e.g. Meta-World benchmark name).
    """

    family: str
    train: tuple[Composition, ...]
    heldout: tuple[Composition, ...]
    primitives: tuple[Primitive, ...]
    seed: int = 0
    meta: dict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if not self.train:
            raise ValueError(f"split of family {self.family!r} has an empty train set")
        if not self.heldout:
            raise ValueError(f"split of family {self.family!r} has an empty held-out set")
        overlap = set(self.train) & set(self.heldout)
        if overlap:
            first = sorted(str(c) for c in overlap)[0]
            raise ValueError(
                f"train and held-out overlap in {len(overlap)} composition(s), e.g. {first!r}; "
                "they must be disjoint"
            )

    def to_dict(self) -> dict:
        """Plain-text form stored in ``results.json``."""
        return {
            "family": self.family,
            "seed": self.seed,
            "train": [str(c) for c in self.train],
            "heldout": [str(c) for c in self.heldout],
            "primitives": [str(p) for p in self.primitives],
        }


@dataclass(frozen=True)
class LayoutSplit(Split):
    """A split whose train and held-out sides share their compositions and differ in layouts.

    For families where the *hidden* thing is which of a few known compositions pays, and
    generalisation is to new layouts/goals (Meta-World ML1; CompoGrid ``grid-layouts:``):
    ``train == heldout``, and ``meta["train_layout_seeds"]`` / ``meta["heldout_layout_seeds"]``
    (non-empty, disjoint) are what tells them apart.
    """

    def __post_init__(self) -> None:
        # Replaces Split's disjointness check: the distinction lives in the layout seeds.
        if not self.train or tuple(self.train) != tuple(self.heldout):
            raise ValueError(
                f"a layout split ({self.family!r}) needs train == heldout (non-empty), got "
                f"train={[str(c) for c in self.train]}, heldout={[str(c) for c in self.heldout]}"
            )
        tr = set(self.meta.get("train_layout_seeds", ()))
        he = set(self.meta.get("heldout_layout_seeds", ()))
        if not tr or not he or tr & he:
            raise ValueError(
                f"a layout split ({self.family!r}) needs non-empty, disjoint "
                "meta['train_layout_seeds'] and meta['heldout_layout_seeds']"
            )

    def to_dict(self) -> dict:
        """``Split.to_dict`` plus the layout seeds, which are what tells train from held-out."""
        d = super().to_dict()
        d["train_layout_seeds"] = list(self.meta["train_layout_seeds"])
        d["heldout_layout_seeds"] = list(self.meta["heldout_layout_seeds"])
        return d


def positions(compositions: Iterable[Composition]) -> set[tuple[Primitive, int]]:
    """Every (primitive, position) pair occurring in ``compositions``."""
    return {(p, i) for c in compositions for i, p in enumerate(c)}


def split_compositions(
    pool: Sequence[Composition],
    *,
    seed: int,
    train_fraction: float = 0.5,
) -> tuple[tuple[Composition, ...], tuple[Composition, ...]]:
    """Seeded train/held-out partition of ``pool`` with primitive-in-position coverage.

    Train first receives a greedy cover of every (primitive, position) pair present in the pool
    (so no held-out composition asks for a primitive at a position never trained), then is
    filled at random up to ``train_fraction``; the rest is held out.
    """
    if not 0.0 < train_fraction < 1.0:
        raise ValueError(f"train_fraction={train_fraction} must lie strictly between 0 and 1")
    pool = sorted(set(pool))
    if len(pool) < 2:
        raise ValueError(f"cannot split {len(pool)} composition(s): need at least 2")
    rng = np.random.default_rng(seed)
    order = [pool[i] for i in rng.permutation(len(pool))]
    needed = positions(order)
    train: list[Composition] = []
    # Greedy set cover in shuffled order: take the composition covering most uncovered pairs.
    while needed:
        best = max(order, key=lambda c: len(positions([c]) & needed))
        train.append(best)
        needed -= positions([best])
        order.remove(best)
    n_train = max(len(train), int(round(train_fraction * len(pool))))
    if n_train >= len(pool):
        raise ValueError(
            f"covering every primitive-in-position needs {len(train)} train compositions, "
            f"leaving none of the {len(pool)} held out; enlarge the pool"
        )
    train.extend(order[: n_train - len(train)])
    chosen = set(train)
    heldout = [c for c in order if c not in chosen]
    return tuple(sorted(train)), tuple(sorted(heldout))


def make_split(family: str = "grid", seed: int = 0, **kwargs) -> Split:
    """Seeded train/held-out split of a task family.

    Args:
        family: ``"grid"`` (CompoGrid), ``"grid-layouts:<c1>;<c2>;..."`` (CompoGrid, the
            listed compositions on both sides, held-out *layouts*: which composition pays is
            what a trial must find out), ``"metaworld"`` (compositional Meta-World verb x
            object), ``"ML10"``, ``"ML45"`` or ``"ML1:<task-name>"`` (standard Meta-World
            splits).
        seed: seed of the partition.
        **kwargs: family options (see ``envs.grid.make_grid_split`` and
            ``envs.metaworld.make_metaworld_split``).

    Examples:
        >>> s = make_split("grid", seed=0)
        >>> set(s.train).isdisjoint(s.heldout)
        True
    """
    if family == "grid":
        from envs.grid import make_grid_split

        return make_grid_split(seed=seed, **kwargs)
    if family.startswith("grid-layouts:"):
        from envs.grid import make_grid_layout_split

        texts = [t for t in family[len("grid-layouts:") :].split(";") if t.strip()]
        return make_grid_layout_split(texts, seed=seed, **kwargs)
    if family == "metaworld" or family in ("ML10", "ML45") or family.startswith("ML1:"):
        from envs.metaworld import make_metaworld_split

        return make_metaworld_split(family, seed=seed, **kwargs)
    raise ValueError(
        f"unknown task family {family!r}; allowed: 'grid', 'grid-layouts:<c1>;<c2>', 'metaworld', "
        "'ML10', 'ML45', 'ML1:<task>'"
    )
