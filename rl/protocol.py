"""The one meta-evaluation protocol every method is measured with.

A method is evaluated on held-out *tasks* (a held-out composition plus a layout/goal seed):
each task gets one trial of E episodes; memory (hidden state, context, adapted parameters)
persists over the trial's episodes and is fresh for every trial. Per episode index we record
success and return, giving the *adaptation curve*. Curves are averaged over tasks per training
seed; intervals are 95% percentile-bootstrap intervals over seeds.

A method plugs in through ``TrialAgent.trial_policy(envs) -> (policy, on_episode_end)``: the
policy acts through the shared ``Collector``; ``on_episode_end(env_index, episode)`` is where
gradient-based methods adapt (it runs inside the collector's ``no_grad`` step, so adapting
code must open ``torch.enable_grad()`` itself).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import gymnasium as gym
import numpy as np
import torch

from envs.core import Composition, Task
from rl.collect import Collector, Episode, FeedForwardPolicy, Prev, StepOutput, make_vector_env
from rl.gae import gae
from rl.nets import ActorCritic

SCHEMA = 1
Hook = Callable[[int, Episode], None] | None


class TrialAgent(Protocol):
    def trial_policy(self, envs: gym.vector.VectorEnv) -> tuple[Any, Hook]: ...


@dataclass
class EvalConfig:
    """Evaluation protocol settings (identical for every method of a run)."""

    episodes: int = 10
    """E: episodes per trial (adaptation budget)"""
    num_tasks: int = 20
    """held-out tasks (composition + layout seed) per method and seed"""
    num_envs: int = 10
    """trials run in parallel"""
    seed: int = 1234
    """seed of the task draw and of the episode seeds (same for every method)"""
    bootstrap: int = 2000
    """bootstrap resamples for the 95% intervals"""

    def __post_init__(self) -> None:
        for k in ("episodes", "num_tasks", "num_envs", "bootstrap"):
            if getattr(self, k) < 1:
                raise ValueError(f"eval.{k}={getattr(self, k)}; allowed: an integer >= 1")


def heldout_tasks(
    compositions: Sequence[Composition | str],
    n: int,
    seed: int,
    layout_seeds: Sequence[int] | None = None,
) -> list[Task]:
    """``n`` tasks cycling through the compositions (shuffled by ``seed``), each with a layout
    seed — drawn from ``layout_seeds`` when the split prescribes them (Meta-World's held-out
    goals), otherwise any."""
    comps = [Composition.parse(c) for c in compositions]
    if not comps:
        raise ValueError("no held-out compositions to evaluate on")
    rng = np.random.default_rng(seed)
    order = [comps[i] for i in rng.permutation(len(comps))]
    if layout_seeds is not None:
        pool = [int(s) for s in layout_seeds]
        return [Task(order[i % len(order)], pool[int(rng.integers(len(pool)))]) for i in range(n)]
    return [Task(order[i % len(order)], int(rng.integers(2**31))) for i in range(n)]


def run_trials(
    agent: TrialAgent,
    tasks: Sequence[Task],
    *,
    env_id: str,
    env_kwargs: dict,
    episodes: int,
    num_envs: int,
    seed: int,
) -> dict[str, np.ndarray]:
    """One trial of ``episodes`` episodes per task; returns ``success`` and ``return`` arrays of
    shape (len(tasks), episodes).

    A pure function of (agent parameters, tasks, ``seed``): torch's global generator, which
    policies sample actions from, is seeded from ``seed`` inside a forked RNG state, so an
    evaluation right after training and one of the reloaded checkpoint agree, and the caller's
    random stream is left as it was.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _run_trials(agent, tasks, env_id, env_kwargs, episodes, num_envs, seed)


def _run_trials(agent, tasks, env_id, env_kwargs, episodes, num_envs, seed):
    n_tasks = len(tasks)
    success = np.full((n_tasks, episodes), np.nan)
    returns = np.full((n_tasks, episodes), np.nan)
    k = min(num_envs, n_tasks)
    envs = make_vector_env(env_id, k, {**env_kwargs, "composition": tasks[0].composition})
    try:
        for b, start in enumerate(range(0, n_tasks, k)):
            batch = list(tasks[start : start + k])
            pad = k - len(batch)
            batch += [batch[-1]] * pad
            policy, hook = agent.trial_policy(envs)
            col = Collector(
                envs, policy, episodes_per_trial=episodes, seed=seed + b, on_episode_end=hook
            )
            ro = col.collect_trials(batch)
            for e in ro.episodes:
                if e.env_index < k - pad:
                    success[start + e.env_index, e.episode_index] = float(e.success)
                    returns[start + e.env_index, e.episode_index] = e.ret
    finally:
        envs.close()
    assert not np.isnan(success).any()
    return {"success": success, "return": returns}


# --- reference agents ---------------------------------------------------------------------------


class _StatelessPolicy:
    def initial_memory(self, n):
        return None

    def reset_memory(self, memory, mask):
        return None

    def bootstrap_value(self, obs, memory, prev):
        return torch.zeros(obs.shape[0])


