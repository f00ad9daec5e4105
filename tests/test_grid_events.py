"""Outcome features read off the observation agree with the env's own completion rules."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import torch

import envs  # noqa: F401
from envs.core import Task
from envs.grid import ENTITIES, PRIMITIVES, Oracle, all_compositions
from envs.grid_events import completed, events, feasible, object_state, task_free


def _walk(steps=3000, seed=0):
    """Random transitions (with oracle-driven stretches, so every primitive occurs)."""
    rng = np.random.default_rng(seed)
    comps = all_compositions((2, 3))
    env = gym.make("CompoGrid-v0", disable_env_checker=True).unwrapped
    oracle = Oracle()
    out = []
    obs, _ = env.reset(seed=seed, options={"task": Task(comps[0], 0)})
    for _t in range(steps):
        before = {"carrying": env.carried_name(), "door_open": bool(env.objects["door"].is_open)}
        a = oracle.act(env) if rng.random() < 0.6 else int(rng.integers(6))
        obs1, _, te, tr, _ = env.step(a)
        truth = np.array([env._completed(p, before) for p in PRIMITIVES])
        out.append((obs, obs1, truth))
        obs = obs1
        if te or tr:
            obs, _ = env.reset(options={"task": Task(comps[rng.integers(len(comps))], None)})
    return out


def test_completed_matches_env_rules_and_events_are_changes():
    trans = _walk()
    o0 = np.stack([t[0] for t in trans])
    o1 = np.stack([t[1] for t in trans])
    truth = np.stack([t[2] for t in trans])
    got = completed(o0, o1)
    np.testing.assert_array_equal(got, truth)
    assert truth.any(0).all(), "every primitive completes somewhere in the walk"
    ev = events(o0, o1)
    assert (ev <= got).all() and ev.any(0).all()
    # a step that changes nothing completes only state-like primitives, never as an event
    assert not events(o0, o0).any()
    # torch and numpy agree
    np.testing.assert_array_equal(completed(torch.as_tensor(o0), torch.as_tensor(o1)).numpy(), got)
    assert object_state(o0).shape == (len(o0), 22)


def test_feasible():
    trans = _walk(800, seed=1)
    o = np.stack([t[0] for t in trans])
    f = feasible(o)
    st = object_state(o)
    on, carried, door = st[:, :7] > 0, st[:, 7:14] > 0, st[:, 14] > 0
    for j, p in enumerate(PRIMITIVES):
        e = ENTITIES.index(p.obj)
        if p.verb == "drop":
            np.testing.assert_array_equal(f[:, j], carried[:, e])
        elif p.verb == "toggle":
            assert f[:, j].all()
        elif p.verb == "open" and p.obj == "door":
            np.testing.assert_array_equal(f[:, j], ~door)
        else:
            np.testing.assert_array_equal(f[:, j], on[:, e])


def test_task_free_hides_progress_and_instruction_only():
    c = "pickup(red ball) > open(door)"
    a = gym.make("CompoGrid-v0", composition=c, task_info="instruction").reset(seed=3)[0]
    b = gym.make("CompoGrid-v0", composition="goto(door) > goto(red ball)").reset(seed=3)[0]
    assert not np.array_equal(a, b)
    np.testing.assert_array_equal(task_free(a), task_free(b))
    np.testing.assert_array_equal(object_state(task_free(a)), object_state(a))
