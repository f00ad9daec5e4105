"""PEARL (Rakelly et al. 2019): probabilistic task embeddings for off-policy meta-RL.

A permutation-invariant context encoder maps a set of transitions (s, a, r, s') of one task to
a Gaussian posterior q(z | c) over a latent task variable z; each transition gives a Gaussian
factor and the factors are multiplied (product of Gaussians, PEARL sec. 4.1; mean pooling as
in the seed document's Q5 is an option). The actor pi(a | s, z) and twin critics Q(s, a, z)
are trained with SAC (discrete SAC on CompoGrid, tanh-squashed Gaussian on Meta-World); the
encoder learns from the critics' Bellman error plus ``kl_weight * KL(q(z|c) || N(0, I))``
(PEARL eq. 3 and sec. 4.2), never from the actor loss.

Data (PEARL alg. 1): a fixed pool of training tasks (composition, layout seed) is drawn once
from ``cfg.seed``. Each training iteration runs one trial of ``episodes_per_trial`` episodes on
``num_envs`` pool tasks through the shared ``Collector``: episode 0 acts with z from the
prior, every later episode with z from the posterior given the trial's earlier episodes. All
transitions go to the task's replay buffer; the prior-z episode replaces the task's context
buffer (PEARL's encoder buffer holds only recent prior-z data, because the encoder must learn
to infer the task from exploratory data, as at test time). Then ``num_grad_steps`` SAC + encoder
updates run over meta-batches of tasks. At meta-test the same policy and episode hook give
posterior sampling: z ~ prior for episode 0, then z ~ q(z | episodes so far).
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass

import gymnasium as gym
import numpy as np
import torch
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F

from envs.core import Task
from rl.collect import Collector, Episode, Prev, StepOutput, make_vector_env
from rl.config import BaseConfig
from rl.module import RLModule
from rl.nets import mlp
from rl.protocol import heldout_tasks
from rl.sac import (
    actor_loss_continuous,
    actor_loss_discrete,
    alpha_loss,
    critic_loss,
    normalize_action,
    rescale_action,
    soft_target_continuous,
    soft_target_discrete,
    soft_update,
    squashed_gaussian,
)

AGGREGATIONS = ("product", "mean")

# --- context encoder --------------------------------------------------------------------------


def kl_to_standard_normal(mu: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, diag var) || N(0, I)) summed over the last dim."""
    return 0.5 * (var + mu**2 - 1.0 - var.log()).sum(-1)