class RandomPolicy(_StatelessPolicy):
    """Uniform random actions (the lower reference row)."""

    def __init__(self, space: gym.Space, seed: int) -> None:
        self.space = space
        self.gen = torch.Generator().manual_seed(seed)

    def step(self, obs: torch.Tensor, memory: Any, prev: Prev) -> StepOutput:
        n = obs.shape[0]
        if isinstance(self.space, gym.spaces.Discrete):
            a = torch.randint(int(self.space.n), (n,), generator=self.gen)
        else:
            lo = torch.as_tensor(self.space.low)
            hi = torch.as_tensor(self.space.high)
            a = lo + (hi - lo) * torch.rand((n, *self.space.shape), generator=self.gen)
        return StepOutput(a, torch.zeros(n), torch.zeros(n))


class RandomAgent:
    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    def trial_policy(self, envs):
        self.seed += 1
        return RandomPolicy(envs.single_action_space, self.seed), None


class OracleAgent:
    """CompoGrid's BFS oracle (the upper reference row); needs a sync vector env."""

    def trial_policy(self, envs):
        from envs.grid import Oracle

        oracle = Oracle()

        class _P(_StatelessPolicy):
            def step(self, obs, memory, prev):
                a = torch.tensor([oracle.act(e) for e in envs.envs])
                n = obs.shape[0]
                return StepOutput(a, torch.zeros(n), torch.zeros(n))

        return _P(), None


class ScratchPPOAgent:
    """PPO from scratch on each held-out task with the same episode budget: a fresh policy per
    trial, one PPO update (``rl.ppo.ppo_update``) on each finished episode."""

    def __init__(self, hidden: int = 64, ppo: Any = None) -> None:
        from rl.ppo import PPOConfig

        self.hidden = hidden
        self.ppo = ppo or PPOConfig(num_minibatches=1)

    def trial_policy(self, envs):
        from rl.collect import Rollout
        from rl.ppo import ppo_update

        obs_dim = envs.single_observation_space.shape[0]
        nets = [
            ActorCritic(obs_dim, envs.single_action_space, self.hidden)
            for _ in range(envs.num_envs)
        ]
        opts = [torch.optim.Adam(n.parameters(), lr=self.ppo.lr, eps=1e-5) for n in nets]
        cfg = self.ppo

        class _P(_StatelessPolicy):
            def step(self, obs, memory, prev):
                outs = [
                    FeedForwardPolicy(n).step(obs[i : i + 1], None, prev)
                    for i, n in enumerate(nets)
                ]
                return StepOutput(
                    torch.cat([o.action for o in outs]),
                    torch.cat([o.logp for o in outs]),
                    torch.cat([o.value for o in outs]),
                )

        def hook(i: int, ep: Episode) -> None:
            net = nets[i]
            with torch.enable_grad():
                T = ep.rewards.shape[0]
                term = ep.terminated.reshape(T, 1)
                with torch.no_grad():
                    last_v = net.value(ep.next_obs[-1:]).reshape(1)
                nv = torch.zeros(T, 1)
                nv[:-1] = ep.values[1:].reshape(-1, 1)
                nv[-1] = torch.where(term[-1], torch.zeros(1), last_v)
                cut = torch.zeros(T, 1)
                cut[-1] = 1.0
                adv, ret = gae(
                    ep.rewards.reshape(T, 1),
                    ep.values.reshape(T, 1),
                    nv,
                    cut,
                    cfg.gamma,
                    cfg.gae_lambda,
                )
                ro = Rollout(
                    obs=ep.obs.unsqueeze(1), actions=ep.actions.unsqueeze(1), logp=ep.logp.reshape(T, 1),
                    values=ep.values.reshape(T, 1), rewards=ep.rewards.reshape(T, 1), terminated=term,
                    truncated=torch.zeros(T, 1, dtype=torch.bool), trunc_value=torch.zeros(T, 1),
                    episode_start=torch.zeros(T, 1, dtype=torch.bool), trial_start=torch.zeros(T, 1, dtype=torch.bool),
                    episode_index=torch.zeros(T, 1, dtype=torch.long), prev_action=ep.actions.unsqueeze(1),
                    prev_reward=torch.zeros(T, 1), prev_done=torch.zeros(T, 1),
                    valid=torch.ones(T, 1, dtype=torch.bool), last_value=torch.zeros(1), memory_start=None,
                    extras={}, phi=None, next_obs=ep.next_obs.unsqueeze(1), episodes=[],
                )  # fmt: skip
                b_obs, b_act = ep.obs, ep.actions

                def evaluate(mb):
                    d = net.dist(b_obs[mb])
                    return d.log_prob(b_act[mb]), d.entropy(), net.value(b_obs[mb])

                ppo_update(
                    ro, evaluate, list(net.parameters()), opts[i], cfg, advantages=adv, returns=ret
                )

        return _P(), hook


# --- statistics ---------------------------------------------------------------------------------


