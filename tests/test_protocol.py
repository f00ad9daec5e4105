"""The evaluation protocol: statistics, reference rows, the run folder it writes."""

from __future__ import annotations

import json

import numpy as np
import pytest

import envs
from rl.protocol import (
    EvalConfig,
    OracleAgent,
    RandomAgent,
    bootstrap_ci,
    episodes_to_threshold,
    heldout_tasks,
    plot_curves,
    run_trials,
    summarize,
    table_markdown,
)


def test_bootstrap_ci_brackets_the_mean_and_collapses_for_one_seed():
    rng = np.random.default_rng(0)
    per_seed = rng.uniform(size=(5, 4))
    ci = bootstrap_ci(per_seed, 2000)
    mean = per_seed.mean(0)
    assert np.all(ci[:, 0] <= mean) and np.all(mean <= ci[:, 1])
    assert np.all(ci[:, 0] >= per_seed.min(0)) and np.all(ci[:, 1] <= per_seed.max(0))
    one = bootstrap_ci(per_seed[:1], 2000)
    assert np.array_equal(one[:, 0], per_seed[0]) and np.array_equal(one[:, 1], per_seed[0])
    # identical seeds -> zero-width interval
    same = bootstrap_ci(np.tile(per_seed[:1], (4, 1)), 500)
    assert np.allclose(same[:, 0], same[:, 1])


def test_episodes_to_threshold():
    assert episodes_to_threshold([0.1, 0.5, 0.8, 0.9]) == 2
    assert episodes_to_threshold([0.85]) == 0
    assert episodes_to_threshold([0.1, 0.79]) is None


def test_summarize_schema():
    s = {0: np.array([[0, 1, 1], [0, 0, 1]], float), 1: np.array([[1, 1, 1], [0, 1, 1]], float)}
    m = summarize(s, s, n_boot=100, meta_train_env_steps=10, wall_s=1.5)
    assert m["success_at"] == [0.25, 0.75, 1.0]
    assert m["episodes_to_80"] == 2
    assert m["seeds"] == [0, 1] and m["meta_train_env_steps"] == 10
    for key in ("success_ci", "return_at", "return_ci", "auc", "wall_s"):
        assert key in m
    assert len(m["success_ci"]) == 3


def test_heldout_tasks_are_seeded_and_held_out():
    split = envs.make_split("grid", seed=0)
    a = heldout_tasks(split.heldout, 12, seed=3)
    b = heldout_tasks(split.heldout, 12, seed=3)
    assert a == b and len({t.composition for t in a}) == 12
    assert all(t.composition in split.heldout for t in a)
    assert all(t.layout_seed is not None for t in a)


def test_reference_rows_oracle_beats_random():
    split = envs.make_split("grid", seed=0)
    tasks = heldout_tasks(split.heldout, 6, seed=0)
    kw = dict(env_id="CompoGrid-v0", env_kwargs={"size": 8}, episodes=3, num_envs=3, seed=0)
    oracle = run_trials(OracleAgent(), tasks, **kw)
    rnd = run_trials(RandomAgent(0), tasks, **kw)
    assert oracle["success"].shape == (6, 3)
    assert np.all(oracle["success"] == 1.0)
    assert np.allclose(oracle["return"], 1.0)
    assert rnd["success"].mean() < 0.5


def test_table_and_curves(tmp_path):
    s = {0: np.array([[0, 1.0]]), 1: np.array([[1, 1.0]])}
    methods = {"ppo": summarize(s, s, n_boot=50), "oracle": summarize(s, s, n_boot=50)}
    text = table_markdown(methods, 2, "compo heldout --out x")
    assert "| ppo | 0.50" in text and "compo heldout --out x" in text
    plot_curves(methods, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"
    json.dumps(methods)  # JSON-serialisable


def test_eval_config_validation():
    with pytest.raises(ValueError, match="eval.episodes=0"):
        EvalConfig(episodes=0)


def test_run_trials_is_a_function_of_agent_tasks_and_seed():
    """Policies sample from torch's global generator: run_trials seeds it (in a forked state),
    so the same agent gives the same trials whatever the caller's RNG state, and the caller's
    stream is left untouched (it used to depend on where training left the generator, so a
    reloaded checkpoint scored differently from the in-memory module)."""
    import torch

    from rl.protocol import ScratchPPOAgent

    torch.manual_seed(0)
    agent = ScratchPPOAgent()  # a real, stochastic network policy
    tasks = heldout_tasks(envs.make_split("grid", seed=0).heldout, 6, seed=0)
    kw = dict(
        env_id="CompoGrid-v0", env_kwargs={"size": 7, "max_steps": 15}, episodes=2, num_envs=3
    )
    torch.manual_seed(1)
    a = run_trials(agent, tasks, seed=5, **kw)
    after = torch.rand(3)
    torch.manual_seed(1)
    torch.rand(3)  # a different global state at the call
    b = run_trials(agent, tasks, seed=5, **kw)
    torch.manual_seed(1)
    run_trials(agent, tasks, seed=5, **kw)
    assert torch.equal(torch.rand(3), after)  # the caller's stream is not consumed
    assert np.array_equal(a["return"], b["return"]) and np.array_equal(a["success"], b["success"])
    c = run_trials(agent, tasks, seed=6, **kw)
    d = run_trials(agent, tasks, seed=6, **kw)
    assert np.array_equal(c["return"], d["return"])
