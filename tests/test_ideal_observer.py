"""Ideal observer (rl.ideal_observer): exact elimination, the prior, and acting like the oracle."""

from __future__ import annotations

from types import SimpleNamespace

import gymnasium as gym
import numpy as np
import pytest
import torch

import envs
from envs.core import Composition, Split, Task
from envs.grid import BOXES, PRIMITIVE_INDEX, PRIMITIVES, Oracle, all_compositions
from rl.collect import Collector, make_vector_env
from rl.ideal_observer import (
    Belief,
    Hypotheses,
    IdealObserverAgent,
    advance,
    before_state,
    completed_primitives,
    frequency_prior,
)
from rl.protocol import OracleAgent, heldout_tasks

C = Composition.parse
BIG = 400  # max_steps for replays: the time limit depends on the length; the observer ignores it


def make_env(composition, layout_seed: int, **kw) -> gym.Env:
    env = gym.make(
        "CompoGrid-v0", composition=composition, layout_seed=layout_seed, max_steps=BIG, **kw
    )
    env.reset(seed=0)
    return env


def observed_step(env: gym.Env, belief: Belief, action: int) -> tuple[float, bool, np.ndarray]:
    """One env step with the belief updated from it, as ``ObserverPolicy`` does."""
    e = env.unwrapped
    before = before_state(e)
    _, r, term, trunc, _ = env.step(action)
    done = completed_primitives(e, before)
    belief.observe(done, float(np.float32(r)))  # the collector stores float32 rewards
    return float(r), term or trunc, done


def replay_rewards(composition, layout_seed: int, episodes: list[list[int]]) -> list[list[float]]:
    """Rewards a CompoGrid env with ``composition`` pays for the same actions on the layout."""
    env = make_env(composition, layout_seed)
    out = []
    for actions in episodes:
        env.reset()
        rs = []
        for a in actions:
            _, r, term, trunc, _ = env.step(a)
            rs.append(r)
            if term or trunc:
                break
        out.append(rs)
    return out


def run_trial(true: Composition, layout_seed: int, belief: Belief, act, max_episode_steps=40):
    """Episodes on one layout driven by ``act(env)``; returns the actions and rewards."""
    env = make_env(true, layout_seed)
    actions, rewards = [], []
    for _ in range(3):
        env.reset()
        belief.new_episode()
        ep_a, ep_r = [], []
        for _ in range(max_episode_steps):
            a = act(env)
            r, done, _ = observed_step(env, belief, a)
            ep_a.append(a)
            ep_r.append(r)
            if done:
                break
        actions.append(ep_a)
        rewards.append(ep_r)
    return actions, rewards


# --- the prior ----------------------------------------------------------------------------------


def test_frequency_prior_matches_hand_counts_on_a_tiny_split():
    a, b, c, d = "pickup(red ball)", "open(door)", "goto(green key)", "goto(blue ball)"
    train = (C(f"{a} > {b}"), C(f"{a} > {c}"), C(f"{d} > {b} > toggle(door)"))
    hyps = [C(f"{a} > {b}"), C(f"{a} > {c}"), C(f"{c} > {b}"), C(f"{b} > toggle(door)")]
    hyps.append(C(f"{d} > {b} > toggle(door)"))
    prior = frequency_prior(train, hyps, smoothing=1.0)
    # P(L=2) = (2+1)/(2+1+1+1) = 3/5; position counts over 2 length-2 train compositions:
    # a first twice, b and c second once each; add-1 over 19 primitives: (count+1)/(2+19)
    p2, p3 = 3 / 5, 2 / 5
    w = [
        p2 * (3 / 21) * (2 / 21),
        p2 * (3 / 21) * (2 / 21),
        p2 * (1 / 21) * (2 / 21),
        p2 * (1 / 21) * (1 / 21),  # b never first; toggle(door) never second in length 2
        p3 * (2 / 20) ** 3,  # the one length-3 train composition: (1+1)/(1+19) per position
    ]
    np.testing.assert_allclose(prior, np.array(w) / sum(w), rtol=1e-12)
    assert prior.sum() == pytest.approx(1.0)


def test_a_length_train_lacks_gets_smoothing_mass_and_pooled_frequencies():
    a, b, c, d = "pickup(red ball)", "open(door)", "goto(green key)", "goto(blue ball)"
    train = (C(f"{a} > {b}"), C(f"{a} > {c}"), C(f"{d} > {b} > toggle(door)"))
    hyps = [C(f"{a} > {b}"), C(f"{d} > {b} > toggle(door)")]
    hyps += [C(f"{a} > {b} > {c} > {d}"), C(f"{d} > {b} > toggle(door) > {c}")]
    prior = frequency_prior(train, hyps, smoothing=1.0)
    # P(L) = (n_L + 1) / (2+1 + 1+1 + 0+1): length 4, which no train composition has, gets 1/6;
    # its positions use the 7 train sub-tasks pooled (a 2, b 2, c 1, d 1, toggle 1): (n+1)/26
    w = [
        3 / 6 * (3 / 21) * (2 / 21),
        2 / 6 * (2 / 20) ** 3,
        1 / 6 * (3 / 26) * (3 / 26) * (2 / 26) * (2 / 26),
        1 / 6 * (2 / 26) * (3 / 26) * (2 / 26) * (2 / 26),
    ]
    np.testing.assert_allclose(prior, np.array(w) / sum(w), rtol=1e-12)


