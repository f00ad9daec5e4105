"""The shared collector: trials, memory resets, terminated/truncated, sync==async, exact resume."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch

from envs.core import Task
from rl.collect import (
    Collector,
    FeedForwardPolicy,
    Prev,
    StepOutput,
    make_vector_env,
    uniform_task_sampler,
)
from rl.nets import ActorCritic

COMPS = ["pickup(red ball) > open(door)", "goto(blue ball) > goto(door)"]


class CountingPolicy:
    """Memory = steps since the trial started; random actions from torch's global RNG."""

    def initial_memory(self, n):
        return torch.zeros(n)

    def reset_memory(self, memory, mask):
        return torch.where(mask, torch.zeros_like(memory), memory)

    def step(self, obs, memory, prev: Prev):
        n = obs.shape[0]
        a = torch.randint(6, (n,))
        return StepOutput(
            a,
            torch.zeros(n),
            torch.zeros(n),
            memory + 1,
            {"memory": memory.clone(), "prev_done": prev.done.clone()},
        )

    def bootstrap_value(self, obs, memory, prev):
        return torch.full((obs.shape[0],), 7.0)


def make(n=3, max_steps=12, vectorization="sync", E=3, seed=0, policy=None):
    envs = make_vector_env(
        "CompoGrid-v0", n, {"max_steps": max_steps, "size": 7}, vectorization=vectorization
    )
    return Collector(
        envs,
        policy or CountingPolicy(),
        episodes_per_trial=E,
        task_sampler=uniform_task_sampler(COMPS, True),
        seed=seed,
    )


def test_memory_persists_over_episodes_and_resets_between_trials():
    torch.manual_seed(0)
    col = make()
    ro = col.collect(100)
    mem = ro.extras["memory"]
    # at a trial start memory is zero; at an episode start inside a trial it is not
    assert (mem[ro.trial_start] == 0).all()
    inner = ro.episode_start & ~ro.trial_start
    assert inner.any() and (mem[inner] > 0).all()
    # previous done is 1 at inner episode starts, 0 at trial starts
    assert (ro.extras["prev_done"][inner] == 1).all()
    assert (ro.extras["prev_done"][ro.trial_start] == 0).all()
    # each trial runs E episodes (max_steps=12 truncates: every episode lasts 12 steps)
    assert set(ro.episode_index.unique().tolist()) == {0, 1, 2}
    # the task of a trial is constant within it
    for e in ro.episodes:
        assert e.task.layout_seed is not None


def test_truncated_bootstraps_final_value_terminated_zero():
    torch.manual_seed(0)
    col = make()
    ro = col.collect(30)
    assert ro.truncated.any()
    assert not (ro.truncated & ro.terminated).any()
    nv = ro.next_values()
    assert torch.all(nv[ro.truncated] == 7.0)
    assert torch.all(ro.episode_cut()[ro.truncated] == 1)


def test_terminated_kept_apart():
    from envs.grid import Oracle

    envs = make_vector_env(
        "CompoGrid-v0", 2, {"size": 7}, vectorization="sync"
    )  # oracle reads envs
    oracle = Oracle()

    class OraclePolicy(CountingPolicy):
        def step(self, obs, memory, prev):
            a = torch.tensor([oracle.act(e) for e in envs.envs])
            return StepOutput(a, torch.zeros(2), torch.zeros(2), memory + 1, {})

    col = Collector(envs, OraclePolicy(), task_sampler=uniform_task_sampler(COMPS, False), seed=0)
    ro = col.collect(60)
    assert ro.terminated.any()
    assert torch.all(ro.next_values()[ro.terminated] == 0)
    assert all(e.success for e in ro.episodes)
    assert torch.all(ro.rewards.sum(0) > 0)


def test_sync_async_and_batched_identical():
    outs = []
    for vec in ("sync", "async", "batched"):
        torch.manual_seed(1)
        col = make(vectorization=vec, seed=4)
        ro = col.collect(40)
        outs.append((ro.obs, ro.actions, ro.rewards))
        col.envs.close()
    for other in outs[1:]:
        for a, b in zip(outs[0], other):
            assert torch.equal(a, b)


def test_collect_trials_exactly_one_trial_each():
    torch.manual_seed(0)
    col = make(n=2, E=2)
    tasks = [
        Task(col.task_sampler(np.random.default_rng(0)).composition, 5),
        Task(col.task_sampler(np.random.default_rng(1)).composition, 6),
    ]
    seen = []
    col.on_episode_end = lambda i, ep: seen.append((i, ep.stats.episode_index, ep.obs.shape[0]))
    ro = col.collect_trials(tasks)
    assert sorted((e.env_index, e.episode_index) for e in ro.episodes) == [
        (0, 0),
        (0, 1),
        (1, 0),
        (1, 1),
    ]
    assert sorted(s[:2] for s in seen) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert ro.valid.sum().item() == sum(e.length for e in ro.episodes)


