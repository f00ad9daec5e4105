"""Meta-World's own evaluator (``metaworld.evaluation``) for every method trained on ML1.

``MetaWorldAgent`` makes a trained module a ``metaworld.evaluation.MetaLearningAgent``, so
``metaworld.evaluation.metalearning_evaluation`` (metaworld 3.1) can measure it, and
``python -m experiments.metaworld_eval --checkpoint CKPT`` (also ``compo metaworld-eval``)
sets its numbers beside our protocol's (``rl.protocol.run_trials``) on the same test goals.

## How metaworld's calls map onto our methods
Our protocol drives a method through ``trial_policy(envs) -> (policy, on_episode_end)``: the
policy acts with a memory that persists over the episodes of a trial, and ``on_episode_end``
is where a method adapts between episodes. The agent maps metaworld's calls onto that:

* ``init()`` (once per batch of sampled goals) starts a trial: a fresh ``trial_policy``, fresh
  memory, zero previous action/reward/done (exactly as the collector starts one).
* ``adapt_action(obs)`` is one policy step; ``step(timestep)`` records the transition and, at an
  episode end, calls the method's ``on_episode_end`` with the finished episode, the same
  ``rl.collect.Episode`` the collector builds. So MAML takes its inner step after every M
  episodes (``eval_adapt_episodes``, default ``episodes_per_trial``), PEARL adds the episode
  to its context and redraws z from the posterior, RL² carries its hidden state: the adaptation
  phase *is* one of our trials (the test checks it step for step).
* ``adapt()`` ends the adaptation phase. It adds no work: our methods have already adapted at
  every episode end. (For MAML, ``adaptation_episodes`` must be a multiple of M, or the last
  episodes would never be used; the evaluation refuses other values.)
* ``eval_action(obs)`` acts with the adapted state and no further ``on_episode_end`` (adapted
  MAML parameters, PEARL's last posterior sample); ``reset(mask)`` marks an episode boundary
  and keeps the memory: evaluation episodes continue the trial (RL²'s adaptation lives in its
  hidden state, which a reset would erase).

metaworld passes ``eval_action`` observations only, and a ``Timestep`` holds no final
observation (its vector envs reset in the same step), yet RL² reads the previous reward and
PEARL's context the transition's next state. ``make_eval_envs`` therefore wraps metaworld's
vector env in ``StepFeedback``, which keeps each step's rewards, ends and final observations
for the agent; ``MetaWorldAgent`` refuses envs without it. The observations are metaworld's
own (goal hidden, as in ``envs.metaworld``), cast to float32 and clipped to our observation
box, which makes them identical to ``CompoMetaWorld-v0``'s for the same goal.

The goals are Meta-World's ML1 *test* goals of benchmark seed ``envs.metaworld.GOAL_SEED``,
which are our held-out goals (layout seeds 50-99), so both evaluators see the same tasks.

## metaworld's evaluation counts the first episodes to *finish*
``metaworld.evaluation.evaluation`` turns ``terminate_on_success`` on, steps all envs together
and, per task *name*, counts the first ``evaluation_episodes`` episodes that end, in the order
they end. A success ends an episode at once; a failure runs to the time limit. With several
envs per task name (ML1: every env is the same task name), the successful envs finish first,
and one that succeeds quickly starts and finishes further episodes while the others are still
running, so the count over-represents successes. The bias is upward and grows with
``max_episode_steps`` / (steps to succeed). Measured on ML1 reach-v3 with 10 envs, a scripted
reach policy in one env and a zero action in the other nine (a true success rate of 0.10):
``evaluation_episodes=1`` scores 1.00; ``evaluation_episodes=10`` still scores 0.20 at
``max_episode_steps=150`` (the scripted env finishes two episodes before the nine time out),
so raising ``evaluation_episodes`` to the number of envs does not remove the bias
(``tests/test_metaworld_eval.py`` measures both).

The unbiased setting is **one env per task name**: ``num_envs`` (metaworld's
``meta_batch_size``) equal to the number of test task classes (ML1: ``num_envs=1``), with
``num_evals`` large enough to visit the goals (ML1: 50 evaluations, one per test goal). The
counted episodes are then that env's own first ``evaluation_episodes`` episodes, whose
success does not depend on finishing order: the same scripted setting scores 0.10.
The comparison command runs this unbiased setting beside the parallel one.

## What the comparison prints
Our protocol runs one trial of ``adaptation_episodes + evaluation_episodes`` episodes on every
goal metaworld visited, with the same torch seed; its success at episode indices
``adaptation_episodes`` and later is what metaworld's evaluation episodes measure (episode
lengths differ: metaworld ends an episode at success, our envs run to the time limit, with
success sticky, so success is the same event and returns are not comparable).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch

from envs.core import Task
from envs.metaworld import GOAL_SEED, HELDOUT_LAYOUT_SEEDS, composition_for, goal_pool
from rl.collect import Episode, EpisodeStats, Prev

#: Meta-World's observation width (goal hidden: the last 3 entries are 0)
OBS_DIM = 39
#: goals per task class on metaworld's test side (``metaworld._N_GOALS``)
TEST_GOALS = len(HELDOUT_LAYOUT_SEEDS)
#: methods whose between-episode adaptation takes M episodes at a time (``baselines.maml``)
MAML_METHODS = ("maml", "fomaml", "reptile")


# --- envs ----------------------------------------------------------------------------------------


class StepFeedback(gym.vector.VectorWrapper):
    """Keeps what metaworld's evaluator does not pass to the agent: each step's rewards,
    terminations, truncations and final observations (``feedback``; cleared at ``reset``).

    ``get_attr``/``call``/``set_attr`` go to the wrapped env, as metaworld's evaluator needs.
    """

    def __init__(self, env: gym.vector.VectorEnv) -> None:
        super().__init__(env)
        self.feedback: dict[str, Any] | None = None

    def reset(self, *, seed=None, options=None):
        self.feedback = None
        return self.env.reset(seed=seed, options=options)

    def step(self, actions):
        obs, reward, term, trunc, info = self.env.step(actions)
        done = np.logical_or(term, trunc)
        final = [None] * self.num_envs
        if done.any():  # same-step autoreset: ``obs`` of a finished env is already the next one
            final = [info["final_obs"][i] if d else None for i, d in enumerate(done)]
        self.feedback = {
            "reward": np.asarray(reward, dtype=np.float32),
            "terminated": np.asarray(term, dtype=bool),
            "truncated": np.asarray(trunc, dtype=bool),
            "final_obs": final,
        }
        return obs, reward, term, trunc, info

    def take_feedback(self) -> dict[str, Any] | None:
        """The last step's feedback, once (None if no step since the last take or reset)."""
        fb, self.feedback = self.feedback, None
        return fb

    def get_attr(self, name: str):
        return self.env.get_attr(name)

    def set_attr(self, name: str, values) -> None:
        self.env.set_attr(name, values)

    def call(self, name: str, *args, **kwargs):
        return self.env.call(name, *args, **kwargs)