def test_length_split_hypotheses_include_length_4():
    split = envs.make_split("grid", seed=0, split_kind="length")
    hyp = IdealObserverAgent(split).hypotheses
    assert len(hyp) == 2950 + len(all_compositions((4,))) == 38108
    assert all(c in hyp.index for c in split.heldout)
    mass = {n: hyp.prior[hyp.length == n].sum() for n in (2, 3, 4)}
    # 50 + 50 train compositions of lengths 2 and 3: length 4 has the smoothing mass only
    assert 0 < mass[4] < 0.05 < min(mass[2], mass[3]) and sum(mass.values()) == pytest.approx(1)
    assert hyp.prior.min() > 0


def test_agent_priors_sum_to_one_and_prefer_train_positions():
    split = envs.make_split("grid", seed=0)
    freq = IdealObserverAgent(split).hypotheses
    uni = IdealObserverAgent(split, prior="uniform").hypotheses
    assert len(freq) == len(all_compositions((2, 3))) == 2950
    assert freq.prior.sum() == pytest.approx(1.0) and uni.prior.sum() == pytest.approx(1.0)
    np.testing.assert_allclose(uni.prior, 1 / 2950)
    # a train composition carries more mass on average than a held-out one (its primitives sit
    # where train puts them), yet every hypothesis keeps some
    tr = np.mean([freq.prior[freq.index[c]] for c in split.train])
    he = np.mean([freq.prior[freq.index[c]] for c in split.heldout])
    assert tr > he > 0 and freq.prior.min() > 0
    # the order is by prior, ties broken by hypothesis index
    p = freq.prior[freq.order]
    assert np.all(np.diff(p) <= 0)
    ties = np.flatnonzero(np.diff(p) == 0)
    assert np.all(freq.order[ties] < freq.order[ties + 1])


# --- elimination is exact ------------------------------------------------------------------------


def env_rule(comp: Composition, progress: int, completed: np.ndarray) -> tuple[int, int]:
    """``CompoGridEnv.step``'s loop, written out for one hypothesis."""
    n = 0
    while progress < len(comp) and completed[PRIMITIVE_INDEX[comp[progress]]]:
        progress += 1
        n += 1
    return progress, n


def test_vectorised_advance_equals_the_env_loop():
    rng = np.random.default_rng(0)
    comps = all_compositions((2, 3))
    hyp = Hypotheses(comps, np.ones(len(comps)))
    for _ in range(20):
        completed = rng.random(len(PRIMITIVES)) < 0.4
        progress = rng.integers(0, hyp.length + 1)
        prog, n = advance(hyp.table, hyp.length, progress, completed)
        ref = [env_rule(c, int(p), completed) for c, p in zip(comps, progress)]
        assert prog.tolist() == [r[0] for r in ref] and n.tolist() == [r[1] for r in ref]
    # three sub-tasks in one step: opening the door while facing it
    completed = np.zeros(len(PRIMITIVES), dtype=bool)
    for p in ("open(door)", "toggle(door)", "goto(door)"):
        completed[PRIMITIVES.index(C(p)[0])] = True
    h = hyp.index[C("open(door) > toggle(door) > goto(door)")]
    prog, n = advance(hyp.table, hyp.length, np.zeros(len(comps), dtype=np.int64), completed)
    assert prog[h] == 3 and n[h] == 3


def walk_until_next_action(env: gym.Env, belief: Belief, comp: Composition, action: int) -> None:
    """Follow the oracle (told ``comp``) until its next action is ``action``."""
    oracle = Oracle()
    while (a := oracle.act_for(env, comp)) != action:
        observed_step(env, belief, a)


