"""Split kinds of CompoGrid (issue 16 item 4): ``order``, ``pair`` and ``length`` satisfy their
definitions on several seeds with their coverage guarantees; ``default`` is today's split,
unchanged."""

from __future__ import annotations

import hashlib
import json

import gymnasium as gym
import pytest

import envs
from envs.core import (
    Composition,
    Task,
    multiset_key,
    positions,
    primitive_pairs,
    split_compositions,
    transitions,
)
from envs.grid import MAX_LEN, PRIMITIVES, Oracle, all_compositions

SEEDS = [0, 1, 2, 3, 4]


def _covered(s: envs.Split) -> None:
    """The guarantee every kind keeps: disjoint sides, every primitive in train, every
    primitive-in-position of held-out trained."""
    assert set(s.train).isdisjoint(s.heldout) and s.heldout
    assert {p for c in s.train for p in c} == set(PRIMITIVES)
    assert positions(s.heldout) <= positions(s.train)
    assert len(s.train) + len(s.heldout) >= 100


# sha256 of json.dumps([train texts, held-out texts]) of make_split("grid", seed=k), computed at
# commit 36990f3, before split kinds existed: every number produced on the default split
# stays reproducible only if these stay put
DEFAULT_SPLIT_SHA256 = {
    0: "edae1b9690e4febe91e30a94cd62870d0d859942330d8851785cc876adeb2189",
    1: "f833db25a3a2f123ed2c6637a69379b2b952c0d40ab682ed2a7ee2504091bf1e",
    2: "26aefb22c0dd8c5c5f0d038108071759ee0b38ca37de806e62799d150cca902f",
    3: "5643af99f840ae1bf778bee02f80b325531233a1324ee2f5bb784f4db77e3e67",
    4: "5f49d455cb2c5be2204d85dd0e857fbab3cb81c70a8a6eded498a504dc6ec983",
}


def _digest(s: envs.Split) -> str:
    text = json.dumps([[str(c) for c in s.train], [str(c) for c in s.heldout]])
    return hashlib.sha256(text.encode()).hexdigest()


@pytest.mark.parametrize("seed", SEEDS)
def test_default_split_is_unchanged(seed):
    s = envs.make_split("grid", seed=seed)
    assert _digest(s) == DEFAULT_SPLIT_SHA256[seed]
    explicit = envs.make_split("grid", seed=seed, split_kind="default")
    assert (explicit.train, explicit.heldout) == (s.train, s.heldout)
    assert s.meta["split_kind"] == "default" and s.to_dict()["kind"] == "default"


@pytest.mark.parametrize("seed", SEEDS)
def test_order_kind_holds_new_orders_of_trained_multisets(seed):
    s = envs.make_split("grid", seed=seed, split_kind="order")
    _covered(s)
    by_key: dict[tuple, list[Composition]] = {}
    for t in s.train:
        by_key.setdefault(multiset_key(t), []).append(t)
    for h in s.heldout:
        # some train composition has the same primitives (with multiplicity) in another order
        siblings = by_key.get(multiset_key(h), [])
        assert siblings and all(t != h for t in siblings)
        assert sorted(siblings[0]) == sorted(h)
    # so every primitive pair of a held-out composition was seen together in train
    seen = set().union(*(primitive_pairs(t) for t in s.train))
    assert all(primitive_pairs(h) <= seen for h in s.heldout)
    assert {len(c) for c in s.heldout} == {2, 3}
    assert s.to_dict()["kind"] == "order"


@pytest.mark.parametrize("seed", SEEDS)
def test_pair_kind_holds_compositions_with_an_unseen_pair(seed):
    s = envs.make_split("grid", seed=seed, split_kind="pair")
    _covered(s)
    seen = set().union(*(primitive_pairs(t) for t in s.train))
    for h in s.heldout:
        assert primitive_pairs(h) - seen, f"{h} has no pair unseen in train"
    # the recorded held-out pairs: none in any train composition, one in every held-out one
    held = [frozenset(map(envs.Primitive.parse, t.split(" + "))) for t in s.meta["heldout_pairs"]]
    assert held and not set(held) & seen
    assert all(set(held) & primitive_pairs(h) for h in s.heldout)
    assert s.to_dict()["heldout_pairs"] == s.meta["heldout_pairs"]
    # the same pool as the default split of the seed, partitioned differently
    d = envs.make_split("grid", seed=seed)
    assert set(s.train) | set(s.heldout) == set(d.train) | set(d.heldout)
    assert set(s.heldout) != set(d.heldout)


