"""Family-agnostic vocabulary: primitives, compositions, tasks and train/held-out splits.

A *primitive* is an atomic sub-task ``verb(object)``; a *composition* is an ordered tuple of
primitives written ``pickup(blue key) > open(door)``; a *task* is a composition plus a
layout/goal seed; a *split* partitions compositions into train and held-out such that every
primitive, and every primitive at every position it occurs in, is covered by train.

Split kinds (issue 16, seed Q9: generalisation along several axes), each on top of that
coverage guarantee:

- ``default``: a seeded random partition (``split_compositions``);
- ``order``: every held-out composition is a new order of a primitive multiset that train
  holds in another order: for each held-out ``h`` some train ``t != h`` has the same primitives
  with the same multiplicities (``order_split``);
- ``pair``: every held-out composition contains an unordered pair of distinct primitives that
  no train composition contains together (``pair_split``);
- ``length``: extrapolation in length: train holds the shorter compositions, held-out only
  longer ones (CompoGrid: lengths 2-3 vs 4). No train composition has the held-out length's
  last position, so primitive-in-position coverage holds for the positions train has; in
  its place every adjacent pair of a held-out composition occurs adjacent in train
  (``transitions``), so what is new is the length alone (``length_split``).
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
        d = {
            "family": self.family,
            "seed": self.seed,
            "train": [str(c) for c in self.train],
            "heldout": [str(c) for c in self.heldout],
            "primitives": [str(p) for p in self.primitives],
        }
        if "split_kind" in self.meta:
            d["kind"] = self.meta["split_kind"]
        if "heldout_pairs" in self.meta:
            d["heldout_pairs"] = list(self.meta["heldout_pairs"])
        if "heldout_length" in self.meta:
            d["train_lengths"] = list(self.meta["train_lengths"])
            d["heldout_length"] = self.meta["heldout_length"]
        return d


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


def primitive_pairs(c: Composition) -> set[frozenset[Primitive]]:
    """The unordered pairs of distinct primitives that ``c`` contains (anywhere in it)."""
    prims = sorted(set(c))
    return {frozenset((a, b)) for i, a in enumerate(prims) for b in prims[i + 1 :]}


def transitions(c: Composition) -> set[tuple[Primitive, Primitive]]:
    """The adjacent pairs ``(c[i], c[i + 1])`` of ``c``: which sub-task follows which."""
    return {(c[i], c[i + 1]) for i in range(len(c) - 1)}


def multiset_key(c: Composition) -> tuple[Primitive, ...]:
    """``c``'s primitives with their multiplicities, order forgotten (its orders share it)."""
    return tuple(sorted(c))


SPLIT_KINDS = ("default", "order", "pair", "length")


def check_split_kind(kind: str) -> str:
    """``kind`` if it is a split kind; one clear ``ValueError`` otherwise."""
    if kind not in SPLIT_KINDS:
        raise ValueError(f"split_kind={kind!r}; allowed: {', '.join(SPLIT_KINDS)}")
    return kind


def _check_fraction_and_pool(pool: Sequence[Composition], train_fraction: float) -> list:
    if not 0.0 < train_fraction < 1.0:
        raise ValueError(f"train_fraction={train_fraction} must lie strictly between 0 and 1")
    pool = sorted(set(pool))
    if len(pool) < 2:
        raise ValueError(f"cannot split {len(pool)} composition(s): need at least 2")
    return pool


def split_compositions(
    pool: Sequence[Composition],
    *,
    seed: int,
    train_fraction: float = 0.5,
    must_train: Iterable[Composition] = (),
) -> tuple[tuple[Composition, ...], tuple[Composition, ...]]:
    """Seeded train/held-out partition of ``pool`` with primitive-in-position coverage.

    Train first receives ``must_train`` (members of the pool), then a greedy cover of every
    (primitive, position) pair present in the pool (so no held-out composition asks for a
    primitive at a position never trained), then is filled at random up to ``train_fraction``;
    the rest is held out. With no ``must_train`` this is the ``default`` split kind.
    """
    pool = _check_fraction_and_pool(pool, train_fraction)
    rng = np.random.default_rng(seed)
    order = [pool[i] for i in rng.permutation(len(pool))]
    train: list[Composition] = sorted(set(must_train))
    if not set(train) <= set(pool):
        raise ValueError("must_train holds compositions that are not in the pool")
    if train:
        order = [c for c in order if c not in set(train)]
    needed = positions(order) - positions(train)
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


def order_split(
    pool: Sequence[Composition], *, seed: int, train_fraction: float = 0.5
) -> tuple[tuple[Composition, ...], tuple[Composition, ...]]:
    """Split kind ``order``: every held-out composition has a train composition with the same
    primitives (``multiset_key``) in another order.

    One seeded member of each multiset class of the pool goes to train (an *anchor*; so a
    class with one member in the pool is all in train), then ``split_compositions`` covers every
    primitive-in-position and fills train up to ``train_fraction``. A pool meant for this kind
    holds several orders of each multiset (``envs.grid.make_grid_split`` draws it so).
    """
    pool = _check_fraction_and_pool(pool, train_fraction)
    classes: dict[tuple, list[Composition]] = {}
    for c in pool:
        classes.setdefault(multiset_key(c), []).append(c)
    rng = np.random.default_rng(seed)
    anchors = [members[int(rng.integers(len(members)))] for members in classes.values()]
    return split_compositions(pool, seed=seed, train_fraction=train_fraction, must_train=anchors)


