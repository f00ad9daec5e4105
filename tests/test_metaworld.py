"""Compositional Meta-World: the verb/object table, the splits and the gymnasium env."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env
from metaworld import env_dict as mw_env_dict

import envs  # noqa: F401  (registers CompoMetaWorld-v0)
from envs.core import Composition, Primitive, Split, Task, make_split
from envs.metaworld import (
    HELDOUT_LAYOUT_SEEDS,
    PRIMITIVES,
    TASKS,
    TRAIN_LAYOUT_SEEDS,
    CompoMetaWorldEnv,
    ML1Split,
    composition_for,
    make_metaworld_split,
    metaworld_env_name,
    split_tasks,
)

# --- table --------------------------------------------------------------------------------------


def test_table_maps_every_v3_name_injectively():
    assert set(TASKS) == set(mw_env_dict.ALL_V3_ENVIRONMENTS)
    assert len(TASKS) == 50
    assert len(set(TASKS.values())) == len(TASKS), "two v3 tasks share a primitive"
    assert all(isinstance(p, Primitive) for p in TASKS.values())


def test_text_round_trips_to_env_name():
    assert metaworld_env_name(Composition.parse("open(door)")) == "door-open-v3"
    assert metaworld_env_name("open(door)") == "door-open-v3"
    assert metaworld_env_name(Primitive("open", "door")) == "door-open-v3"
    assert metaworld_env_name("door-open-v3") == "door-open-v3"
    for name, prim in TASKS.items():
        # the canonical text must parse back to the same primitive (verb/object syntax is valid)
        assert metaworld_env_name(Composition.parse(str(prim))) == name
        assert composition_for(name) == Composition((prim,))


@pytest.mark.parametrize("bad", ["fly(kite)", "open(door) > close(door)", "kite-fly-v3", ""])
def test_unknown_task_raises_naming_it(bad):
    with pytest.raises(ValueError) as e:
        metaworld_env_name(bad)
    assert repr(bad) in str(e.value) or "2 primitives" in str(e.value)


# --- splits -------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_compositional_split_properties(seed):
    s = make_split("metaworld", seed=seed)
    assert isinstance(s, Split)
    assert set(s.train).isdisjoint(s.heldout)
    assert len(s.heldout) >= 8
    assert set(s.train) | set(s.heldout) == {Composition((p,)) for p in PRIMITIVES}
    train_verbs = {c[0].verb for c in s.train}
    train_objs = {c[0].obj for c in s.train}
    for c in s.heldout:
        assert len(c) == 1
        assert c[0].verb in train_verbs and c[0].obj in train_objs, str(c)
    assert s.meta["benchmark"] == "metaworld"
    assert s.primitives == PRIMITIVES


def test_compositional_split_is_seeded():
    assert make_split("metaworld", seed=3) == make_split("metaworld", seed=3)
    heldouts = {make_split("metaworld", seed=s).heldout for s in range(5)}
    assert len(heldouts) > 1


def test_compositional_split_size_limits():
    assert len(make_split("metaworld", seed=0, n_heldout=12).heldout) == 12
    with pytest.raises(ValueError, match="n_heldout"):
        make_split("metaworld", seed=0, n_heldout=40)  # coverage cannot survive that many
    with pytest.raises(ValueError, match="n_heldout"):
        make_split("metaworld", seed=0, n_heldout=3)  # below the required 8


@pytest.mark.parametrize("family,classes", [("ML10", "ML10_V3"), ("ML45", "ML45_V3")])
def test_benchmark_splits_match_metaworld(family, classes):
    s = make_split(family, seed=0)
    ref = getattr(mw_env_dict, classes)
    assert [metaworld_env_name(c) for c in s.train] == list(ref["train"])
    assert [metaworld_env_name(c) for c in s.heldout] == list(ref["test"])
    assert set(s.train).isdisjoint(s.heldout)
    assert s.meta["benchmark"] == family
    with pytest.raises(ValueError, match="n_heldout"):
        make_split(family, n_heldout=10)


def test_ml1_split_same_task_disjoint_goals():
    s = make_split("ML1:reach-v3")
    assert isinstance(s, ML1Split) and isinstance(s, Split)
    assert s.train == s.heldout == (Composition.parse("reach(goal)"),)
    assert s.meta["ml1"] == "reach-v3"
    assert set(s.meta["train_layout_seeds"]).isdisjoint(s.meta["heldout_layout_seeds"])
    d = s.to_dict()
    assert d["train"] == ["reach(goal)"] and d["heldout_layout_seeds"] == list(HELDOUT_LAYOUT_SEEDS)
    assert split_tasks(s, "heldout")[0] == Task(s.train[0], HELDOUT_LAYOUT_SEEDS[0])
    assert len(split_tasks(s, "train")) == len(TRAIN_LAYOUT_SEEDS)


@pytest.mark.parametrize("family", ["ML1:kite-fly-v3", "ML1:reach", "ML25"])
def test_unknown_family_or_name_raises(family):
    with pytest.raises(ValueError) as e:
        make_metaworld_split(family)
    msg = str(e.value)
    assert repr(family.removeprefix("ML1:")) in msg and "allowed" in msg


# --- environment --------------------------------------------------------------------------------


def test_gym_make_passes_env_checker():
    env = gym.make("CompoMetaWorld-v0")
    assert env.observation_space.shape == (39,) and env.observation_space.dtype == np.float32
    assert env.action_space == gym.spaces.Box(-1.0, 1.0, (4,), np.float32)
    check_env(env.unwrapped, skip_render_check=True)
    env.close()


def _rollout(seed: int, layout_seed: int | None, n: int = 30) -> tuple[np.ndarray, list]:
    env = CompoMetaWorldEnv(composition="open(door)", layout_seed=layout_seed)
    obs, info = env.reset(seed=seed)
    actions = np.random.default_rng(123).uniform(-1, 1, (n, 4)).astype(np.float32)
    out, rewards = [obs], []
    for a in actions:
        obs, r, terminated, truncated, info = env.step(a)
        assert obs.dtype == np.float32 and obs.shape == (39,)
        assert not terminated and not truncated
        assert info["phi"].dtype == np.float32 and info["phi"].shape == (6,)
        np.testing.assert_array_equal(info["phi"], np.concatenate([obs[:3], obs[4:7]]))
        out.append(obs)
        rewards.append(r)
    env.close()
    return np.array(out), rewards


@pytest.mark.parametrize("layout_seed", [None, 7])
def test_same_seed_same_rollout(layout_seed):
    a, ra = _rollout(seed=5, layout_seed=layout_seed)
    b, rb = _rollout(seed=5, layout_seed=layout_seed)
    np.testing.assert_array_equal(a, b)
    assert ra == rb


def test_tasks_change_the_goal():
    env = CompoMetaWorldEnv(composition="reach(goal)")
    door = Composition.parse("open(door)")
    env.set_task(Task(door, 0))
    env.reset(seed=0)
    assert env.env_name == "door-open-v3" and env.goal_index == 0
    goal0 = env.mw_env._target_pos.copy()
    # the rollout collector's path: set_attr("pending_task", ...) then reset
    env.pending_task = Task(door, 57)
    env.reset()
    assert env.pending_task is None and env.goal_index == 57
    assert not np.allclose(goal0, env.mw_env._target_pos)
    # same seed, same goal again
    env.reset(options={"task": Task(door, 0)})
    np.testing.assert_array_equal(goal0, env.mw_env._target_pos)
    # and back to another env
    env.reset(options={"task": Task(Composition.parse("reach(goal)"), 1)})
    assert env.env_name == "reach-v3"
    env.close()


def test_success_is_sticky_and_truncation_at_max_steps():
    from metaworld.policies.sawyer_reach_v3_policy import SawyerReachV3Policy

    env = CompoMetaWorldEnv(composition="reach(goal)", layout_seed=3, max_steps=120)
    policy = SawyerReachV3Policy()
    obs, info = env.reset(seed=0)
    assert info["success"] is False
    successes = []
    for t in range(120):
        # the scripted policy needs the goal the agent is denied; take it from the simulator
        full = obs.astype(np.float64)
        full[-3:] = env.mw_env._target_pos
        obs, _, terminated, truncated, info = env.step(policy.get_action(full))
        successes.append(info["success"])
        assert not terminated
        assert truncated == (t == 119)
    first = successes.index(True)
    assert all(successes[first:])
    env.close()


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="task_info"):
        CompoMetaWorldEnv(task_info="instruction")
    with pytest.raises(ValueError, match="fly"):
        CompoMetaWorldEnv(composition="fly(kite)")
    with pytest.raises(ValueError, match="max_steps"):
        CompoMetaWorldEnv(max_steps=0)