def test_hook_episodes_limits_the_hook_and_keeps_its_episodes_whole():
    """hook_episodes={1}: the hook sees only each trial's second episode, with all its steps
    (the same Episode as an unfiltered hook gets); the rollout itself is unchanged."""
    got = {}
    for filt in (None, {1}):
        torch.manual_seed(0)
        col = make(n=2, E=3)
        col.hook_episodes = None if filt is None else frozenset(filt)
        seen = []
        col.on_episode_end = lambda i, ep, _s=seen: _s.append((i, ep))
        ro = col.collect(60)
        col.envs.close()
        got[filt is None] = (seen, ro)
    (all_eps, ro_all), (some, ro_some) = got[True], got[False]
    assert torch.equal(ro_all.actions, ro_some.actions) and torch.equal(ro_all.obs, ro_some.obs)
    assert some and all(ep.stats.episode_index == 1 for _, ep in some)
    want = [(i, ep) for i, ep in all_eps if ep.stats.episode_index == 1]
    assert len(some) == len(want) and len(all_eps) > len(some)
    for (i, a), (j, b) in zip(some, want):
        assert i == j and a.obs.shape[0] == a.stats.length
        assert torch.equal(a.obs, b.obs) and torch.equal(a.actions, b.actions)


@pytest.mark.parametrize("vectorization", ["sync", "async", "batched"])
def test_exact_resume_from_state_dict(vectorization):
    obs_dim = gym.make("CompoGrid-v0").observation_space.shape[0]  # 166 (4 instruction slots)
    net = ActorCritic(obs_dim, gym.spaces.Discrete(6))
    torch.manual_seed(3)
    a = make(vectorization=vectorization, policy=FeedForwardPolicy(net), max_steps=40)
    first = a.collect(25)
    state = a.state_dict()
    rng = torch.get_rng_state()
    rest_a = [a.collect(25) for _ in range(2)]
    # a new collector restored from plain data continues identically
    b = make(vectorization=vectorization, policy=FeedForwardPolicy(net), max_steps=40, seed=99)
    b.load_state_dict(torch.load(_roundtrip(state), weights_only=True))
    torch.set_rng_state(rng)
    rest_b = [b.collect(25) for _ in range(2)]
    assert first.obs.shape[0] == 25
    for x, y in zip(rest_a, rest_b):
        assert torch.equal(x.obs, y.obs) and torch.equal(x.actions, y.actions)
        assert torch.equal(x.rewards, y.rewards)
        assert torch.equal(x.episode_index, y.episode_index)
    assert a.env_steps == b.env_steps
    a.envs.close()
    b.envs.close()


def _roundtrip(obj):
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_envs=0"):
        make_vector_env("CompoGrid-v0", 0)
    with pytest.raises(ValueError, match="vectorization='threads'"):
        make_vector_env("CompoGrid-v0", 1, vectorization="threads")
    with pytest.raises(ValueError, match="vectorization='batched' for env 'CompoMetaWorld-v0'"):
        make_vector_env("CompoMetaWorld-v0", 1, vectorization="batched")
    envs = make_vector_env("CompoGrid-v0", 1)
    with pytest.raises(ValueError, match="episodes_per_trial=0"):
        Collector(envs, CountingPolicy(), episodes_per_trial=0)


@pytest.mark.parametrize("E", [1, 3])
def test_stored_rewards_match_episode_returns(E):
    # regression: the previous-reward buffer once aliased the stored rewards and zeroed the
    # terminal reward of every trial when it was reset in place
    from envs.grid import Oracle

    envs = make_vector_env(
        "CompoGrid-v0", 2, {"size": 7}, vectorization="sync"
    )  # oracle reads envs
    oracle = Oracle()

    class OraclePolicy(CountingPolicy):
        def step(self, obs, memory, prev):
            a = torch.tensor([oracle.act(e) for e in envs.envs])
            return StepOutput(a, torch.zeros(2), torch.zeros(2), memory + 1, {})

    col = Collector(
        envs,
        OraclePolicy(),
        episodes_per_trial=E,
        task_sampler=uniform_task_sampler(COMPS, True),
        seed=0,
    )
    ro = col.collect(120)
    ends = ro.terminated | ro.truncated
    assert ro.terminated.sum() >= 4
    assert torch.all(ro.rewards[ro.terminated] > 0)
    # every finished episode's return equals the sum of its stored rewards
    for n in range(2):
        starts = torch.nonzero(ro.episode_start[:, n]).squeeze(-1).tolist()
        stops = torch.nonzero(ends[:, n]).squeeze(-1).tolist()
        eps = [e for e in ro.episodes if e.env_index == n]
        for e, a, b in zip(eps, starts, stops):
            assert ro.rewards[a : b + 1, n].sum().item() == pytest.approx(e.ret)