def pair_split(
    pool: Sequence[Composition], *, seed: int, train_fraction: float = 0.5
) -> tuple[tuple[Composition, ...], tuple[Composition, ...], tuple[frozenset, ...]]:
    """Split kind ``pair``: every held-out composition contains a pair of primitives that no
    train composition contains together.

    Pairs of primitives (``primitive_pairs``) are visited in a seeded order; a pair is held out
    — every pool composition containing it moves to held-out — when held-out stays within
    ``1 - train_fraction`` of the pool and the remaining (train) compositions still cover every
    primitive-in-position of the pool. Train is everything not held out, so a held-out pair
    occurs in no train composition.

    Returns:
        ``(train, heldout, heldout_pairs)``.
    """
    pool = _check_fraction_and_pool(pool, train_fraction)
    target = len(pool) - max(1, int(round(train_fraction * len(pool))))
    having: dict[frozenset, set[Composition]] = {}
    for c in pool:
        for pr in primitive_pairs(c):
            having.setdefault(pr, set()).add(c)
    pairs = sorted(having, key=lambda pr: tuple(sorted(pr)))
    needed = positions(pool)
    rng = np.random.default_rng(seed)
    held: list[frozenset] = []
    heldout: set[Composition] = set()
    for i in rng.permutation(len(pairs)):
        grown = heldout | having[pairs[i]]
        if grown == heldout or len(grown) > target:
            continue
        if positions(c for c in pool if c not in grown) != needed:
            continue  # train would lose a primitive-in-position the pool has
        held.append(pairs[i])
        heldout = grown
        if len(heldout) == target:
            break
    if not heldout:
        raise ValueError(
            f"split_kind='pair' found no pair of primitives to hold out in a pool of {len(pool)}"
            " compositions without losing coverage; enlarge the pool"
        )
    train = tuple(c for c in pool if c not in heldout)
    return train, tuple(sorted(heldout)), tuple(held)


def length_split(
    short: Sequence[Sequence[Composition]],
    long: Sequence[Composition],
    *,
    seed: int,
    n_train: int,
    n_heldout: int,
) -> tuple[tuple[Composition, ...], tuple[Composition, ...]]:
    """Split kind ``length``: train from the shorter compositions, held-out from longer ones.

    Train: a greedy cover (in a seeded order) of every primitive-in-position of ``short`` (one
    candidate list per train length), then each length filled at random up to an equal share
    of ``n_train`` (a length the cover already filled past its share keeps what it has).
    Held-out: up to ``n_heldout`` of ``long`` in a seeded order, keeping only compositions
    whose primitives at the positions train has are trained there and whose adjacent pairs
    (``transitions``) all occur adjacent in some train composition.

    Returns:
        ``(train, heldout)``; ``ValueError`` if no long composition qualifies.
    """
    if n_train < 1 or n_heldout < 1:
        raise ValueError(
            f"split_kind='length' with {n_train} train and {n_heldout} held-out compositions;"
            " allowed: at least 1 of each (pool_size >= 2, 0 < train_fraction < 1)"
        )
    if any(not pool for pool in short) or not long:
        raise ValueError("split_kind='length' with an empty candidate list; give compositions")
    rng = np.random.default_rng(seed)
    by_len = [[pool[i] for i in rng.permutation(len(pool))] for pool in short]
    flat = [c for pool in by_len for c in pool]
    order = [flat[i] for i in rng.permutation(len(flat))]
    pos_of = {c: positions([c]) for c in order}
    train: list[Composition] = []
    needed = positions(order)
    # greedy set cover in the seeded order, as split_compositions does
    while needed:
        best = max(order, key=lambda c: len(pos_of[c] & needed))
        train.append(best)
        needed -= pos_of[best]
    for j, pool in enumerate(by_len):
        share = n_train // len(by_len) + (1 if j < n_train % len(by_len) else 0)
        members = set(pool)
        mine = {c for c in train if c in members}
        train += [c for c in pool if c not in mine][: max(0, share - len(mine))]
    train_pos = positions(train)
    train_next = set().union(*(transitions(c) for c in train))
    span = max(len(c) for c in train)  # the positions train has: 0 .. span - 1
    heldout: list[Composition] = []
    for i in rng.permutation(len(long)):
        c = long[i]
        trained = {(p, k) for p, k in positions([c]) if k < span} <= train_pos
        if trained and transitions(c) <= train_next:
            heldout.append(c)
            if len(heldout) == n_heldout:
                break
    if not heldout:
        raise ValueError(
            "split_kind='length' found no longer composition whose adjacent pairs all occur in"
            f" train ({len(train)} compositions); raise pool_size or train_fraction"
        )
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
            ``envs.metaworld.make_metaworld_split``); ``split_kind`` (``SPLIT_KINDS``, see the
            module docstring) for ``"grid"``, only ``"default"`` elsewhere.

    Examples:
        >>> s = make_split("grid", seed=0)
        >>> set(s.train).isdisjoint(s.heldout)
        True
    """
    if family == "grid":
        from envs.grid import make_grid_split

        return make_grid_split(seed=seed, **kwargs)
    kind = kwargs.pop("split_kind", "default")
    if check_split_kind(kind) != "default":
        raise ValueError(
            f"split_kind={kind!r} for family {family!r}; split kinds other than 'default' exist"
            " only for family 'grid'"
        )
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
