"""CompoGrid: the oracle solves every split composition; bad input fails clearly; check_env."""

from __future__ import annotations

import copy

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import envs
from envs.core import Composition, Task
from envs.grid import (
    _DIRS,
    ACTIONS,
    MAX_LEN,
    PRIMITIVE_INDEX,
    PRIMITIVES,
    Oracle,
    all_compositions,
    validate_composition,
)


def run_oracle(env: gym.Env, seed: int) -> tuple[bool, int, float]:
    env.reset(seed=seed)
    oracle, done, steps, ret = Oracle(), False, 0, 0.0
    while not done:
        _, r, term, trunc, info = env.step(oracle.act(env))
        ret += r
        steps += 1
        done = term or trunc
    return bool(info["success"]), steps, ret


def test_vocabulary_size():
    assert len(PRIMITIVES) >= 10
    assert len(all_compositions((2, 3))) >= 100
    verbs = {p.verb for p in PRIMITIVES}
    assert {"goto", "pickup", "drop", "open", "toggle"} <= verbs


def test_oracle_solves_every_composition_of_default_split():
    split = envs.make_split("grid", seed=0)
    env = gym.make("CompoGrid-v0")
    for i, c in enumerate(split.train + split.heldout):
        env.unwrapped.set_task(Task(c))
        ok, steps, ret = run_oracle(env, seed=i)
        assert ok, f"oracle failed on {c}"
        assert steps <= env.unwrapped.max_steps
        assert ret == pytest.approx(1.0)


@pytest.mark.parametrize("size", [7, 10])
def test_oracle_other_sizes(size):
    env = gym.make("CompoGrid-v0", size=size)
    for i, c in enumerate(all_compositions((3,))[::97]):
        env.unwrapped.set_task(Task(c))
        assert run_oracle(env, seed=100 + i)[0], str(c)


def _clone(e):
    """An independent copy of the unwrapped env's dynamic state (walls never change: shared)."""
    c = copy.copy(e)
    memo = {id(w): w for w in e.grid.grid if w is not None and w.type == "wall"}
    c.grid, c.objects, c.carrying = copy.deepcopy((e.grid, e.objects, e.carrying), memo)
    return c


def fewest_steps_to_success(e, horizon: int) -> int | None:
    """Brute force: BFS over every action sequence of length <= ``horizon`` on env copies
    (states deduplicated); the fewest steps that complete the task, or None."""
    frontier, seen = [e], set()
    for depth in range(1, horizon + 1):
        nxt = []
        for s in frontier:
            for a in range(len(ACTIONS)):
                c = _clone(s)
                *_, info = c.step(a)
                if info["success"]:
                    return depth
                pos = tuple(int(v) for v in c.agent_pos)
                key = (pos, c.agent_dir, c.carried_name(), c.progress, c.grid.encode().tobytes())
                if key not in seen:
                    seen.add(key)
                    nxt.append(c)
        frontier = nxt
    return None


def test_oracle_is_shortest_on_hidden_goal_family():
    # goto a ball within 5 steps: picking up (or opening) an object in the way is sometimes the
    # only way in time, so a planner treating every object as a wall is not an upper bound
    split = envs.make_split("grid-layouts:goto(red ball);goto(blue ball)", seed=0)
    solved = 0
    for c in split.heldout:
        for layout in split.meta["heldout_layout_seeds"][:75]:
            kw = {"composition": str(c), "size": 7, "max_steps": 5, "layout_seed": layout}
            env = gym.make("CompoGrid-v0", **kw)
            env.reset(seed=0)
            best = fewest_steps_to_success(_clone(env.unwrapped), 5)
            ok, steps, _ = run_oracle(env, seed=0)
            assert ok == (best is not None), f"{c} @ {layout}: oracle {ok}, brute force {best}"
            if ok:
                assert steps == best, f"{c} @ {layout}: oracle {steps} steps, shortest {best}"
                solved += 1
    assert 0 < solved < 2 * 75  # some layouts are out of reach in 5 steps, some are not


def test_oracle_already_facing_goto_target_keeps_facing():
    # goto is checked after a step: an oracle facing its target must not turn away
    env = gym.make("CompoGrid-v0", composition="goto(red ball) > open(door)")
    env.reset(seed=0)
    e = env.unwrapped
    bx, by = e.entity_cell("red ball")
    for d, (dx, dy) in enumerate(_DIRS):
        if e.grid.get(bx - dx, by - dy) is None:
            e.agent_pos, e.agent_dir = (bx - dx, by - dy), d
            break
    assert e.front_entity() == "red ball"
    _, r, *_ = env.step(Oracle().act(env))
    assert r == pytest.approx(0.5) and e.progress == 1


def test_reward_is_one_over_L_per_subtask_in_order():
    env = gym.make("CompoGrid-v0", composition="pickup(red ball) > open(door) > drop(red ball)")
    env.reset(seed=3)
    oracle, rewards = Oracle(), []
    done = False
    while not done:
        _, r, term, trunc, info = env.step(oracle.act(env))
        rewards.append(r)
        done = term or trunc
    paid = [r for r in rewards if r > 0]
    assert paid == pytest.approx([1 / 3] * 3)
    assert term and not trunc and info["success"]


