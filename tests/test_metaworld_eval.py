"""metaworld's own evaluator: its first-finished-episode count, and our methods as its agents.

Tiny checkpoints of every method that runs on Meta-World are trained on ML1 reach-v3 through
the real console script; metaworld's ``metalearning_evaluation`` then drives them through
``MetaWorldAgent``, and its adaptation phase must be our protocol's trial, return for return.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from metaworld.evaluation import metalearning_evaluation
from metaworld.policies import SawyerReachV3Policy

from experiments.cli import main
from experiments.metaworld_eval import (
    MetaWorldAgent,
    MetaWorldEvalConfig,
    _check_module,
    make_eval_envs,
    metaworld_evaluation,
    protocol_on_goals,
)
from experiments.registry import REGISTRY, method_class
from rl.train import load_module

ML1 = [
    "--set", "env_id=CompoMetaWorld-v0", "--set", "split_family=ML1:reach-v3",
    "--set", "compositions=null", "--set", "env_kwargs={max_steps: 20}",
    "--set", "num_envs=2", "--set", "total_env_steps=800",
]  # fmt: skip
#: every method that trains on Meta-World (the compositional agent is CompoGrid-only; FOMAML
#: and Reptile share MAML's evaluation code)
METHODS = ["ppo", "maml", "rl2", "pearl"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ml1")
    out = {}
    for m in METHODS:
        assert main(["train", "--method", m, "--out", str(root / m), *ML1]) == 0
        out[m] = root / m / "checkpoints" / "final.ckpt"
    return out


# --- metaworld's count ---------------------------------------------------------------------------


class ScriptedInSome:
    """metaworld's scripted reach policy on the envs (or evaluations) in ``good``, a zero
    action elsewhere: a known true success rate."""

    def __init__(self, envs, good_envs=(), good_evals=()) -> None:
        self.envs, self.good_envs, self.good_evals = envs, set(good_envs), set(good_evals)
        self.policy = SawyerReachV3Policy()
        self.evals = -1

    def init(self) -> None:
        self.evals += 1

    def adapt(self) -> None:
        pass

    def reset(self, env_mask) -> None:
        pass

    def eval_action(self, obs):
        goals = self.envs.get_attr("_target_pos")  # the goal is hidden from the observation
        actions = np.zeros((len(obs), 4))
        for i, o in enumerate(obs):
            if i in self.good_envs or self.evals in self.good_evals:
                o = np.array(o[:39], dtype=np.float64)
                o[36:39] = goals[i]
                actions[i] = self.policy.get_action(o)
        return actions


def _scripted_success(num_envs: int, num_evals: int, evaluation_episodes: int, **good) -> float:
    envs = make_eval_envs("reach-v3", num_envs=num_envs, max_episode_steps=150)
    try:
        agent = ScriptedInSome(envs, **good)
        with pytest.warns(UserWarning, match="Constant"):  # metaworld's scripted policy warns
            success, *_ = metalearning_evaluation(
                agent, envs, num_evals=num_evals, adaptation_episodes=0,
                evaluation_episodes=evaluation_episodes,
            )  # fmt: skip
    finally:
        envs.close()
    return success


def test_first_finished_count_is_biased_and_one_env_per_task_is_not():
    # one env in ten can succeed: the true success rate is 0.1
    assert _scripted_success(10, 1, 1, good_envs={0}) == 1.0
    # more counted episodes do not fix it: env 0 succeeds in ~50 steps and finishes a second
    # episode before the other nine time out at 150 (the module docstring quotes this number)
    assert _scripted_success(10, 1, 10, good_envs={0}) == pytest.approx(0.2)
    # one env per task name: the counted episodes are that env's own, in order
    assert _scripted_success(1, 10, 1, good_evals={0}) == pytest.approx(0.1)
    assert _scripted_success(1, 10, 3, good_evals={0}) == pytest.approx(0.1)


# --- our methods as metaworld agents -------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_adaptation_phase_is_our_trial_and_metaworld_scores_it(method, checkpoints):
    """metaworld's adaptation episodes replay our protocol's trial exactly (MAML's inner step
    after 2 episodes, PEARL's posterior z, RL²'s hidden state all act in episodes 2-3), and its
    evaluation episodes are the trial's next episodes, scored by metaworld."""
    cfg = MetaWorldEvalConfig(
        num_envs=2, num_evals=1, adaptation_episodes=4, evaluation_episodes=2, seed=3
    )
    mw = metaworld_evaluation(load_module(checkpoints[method], REGISTRY), cfg)
    assert mw["num_evals"] == 1 and mw["max_episode_steps"] == 20  # the checkpoint's horizon
    assert set(mw["success_per_task"]) == {"reach-v3"}
    assert 0.0 <= mw["success"] <= 1.0 and np.isfinite(mw["return"])
    (goals,) = mw["goals"]
    assert all(50 <= g < 100 for g in goals)  # metaworld's ML1 test goals are our held-out ones
    ours = protocol_on_goals(
        load_module(checkpoints[method], REGISTRY), "reach-v3", goals, cfg, num_envs=2
    )
    # the adaptation phase: the same actions, hence bit-identical returns (a final observation
    # dropped from PEARL's context already shows at 1e-5; skipping the hooks at 1)
    np.testing.assert_array_equal(
        np.array(mw["adaptation_returns"][0]), np.array(ours["return"])[:, :4]
    )
    # the evaluation phase continues the trial: without a success (so no early end) metaworld's
    # two counted episodes are each env's episode 4 of our trial (RL² fed a zero reward there
    # instead of the true one is off by 1.5e-3; the returns differ only in float32 summation)
    assert mw["success"] == 0.0 and not np.any(np.array(ours["success"])[:, 4])
    assert mw["return"] == pytest.approx(np.mean(np.array(ours["return"])[:, 4]), rel=1e-7)