def bootstrap_ci(per_seed: np.ndarray, n_boot: int, seed: int = 0) -> np.ndarray:
    """95% percentile-bootstrap interval of the mean over seeds, per column.

    Args:
        per_seed: (S, E) array, one row per training seed.

    Returns:
        (E, 2) array of [low, high]; with a single seed the interval collapses to the value.
    """
    per_seed = np.asarray(per_seed, dtype=float)
    S = per_seed.shape[0]
    if S == 1:
        return np.stack([per_seed[0], per_seed[0]], axis=-1)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, S, size=(n_boot, S))
    means = per_seed[idx].mean(axis=1)  # (n_boot, E)
    return np.stack(
        [np.percentile(means, 2.5, axis=0), np.percentile(means, 97.5, axis=0)], axis=-1
    )


def episodes_to_threshold(curve: Sequence[float], threshold: float = 0.8) -> int | None:
    """Index of the first episode whose mean success reaches ``threshold`` (0 = zero-shot), i.e.
    the number of adaptation episodes needed before it; None if never within the trial."""
    for i, v in enumerate(curve):
        if v >= threshold - 1e-12:
            return i
    return None


def summarize(
    per_seed_success: dict[int, np.ndarray],
    per_seed_return: dict[int, np.ndarray],
    *,
    n_boot: int = 2000,
    meta_train_env_steps: int = 0,
    wall_s: float = 0.0,
) -> dict:
    """The ``results.json`` entry of one method from its per-seed (tasks, E) arrays."""
    seeds = sorted(per_seed_success)
    S = np.stack([per_seed_success[s].mean(axis=0) for s in seeds])
    R = np.stack([per_seed_return[s].mean(axis=0) for s in seeds])
    success_at = S.mean(axis=0)
    return {
        "success_at": [float(x) for x in success_at],
        "success_ci": [[float(a), float(b)] for a, b in bootstrap_ci(S, n_boot)],
        "return_at": [float(x) for x in R.mean(axis=0)],
        "return_ci": [[float(a), float(b)] for a, b in bootstrap_ci(R, n_boot)],
        "episodes_to_80": episodes_to_threshold(success_at, 0.8),
        "auc": float(success_at.mean()),
        "per_seed_success_at": {str(s): [float(x) for x in S[i]] for i, s in enumerate(seeds)},
        "meta_train_env_steps": int(meta_train_env_steps),
        "wall_s": float(wall_s),
        "seeds": [int(s) for s in seeds],
    }


# --- run folder ---------------------------------------------------------------------------------


def results_document(config: dict, split: dict, methods: dict[str, dict]) -> dict:
    return {"schema": SCHEMA, "config": config, "split": split, "methods": methods}


def table_markdown(methods: dict[str, dict], episodes: int, command: str = "") -> str:
    """The held-out table: zero-shot success, final success, episodes to 0.8, AUC, budget."""
    k = episodes - 1
    lines = [
        f"| method | success@0 [95% CI] | success@{k} [95% CI] | episodes to 0.8 | AUC | meta-train env steps | seeds | wall s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, m in methods.items():
        s0, c0 = m["success_at"][0], m["success_ci"][0]
        sk, ck = m["success_at"][k], m["success_ci"][k]
        e80 = "never" if m["episodes_to_80"] is None else str(m["episodes_to_80"])
        lines.append(
            f"| {name} | {s0:.2f} [{c0[0]:.2f}, {c0[1]:.2f}] | {sk:.2f} [{ck[0]:.2f}, {ck[1]:.2f}] | "
            f"{e80} | {m['auc']:.2f} | {m['meta_train_env_steps']:,} | {len(m['seeds'])} | {m['wall_s']:.0f} |"
        )
    text = "\n".join(lines) + "\n"
    if command:
        text += f"\nProduced by: `{command}`\n"
    return text


def plot_curves(methods: dict[str, dict], path, title: str = "Held-out adaptation curves") -> None:
    """Success per episode index with 95% bands, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from rl.io import atomic_write_bytes

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, m in methods.items():
        x = np.arange(len(m["success_at"]))
        ci = np.asarray(m["success_ci"])
        style = "--" if name in ("random", "oracle", "ppo_scratch") else "-"
        (line,) = axes[0].plot(x, m["success_at"], style, marker="o", ms=3, label=name)
        axes[0].fill_between(x, ci[:, 0], ci[:, 1], color=line.get_color(), alpha=0.15)
        rci = np.asarray(m["return_ci"])
        axes[1].plot(x, m["return_at"], style, marker="o", ms=3, color=line.get_color(), label=name)
        axes[1].fill_between(x, rci[:, 0], rci[:, 1], color=line.get_color(), alpha=0.15)
    axes[0].axhline(0.8, color="grey", lw=0.8, ls=":")
    axes[0].set(
        xlabel="episode index in trial", ylabel="success rate", ylim=(-0.02, 1.02), title=title
    )
    axes[1].set(xlabel="episode index in trial", ylabel="return", title="Return")
    axes[0].legend(fontsize=8, loc="best")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def is_finite_curve(xs: Sequence[float]) -> bool:
    return all(math.isfinite(x) for x in xs)
