"""RL² (Duan et al. 2016, "RL²: Fast Reinforcement Learning via Slow Reinforcement Learning";
Wang et al. 2016, "Learning to reinforcement learn").

A recurrent policy reads ``[o_t, a_{t-1}, r_{t-1}, done_{t-1}]`` (``a_{t-1}`` one-hot, all zeros
at a trial's first step, where there is no previous action); its hidden state is kept across
the episodes of a trial and reset only between trials, so whatever it learns about the task in
episode 0 (which object pays, where the goal is) is available in episodes 1..E-1. The "fast"
learner is the hidden-state dynamics; the "slow" learner is PPO over whole trials, with
advantages whose lambda-trace and bootstrap span the episodes of a trial (``trial_cut`` /
``trial_next_values``), so exploring in episode 0 is credited with the reward it earns later;
a trial's end is terminal, however its last episode ended.

Training re-runs the recurrent net over each rollout from ``memory_start`` with truncated
backpropagation through time: the sequence is cut into chunks of ``bptt_len`` steps (the hidden
state is detached between chunks) and the hidden state is zeroed wherever a trial starts.
Between those points the whole segment goes through one ``nn.LSTM``/``nn.GRU`` call, so a
rollout costs a handful of fused recurrent calls rather than one Python step per time step.

The PPO epochs take minibatches of *envs* (whole sequences), as in CleanRL's
``ppo_atari_lstm.py``, and use the shared ``rl.ppo.ppo_loss``.

Examples:
    >>> from baselines.rl2 import RL2Module
    >>> m = RL2Module({"compositions": ["goto(red ball)"], "hidden": 16, "head_hidden": 16})
    >>> m.net.rnn.hidden_size
    16
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from torch import nn
from torch.distributions import Distribution

from rl import distributed
from rl.collect import Collector, Prev, Rollout, StepOutput, make_vector_env, uniform_task_sampler
from rl.config import BaseConfig
from rl.gae import gae
from rl.module import RLModule
from rl.nets import ActionHead, mlp
from rl.ppo import PPO_TERMS, PPOConfig, empty_step, explained_variance, ppo_loss, ppo_section

Memory = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


# --- config -----------------------------------------------------------------------------------------


@dataclass
class RL2Config(BaseConfig):
    """RL²: a recurrent PPO policy meta-trained over trials of ``episodes_per_trial`` episodes.

    The network sizes default to the seed document's Q3.2 (LSTM, 2 layers of 256, heads of
    256). They are kept as the default so the baseline matches its description; on CompoGrid on
    2 CPU cores a 1-layer GRU of 64 units trains about 2.7x faster (574 vs 214 env steps/s
    including the PPO update, measured on busy cores), so small-budget runs should pass
    ``rnn: gru, hidden: 64, num_layers: 1, head_hidden: 64``.
    """

    episodes_per_trial: int = 4
    """E: episodes per training trial; the hidden state persists over them"""
    rnn: str = "lstm"
    """recurrent cell: 'lstm' (seed Q3.2) or 'gru'"""
    hidden: int = 256
    """recurrent hidden size (seed Q3.2: 256)"""
    num_layers: int = 2
    """stacked recurrent layers (seed Q3.2: 2)"""
    head_hidden: int = 256
    """width of the policy and value heads' hidden layer (seed Q3.2: 256)"""
    bptt_len: int = 32
    """truncated-BPTT chunk length in steps; the hidden state is detached between chunks"""
    ppo: PPOConfig = field(default_factory=lambda: PPOConfig(num_steps=256, num_minibatches=2))
    """PPO hyper-parameters (``num_minibatches`` splits the *envs*, so it is capped at
    ``num_envs``)"""

    def __post_init__(self) -> None:
        self.ppo = ppo_section(self)
        super().__post_init__()  # after the section is built: it reads the rollout length
        if self.rnn not in ("lstm", "gru"):
            raise ValueError(f"rnn={self.rnn!r}; allowed: 'lstm', 'gru'")
        for name in ("hidden", "num_layers", "head_hidden", "bptt_len"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | np.integer) or v < 1:
                raise ValueError(f"{name}={v!r}; allowed: an integer >= 1")

    def rollout_env_steps(self) -> int:
        return int(self.num_envs) * int(self.ppo.num_steps)