def test_agent_needs_the_feedback_envs(checkpoints):
    import gymnasium as gym
    import metaworld  # noqa: F401

    plain = gym.make_vec("Meta-World/ML1-test", env_name="reach-v3", meta_batch_size=1)
    try:
        with pytest.raises(ValueError, match="make_eval_envs"):
            MetaWorldAgent(load_module(checkpoints["ppo"], REGISTRY), plain, "reach-v3")
    finally:
        plain.close()


def test_refuses_what_metaworld_cannot_run(checkpoints):
    cfg = MetaWorldEvalConfig(num_envs=2, num_evals=1, adaptation_episodes=3)
    with pytest.raises(ValueError, match="env_id='CompoGrid-v0'"):
        metaworld_evaluation(method_class("ppo")({}), cfg)
    with pytest.raises(ValueError, match="adaptation_episodes=3 for maml.*multiple of 2"):
        metaworld_evaluation(load_module(checkpoints["maml"], REGISTRY), cfg)
    # the skill-level agent runs on Meta-World too (Gaussian options of fixed length)
    mw = method_class("compositional")(
        {"env_id": "CompoMetaWorld-v0", "split_family": "ML1:reach-v3", "env_kwargs": {}}
    )
    assert _check_module(mw, cfg) == "reach-v3"


# --- the command ---------------------------------------------------------------------------------


def test_command_prints_both_evaluators(checkpoints, tmp_path, capsys):
    out = tmp_path / "mw"
    args = ["metaworld-eval", "--checkpoint", str(checkpoints["rl2"]), "--out", str(out)]
    args += ["--set", "num_envs=2", "--set", "num_evals=1", "--set", "evaluation_episodes=2"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "metaworld evaluation, 2 envs x 1 evals: success" in text
    assert "1 env x 2 evals (unbiased count)" in text
    assert "our protocol, same goals: success by episode" in text
    assert text.count("metaworld_eval.json") == 1  # one "wrote" line
    doc = json.loads((out / "metaworld_eval.json").read_text())
    assert doc["method"] == "rl2" and doc["config"]["num_envs"] == 2
    assert len(doc["protocol"]["success_at"]) == 4  # 2 adaptation + 2 evaluation episodes


def test_command_bad_setting_writes_nothing(checkpoints, tmp_path, capsys):
    out = tmp_path / "bad"
    args = ["metaworld-eval", "--checkpoint", str(checkpoints["ppo"]), "--out", str(out)]
    assert main([*args, "--set", "num_envs=3"]) == 2
    assert "num_envs=3; allowed: a divisor of the 50 ML1 test goals" in capsys.readouterr().err
    assert not out.exists()
