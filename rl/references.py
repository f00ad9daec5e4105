"""Reference rows of the held-out table: agents that are not meta-trained methods.

``random`` (uniform actions: the floor), ``oracle`` (CompoGrid's BFS oracle, told the
composition: the ceiling), ``ppo_scratch`` (PPO from scratch on each held-out task with the
trial's episode budget) and ``ppo_finetune`` (the transfer-learning comparison of issue 16: a
PPO policy pre-trained on the train compositions, fine-tuned by PPO on each held-out task with
the trial's episodes only). The ideal observer (reward mode) lives in ``rl.ideal_observer``.

Each agent implements ``TrialAgent.trial_policy(envs) -> (policy, on_episode_end)`` of
``rl.protocol`` and is evaluated by ``rl.protocol.run_trials`` like every method.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import torch

from rl.collect import Episode, FeedForwardPolicy, Prev, Rollout, StepOutput
from rl.gae import gae
from rl.nets import ActorCritic


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

    needs_env_objects = True

    def trial_policy(self, envs):
        from envs.grid import Oracle

        oracle = Oracle()

        class _P(_StatelessPolicy):
            def step(self, obs, memory, prev):
                a = torch.tensor([oracle.act(e) for e in envs.envs])
                n = obs.shape[0]
                return StepOutput(a, torch.zeros(n), torch.zeros(n))

        return _P(), None


# --- PPO within a trial (from scratch or fine-tuned) --------------------------------------------


@dataclass(frozen=True)
class TrialUpdate:
    """One PPO update made inside a trial (what ``PerTrialPPOAgent.updates`` records)."""

    trial_batch: int
    """which ``trial_policy`` call (one per batch of parallel trials)"""
    env_index: int
    """the env (trial) within the batch"""
    episode_index: int
    """the episode of the trial the update used"""
    steps: int
    """its env steps (the whole update batch)"""
    task: str
    """the trial's task"""


def ppo_update_on_episode(
    net: ActorCritic, optimizer: torch.optim.Optimizer, cfg: Any, ep: Episode
) -> dict[str, float]:
    """One PPO update (``rl.ppo.ppo_update``, ``cfg.update_epochs`` epochs) of ``net`` on one
    finished episode: GAE within the episode, bootstrapping from V(last obs) only when the
    episode was truncated."""
    from rl.ppo import ppo_update

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
            ep.rewards.reshape(T, 1), ep.values.reshape(T, 1), nv, cut, cfg.gamma, cfg.gae_lambda
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

        return ppo_update(
            ro, evaluate, list(net.parameters()), optimizer, cfg, advantages=adv, returns=ret
        )


class _PerEnvPolicy(_StatelessPolicy):
    """Env ``i`` acts with its own network ``nets[i]`` (one network per trial)."""

    def __init__(self, nets: list[ActorCritic]) -> None:
        self.nets = nets

    def step(self, obs, memory, prev):
        outs = [
            FeedForwardPolicy(n).step(obs[i : i + 1], None, prev) for i, n in enumerate(self.nets)
        ]
        return StepOutput(
            torch.cat([o.action for o in outs]),
            torch.cat([o.logp for o in outs]),
            torch.cat([o.value for o in outs]),
        )


class PerTrialPPOAgent:
    """PPO inside each trial: one network per trial (made by ``make_net``), one PPO update on
    each finished episode of the trial and on nothing else; networks are dropped when the
    trial ends.

    Attributes:
        updates: every PPO update made so far, as ``TrialUpdate`` records (so a test or a
            reader can check which episodes each trial's network learned from).
        nets: the networks of the current batch of trials.
    """

    def __init__(self, ppo: Any = None) -> None:
        from rl.ppo import PPOConfig

        # one minibatch: an episode is tens of steps, four minibatches would be a handful each
        self.ppo = ppo or PPOConfig(num_minibatches=1)
        self.updates: list[TrialUpdate] = []
        self.nets: list[ActorCritic] = []
        self._batches = 0

    def make_net(self, envs: gym.vector.VectorEnv) -> ActorCritic:
        raise NotImplementedError

    def trial_policy(self, envs):
        self.nets = [self.make_net(envs) for _ in range(envs.num_envs)]
        nets, cfg, batch = self.nets, self.ppo, self._batches
        self._batches += 1
        opts = [torch.optim.Adam(n.parameters(), lr=cfg.lr, eps=1e-5) for n in nets]

        def hook(i: int, ep: Episode) -> None:
            ppo_update_on_episode(nets[i], opts[i], cfg, ep)
            self.updates.append(
                TrialUpdate(
                    batch,
                    int(i),
                    int(ep.stats.episode_index),
                    int(ep.rewards.shape[0]),
                    str(ep.stats.task),
                )  # fmt: skip
            )

        return _PerEnvPolicy(nets), hook


class ScratchPPOAgent(PerTrialPPOAgent):
    """PPO from scratch on each held-out task with the same episode budget: a freshly
    initialised policy per trial, one PPO update on each finished episode."""

    def __init__(self, hidden: int = 64, ppo: Any = None) -> None:
        super().__init__(ppo)
        self.hidden = hidden

    def make_net(self, envs):
        obs_dim = envs.single_observation_space.shape[0]
        return ActorCritic(obs_dim, envs.single_action_space, self.hidden)


class FinetunePPOAgent(PerTrialPPOAgent):
    """Transfer learning (issue 16, seed Q8): a PPO policy pre-trained on the train
    compositions, fine-tuned by PPO on each held-out task using only the episodes of its trial.

    Every trial starts from its own copy of the pre-trained weights; the agent keeps a private
    copy of them, which no trial modifies, so trials are independent of their order.

    Args:
        net: the pre-trained ``ActorCritic`` (e.g. ``PPOModule.net``); copied, not modified.
        ppo: the fine-tuning PPO settings (default: those of ``ScratchPPOAgent``, so the two
            rows differ only in their starting weights).
    """

    def __init__(self, net: ActorCritic, ppo: Any = None) -> None:
        super().__init__(ppo)
        if not isinstance(net, ActorCritic):
            raise ValueError(
                f"ppo_finetune needs a pre-trained ActorCritic; got {type(net).__name__}"
            )
        self.pretrained = copy.deepcopy(net)
        self.obs_dim = int(net.actor[0].in_features)

    def make_net(self, envs):
        obs_dim = envs.single_observation_space.shape[0]
        if obs_dim != self.obs_dim:
            raise ValueError(
                f"ppo_finetune: the pre-trained policy reads {self.obs_dim} observation features,"
                f" the evaluation envs give {obs_dim}; allowed: the same env and env_kwargs"
            )
        return copy.deepcopy(self.pretrained)