def test_a_reward_at_a_pickup_keeps_exactly_the_hypotheses_whose_next_sub_task_it_is():
    true = C("pickup(red ball) > open(door)")
    hyp = Hypotheses(all_compositions((2, 3)), np.ones(2950))
    belief = Belief(hyp)
    env = make_env(true, layout_seed=0)
    walk_until_next_action(env, belief, true, 3)
    # (on this layout the way there opens no box: an opened box keeps ``open(box)`` complete)
    assert all(env.unwrapped.entity_cell(b) is not None for b in BOXES)
    alive, progress = belief.alive.copy(), belief.progress.copy()
    r, _, done = observed_step(env, belief, 3)
    assert r == pytest.approx(0.5)
    assert np.flatnonzero(done).tolist() == [PRIMITIVES.index(C("pickup(red ball)")[0])]
    nxt = hyp.table[np.arange(len(hyp)), np.minimum(progress, 2)]
    expect = alive & (nxt == done.argmax()) & (hyp.length == 2) & (progress == 0)
    assert np.array_equal(belief.alive, expect) and belief.alive[hyp.index[true]]
    assert all(c[0] == true[0] and len(c) == 2 for c in belief.survivors())


def test_a_reward_of_zero_at_a_pickup_removes_exactly_those_it_would_have_paid():
    true = C("goto(red ball) > open(door)")
    hyp = Hypotheses(all_compositions((2, 3)), np.ones(2950))
    belief = Belief(hyp)
    env = make_env(true, layout_seed=3)
    walk_until_next_action(env, belief, C("pickup(red ball)"), 3)
    alive, progress = belief.alive.copy(), belief.progress.copy()
    r, _, _ = observed_step(env, belief, 3)
    assert r == 0.0
    nxt = hyp.table[np.arange(len(hyp)), np.minimum(progress, 2)]
    paid = nxt == PRIMITIVE_INDEX[C("pickup(red ball)")[0]]
    assert paid[alive].sum() > 0  # the step did eliminate something
    assert np.array_equal(belief.alive, alive & ~paid)


def test_two_sub_tasks_completing_in_one_step_are_predicted_exactly():
    true = C("open(door) > toggle(door)")
    hyp = Hypotheses(all_compositions((2, 3)), np.ones(2950))
    belief = Belief(hyp)
    env = make_env(true, layout_seed=5)
    actions = []
    oracle = Oracle()
    while env.unwrapped.front_entity() != "door":  # (the way there may open a box: action 5)
        a = oracle.act_for(env, true)
        observed_step(env, belief, a)
        actions.append(a)
    r, done, completed = observed_step(env, belief, 5)
    actions.append(5)
    assert r == pytest.approx(1.0) and done  # both sub-tasks paid by one toggle
    assert completed[PRIMITIVE_INDEX[true[0]]] and completed[PRIMITIVE_INDEX[true[1]]]
    assert belief.alive[hyp.index[true]]
    assert not belief.alive[hyp.index[C("open(door) > goto(red ball)")]]  # would pay 1/2
    # every survivor completes all its sub-tasks in that last step
    assert all(all(completed[PRIMITIVE_INDEX[p]] for p in c) for c in belief.survivors())
    # and the survivors are exactly the hypotheses an env would pay the same rewards
    observed = replay_rewards(true, 5, [actions])
    for c in hyp.compositions[::13] + belief.survivors():
        same = replay_rewards(c, 5, [actions]) == observed
        assert same == bool(belief.alive[hyp.index[c]]), str(c)


@pytest.mark.parametrize("seed", [0, 1])
def test_elimination_equals_replaying_every_hypothesis_in_its_own_env(seed):
    """Over a 3-episode trial (observer actions mixed with random ones, so the room reaches
    states no oracle run creates), a hypothesis survives iff an env with that composition pays
    exactly the observed rewards; the true composition always survives."""
    split = envs.make_split("grid", seed=0)
    rng = np.random.default_rng(seed)
    true = split.heldout[int(rng.integers(len(split.heldout)))]
    agent = IdealObserverAgent(split, prior="uniform")
    hyp = agent.hypotheses
    env0 = make_env(true, seed)
    policy, _ = agent.trial_policy(SimpleNamespace(envs=[env0]))
    belief = policy.beliefs[0]

    def act(env):
        if rng.random() < 0.3:
            return int(rng.integers(6))
        return policy.act(env.unwrapped, belief)

    actions, rewards = run_trial(true, seed, belief, act)
    assert belief.alive[hyp.index[true]]
    sample = set(rng.choice(len(hyp), 100, replace=False).tolist())
    sample |= set(np.flatnonzero(belief.alive).tolist())
    for h in sorted(sample):
        replay = replay_rewards(hyp.compositions[h], seed, actions)
        assert (replay == rewards) == bool(belief.alive[h]), str(hyp.compositions[h])


# --- the agent in the protocol ---------------------------------------------------------------------


def collect(agent, tasks: list[Task], episodes: int, check=None):
    vec = make_vector_env(
        "CompoGrid-v0", len(tasks), {"composition": tasks[0].composition}, vectorization="sync"
    )
    try:
        policy, hook = agent.trial_policy(vec)

        def on_end(i, ep):
            if hook is not None:
                hook(i, ep)
            if check is not None:
                check(policy, i, ep)

        col = Collector(vec, policy, episodes_per_trial=episodes, seed=0, on_episode_end=on_end)
        return col.collect_trials(tasks)
    finally:
        vec.close()