def ml1_env_name(split_family: str) -> str:
    """The v3 task of an ``ML1:<task>`` split family; one clear error otherwise."""
    name = split_family[len("ML1:") :].strip() if split_family.startswith("ML1:") else ""
    if not name:
        raise ValueError(
            f"split_family={split_family!r}; allowed: a checkpoint trained on an 'ML1:<v3 task>'"
            " split (metaworld's ML1 evaluation; ML10/ML45 and the compositional split are not"
            " wired here)"
        )
    composition_for(name)  # validates the task name
    return name


def make_eval_envs(env_name: str, *, num_envs: int, max_episode_steps: int) -> StepFeedback:
    """metaworld's ML1 test envs of ``env_name`` (goals of benchmark seed ``GOAL_SEED``, our
    held-out goals): ``num_envs`` envs (metaworld's ``meta_batch_size``), each cycling through
    ``TEST_GOALS / num_envs`` goals, inside ``StepFeedback``."""
    if num_envs < 1 or TEST_GOALS % num_envs:
        divisors = [d for d in range(1, TEST_GOALS + 1) if TEST_GOALS % d == 0]
        raise ValueError(
            f"num_envs={num_envs}; allowed: a divisor of the {TEST_GOALS} ML1 test goals "
            f"({', '.join(map(str, divisors))}), as metaworld splits the goals among the envs"
        )
    if not 1 <= max_episode_steps <= 500:
        raise ValueError(
            f"max_episode_steps={max_episode_steps}; allowed: 1..500 (Meta-World's path length)"
        )
    import metaworld  # noqa: F401  (registers the Meta-World/* ids)

    envs = gym.make_vec(
        "Meta-World/ML1-test", env_name=env_name, meta_batch_size=num_envs, seed=GOAL_SEED,
        max_episode_steps=max_episode_steps,
    )  # fmt: skip
    return StepFeedback(envs)