def test_out_of_order_completion_is_not_paid():
    # toggling the door first pays nothing: only the next sub-task in order is checked
    env = gym.make("CompoGrid-v0", composition="goto(red ball) > toggle(door)")
    env.reset(seed=0)
    u = env.unwrapped
    u.objects["door"].is_open = True  # simulate an out-of-order toggle
    _, r, *_ = env.step(0)
    assert r == 0.0 and u.progress == 0


def test_truncation_not_termination():
    env = gym.make("CompoGrid-v0", composition="pickup(red ball) > open(door)", max_steps=5)
    env.reset(seed=0)
    for _ in range(5):
        _, r, term, trunc, info = env.step(0)  # spin left forever
    assert trunc and not term and not info["success"]


def test_instruction_mode_reveals_tokens_reward_mode_hides_them():
    c = "pickup(red ball) > open(door)"
    a = gym.make("CompoGrid-v0", composition=c, task_info="instruction").reset(seed=0)[0]
    b = gym.make("CompoGrid-v0", composition=c, task_info="reward").reset(seed=0)[0]
    n_instr = MAX_LEN * len(PRIMITIVES)
    assert a[-n_instr:].sum() == 2 and b[-n_instr:].sum() == 0
    np.testing.assert_array_equal(a[:-n_instr], b[:-n_instr])
    # four positions (split kind 'length' holds out length 4), one token each, in order; the
    # observation has the same size whatever the length
    c4 = Composition.parse("goto(door) > pickup(red ball) > open(door) > drop(red ball)")
    o4 = gym.make("CompoGrid-v0", composition=c4, task_info="instruction").reset(seed=0)[0]
    tokens = o4[-n_instr:].reshape(MAX_LEN, len(PRIMITIVES))
    assert MAX_LEN == 4 and o4.shape == a.shape
    assert [int(t.argmax()) for t in tokens] == [PRIMITIVE_INDEX[p] for p in c4]
    assert (tokens.sum(axis=1) == 1).all()


def test_cell_onehot_appends_the_agent_cell_and_changes_nothing_else():
    a = gym.make("CompoGrid-v0", cell_onehot=True, size=9)
    b = gym.make("CompoGrid-v0", size=9)
    oa, ob = a.reset(seed=3)[0], b.reset(seed=3)[0]
    assert oa.shape == (ob.shape[0] + 18,) and a.observation_space.shape == oa.shape
    for action in (2, 1, 2, 2, 0, 2):
        oa, *_, info = a.step(action)
        ob = b.step(action)[0]
        np.testing.assert_array_equal(oa[: ob.shape[0]], ob)
        x, y = info["phi"][:2]
        assert oa[ob.shape[0] + x] == 1 and oa[ob.shape[0] + 9 + y] == 1
        assert oa[ob.shape[0] :].sum() == 2


def test_layout_from_seed_and_fixed_layout_seed():
    env = gym.make("CompoGrid-v0")
    o1 = env.reset(seed=1)[0]
    o2 = env.reset(seed=2)[0]
    o1b = env.reset(seed=1)[0]
    assert not np.array_equal(o1, o2)
    np.testing.assert_array_equal(o1, o1b)
    env2 = gym.make("CompoGrid-v0", layout_seed=7)
    np.testing.assert_array_equal(env2.reset(seed=1)[0], env2.reset(seed=2)[0])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"composition": "pickup(pink ball) > open(door)"}, "unknown object 'pink ball'"),
        ({"composition": "jump(red ball) > open(door)"}, "unknown verb 'jump'"),
        ({"composition": "pickup(grey box)"}, "does not exist"),
        ({"composition": "drop(red ball) > open(door)"}, "infeasible composition"),
        ({"composition": "open(grey box) > goto(grey box)"}, "infeasible composition"),
        ({"composition": "pickup red ball"}, "cannot parse primitive"),
        ({"composition": " > ".join(["goto(door)", "goto(red ball)"] * 3)}, "has length 6"),
        ({"size": 6}, "size=6 is too small"),
        ({"task_info": "oracle"}, "task_info='oracle'"),
        ({"cell_onehot": 1}, "cell_onehot=1; allowed: true or false"),
    ],
)
def test_bad_input_raises_one_clear_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        gym.make("CompoGrid-v0", **kwargs)


def test_composition_round_trip():
    text = "pickup(blue ball)  >goto( red ball )"
    c = Composition.parse(text)
    assert str(c) == "pickup(blue ball) > goto(red ball)"
    assert Composition.parse(str(c)) == c
    assert validate_composition(c) == c


@pytest.mark.parametrize("env_id", ["CompoGrid-v0", "CompoMetaWorld-v0"])
def test_check_env(env_id):
    check_env(gym.make(env_id).unwrapped, skip_render_check=True)


@pytest.mark.parametrize("env_id", ["CompoGrid-v0", "CompoMetaWorld-v0"])
def test_same_seed_same_rollout(env_id):
    def rollout():
        env = gym.make(env_id)
        env.action_space.seed(5)
        obs, _ = env.reset(seed=11)
        out = [obs]
        for _ in range(40):
            obs, r, term, trunc, _ = env.step(env.action_space.sample())
            out.append(np.append(obs, [r, term, trunc]))
            if term or trunc:
                out.append(env.reset()[0])
        return np.concatenate(out)

    np.testing.assert_array_equal(rollout(), rollout())
