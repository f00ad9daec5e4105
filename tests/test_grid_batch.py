"""The batched CompoGrid against the reference ``CompoGridEnv``, step for step."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest

import envs
from envs.core import Task
from envs.grid import Oracle, all_compositions
from envs.grid_batch import MAX_ENVS, CompoGridVectorEnv

# lengths 2-3 (every split) and a spread of length 4 (split kind 'length' holds it out)
COMPS = all_compositions((2, 3)) + all_compositions((4,))[::37]


def _ref(**kw):
    return gym.make("CompoGrid-v0", disable_env_checker=True, **kw).unwrapped


def _same(ref_out, batch_out, i: int) -> None:
    o, r, te, tr, info = ref_out
    bo, br, bte, btr, binfo = batch_out
    np.testing.assert_array_equal(o, bo[i])
    assert (r, te, tr) == (br[i], bte[i], btr[i])
    assert info["success"] == binfo["success"][i]
    assert info["progress"] == binfo["progress"][i]
    np.testing.assert_array_equal(info["phi"], binfo["phi"][i])


@pytest.mark.parametrize("task_info", ["reward", "instruction"])
@pytest.mark.parametrize("cell_onehot", [False, True])
def test_random_actions_match_reference(task_info, cell_onehot):
    """>= 20k random-action steps over >= 200 (composition, layout) pairs across the four
    parametrisations; fixed and fresh layouts; mixed lengths in one batch."""
    rng = np.random.default_rng(hash((task_info, cell_onehot)) % 2**32)
    B = 16
    v = CompoGridVectorEnv(
        B, task_info=task_info, cell_onehot=cell_onehot, autoreset_mode="Disabled"
    )
    refs = [_ref(task_info=task_info, cell_onehot=cell_onehot) for _ in range(B)]
    steps = pairs = 0
    for _trial in range(4):
        tasks = {
            i: Task(COMPS[rng.integers(len(COMPS))], int(rng.integers(10**6)) if i % 2 else None)
            for i in range(B)
        }
        seeds = [int(rng.integers(2**31)) for _ in range(B)]
        obs, info = v.reset(seed=seeds, options={"tasks": tasks})
        for i in range(B):
            o, inf = refs[i].reset(seed=seeds[i], options={"task": tasks[i]})
            np.testing.assert_array_equal(o, obs[i])
            np.testing.assert_array_equal(inf["phi"], info["phi"][i])
        pairs += B
        alive = np.ones(B, dtype=bool)
        while alive.any():
            a = rng.integers(6, size=B)
            out = v.step(a)
            for i in np.flatnonzero(alive):
                ref_out = refs[i].step(int(a[i]))
                _same(ref_out, out, int(i))
                steps += 1
                alive[i] = not (ref_out[2] or ref_out[3])
            done = out[2] | out[3]
            if done.any():  # keep the finished envs stepping a throw-away episode
                v.reset(options={"reset_mask": done})
    assert pairs >= 64 and steps >= 5_000


@pytest.mark.parametrize("kind", ["default", "length"])
def test_oracle_trajectories_match_reference(kind):
    """Every held-out composition of the default split (lengths 2-3) and of the length split
    (length 4), solved by the oracle on the reference env; the batched env sees the same
    actions and must agree on every step and succeed."""
    split = envs.make_split("grid", seed=0, split_kind=kind)
    comps = list(split.heldout)
    for task_info in ("reward", "instruction"):
        v = CompoGridVectorEnv(len(comps), task_info=task_info, autoreset_mode="Disabled")
        tasks = {i: Task(c, 1000 + i) for i, c in enumerate(comps)}
        v.reset(seed=list(range(len(comps))), options={"tasks": tasks})
        refs = [_ref(task_info=task_info) for _ in comps]
        for i, r in enumerate(refs):
            r.reset(seed=i, options={"task": tasks[i]})
        oracle = Oracle()
        alive = np.ones(len(comps), dtype=bool)
        successes = 0
        while alive.any():
            a = np.zeros(len(comps), dtype=np.int64)
            for i in np.flatnonzero(alive):
                a[i] = oracle.act(refs[i])
            out = v.step(a)
            for i in np.flatnonzero(alive):
                ref_out = refs[i].step(int(a[i]))
                _same(ref_out, out, int(i))
                if ref_out[2] or ref_out[3]:
                    alive[i] = False
                    successes += int(ref_out[4]["success"])
        assert successes == len(comps)


def test_make_vec_starts_from_the_reference_layout():
    c = "pickup(green key) > goto(door) > open(purple box)"
    for s in (0, 7, 123):
        v = gym.make_vec(
            "CompoGrid-v0", num_envs=3, vectorization_mode="vector_entry_point",
            layout_seed=s, composition=c,
        )  # fmt: skip
        assert isinstance(v, CompoGridVectorEnv)
        obs, _ = v.reset(seed=5)
        ref_obs, _ = gym.make("CompoGrid-v0", layout_seed=s, composition=c).reset(seed=5)
        for i in range(3):
            np.testing.assert_array_equal(obs[i], ref_obs)


def test_state_loads_into_reference_env_and_continues():
    """``env_at`` gives a CompoGridEnv in the same state: same observation, and stepping both on
    gives the same results (so traces can render any batched rollout)."""
    rng = np.random.default_rng(3)
    v = CompoGridVectorEnv(8, autoreset_mode="Disabled", render_mode="rgb_array")
    tasks = {i: Task(COMPS[rng.integers(len(COMPS))], i) for i in range(8)}
    v.reset(seed=list(range(8)), options={"tasks": tasks})
    for _ in range(25):
        v.step(rng.integers(6, size=8))
    v.reset(options={"reset_mask": np.zeros(8, bool)})  # no-op reset keeps the state
    for i in range(8):
        e = v.env_at(i)
        np.testing.assert_array_equal(e.gen_obs(), v._obs()[i])
        frame = e.render()
        assert frame.ndim == 3 and frame.shape[2] == 3
    refs = [v.env_at(i) for i in range(8)]
    for _ in range(40):
        a = rng.integers(6, size=8)
        out = v.step(a)
        for i in range(8):
            if (
                refs[i].progress < len(refs[i].composition)
                and refs[i].step_count < refs[i].max_steps
            ):
                _same(refs[i].step(int(a[i])), out, i)


def test_autoreset_modes():
    c = "goto(red ball) > goto(blue ball)"
    nxt = CompoGridVectorEnv(2, composition=c, max_steps=3, autoreset_mode="NextStep")
    same = CompoGridVectorEnv(2, composition=c, max_steps=3, autoreset_mode="SameStep")
    nxt.reset(seed=0)
    same.reset(seed=0)
    for _ in range(2):
        _, _, te, tr, _ = nxt.step(np.array([0, 0]))
        same.step(np.array([0, 0]))
        assert not (te | tr).any()
    final, _, _, tr, _ = nxt.step(np.array([0, 0]))
    assert tr.all()
    obs, r, te, tr, info = same.step(np.array([0, 0]))
    # same-step: already reset, the episode's last observation kept in info
    assert tr.all() and info["_final_obs"].all() and (same.step_count == 0).all()
    np.testing.assert_array_equal(info["final_obs"], final)
    assert not np.array_equal(obs, final)
    # next-step: the following step resets and ignores the action
    obs, r, te, tr, info = nxt.step(np.array([2, 2]))
    assert not (te | tr).any() and (r == 0).all() and (nxt.step_count == 0).all()
    np.testing.assert_array_equal(obs, same._obs())  # both drew their next layout alike


def test_replay_restores_the_stepped_state():
    rng = np.random.default_rng(1)
    v = CompoGridVectorEnv(4, autoreset_mode="Disabled")
    tasks = {i: Task(COMPS[i * 50], None) for i in range(4)}
    v.reset(seed=[10, 11, 12, 13], options={"tasks": tasks})
    acts = rng.integers(6, size=(12, 4))
    for a in acts:
        v.step(a)
    w = CompoGridVectorEnv(4, autoreset_mode="Disabled")
    replay = {i: (tasks[i], 10 + i, acts[: 5 + i, i].tolist()) for i in range(4)}
    w.reset(seed=[10, 11, 12, 13], options={"replay": replay})
    for i in range(4):  # replayed prefixes: compare with a reference stepped as far
        ref = _ref()
        ref.reset(seed=10 + i, options={"task": tasks[i]})
        for a in acts[: 5 + i, i]:
            ref.step(int(a))
        np.testing.assert_array_equal(w._obs()[i], ref.gen_obs())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_envs": 0}, "num_envs=0"),
        ({"num_envs": MAX_ENVS + 1}, f"num_envs={MAX_ENVS + 1}"),
        ({"num_envs": 2, "task_info": "hint"}, "task_info='hint'"),
        ({"num_envs": 2, "composition": "open(red ball)"}, "open"),
        ({"num_envs": 2, "composition": "pickup(red ball) > pickup(red ball)"}, "repeats"),
        ({"num_envs": 2, "layout_seed": -1}, "layout_seed=-1"),
        ({"num_envs": 2, "layout_seed": 1.5}, "layout_seed=1.5"),
        ({"num_envs": 2, "layout_seed": [1, 2, 3]}, "3 entries"),
        ({"num_envs": 2, "size": 5}, "size=5"),
        (
            {"num_envs": 2, "composition": " > ".join(["goto(door)", "goto(red ball)"] * 3)},
            "has length 6; allowed lengths: 1..4",
        ),
    ],
)
def test_bad_input_one_line(kwargs, match):
    with pytest.raises(ValueError, match=match) as e:
        CompoGridVectorEnv(**kwargs)
    assert "\n" not in str(e.value)


def test_mixed_lengths_in_one_batch():
    comps = [
        "goto(red ball) > goto(door)",
        "pickup(green key) > goto(door) > drop(green key)",
        "open(purple box) > pickup(blue ball) > toggle(door) > drop(blue ball)",
    ]
    v = CompoGridVectorEnv(3, composition=comps, layout_seed=[4, 5, 6], task_info="instruction")
    obs, _ = v.reset(seed=0)
    for i, c in enumerate(comps):
        ref_obs, _ = _ref(composition=c, layout_seed=4 + i, task_info="instruction").reset(seed=i)
        np.testing.assert_array_equal(obs[i], ref_obs)