def test_true_composition_is_never_eliminated_over_many_trials():
    split = envs.make_split("grid", seed=0)
    tasks = heldout_tasks(split.heldout, 12, seed=7)
    # the uniform prior explores the most (elimination itself does not depend on the prior)
    agent = IdealObserverAgent(split, prior="uniform")
    seen = []

    def check(policy, i, _episode):
        b = policy.beliefs[i]
        assert b.alive[agent.hypotheses.index[tasks[i].composition]], str(tasks[i])
        seen.append(int(b.alive.sum()))

    ro = collect(agent, tasks, episodes=3, check=check)
    assert len(seen) == 36 and max(seen) < 2950  # every trial eliminated something
    assert np.mean([e.success for e in ro.episodes if e.episode_index == 2]) >= 0.9


def test_length_4_tasks_are_inferred_and_solved():
    """Held-out length-4 tasks of the length split: the true composition survives, the first
    reward (1/4) leaves only length-4 hypotheses, and the trial ends up solving the task."""
    split = envs.make_split("grid", seed=0, split_kind="length")
    tasks = heldout_tasks(split.heldout, 4, seed=3)
    agent = IdealObserverAgent(split)
    hyp = agent.hypotheses
    paid = [0.0] * len(tasks)

    def check(policy, i, episode):
        b = policy.beliefs[i]
        assert b.alive[hyp.index[tasks[i].composition]], str(tasks[i])
        paid[i] += float(episode.rewards.sum())
        if paid[i] > 0:
            assert set(hyp.length[b.alive].tolist()) == {4}

    ro = collect(agent, tasks, episodes=3, check=check)
    assert all(p > 0 for p in paid)
    assert all(e.success for e in ro.episodes if e.episode_index == 2)


def test_with_a_single_hypothesis_it_acts_exactly_like_the_oracle():
    split = envs.make_split("grid", seed=0)
    tasks = heldout_tasks(split.heldout, 4, seed=1)
    for task in tasks:
        agent = IdealObserverAgent(split, hypotheses=[task.composition])
        mine = collect(agent, [task], episodes=2)
        ref = collect(OracleAgent(), [task], episodes=2)
        assert torch.equal(mine.actions, ref.actions) and torch.equal(mine.valid, ref.valid)
        assert all(e.success for e in mine.episodes)


def test_run_trials_reference_row():
    from rl.protocol import run_trials

    split = envs.make_split("grid", seed=0)
    tasks = heldout_tasks(split.heldout, 4, seed=0)
    kw = dict(env_id="CompoGrid-v0", env_kwargs={"size": 8}, episodes=3, num_envs=2, seed=0)
    a = run_trials(IdealObserverAgent(split), tasks, **kw)
    b = run_trials(IdealObserverAgent(split), tasks, **kw)
    assert a["success"].shape == (4, 3) and np.array_equal(a["return"], b["return"])
    assert a["success"][:, 1:].mean() >= 0.75


# --- bad input --------------------------------------------------------------------------------------


def test_bad_input_fails_with_one_clear_line():
    split = envs.make_split("grid", seed=0)
    with pytest.raises(ValueError, match="prior='flat'"):
        IdealObserverAgent(split, prior="flat")
    with pytest.raises(ValueError, match="smoothing=0"):
        IdealObserverAgent(split, smoothing=0)
    other = Split("metaworld", split.train, split.heldout, split.primitives)
    with pytest.raises(ValueError, match="family 'metaworld'"):
        IdealObserverAgent(other)
    with pytest.raises(ValueError, match="infeasible composition"):
        IdealObserverAgent(split, hypotheses=["pickup(red ball) > pickup(red ball)"])
    agent = IdealObserverAgent(split)
    with pytest.raises(ValueError, match="task_info='instruction'"):
        agent.trial_policy(
            SimpleNamespace(envs=[make_env(split.train[0], 0, task_info="instruction")])
        )
    with pytest.raises(ValueError, match="needs a sync vector env"):
        agent.trial_policy(SimpleNamespace())


def test_measurement_script_tiny_budget(tmp_path, capsys):
    import json

    from experiments.ideal_observer import main

    out = tmp_path / "io.json"
    rows = main(
        ["--tasks", "2", "--episodes", "2", "--prior", "frequency", "uniform"] + ["--out", str(out)]
    )
    assert [r["prior"] for r in rows] == ["frequency", "uniform"]
    assert json.loads(out.read_text())["rows"] == rows
    assert all(len(r["success_at"]) == 2 and 0 <= r["auc"] <= 1 for r in rows)
    assert "success by episode" in capsys.readouterr().out
    with pytest.raises(ValueError, match="tasks=0"):
        main(["--tasks", "0"])