def current_goals(envs: gym.vector.VectorEnv, env_name: str) -> list[int]:
    """Our layout seed (goal-pool index) of each env's current metaworld task."""
    pool = {bytes(t.data): k for k, t in enumerate(goal_pool(env_name))}
    tasks, idx = envs.get_attr("tasks"), envs.get_attr("current_task_idx")
    return [pool[bytes(tasks[i][idx[i]].data)] for i in range(envs.num_envs)]


# --- the agent -----------------------------------------------------------------------------------


class MetaWorldAgent:
    """A trained module as a ``metaworld.evaluation.MetaLearningAgent`` (module docstring).

    Args:
        module: a trained method (anything with ``trial_policy(envs)``).
        envs: the evaluation envs from ``make_eval_envs`` (a ``StepFeedback``).

    Attributes:
        goals: per ``init()`` call, the layout seed of each env's goal (for the comparison).
        adaptation_returns: per ``init()`` call, each env's adaptation-episode returns.
    """

    def __init__(self, module: Any, envs: StepFeedback, env_name: str) -> None:
        if not isinstance(envs, StepFeedback):
            raise ValueError(
                f"envs of type {type(envs).__name__}; allowed: make_eval_envs(...) (a"
                " StepFeedback), which keeps the rewards metaworld does not pass to the agent"
            )
        self.module = module
        self.envs = envs
        self.env_name = env_name
        self.n = envs.num_envs
        space = envs.single_action_space
        self.low, self.high = space.low, space.high
        from envs.metaworld import _observation_space

        box = _observation_space()
        self.obs_low, self.obs_high = box.low, box.high
        self.policy: Any = None
        self.goals: list[list[int]] = []
        self.adaptation_returns: list[list[list[float]]] = []

    # -- metaworld's MetaLearningAgent ----------------------------------------------------------
    def init(self) -> None:
        """A new trial on every env (called after metaworld sampled new goals)."""
        self.policy, self.hook = self.module.trial_policy(self.envs)
        n = self.n
        mem = self.policy.initial_memory(n)
        ones = torch.ones(n, dtype=torch.bool)
        # a trial starts as in Collector.collect_trials, draw for draw: it resets once for the
        # rollout's starting memory and again at its first step (PEARL draws z at each)
        self.policy.reset_memory(mem, ones)
        self.memory = self.policy.reset_memory(mem, ones)
        a = torch.zeros((n, *self.low.shape), dtype=torch.float32)
        self.prev = Prev(a, torch.zeros(n), torch.zeros(n))
        self.steps: list[list[dict]] = [[] for _ in range(n)]
        self.episode_index = [0] * n
        self.returns = np.zeros(n)
        self._last: tuple[torch.Tensor, Any] | None = None
        self.goals.append(current_goals(self.envs, self.env_name))
        self.adaptation_returns.append([[] for _ in range(n)])
        self.envs.take_feedback()

    def adapt_action(self, observations: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        action, out = self._act(observations)
        return action, {"log_prob": out.logp.numpy(), "value": out.value.numpy()}

    def step(self, timestep: Any) -> None:
        """One adaptation-phase transition; finished episodes go to ``on_episode_end``."""
        fb = self.envs.take_feedback()
        final = fb["final_obs"] if fb is not None else [None] * self.n
        self._observe(timestep.reward, timestep.terminated, timestep.truncated, final, True)

    def adapt(self) -> None:
        """Nothing to do: the method adapted at every episode end (module docstring)."""

    def eval_action(self, observations: np.ndarray) -> np.ndarray:
        if self.policy is None:  # metaworld's plain ``evaluation`` without an adaptation phase
            self.init()
        fb = self.envs.take_feedback()
        if fb is not None and self._last is not None:
            self._observe(fb["reward"], fb["terminated"], fb["truncated"], fb["final_obs"], False)
        return self._act(observations)[0]

    def reset(self, env_mask: np.ndarray) -> None:
        """An episode boundary on the masked envs: the trial (memory) goes on."""
        if self.policy is None:
            self.init()
        mask = torch.as_tensor(np.asarray(env_mask, dtype=bool))
        self.prev.done[mask] = 1.0
        for i in np.flatnonzero(mask.numpy()):
            if self.steps[i]:  # an episode cut by metaworld's reset: not a finished episode
                self.steps[i] = []
                self.returns[i] = 0.0

    # -- internals ------------------------------------------------------------------------------
    def _obs(self, observations: np.ndarray) -> torch.Tensor:
        o = np.asarray(observations, dtype=np.float32)[..., :OBS_DIM]
        return torch.as_tensor(np.clip(o, self.obs_low, self.obs_high))

    @torch.no_grad()
    def _act(self, observations: np.ndarray) -> tuple[np.ndarray, Any]:
        obs = self._obs(observations)
        out = self.policy.step(obs, self.memory, self.prev)
        self.memory = out.memory
        self._last = (obs, out)
        return np.clip(out.action.numpy(), self.low, self.high).astype(np.float32), out

    @torch.no_grad()
    def _observe(self, reward, terminated, truncated, final_obs, adapting: bool) -> None:
        obs, out = self._last
        self._last = None
        reward = torch.as_tensor(np.asarray(reward, dtype=np.float32))
        term = np.asarray(terminated, dtype=bool)
        done = term | np.asarray(truncated, dtype=bool)
        self.returns += reward.numpy()
        for i in range(self.n):
            if self.steps[i]:  # this step's observation is the previous step's next state
                self.steps[i][-1]["next_obs"] = obs[i]
            if adapting and self.hook is not None:
                extras = {k: v[i] for k, v in out.extras.items()}
                self.steps[i].append(
                    {"obs": obs[i], "actions": out.action[i], "rewards": reward[i],
                     "terminated": torch.tensor(term[i]), "logp": out.logp[i],
                     "values": out.value[i], "next_obs": obs[i], "extras": extras}
                )  # fmt: skip
        self.prev = Prev(out.action.clone(), reward, torch.as_tensor(done, dtype=torch.float32))
        for i in np.flatnonzero(done):
            if adapting:
                self.adaptation_returns[-1][i].append(float(self.returns[i]))
            if adapting and self.hook is not None:
                if final_obs[i] is not None:
                    self.steps[i][-1]["next_obs"] = self._obs(final_obs[i])
                self.hook(int(i), self._episode(int(i)))
            self.steps[i] = []
            self.episode_index[i] += 1
            self.returns[i] = 0.0

    def _episode(self, i: int) -> Episode:
        steps = self.steps[i]
        keys = ("obs", "actions", "rewards", "next_obs", "terminated", "logp", "values")
        cat = {k: torch.stack([s[k] for s in steps]) for k in keys}
        extras = {k: torch.stack([s["extras"][k] for s in steps]) for k in steps[0]["extras"]}
        stats = EpisodeStats(
            env_index=i,
            task=Task(composition_for(self.env_name), None),
            episode_index=self.episode_index[i],
            ret=float(self.returns[i]),
            # a Timestep carries no info dict; no method's on_episode_end reads success
            success=False,
            length=len(steps),
            trial_id=len(self.goals),
        )
        return Episode(**cat, stats=stats, extras=extras)


# --- evaluation ----------------------------------------------------------------------------------


@dataclass
class MetaWorldEvalConfig:
    """Settings of ``python -m experiments.metaworld_eval`` (metaworld's names)."""

    num_envs: int = 10
    """parallel envs, metaworld's meta_batch_size (a divisor of 50); 1 = unbiased count"""
    num_evals: int = 0
    """goal samplings (init, adapt, evaluate); 0 = 50 / num_envs: every test goal once"""
    adaptation_episodes: int = 2
    """episodes per env before adapt() (MAML: a multiple of its M episodes per inner step)"""
    evaluation_episodes: int = 1
    """episodes counted per task name after adapt() (the first to finish: module docstring)"""
    max_episode_steps: int = 0
    """episode length; 0 = the checkpoint's env max_steps (Meta-World's 500 if unset)"""
    unbiased: bool = True
    """also run metaworld's evaluation with one env (unbiased count) on the same goals"""
    seed: int = 0
    """torch seed of the policies' action sampling (both evaluators)"""

    def __post_init__(self) -> None:
        for k in ("num_envs", "adaptation_episodes", "evaluation_episodes"):
            if int(getattr(self, k)) < 1:
                raise ValueError(f"{k}={getattr(self, k)}; allowed: an integer >= 1")
        for k in ("num_evals", "max_episode_steps"):
            if int(getattr(self, k)) < 0:
                raise ValueError(f"{k}={getattr(self, k)}; allowed: an integer >= 0 (0 = default)")
        if TEST_GOALS % int(self.num_envs):
            divisors = ", ".join(str(d) for d in range(1, TEST_GOALS + 1) if TEST_GOALS % d == 0)
            raise ValueError(
                f"num_envs={self.num_envs}; allowed: a divisor of the {TEST_GOALS} ML1 test goals"
                f" ({divisors}), as metaworld splits the goals among the envs"
            )


def _check_module(module: Any, cfg: MetaWorldEvalConfig) -> str:
    """The ML1 task of a checkpoint's module; refuses what metaworld's evaluator cannot run."""
    mcfg = module.cfg
    if mcfg.env_id != "CompoMetaWorld-v0":
        raise ValueError(
            f"checkpoint of {module.method!r} trained on env_id={mcfg.env_id!r}; allowed: a"
            " checkpoint trained on CompoMetaWorld-v0"
        )
    if module.method in MAML_METHODS:
        m = int(mcfg.eval_adapt_episodes or mcfg.episodes_per_trial)
        if cfg.adaptation_episodes % m:
            raise ValueError(
                f"adaptation_episodes={cfg.adaptation_episodes} for {module.method}, whose inner"
                f" step takes {m} episodes; allowed: a multiple of {m}"
            )
    return ml1_env_name(mcfg.split_family)


def metaworld_evaluation(
    module: Any, cfg: MetaWorldEvalConfig, *, num_envs: int | None = None
) -> dict:
    """metaworld's ``metalearning_evaluation`` of ``module`` on its ML1 task's test goals.

    Returns:
        ``success`` and ``return`` (metaworld's means), ``success_per_task``, the ``goals``
        visited per evaluation (our layout seeds, one per env), the ``adaptation_returns`` of
        each env's adaptation episodes, and the settings used.
    """
    from metaworld.evaluation import metalearning_evaluation

    env_name = _check_module(module, cfg)
    n = int(num_envs or cfg.num_envs)
    steps = cfg.max_episode_steps or int(module.cfg.env_kwargs.get("max_steps", 500))
    num_evals = cfg.num_evals or TEST_GOALS // n
    envs = make_eval_envs(env_name, num_envs=n, max_episode_steps=steps)
    agent = MetaWorldAgent(module, envs, env_name)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            success, ret, per_task = metalearning_evaluation(
                agent, envs, num_evals=num_evals, adaptation_steps=1,
                adaptation_episodes=cfg.adaptation_episodes,
                evaluation_episodes=cfg.evaluation_episodes,
            )  # fmt: skip
    finally:
        envs.close()
    return {
        "success": float(success),
        "return": float(ret),
        "success_per_task": {k: float(v) for k, v in per_task.items()},
        "goals": agent.goals,
        "adaptation_returns": agent.adaptation_returns,
        "num_envs": n,
        "num_evals": num_evals,
        "max_episode_steps": steps,
    }


def protocol_on_goals(
    module: Any, env_name: str, goals: list[int], cfg: MetaWorldEvalConfig, *, num_envs: int
) -> dict:
    """Our protocol (``rl.protocol.run_trials``) on ``goals``: one trial of adaptation +
    evaluation episodes per goal, ``num_envs`` at a time (as metaworld batched them)."""
    from rl.protocol import run_trials

    steps = cfg.max_episode_steps or int(module.cfg.env_kwargs.get("max_steps", 500))
    tasks = [Task(composition_for(env_name), int(g)) for g in goals]
    episodes = cfg.adaptation_episodes + cfg.evaluation_episodes
    r = run_trials(
        module, tasks, env_id="CompoMetaWorld-v0",
        env_kwargs={**module.cfg.env_kwargs, "max_steps": steps}, episodes=episodes,
        num_envs=num_envs, seed=cfg.seed,
    )  # fmt: skip
    after = r["success"][:, cfg.adaptation_episodes :]
    return {
        "success_at": r["success"].mean(0).tolist(),
        "success_after_adaptation": float(after.mean()),
        "return": r["return"].tolist(),
        "success": r["success"].tolist(),
    }


def compare(checkpoint: str | Path, cfg: MetaWorldEvalConfig, log=print) -> dict:
    """metaworld's evaluation (``cfg.num_envs`` envs, and one env if ``cfg.unbiased``) and our
    protocol on the goals metaworld visited; prints the numbers side by side."""
    from experiments.registry import REGISTRY
    from rl.train import load_module

    def fresh():  # every evaluation starts from the checkpoint (PEARL counts its eval calls)
        return load_module(checkpoint, REGISTRY)

    module = fresh()
    env_name = _check_module(module, cfg)
    torch.set_num_threads(1)
    mw = metaworld_evaluation(module, cfg)
    goals = [g for batch in mw["goals"] for g in batch]
    ours = protocol_on_goals(fresh(), env_name, goals, cfg, num_envs=mw["num_envs"])
    result = {"method": module.method, "task": env_name, "metaworld": mw, "protocol": ours}
    if cfg.unbiased and mw["num_envs"] > 1:
        one = MetaWorldEvalConfig(**{**vars(cfg), "num_evals": len(set(goals))})
        result["metaworld_one_env"] = metaworld_evaluation(fresh(), one, num_envs=1)
    a, v = cfg.adaptation_episodes, cfg.evaluation_episodes
    log(f"{module.method} on ML1 {env_name}: {len(set(goals))} test goals, {a} adaptation + {v}"
        f" evaluation episodes of {mw['max_episode_steps']} steps")  # fmt: skip
    log(f"  metaworld evaluation, {mw['num_envs']} envs x {mw['num_evals']} evals:"
        f" success {mw['success']:.2f}")  # fmt: skip
    if "metaworld_one_env" in result:
        one = result["metaworld_one_env"]
        log(f"  metaworld evaluation, 1 env x {one['num_evals']} evals (unbiased count):"
            f" success {one['success']:.2f}")  # fmt: skip
    curve = ", ".join(f"{x:.2f}" for x in ours["success_at"])
    log(f"  our protocol, same goals: success by episode [{curve}]; episodes {a}..{a + v - 1}:"
        f" {ours['success_after_adaptation']:.2f}")  # fmt: skip
    return result


def run_metaworld_eval(
    checkpoint: str | Path,
    cfg: MetaWorldEvalConfig,
    out: str | Path | None = None,
    *,
    overwrite: bool = False,
    log=print,
    say_wrote: bool = True,
) -> dict:
    """``compare`` for one checkpoint; with ``out``, writes ``out/metaworld_eval.json`` (and
    says so unless ``say_wrote`` is False: ``compo`` lists every file it wrote itself)."""
    from experiments.registry import REGISTRY
    from rl.io import atomic_write_json, prepare_run_dir
    from rl.train import load_module

    if not Path(checkpoint).is_file():
        raise FileNotFoundError(f"--checkpoint {str(checkpoint)!r} is not a file")
    _check_module(load_module(checkpoint, REGISTRY), cfg)  # before anything is written
    folder = prepare_run_dir(out, overwrite=overwrite) if out is not None else None
    result = compare(checkpoint, cfg, log=log)
    if folder is not None:
        atomic_write_json(folder / "metaworld_eval.json", {"config": vars(cfg), **result})
        if say_wrote:
            log(f"wrote {folder / 'metaworld_eval.json'}")
    return result


def main(argv: list[str] | None = None) -> int:
    import yaml

    from rl.config import config_from_dict

    p = argparse.ArgumentParser(
        prog="python -m experiments.metaworld_eval", description=__doc__.splitlines()[0]
    )
    p.add_argument("--checkpoint", required=True, type=Path, help="a Meta-World ML1 checkpoint")
    p.add_argument("--out", type=Path, help="folder for metaworld_eval.json (optional)")
    p.add_argument("--overwrite", action="store_true", help="allow an existing --out folder")
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="one setting: " + ", ".join(MetaWorldEvalConfig.__dataclass_fields__),
    )  # fmt: skip
    a = p.parse_args(argv)
    try:
        raw = {}
        for pair in a.set:
            if "=" not in pair:
                raise ValueError(f"--set {pair!r}; expected key=value")
            key, value = pair.split("=", 1)
            raw[key] = yaml.safe_load(value)
        cfg = config_from_dict(MetaWorldEvalConfig, raw)
        run_metaworld_eval(a.checkpoint, cfg, a.out, overwrite=a.overwrite)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"metaworld_eval: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
