"""Splits: seeded, disjoint, every primitive and primitive-in-position covered by train."""

from __future__ import annotations

import pytest

import envs
from envs.core import Composition, Split, make_split, positions, split_compositions
from envs.grid import all_compositions


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_grid_split_coverage(seed):
    s = envs.make_split("grid", seed=seed)
    assert set(s.train).isdisjoint(s.heldout)
    assert len(s.train) + len(s.heldout) >= 100
    assert len(s.train) == len(s.heldout)  # default 50/50
    used = {p for c in s.train + s.heldout for p in c}
    train_prims = {p for c in s.train for p in c}
    assert used <= train_prims
    assert positions(s.heldout) <= positions(s.train)
    assert {len(c) for c in s.train} == {2, 3}


def test_every_primitive_appears_in_train():
    s = envs.make_split("grid", seed=0)
    assert {p for c in s.train for p in c} == set(s.primitives)


def test_split_is_seeded():
    a, b, c = (envs.make_split("grid", seed=k) for k in (0, 0, 1))
    assert a.train == b.train and a.heldout == b.heldout
    assert a.train != c.train


def test_split_cover_property_on_random_pools():
    pool = all_compositions((2,))
    for seed in range(5):
        tr, ho = split_compositions(pool[seed * 20 : seed * 20 + 40], seed=seed)
        assert positions(ho) <= positions(tr)
        assert set(tr).isdisjoint(ho)


def test_overlapping_or_empty_split_rejected():
    c1 = Composition.parse("goto(red ball) > goto(door)")
    c2 = Composition.parse("goto(blue ball) > goto(door)")
    with pytest.raises(ValueError, match="overlap"):
        Split("grid", (c1, c2), (c2,), ())
    with pytest.raises(ValueError, match="empty held-out"):
        Split("grid", (c1,), (), ())
    with pytest.raises(ValueError, match="empty train"):
        Split("grid", (), (c1,), ())


def test_unknown_family():
    with pytest.raises(ValueError, match="unknown task family 'atari'"):
        envs.make_split("atari")


def test_grid_layout_split_shares_compositions_and_separates_layouts():
    from envs.core import LayoutSplit

    fam = "grid-layouts:goto(red ball);goto(blue ball)"
    s = make_split(fam, seed=3)
    assert isinstance(s, LayoutSplit) and s.family == fam
    assert (
        [str(c) for c in s.train]
        == ["goto(red ball)", "goto(blue ball)"]
        == [str(c) for c in s.heldout]
    )
    tr, he = s.meta["train_layout_seeds"], s.meta["heldout_layout_seeds"]
    assert len(tr) == len(he) == 1000 and not set(tr) & set(he)
    assert set(tr) | set(he) == set(range(2000))
    assert s == make_split(fam, seed=3) and tr == make_split(fam, seed=3).meta["train_layout_seeds"]
    assert tr != make_split(fam, seed=4).meta["train_layout_seeds"]
    d = s.to_dict()
    assert d["train_layout_seeds"] == tr and d["heldout_layout_seeds"] == he
    # training draws only train layouts; the protocol's held-out tasks only held-out ones
    from rl.config import BaseConfig
    from rl.protocol import heldout_tasks

    cfg = BaseConfig(split_family=fam, split_seed=3)
    assert cfg.train_compositions() == ["goto(red ball)", "goto(blue ball)"]
    assert cfg.train_layout_seeds() == tr
    assert {t.layout_seed for t in heldout_tasks(s.heldout, 50, 0, he)} <= set(he)


def test_layout_split_bad_input():
    from envs.core import LayoutSplit

    with pytest.raises(
        ValueError, match="unknown grid primitive|verb|object|feasible|goto\\(moon\\)"
    ):
        make_split("grid-layouts:goto(moon)")
    with pytest.raises(ValueError, match="grid-layouts family with no compositions"):
        make_split("grid-layouts:")
    c = make_split("grid-layouts:goto(door)").train
    with pytest.raises(ValueError, match="disjoint"):
        LayoutSplit("x", c, c, (), meta={"train_layout_seeds": [1], "heldout_layout_seeds": [1]})
    with pytest.raises(ValueError, match="train == heldout"):
        LayoutSplit("x", c, make_split("grid-layouts:goto(red ball)").train, ())