# --- network ----------------------------------------------------------------------------------------


class RL2Net(nn.Module):
    """Recurrent actor-critic over ``[obs, prev action, prev reward, prev done]``.

    The recurrent core is shared by the policy and value heads (as in RL², Duan et al. 2016,
    sec. 2.2, where one GRU feeds both); memory is ``h`` (GRU) or ``(h, c)`` (LSTM), each of
    shape (num_layers, N, hidden).
    """

    def __init__(
        self,
        obs_dim: int,
        action_space: gym.Space,
        *,
        rnn: str = "lstm",
        hidden: int = 256,
        num_layers: int = 2,
        head_hidden: int = 256,
    ) -> None:
        super().__init__()
        self.head = ActionHead(action_space)
        self.obs_dim = obs_dim
        self.in_dim = obs_dim + self.head.prev_dim + 2
        cls = nn.LSTM if rnn == "lstm" else nn.GRU
        self.is_lstm = rnn == "lstm"
        self.rnn = cls(self.in_dim, hidden, num_layers=num_layers)
        for name, p in self.rnn.named_parameters():
            # orthogonal recurrent weights, zero biases (CleanRL's ppo_atari_lstm init)
            if "weight" in name:
                nn.init.orthogonal_(p, 1.0)
            else:
                nn.init.zeros_(p)
        self.actor = mlp([hidden, head_hidden, self.head.n_out], out_gain=0.01)
        self.critic = mlp([hidden, head_hidden, 1], out_gain=1.0)
        self.log_std = nn.Parameter(
            torch.full((self.head.n_out,), -0.5), requires_grad=not self.head.discrete
        )

    # -- memory -------------------------------------------------------------------------------------
    def initial_memory(self, n: int) -> Memory:
        h = torch.zeros(self.rnn.num_layers, n, self.rnn.hidden_size)
        return (h, h.clone()) if self.is_lstm else h

    @staticmethod
    def mask_memory(memory: Memory, keep: torch.Tensor) -> Memory:
        """Zero the batch entries where ``keep`` (N,) is 0 (out of place: the caller may still
        hold the old memory, e.g. the collector's ``memory_start``)."""
        k = keep.to(torch.float32).reshape(1, -1, 1)
        if isinstance(memory, tuple):
            return tuple(m * k for m in memory)
        return memory * k

    @staticmethod
    def detach_memory(memory: Memory) -> Memory:
        if isinstance(memory, tuple):
            return tuple(m.detach() for m in memory)
        return memory.detach()

    # -- forward ------------------------------------------------------------------------------------
    def inputs(
        self,
        obs: torch.Tensor,
        prev_action: torch.Tensor,
        prev_reward: torch.Tensor,
        prev_done: torch.Tensor,
        trial_start: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Concatenate the RL² input for any leading shape (..., obs_dim).

        ``trial_start`` (leading shape, bool) marks steps with no previous action: their action
        encoding is all zeros. The collector stores action 0 there (its ``Prev`` convention),
        which one-hot encoding would turn into "the agent just moved left".
        """
        lead = obs.shape[:-1]
        a = self.head.encode_prev(prev_action).reshape(*lead, self.head.prev_dim)
        if trial_start is not None:
            a = a * (~trial_start.bool()).reshape(*lead, 1).to(a.dtype)
        return torch.cat(
            [obs, a, prev_reward.reshape(*lead, 1).float(), prev_done.reshape(*lead, 1).float()],
            dim=-1,
        )

    def core(self, x: torch.Tensor, memory: Memory) -> tuple[torch.Tensor, Memory]:
        """Run the recurrent core over ``x`` (L, N, in_dim) from ``memory``."""
        return self.rnn(x, memory)

    def dist(self, features: torch.Tensor) -> Distribution:
        return self.head.dist(self.actor(features), self.log_std)

    def value(self, features: torch.Tensor) -> torch.Tensor:
        return self.critic(features).squeeze(-1)

    def sequence(
        self,
        x: torch.Tensor,
        memory_start: Memory,
        trial_start: torch.Tensor,
        bptt_len: int,
    ) -> torch.Tensor:
        """Features (T, N, hidden) of a stored rollout, recomputed for training.

        The hidden state is zeroed for env n before step t where ``trial_start[t, n]``, exactly
        as the collector does while acting, and detached every ``bptt_len`` steps (truncated
        BPTT). Between those points one fused recurrent call covers the whole segment.

        Args:
            x: RL² inputs (T, N, in_dim).
            memory_start: memory before step 0 (``Rollout.memory_start``).
            trial_start: bool (T, N).
            bptt_len: truncation length (>= 1).
        """
        T = x.shape[0]
        # segment boundaries: trial starts of any env, BPTT chunk starts
        resets = set(torch.nonzero(trial_start.any(dim=1)).flatten().tolist())
        chunks = set(range(0, T, bptt_len))
        bounds = sorted(resets | chunks | {T})
        memory = memory_start
        outs = []
        for a, b in zip(bounds[:-1], bounds[1:]):
            if a in chunks and a > 0:
                memory = self.detach_memory(memory)
            if a in resets:
                memory = self.mask_memory(memory, ~trial_start[a])
            out, memory = self.core(x[a:b], memory)
            outs.append(out)
        return torch.cat(outs, dim=0)


class RL2Policy:
    """The ``RolloutPolicy`` of an ``RL2Net``: memory is the recurrent state."""

    def __init__(self, net: RL2Net, greedy: bool = False) -> None:
        self.net = net
        self.greedy = greedy
        # (N,) bool: envs whose next step is a trial's first (no previous action). ``Prev`` cannot
        # say so (it holds action 0 there), so the policy keeps it: set where the memory is
        # (re)initialised, cleared by the step that consumes it.
        self.trial_first: torch.Tensor | None = None

    def initial_memory(self, n: int) -> Memory:
        self.trial_first = torch.ones(n, dtype=torch.bool)
        return self.net.initial_memory(n)

    def reset_memory(self, memory: Memory, mask: torch.Tensor) -> Memory:
        """Called by the collector at trial starts only: zero the masked envs' hidden state."""
        mask = mask.bool()
        self.trial_first = mask.clone() if self.trial_first is None else self.trial_first | mask
        return self.net.mask_memory(memory, ~mask)

    def _features(self, obs: torch.Tensor, memory: Memory, prev: Prev):
        first = self.trial_first
        if first is not None and first.shape[0] != obs.shape[0]:
            raise ValueError(
                f"memory set up for {first.shape[0]} envs, got a batch of {obs.shape[0]}"
            )
        x = self.net.inputs(obs, prev.action, prev.reward, prev.done, first).unsqueeze(0)
        out, memory = self.net.core(x, memory)
        return out[0], memory

    def step(self, obs: torch.Tensor, memory: Memory, prev: Prev) -> StepOutput:
        f, memory = self._features(obs, memory, prev)
        self.trial_first = torch.zeros(obs.shape[0], dtype=torch.bool)
        dist = self.net.dist(f)
        if self.greedy:
            action = dist.probs.argmax(-1) if hasattr(dist, "probs") else dist.mean
        else:
            action = dist.sample()
        return StepOutput(
            action, dist.log_prob(action), self.net.value(f), memory,
            {"entropy": dist.entropy()},  # for rl.diagnostics
        )  # fmt: skip

    def bootstrap_value(self, obs: torch.Tensor, memory: Memory, prev: Prev) -> torch.Tensor:
        f, _ = self._features(obs, memory, prev)
        return self.net.value(f)


# --- advantages -------------------------------------------------------------------------------------


def trial_advantages(
    ro: Rollout, next_trial_start: torch.Tensor | None, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE over whole trials (RL²): episode ends inside a trial continue the trace into the next
    episode; a trial end stops it with no bootstrap, whether its last episode terminated or was
    truncated. A trial is RL²'s episode (Duan et al. 2016, sec. 2.2): once its E episodes are
    done nothing more can be earned, so V(final obs) of a truncated last episode would credit
    reward that never comes.

    ``next_trial_start`` (N,) says whether the rollout's last step ends a trial (the collector
    stores it as ``ro.next_trial_start``); pass None to use the rollout's own.
    """
    if next_trial_start is not None:
        ro.next_trial_start = next_trial_start
    cut = ro.trial_cut()
    next_values = torch.where(cut.bool(), torch.zeros_like(ro.values), ro.trial_next_values())
    return gae(ro.rewards, ro.values, next_values, cut, gamma, lam)


# --- module -----------------------------------------------------------------------------------------


class RL2Module(RLModule):
    """RL² as a LightningModule: one ``training_step`` = one rollout of ``ppo.num_steps`` vector
    steps (trials continue across rollouts) + PPO epochs with truncated BPTT."""

    method = "rl2"
    config_cls = RL2Config

    def build(self) -> None:
        cfg: RL2Config = self.cfg
        self.train_set = cfg.train_compositions()
        probe = make_vector_env(cfg.env_id, 1, {**cfg.env_kwargs, "composition": self.train_set[0]})
        obs_dim = probe.single_observation_space.shape[0]
        self.action_space = probe.single_action_space
        probe.close()
        self.net = RL2Net(
            obs_dim, self.action_space, rnn=cfg.rnn, hidden=cfg.hidden,
            num_layers=cfg.num_layers, head_hidden=cfg.head_hidden,
        )  # fmt: skip

    def make_collector(self) -> Collector:
        cfg: RL2Config = self.cfg
        envs = make_vector_env(
            cfg.env_id, self.num_local_envs, {**cfg.env_kwargs, "composition": self.train_set[0]},
            vectorization=cfg.vectorization,
        )  # fmt: skip
        sampler = uniform_task_sampler(self.train_set, cfg.fixed_layout, cfg.train_layout_seeds())
        return Collector(
            envs, RL2Policy(self.net), episodes_per_trial=cfg.episodes_per_trial,
            task_sampler=sampler, seed=cfg.seed,
        )  # fmt: skip

    def configure_optimizers(self):
        return torch.optim.Adam(self.net.parameters(), lr=self.cfg.ppo.lr, eps=1e-5)

    def iterations(self) -> int:
        cfg = self.cfg
        return max(1, -(-cfg.total_env_steps // (cfg.num_envs * cfg.ppo.num_steps)))

    def acting_policy(self) -> RL2Policy:
        return RL2Policy(self.net)

    def evaluate_rollout(
        self, ro: Rollout, envs: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(new_logp, entropy, new_values), each (T, n), of the rollout's envs ``envs`` (all by
        default), recomputing the recurrent features from ``memory_start`` with truncated BPTT."""
        idx = torch.arange(ro.obs.shape[1]) if envs is None else envs
        mem = ro.memory_start
        mem = tuple(m[:, idx] for m in mem) if isinstance(mem, tuple) else mem[:, idx]
        x = self.net.inputs(
            ro.obs[:, idx], ro.prev_action[:, idx], ro.prev_reward[:, idx], ro.prev_done[:, idx],
            ro.trial_start[:, idx],
        )  # fmt: skip
        f = self.net.sequence(x, mem, ro.trial_start[:, idx], self.cfg.bptt_len)
        dist = self.net.dist(f)
        return dist.log_prob(ro.actions[:, idx]), dist.entropy(), self.net.value(f)

    def training_step(self, batch, batch_idx):
        cfg: RL2Config = self.cfg
        t0 = time.perf_counter()
        ro = self.collector.collect(cfg.ppo.num_steps)
        adv, ret = trial_advantages(ro, None, cfg.ppo.gamma, cfg.ppo.gae_lambda)
        stats = self.ppo_epochs(ro, adv, ret)
        self.last_rollouts = (ro,)  # read by rl.diagnostics.MetaRLDiagnostics
        self.log_iteration(ro, stats, time.perf_counter() - t0)

    def ppo_epochs(self, ro: Rollout, adv: torch.Tensor, ret: torch.Tensor) -> dict[str, float]:
        """PPO epochs over minibatches of envs (whole sequences keep BPTT exact), each term from
        the shared ``ppo_loss``; advantages normalised per minibatch as in ``ppo_update``.

        Under DDP the minibatches are drawn from the envs of all ranks (rank 0's permutation,
        broadcast), each rank evaluates the sequences of its own envs and scales its loss by
        its share of the minibatch's valid steps (``rl.distributed``), so the step is the one
        a single process holding every env would take.
        """
        p = self.cfg.ppo
        opt = self.optimizers()
        params = list(self.net.parameters())
        rank, size = distributed.world()
        n_local = ro.obs.shape[1]
        n_envs = n_local * size
        g_valid, g_adv = distributed.gather_envs(ro.valid), distributed.gather_envs(adv)
        groups = min(p.num_minibatches, n_envs)
        stats: dict[str, list[float]] = {}
        rows, shares = [], []
        for _epoch in range(p.update_epochs):
            perm = torch.randperm(n_envs) if rank == 0 else torch.empty(n_envs, dtype=torch.long)
            for g_mb in torch.tensor_split(distributed.broadcast(perm), groups):
                _, mb = distributed.local_part(g_mb, n_local, rank)
                valid = ro.valid[:, mb]
                mb_adv = adv[:, mb][valid]
                g_sel = g_adv[:, g_mb][g_valid[:, g_mb]]
                if p.norm_adv and g_sel.numel() > 1:
                    mb_adv = (mb_adv - g_sel.mean()) / (g_sel.std() + 1e-8)
                share = int(valid.sum()) / max(int(g_sel.numel()), 1)
                if size > 1 and not valid.any():
                    empty_step(params, opt, p, self.manual_backward)
                    rows.append({})
                    shares.append(0.0)
                    continue
                new_logp, entropy, new_values = self.evaluate_rollout(ro, mb)
                terms = ppo_loss(
                    new_logp[valid], ro.logp[:, mb][valid], mb_adv, new_values[valid],
                    ro.values[:, mb][valid], ret[:, mb][valid], entropy[valid],
                    clip_coef=p.clip_coef, vf_coef=p.vf_coef, ent_coef=p.ent_coef,
                )  # fmt: skip
                opt.zero_grad()
                loss = terms["loss"]
                if size > 1:
                    loss = loss * distributed.minibatch_scale(int(valid.sum()), g_sel.numel())
                self.manual_backward(loss)
                nn.utils.clip_grad_norm_(params, p.max_grad_norm)
                opt.step()
                for k, v in terms.items():
                    stats.setdefault(k, []).append(float(v.detach()))
                rows.append({k: float(v.detach()) for k, v in terms.items()})
                shares.append(share)
        if size == 1:
            out = {k: float(np.mean(v)) for k, v in stats.items()}
        else:
            out = distributed.weighted_stats(rows, shares, PPO_TERMS)
        g_values, g_ret = distributed.gather_envs(ro.values), distributed.gather_envs(ret)
        out["explained_variance"] = explained_variance(g_values[g_valid], g_ret[g_valid])
        return out

    def trial_policy(self, envs: Any) -> tuple[RL2Policy, None]:
        """Evaluation: fresh hidden state per trial (the collector calls ``initial_memory``);
        adaptation lives in the hidden state, so no episode hook."""
        return RL2Policy(self.net), None