@pytest.mark.parametrize("seed", SEEDS)
def test_length_kind_trains_on_2_3_and_holds_out_4(seed):
    s = envs.make_split("grid", seed=seed, split_kind="length")
    assert set(s.train).isdisjoint(s.heldout) and s.heldout
    # train: lengths 2 and 3, an equal share each; held-out: length 4 only, the rest of the pool
    assert [sum(len(c) == n for c in s.train) for n in (2, 3)] == [50, 50]
    assert {len(c) for c in s.heldout} == {4} and len(s.heldout) == 100
    # every primitive is trained, and every primitive-in-position that train can have: all of
    # those of the held-out compositions' first three positions
    assert {p for c in s.train for p in c} == set(PRIMITIVES)
    assert positions(s.train) == positions(all_compositions((2, 3)))
    assert {(p, i) for p, i in positions(s.heldout) if i < 3} <= positions(s.train)
    # no train composition has a 4th position; in its place every adjacent pair (which
    # sub-task follows which) of a held-out composition occurs adjacent in train
    assert not {i for _, i in positions(s.train)} & {3}
    seen = set().union(*(transitions(t) for t in s.train))
    assert all(transitions(h) <= seen for h in s.heldout)
    # and that is a real constraint: most length-4 compositions have an unseen transition
    unseen = [c for c in all_compositions((4,)) if not transitions(c) <= seen]
    assert len(unseen) > len(all_compositions((4,))) // 2
    assert s.meta["lengths"] == [2, 3, 4] and s.meta["train_lengths"] == [2, 3]
    d = s.to_dict()
    assert d["kind"] == "length" and d["train_lengths"] == [2, 3] and d["heldout_length"] == 4


def test_length_kind_is_feasible_in_the_room():
    """Every held-out length-4 composition of a length split is solved by the oracle in the
    reference env (opened boxes are gone and the agent carries one object at a time: the
    split's feasibility filter, ``infeasibility``, must match what the room allows)."""
    s = envs.make_split("grid", seed=0, split_kind="length")
    env = gym.make("CompoGrid-v0", disable_env_checker=True).unwrapped
    oracle = Oracle()
    for i, c in enumerate(s.heldout):
        env.reset(seed=i, options={"task": Task(c)})
        done, ret = False, 0.0
        while not done:
            _, r, term, trunc, info = env.step(oracle.act(env))
            ret += r
            done = term or trunc
        assert info["success"] and ret == pytest.approx(1.0), str(c)
        assert env.step_count <= 5 * 8 * 4 == env.max_steps


def test_length_kind_other_lengths():
    # train on length 2 only: held out length 3; or hold out 4 explicitly from length 2
    s = envs.make_split("grid", seed=1, split_kind="length", lengths=(2,))
    assert {len(c) for c in s.train} == {2} and {len(c) for c in s.heldout} == {3}
    s = envs.make_split("grid", seed=1, split_kind="length", lengths=(2,), heldout_length=4)
    assert {len(c) for c in s.heldout} == {4} and s.meta["lengths"] == [2, 4]


@pytest.mark.parametrize("kind", ["order", "pair", "length"])
def test_kinds_are_seeded(kind):
    a, b, c = (envs.make_split("grid", seed=k, split_kind=kind) for k in (0, 0, 1))
    assert (a.train, a.heldout) == (b.train, b.heldout)
    assert a.heldout != c.heldout


def test_default_split_would_fail_the_new_definitions():
    # the kinds are real constraints: the default split's held-out side satisfies neither
    d = envs.make_split("grid", seed=0)
    keys = {multiset_key(t) for t in d.train}
    seen = set().union(*(primitive_pairs(t) for t in d.train))
    assert not all(multiset_key(h) in keys for h in d.heldout)
    assert not all(primitive_pairs(h) - seen for h in d.heldout)