class ContextEncoder(nn.Module):
    """q(z | c): a per-transition MLP gives Gaussian factors (mu_i, sigma_i^2); aggregation over
    the set makes the posterior invariant to the order of the transitions.

    ``product``: q ∝ prod_i N(mu_i, sigma_i^2), i.e. precision = sum_i 1/sigma_i^2 and
    mu = var * sum_i mu_i/sigma_i^2 (PEARL sec. 4.1), so every added transition shrinks the
    variance. ``mean``: the factors' parameters are averaged before the variance
    non-linearity, which equals mean-pooling the hidden features before linear heads (seed Q5).
    An empty context gives the prior N(0, I).
    """

    def __init__(
        self, feat_dim: int, latent_dim: int, hidden: int = 128, aggregation: str = "product"
    ) -> None:
        super().__init__()
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation={aggregation!r}; allowed: 'product', 'mean'")
        self.latent_dim = latent_dim
        self.aggregation = aggregation
        self.net = mlp([feat_dim, hidden, hidden, 2 * latent_dim], act=nn.ReLU)

    def forward(
        self, context: torch.Tensor, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior mean and variance.

        Args:
            context: (K, M, F) transition features of K tasks, M transitions each.
            mask: (K, M) bool, False for padding; None: all valid.

        Returns:
            (mu, var), each (K, latent_dim).
        """
        K, M, _ = context.shape
        out = self.net(context)
        mu_i, raw = out[..., : self.latent_dim], out[..., self.latent_dim :]
        w = (
            torch.ones(K, M, 1, dtype=context.dtype)
            if mask is None
            else mask.to(context.dtype).unsqueeze(-1)
        )
        n = w.sum(1)  # (K, 1)
        empty = n == 0
        if self.aggregation == "product":
            # PEARL clamps factor variances from below so one factor cannot dominate to 0
            var_i = F.softplus(raw).clamp(min=1e-7)
            precision = (w / var_i).sum(1)
            var = 1.0 / torch.where(empty, torch.ones_like(precision), precision)
            mu = var * (w * mu_i / var_i).sum(1)
        else:
            mean_raw = (w * raw).sum(1) / n.clamp(min=1)
            mu = (w * mu_i).sum(1) / n.clamp(min=1)
            var = F.softplus(mean_raw).clamp(min=1e-7)
        mu = torch.where(empty, torch.zeros_like(mu), mu)
        var = torch.where(empty, torch.ones_like(var), var)
        return mu, var


# --- networks ----------------------------------------------------------------------------------


class PEARLNets(nn.Module):
    """Encoder, context-conditioned actor, twin critics (+ targets) and the SAC temperature.

    Discrete spaces: actor logits and critics Q(s, z, .) over all actions (Christodoulou 2019).
    Box spaces: actor mean/log-std of a tanh-squashed Gaussian rescaled to the bounds; critics
    Q(s, z, a) with a normalised to [-1, 1].
    """

    def __init__(
        self,
        obs_dim: int,
        action_space: gym.Space,
        *,
        latent_dim: int = 5,
        hidden: int = 128,
        encoder_hidden: int = 128,
        aggregation: str = "product",
        init_alpha: float = 0.1,
    ) -> None:
        super().__init__()
        if isinstance(action_space, gym.spaces.Discrete):
            self.discrete = True
            self.n_actions = int(action_space.n)
            act_in = self.n_actions  # one-hot in the context
            actor_out, q_in, q_out = self.n_actions, obs_dim + latent_dim, self.n_actions
            low = high = torch.zeros(0)
        elif isinstance(action_space, gym.spaces.Box) and len(action_space.shape) == 1:
            self.discrete = False
            d = int(action_space.shape[0])
            self.n_actions = d
            act_in = d
            actor_out, q_in, q_out = 2 * d, obs_dim + latent_dim + d, 1
            low = torch.as_tensor(action_space.low, dtype=torch.float32)
            high = torch.as_tensor(action_space.high, dtype=torch.float32)
        else:
            raise ValueError(
                f"unsupported action space {action_space}; allowed: Discrete or 1-d Box"
            )
        self.obs_dim = obs_dim
        self.latent_dim = latent_dim
        self.feat_dim = 2 * obs_dim + act_in + 1
        self.encoder = ContextEncoder(self.feat_dim, latent_dim, encoder_hidden, aggregation)
        self.actor = mlp(
            [obs_dim + latent_dim, hidden, hidden, actor_out], act=nn.ReLU, out_gain=0.01
        )
        self.q1 = mlp([q_in, hidden, hidden, q_out], act=nn.ReLU)
        self.q2 = mlp([q_in, hidden, hidden, q_out], act=nn.ReLU)
        self.q1_target = copy.deepcopy(self.q1).requires_grad_(False)
        self.q2_target = copy.deepcopy(self.q2).requires_grad_(False)
        self.log_alpha = nn.Parameter(torch.tensor(math.log(init_alpha)))
        self.register_buffer("low", low, persistent=False)
        self.register_buffer("high", high, persistent=False)

    # -- context ----------------------------------------------------------------------------------
    def encode_action(self, actions: torch.Tensor) -> torch.Tensor:
        if self.discrete:
            return F.one_hot(actions.long().reshape(-1), self.n_actions).float()
        return normalize_action(actions.float().reshape(-1, self.n_actions), self.low, self.high)

    def features(
        self,
        obs: torch.Tensor,
        actions: torch.Tensor,
        rewards: torch.Tensor,
        next_obs: torch.Tensor,
    ) -> torch.Tensor:
        """Transition features [s, a, r, s'] (one-hot or normalised a), leading dims kept."""
        lead = obs.shape[:-1]
        a = self.encode_action(actions.reshape(-1, *actions.shape[len(lead) :]))
        a = a.reshape(*lead, -1)
        return torch.cat([obs, a, rewards.unsqueeze(-1).float(), next_obs], -1)

    def sample_z(
        self, mu: torch.Tensor, var: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        eps = torch.randn(mu.shape, generator=generator, dtype=mu.dtype)
        return mu + var.sqrt() * eps

    # -- acting -----------------------------------------------------------------------------------
    def act(
        self,
        obs: torch.Tensor,
        z: torch.Tensor,
        *,
        greedy: bool = False,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Env actions and their log-probabilities for (N, obs) and (N, latent)."""
        out = self.actor(torch.cat([obs, z], -1))
        if self.discrete:
            logp_all = torch.log_softmax(out, -1)
            if greedy:
                a = logp_all.argmax(-1)
            else:
                a = torch.multinomial(logp_all.exp(), 1, generator=generator).squeeze(-1)
            return a, logp_all.gather(-1, a[:, None]).squeeze(-1)
        mean, log_std = out.chunk(2, -1)
        u, logp = squashed_gaussian(mean, log_std, deterministic=greedy, generator=generator)
        return rescale_action(u, self.low, self.high), logp


def pearl_losses(
    nets: PEARLNets,
    context: torch.Tensor,
    batch: dict[str, torch.Tensor],
    *,
    gamma: float,
    kl_weight: float,
    target_entropy: float,
    reward_scale: float = 1.0,
    context_mask: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """One PEARL update's named loss terms over a meta-batch of K tasks.

    Gradient routing (so one ``loss.backward()`` and one optimiser over all parameters give
    PEARL's separate updates): the critic loss reaches the critics *and the encoder* (z keeps
    its graph, PEARL sec. 4.2); the KL reaches the encoder; the actor loss uses a detached z
    and frozen critic parameters, so it moves the actor only; the temperature loss moves
    ``log_alpha`` only; targets are computed without grad from the target critics.

    Args:
        context: (K, M, F) context features per task (from the context buffers).
        batch: (K, B, ...) tensors ``obs``, ``actions``, ``rewards``, ``next_obs``,
            ``terminated`` from the tasks' replay buffers.

    Returns:
        ``loss`` (sum to minimise) and the terms ``loss_critic``, ``loss_q1``, ``loss_q2``,
        ``loss_kl`` (unweighted), ``loss_actor``, ``loss_alpha``, plus detached ``alpha``,
        ``entropy``, ``q_mean``, ``z_var`` (mean posterior variance).
    """
    K, B = batch["rewards"].shape
    mu, var = nets.encoder(context, context_mask)
    z_task = mu + var.sqrt() * torch.randn_like(mu)  # reparameterised, PEARL eq. 3
    kl = kl_to_standard_normal(mu, var).mean()
    z = z_task[:, None, :].expand(K, B, nets.latent_dim).reshape(K * B, -1)
    z_det = z.detach()
    obs = batch["obs"].reshape(K * B, -1)
    next_obs = batch["next_obs"].reshape(K * B, -1)
    rewards = reward_scale * batch["rewards"].reshape(K * B)
    term = batch["terminated"].reshape(K * B)
    alpha = nets.log_alpha.detach().exp()
    frozen = {
        name: {k: v.detach() for k, v in q.named_parameters()}
        for name, q in (("q1", nets.q1), ("q2", nets.q2))
    }
    if nets.discrete:
        actions = batch["actions"].reshape(K * B).long()
        with torch.no_grad():
            next_logp = torch.log_softmax(nets.actor(torch.cat([next_obs, z_det], -1)), -1)
            nz = torch.cat([next_obs, z_det], -1)
            target = soft_target_discrete(
                rewards, term, nets.q1_target(nz), nets.q2_target(nz), next_logp,
                gamma=gamma, alpha=alpha,
            )  # fmt: skip
        sz = torch.cat([obs, z], -1)
        q1_all, q2_all = nets.q1(sz), nets.q2(sz)
        q1 = q1_all.gather(-1, actions[:, None]).squeeze(-1)
        q2 = q2_all.gather(-1, actions[:, None]).squeeze(-1)
        terms = critic_loss(q1, q2, target)
        logp_all = torch.log_softmax(nets.actor(torch.cat([obs, z_det], -1)), -1)
        terms |= actor_loss_discrete(logp_all, q1_all.detach(), q2_all.detach(), alpha)
        entropy = -(logp_all.exp() * logp_all).sum(-1)
    else:
        a_norm = normalize_action(batch["actions"].reshape(K * B, -1), nets.low, nets.high)
        with torch.no_grad():
            nmean, nlog_std = nets.actor(torch.cat([next_obs, z_det], -1)).chunk(2, -1)
            nu, nlogp = squashed_gaussian(nmean, nlog_std)
            nin = torch.cat([next_obs, z_det, nu], -1)
            target = soft_target_continuous(
                rewards, term, nets.q1_target(nin).squeeze(-1), nets.q2_target(nin).squeeze(-1),
                nlogp, gamma=gamma, alpha=alpha,
            )  # fmt: skip
        qin = torch.cat([obs, z, a_norm], -1)
        q1, q2 = nets.q1(qin).squeeze(-1), nets.q2(qin).squeeze(-1)
        terms = critic_loss(q1, q2, target)
        mean, log_std = nets.actor(torch.cat([obs, z_det], -1)).chunk(2, -1)
        u, logp = squashed_gaussian(mean, log_std)
        pin = torch.cat([obs, z_det, u], -1)
        q1_pi = functional_call(nets.q1, frozen["q1"], (pin,)).squeeze(-1)
        q2_pi = functional_call(nets.q2, frozen["q2"], (pin,)).squeeze(-1)
        terms |= actor_loss_continuous(logp, q1_pi, q2_pi, alpha)
        entropy = -logp
    terms |= alpha_loss(nets.log_alpha, entropy, target_entropy)
    terms["loss_kl"] = kl
    terms["loss"] = (
        terms["loss_critic"] + kl_weight * kl + terms["loss_actor"] + terms["loss_alpha"]
    )
    terms["q_mean"] = q1.detach().mean()
    terms["z_var"] = var.detach().mean()
    return terms


# --- buffers -----------------------------------------------------------------------------------


class TaskBuffers:
    """One ring buffer of transitions per task, as fixed-capacity tensors (checkpoint-safe)."""

    FIELDS = ("obs", "actions", "rewards", "next_obs", "terminated")

    def __init__(
        self,
        num_tasks: int,
        capacity: int,
        obs_dim: int,
        act_shape: tuple[int, ...],
        act_dtype: torch.dtype,
    ) -> None:
        self.capacity = capacity
        self.obs = torch.zeros(num_tasks, capacity, obs_dim)
        self.actions = torch.zeros(num_tasks, capacity, *act_shape, dtype=act_dtype)
        self.rewards = torch.zeros(num_tasks, capacity)
        self.next_obs = torch.zeros(num_tasks, capacity, obs_dim)
        self.terminated = torch.zeros(num_tasks, capacity, dtype=torch.bool)
        self.ptr = torch.zeros(num_tasks, dtype=torch.long)
        self.size = torch.zeros(num_tasks, dtype=torch.long)

    def clear(self, task: int) -> None:
        self.ptr[task] = 0
        self.size[task] = 0

    def add(self, task: int, data: dict[str, torch.Tensor]) -> None:
        """Append (n, ...) transitions to ``task``'s ring buffer (oldest overwritten)."""
        n = data["rewards"].shape[0]
        if n == 0:
            return
        if n > self.capacity:  # only the newest ``capacity`` survive anyway
            data = {k: v[-self.capacity :] for k, v in data.items()}
            n = self.capacity
        idx = (self.ptr[task] + torch.arange(n)) % self.capacity
        for k in self.FIELDS:
            getattr(self, k)[task, idx] = data[k].to(getattr(self, k).dtype)
        self.ptr[task] = (self.ptr[task] + n) % self.capacity
        self.size[task] = torch.clamp(self.size[task] + n, max=self.capacity)

    def sample(self, tasks: torch.Tensor, n: int) -> dict[str, torch.Tensor]:
        """``n`` transitions per task, uniformly with replacement: (K, n, ...) tensors."""
        sizes = self.size[tasks].clamp(min=1)
        idx = (torch.rand(len(tasks), n) * sizes[:, None]).long()
        rows = tasks[:, None].expand(-1, n)
        return {k: getattr(self, k)[rows, idx] for k in self.FIELDS}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: getattr(self, k).clone() for k in (*self.FIELDS, "ptr", "size")}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for k in (*self.FIELDS, "ptr", "size"):
            cur = getattr(self, k)
            if state[k].shape != cur.shape:
                raise ValueError(
                    f"buffer field {k!r} has shape {tuple(state[k].shape)} in the checkpoint; "
                    f"this config expects {tuple(cur.shape)}"
                )
            cur.copy_(state[k])


# --- acting policy -------------------------------------------------------------------------------


class PEARLPolicy:
    """Rollout policy that acts with a per-env z and does posterior sampling over a trial.

    State lives here, keyed by env index: z (N, latent) and the context (transition features of
    the trial's finished episodes). ``reset_memory`` at a trial start clears the context and
    draws z from the prior; ``on_episode_end`` (the collector hook) appends the episode to the
    env's context and redraws z ~ q(z | context) (PEARL alg. 2, posterior sampling).
    """

    def __init__(
        self, nets: PEARLNets, *, greedy: bool = False, generator: torch.Generator | None = None
    ) -> None:
        self.nets = nets
        self.greedy = greedy
        self.generator = generator
        self.z = torch.zeros(0, nets.latent_dim)
        self.context: list[list[torch.Tensor]] = []

    def initial_memory(self, n: int) -> torch.Tensor:
        self.context = [[] for _ in range(n)]
        self.z = self._prior(n)
        return self.z.clone()

    def _prior(self, n: int) -> torch.Tensor:
        return torch.randn((n, self.nets.latent_dim), generator=self.generator)

    def reset_memory(self, memory: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        idx = torch.nonzero(mask).squeeze(-1)
        for i in idx.tolist():
            self.context[i] = []
        self.z[idx] = self._prior(len(idx))
        return self.z.clone()

    def step(self, obs: torch.Tensor, memory: torch.Tensor, prev: Prev) -> StepOutput:
        action, logp = self.nets.act(obs, self.z, greedy=self.greedy, generator=self.generator)
        n = obs.shape[0]
        return StepOutput(action, logp, torch.zeros(n), self.z.clone(), {"z": self.z.clone()})

    def bootstrap_value(self, obs: torch.Tensor, memory: torch.Tensor, prev: Prev) -> torch.Tensor:
        return torch.zeros(obs.shape[0])  # SAC learns from replay; no on-policy bootstrap

    @torch.no_grad()
    def on_episode_end(self, i: int, ep: Episode) -> None:
        self.context[i].append(self.nets.features(ep.obs, ep.actions, ep.rewards, ep.next_obs))
        ctx = torch.cat(self.context[i])[None]
        mu, var = self.nets.encoder(ctx)
        self.z[i] = self.nets.sample_z(mu, var, self.generator)[0]


# --- config and module -------------------------------------------------------------------------


@dataclass
class PEARLConfig(BaseConfig):
    """PEARL: context encoder + SAC over a fixed pool of training tasks."""

    episodes_per_trial: int = 2
    """E of a training trial: episode 0 with z ~ prior, later ones with z ~ posterior"""
    latent_dim: int = 5
    """size of z (PEARL uses 5)"""
    aggregation: str = "product"
    """'product' of Gaussian factors (PEARL sec. 4.1) or 'mean' pooling (seed Q5)"""
    kl_weight: float = 0.1
    """beta: weight of KL(q(z|c) || N(0, I)) in the encoder loss (PEARL kl_lambda)"""
    hidden: int = 128
    """actor/critic MLP width"""
    encoder_hidden: int = 128
    """context-encoder MLP width"""
    num_train_tasks: int = 32
    """size of the task pool (composition, layout seed) drawn once from ``seed``"""
    meta_batch: int = 4
    """tasks per gradient step"""
    num_grad_steps: int = 40
    """SAC + encoder updates per iteration"""
    batch_size: int = 128
    """replay transitions per task per gradient step"""
    context_batch: int = 64
    """context transitions per task per gradient step"""
    replay_capacity: int = 2000
    """replay-buffer transitions per task"""
    context_capacity: int = 400
    """context-buffer transitions per task (recent prior-z data)"""
    lr: float = 3e-4
    """Adam learning rate (all networks, as in PEARL)"""
    gamma: float = 0.99
    """discount"""
    tau: float = 0.005
    """Polyak rate of the target critics"""
    reward_scale: float = 10.0
    """multiplies rewards in the Bellman target (PEARL tunes it per env; 5 in most of its
    MuJoCo configs). 10 because at 1 the entropy bonus outweighs CompoGrid's sparse terminal
    reward: with time-limit truncations bootstrapped, never finishing collects
    ~alpha * H / (1 - gamma) (about 17 at the start: alpha 0.1, H 1.7, gamma 0.99) against 1 for
    finishing, and training success fell from 0.19 to 0.00 within 40k steps on the single
    task goto(red ball) (0.69-0.94 with 10; RESULTS.md)"""
    autotune_alpha: bool = True
    """learn the entropy temperature; False keeps ``alpha`` fixed"""
    alpha: float = 0.1
    """initial (or fixed) entropy temperature"""
    target_entropy_scale: float = 0.5
    """discrete target entropy = scale * log(|A|); continuous uses -dim(A)"""
    eval_greedy: bool = False
    """meta-test acts with argmax / tanh(mean) instead of sampling (z is sampled either way)"""

    def __post_init__(self) -> None:
        super().__post_init__()
        if int(self.latent_dim) < 1:
            raise ValueError(f"latent_dim={self.latent_dim}; allowed: an integer >= 1")
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation={self.aggregation!r}; allowed: 'product', 'mean'")
        if not self.kl_weight >= 0:
            raise ValueError(f"kl_weight={self.kl_weight}; allowed: a number >= 0")
        for k in (
            "hidden", "encoder_hidden", "num_train_tasks", "meta_batch", "batch_size",
            "context_batch", "replay_capacity", "context_capacity",
        ):  # fmt: skip
            if int(getattr(self, k)) < 1:
                raise ValueError(f"{k}={getattr(self, k)}; allowed: an integer >= 1")
        if int(self.num_grad_steps) < 0:
            raise ValueError(f"num_grad_steps={self.num_grad_steps}; allowed: an integer >= 0")
        for k in ("lr", "alpha", "reward_scale"):
            if not getattr(self, k) > 0:
                raise ValueError(f"{k}={getattr(self, k)}; allowed: a positive number")
        if not 0 <= self.gamma <= 1:
            raise ValueError(f"gamma={self.gamma}; allowed: a number in [0, 1]")
        if not 0 < self.tau <= 1:
            raise ValueError(f"tau={self.tau}; allowed: a number in (0, 1]")
        if not 0 < self.target_entropy_scale <= 1:
            raise ValueError(
                f"target_entropy_scale={self.target_entropy_scale}; allowed: a number in (0, 1]"
            )


class PEARLModule(RLModule):
    """PEARL as a LightningModule: one ``training_step`` = one meta-iteration (collect one
    trial on ``num_envs`` pool tasks, then ``num_grad_steps`` updates).

    Budget: an iteration's env steps vary with episode lengths (``collect_trials`` runs every
    env until all trials end), so ``iterations()`` is an upper bound and training stops at the
    end of the first iteration that reaches ``total_env_steps``.
    """

    method = "pearl"
    config_cls = PEARLConfig

    def build(self) -> None:
        cfg: PEARLConfig = self.cfg
        train_set = cfg.train_compositions()
        # the task pool: (composition, layout seed) pairs drawn once, so per-task buffers are
        # well defined; with fixed_layout=False a task is its composition (new layout per episode)
        pool = heldout_tasks(
            train_set, cfg.num_train_tasks, seed=cfg.seed, layout_seeds=cfg.train_layout_seeds()
        )
        if not cfg.fixed_layout:
            pool = [Task(t.composition, None) for t in pool]
        self.task_pool: list[Task] = pool
        probe = make_vector_env(cfg.env_id, 1, {**cfg.env_kwargs, "composition": train_set[0]})
        obs_dim = int(probe.single_observation_space.shape[0])
        space = probe.single_action_space
        probe.close()
        self.nets = PEARLNets(
            obs_dim, space, latent_dim=cfg.latent_dim, hidden=cfg.hidden,
            encoder_hidden=cfg.encoder_hidden, aggregation=cfg.aggregation, init_alpha=cfg.alpha,
        )  # fmt: skip
        if not cfg.autotune_alpha:
            self.nets.log_alpha.requires_grad_(False)
        if self.nets.discrete:
            self.target_entropy = cfg.target_entropy_scale * math.log(self.nets.n_actions)
            act_shape, act_dtype = (), torch.long
        else:
            self.target_entropy = -float(self.nets.n_actions)  # SAC's -dim(A) heuristic
            act_shape, act_dtype = (self.nets.n_actions,), torch.float32
        K = cfg.num_train_tasks
        self.replay = TaskBuffers(K, cfg.replay_capacity, obs_dim, act_shape, act_dtype)
        self.context_buffer = TaskBuffers(K, cfg.context_capacity, obs_dim, act_shape, act_dtype)
        self._eval_calls = 0

    def make_collector(self) -> Collector:
        cfg: PEARLConfig = self.cfg
        envs = make_vector_env(
            cfg.env_id, cfg.num_envs,
            {**cfg.env_kwargs, "composition": self.task_pool[0].composition},
            vectorization=cfg.vectorization,
        )  # fmt: skip
        policy = PEARLPolicy(self.nets)
        return Collector(
            envs, policy, episodes_per_trial=cfg.episodes_per_trial, seed=cfg.seed,
            on_episode_end=policy.on_episode_end,
        )  # fmt: skip

    def configure_optimizers(self):
        # one Adam over everything: pearl_losses routes each term's gradient to its own
        # parameters, so this equals PEARL's separate optimisers with a shared learning rate
        params = [p for p in self.nets.parameters() if p.requires_grad]
        return torch.optim.Adam(params, lr=self.cfg.lr)

    def iterations(self) -> int:
        cfg = self.cfg
        # upper bound (every episode >= 1 step); training_step stops at the budget
        return max(1, -(-cfg.total_env_steps // (cfg.num_envs * cfg.episodes_per_trial)))

    # -- data -------------------------------------------------------------------------------------
    def _store(self, ro, task_ids: list[int]) -> None:
        """Valid steps of env i go to task_ids[i]'s replay; its prior-z episode (index 0)
        replaces the task's context buffer (recent exploratory data, PEARL alg. 1)."""
        for k in set(task_ids):
            self.context_buffer.clear(k)
        for i, k in enumerate(task_ids):
            v = ro.valid[:, i]
            data = {
                "obs": ro.obs[v, i], "actions": ro.actions[v, i], "rewards": ro.rewards[v, i],
                "next_obs": ro.next_obs[v, i], "terminated": ro.terminated[v, i],
            }  # fmt: skip
            self.replay.add(k, data)
            prior = ro.episode_index[v, i] == 0
            self.context_buffer.add(k, {f: x[prior] for f, x in data.items()})

    def sample_meta_batch(self) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Context features (K, M, F) and a replay batch (K, B, ...) of ``meta_batch`` tasks
        drawn uniformly from the tasks that have data."""
        cfg: PEARLConfig = self.cfg
        have = torch.nonzero(self.replay.size > 0).squeeze(-1)
        tasks = have[torch.randint(len(have), (cfg.meta_batch,))]
        c = self.context_buffer.sample(tasks, cfg.context_batch)
        ctx = self.nets.features(c["obs"], c["actions"], c["rewards"], c["next_obs"])
        return ctx, self.replay.sample(tasks, cfg.batch_size)

    # -- training ---------------------------------------------------------------------------------
    def training_step(self, batch, batch_idx):
        cfg: PEARLConfig = self.cfg
        t0 = time.perf_counter()
        n = cfg.num_envs
        P = len(self.task_pool)
        ids = torch.randperm(P)[:n] if P >= n else torch.randint(P, (n,))
        task_ids = [int(k) for k in ids]
        ro = self.collector.collect_trials([self.task_pool[k] for k in task_ids])
        self._store(ro, task_ids)
        opt = self.optimizers()
        sums: dict[str, float] = {}
        for _ in range(cfg.num_grad_steps):
            ctx, rb = self.sample_meta_batch()
            terms = pearl_losses(
                self.nets, ctx, rb, gamma=cfg.gamma, kl_weight=cfg.kl_weight,
                target_entropy=self.target_entropy, reward_scale=cfg.reward_scale,
            )  # fmt: skip
            opt.zero_grad()
            self.manual_backward(terms["loss"])
            opt.step()
            soft_update(self.nets.q1_target, self.nets.q1, cfg.tau)
            soft_update(self.nets.q2_target, self.nets.q2, cfg.tau)
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach())
        stats = {k: v / max(1, cfg.num_grad_steps) for k, v in sums.items()}
        self._log(ro, stats, time.perf_counter() - t0)
        if self.env_steps >= cfg.total_env_steps and self._trainer is not None:
            self.trainer.should_stop = True

    def _log(self, ro, losses: dict[str, float], seconds: float) -> None:
        """``log_iteration``'s signals plus success of the prior-z episode (0) and of the last
        posterior-z episode, the adaptation signal of PEARL."""
        extra = {}
        last = self.cfg.episodes_per_trial - 1
        for name, idx in (("prior", 0), ("posterior", last)):
            s = [e.success for e in ro.episodes if e.episode_index == idx]
            if s and (name == "prior" or last > 0):
                extra[f"charts/success_{name}"] = float(np.mean(s))
        self.log_iteration(ro, losses, seconds, extra=extra)

    # -- checkpoint state -------------------------------------------------------------------------
    def extra_state(self) -> dict:
        return {
            "replay": self.replay.state_dict(),
            "context": self.context_buffer.state_dict(),
            "eval_calls": self._eval_calls,
        }

    def load_extra_state(self, state: dict) -> None:
        if "replay" in state:
            self.replay.load_state_dict(state["replay"])
            self.context_buffer.load_state_dict(state["context"])
            self._eval_calls = int(state.get("eval_calls", 0))

    # -- evaluation -------------------------------------------------------------------------------
    def acting_policy(self) -> PEARLPolicy:
        return PEARLPolicy(self.nets)

    def trial_policy(self, envs):
        """Meta-test: z ~ prior for episode 0, then after each episode the hook adds it to the
        env's context and redraws z from the posterior (PEARL alg. 2). A generator seeded from
        ``seed`` and the call count makes evaluation independent of the global RNG."""
        self._eval_calls += 1
        gen = torch.Generator().manual_seed(int(self.cfg.seed) * 1_000_003 + self._eval_calls)
        policy = PEARLPolicy(self.nets, greedy=self.cfg.eval_greedy, generator=gen)
        return policy, policy.on_episode_end


__all__ = [
    "ContextEncoder",
    "PEARLConfig",
    "PEARLModule",
    "PEARLNets",
    "PEARLPolicy",
    "TaskBuffers",
    "kl_to_standard_normal",
    "pearl_losses",
]