def test_split_compositions_must_train():
    pool = envs.grid.all_compositions((2,))[:40]
    forced = pool[:5]
    tr, ho = split_compositions(pool, seed=0, must_train=forced)
    assert set(forced) <= set(tr) and positions(ho) <= positions(tr)
    with pytest.raises(ValueError, match="must_train holds compositions that are not in the pool"):
        split_compositions(pool[:10], seed=0, must_train=pool[10:11])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"split_kind": "orders"}, "split_kind='orders'; allowed: default, order, pair, length"),
        # lengths the env cannot build
        ({"split_kind": "length", "heldout_length": 5}, "heldout_length=5: the env builds"),
        ({"split_kind": "length", "lengths": (2, 3, 4)}, "which the env cannot build"),
        ({"split_kind": "default", "lengths": (2, 5)}, r"lengths=\(2, 5\); allowed: a subset"),
        ({"split_kind": "length", "heldout_length": 3}, "heldout_length=3 is not longer"),
        ({"split_kind": "order", "heldout_length": 4}, "only with split_kind='length'"),
        ({"split_kind": "length", "train_fraction": 1.0}, "train_fraction=1.0"),
    ],
)
def test_bad_split_input_fails_in_one_line(kwargs, match):
    with pytest.raises(ValueError, match=match) as e:
        envs.make_split("grid", **kwargs)
    assert "\n" not in str(e.value)
    five = " > ".join(["goto(door)", "goto(red ball)"] * 2 + ["goto(door)"])
    with pytest.raises(ValueError, match=f"has length 5; allowed lengths: 1..{MAX_LEN}"):
        envs.grid.validate_composition(five)


def test_bad_split_kinds_fail_in_one_line():
    with pytest.raises(ValueError, match="exist only for family 'grid'"):
        envs.make_split("metaworld", split_kind="pair")
    # 'default' is accepted everywhere (it is what every family does)
    fam = "grid-layouts:goto(red ball);goto(door)"
    assert envs.make_split(fam, split_kind="default") == envs.make_split(fam)
    with pytest.raises(ValueError, match="length 1 has no composition with another feasible"):
        envs.make_split("grid", split_kind="order", lengths=(1, 2))
    with pytest.raises(ValueError, match="train_fraction=1.5"):
        envs.make_split("grid", split_kind="order", train_fraction=1.5)


def test_heldout_split_kind_reaches_training_and_evaluation(tmp_path, capsys):
    from experiments.cli import main
    from experiments.heldout import HeldoutConfig, eval_tasks, method_run_config
    from rl.config import config_from_dict

    cfg = config_from_dict(HeldoutConfig, {"split_kwargs": {"split_kind": "pair"}})
    split, tasks = eval_tasks(cfg)
    assert split.meta["split_kind"] == "pair"
    assert {t.composition for t in tasks} <= set(split.heldout)
    rc = method_run_config(cfg, cfg.method_specs()[0], 0)
    assert rc["compositions"] == [str(c) for c in split.train]
    out = tmp_path / "x"
    assert main(["heldout", "--out", str(out), "--set", "split_kwargs.split_kind=lenght"]) == 2
    assert "split_kind='lenght'; allowed: default, order, pair, length" in capsys.readouterr().err
    assert not out.exists()
    bad = ["--set", "split_kwargs.split_kind=length", "--set", "split_kwargs.heldout_length=5"]
    assert main(["heldout", "--out", str(out), *bad]) == 2
    err = capsys.readouterr().err.strip()
    assert "heldout_length=5: the env builds compositions of length 1..4" in err
    assert not out.exists()


def test_heldout_length_kind_end_to_end(tmp_path):
    """``compo heldout`` on split kind ``length`` at a tiny budget: PPO trained on lengths 2-3,
    every row evaluated on held-out length-4 tasks; the oracle solves them all and the ideal
    observer (whose hypotheses include length 4) solves them once it has found them."""
    from experiments.cli import main

    out = tmp_path / "run"
    args = [
        "--set", "split_kwargs.split_kind=length", "--set", "methods=[ppo]",
        "--set", "references=[random, oracle, ideal_observer]", "--set", "seeds=[0]",
        "--set", "total_env_steps=256", "--set", "num_envs=2",
        "--set", "method_config.ppo.ppo.num_steps=64",
        "--set", "eval.episodes=3", "--set", "eval.num_tasks=2", "--set", "eval.num_envs=2",
    ]  # fmt: skip
    assert main(["heldout", "--out", str(out), *args]) == 0
    doc = json.loads((out / "results.json").read_text())
    split = doc["split"]
    assert split["kind"] == "length" and split["heldout_length"] == 4
    assert {len(Composition.parse(c)) for c in split["train"]} == {2, 3}
    assert {len(Composition.parse(c)) for c in split["heldout"]} == {4}
    assert set(doc["methods"]) == {"ppo", "random", "oracle", "ideal_observer"}
    assert doc["methods"]["oracle"]["success_at"] == [1.0, 1.0, 1.0]
    assert doc["methods"]["ideal_observer"]["success_at"][-1] == 1.0
    assert len(doc["methods"]["ppo"]["success_at"]) == 3
