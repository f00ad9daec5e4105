"""Skill discovery (DIAYN, Eysenbach et al. 2019) and the ablation libraries.

DIAYN maximises I(K; phi(S)): a skill k ~ p(k) = uniform is drawn at the start of every
episode and held for the whole episode; a discriminator q(k | phi(s)) learns to tell the skills
apart from the discovery features ``info["phi"]`` (CompoGrid: agent cell, carried object,
object states; Meta-World: end-effector and object positions), and the skills are trained by the
shared PPO (``rl.ppo.ppo_update``) on the intrinsic reward ``log q(k | phi(s')) - log p(k)``.
The discriminator's accuracy on fresh rollouts (``charts/disc_accuracy``) and the mean intrinsic
reward (``charts/mi_estimate``, a variational lower bound on I(K; S), Agakov 2004) are logged.

``objective="supervised"`` is the ablation with hand-labelled primitives: skill k is trained by
PPO on the env reward of the length-1 composition of primitive k (K = number of primitives).
"""

from __future__ import annotations

import io
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch
from torch import nn

from rl import distributed
from rl.collect import Collector, Prev, Rollout, StepOutput, make_vector_env, uniform_task_sampler
from rl.config import BaseConfig
from rl.gae import gae
from rl.module import RLModule
from rl.nets import mlp
from rl.ppo import PPOConfig, ppo_section, ppo_update

from .library import SkillLibrary, check_num_skills, inverse_cdf

OBJECTIVES = ("diayn", "supervised")


# --- configuration --------------------------------------------------------------------------------


@dataclass
class SkillTrainingConfig:
    """How the library is trained in phase 1 (shared by ``discovery`` and ``compositional``)."""

    disc_hidden: int = 64
    """discriminator MLP width"""
    disc_lr: float = 1e-3
    """discriminator Adam learning rate"""
    disc_epochs: int = 2
    """discriminator passes over each rollout"""
    supervised_primitives: list | None = None
    """``supervised``: primitive texts, one per skill; None: K feasible primitives of the split,
    evenly spread over its primitive list"""
    disc_buffer: int = 8192
    """discriminator training pairs kept (FIFO over recent rollouts): one rollout holds only a few
    episodes, hence only some of the K skills, so training on it alone makes q forget the rest"""
    heatmap_fraction: float = 0.25
    """visitation heatmaps are accumulated over this last share of the discovery iterations"""
    reward_floor: float | None = None
    """DIAYN reward ``max(log q(k|phi) - log p(k), reward_floor)``; None: no floor. log q of a
    state the discriminator gives to another skill is unbounded below (-20 and worse), which
    makes returns, value targets and advantages dominated by a few such steps"""
    curriculum_threshold: float | None = None
    """DIAYN skill curriculum (VALOR, Achiam et al. 2018): start with ``curriculum_start``
    active skills and grow to ``min(int(1.5 K_active + 1), K)`` whenever the discriminator's
    accuracy over the active skills, averaged over the last ``curriculum_window`` iterations
    at the current K_active, reaches this; p(k) is uniform over the active skills. None: all K
    skills from the first iteration (plain DIAYN)"""
    curriculum_start: int = 2
    """active skills at the start of the curriculum"""
    curriculum_window: int = 5
    """iterations averaged for the curriculum's accuracy test"""
    ppo: PPOConfig = field(default_factory=lambda: PPOConfig(lr=1e-3, ent_coef=0.01))
    """PPO hyper-parameters of the skills"""

    def __post_init__(self) -> None:
        self.ppo = ppo_section(self)
        if self.disc_buffer < 1:
            raise ValueError(f"disc_buffer={self.disc_buffer}; allowed: an integer >= 1")
        if self.disc_hidden < 1 or self.disc_epochs < 1:
            raise ValueError(
                f"disc_hidden={self.disc_hidden}, disc_epochs={self.disc_epochs}; "
                "allowed: integers >= 1"
            )
        if self.disc_lr <= 0:
            raise ValueError(f"disc_lr={self.disc_lr}; allowed: a positive number")
        if not 0.0 < self.heatmap_fraction <= 1.0:
            raise ValueError(f"heatmap_fraction={self.heatmap_fraction}; allowed: (0, 1]")
        if self.curriculum_threshold is not None and not 0.0 < self.curriculum_threshold <= 1.0:
            raise ValueError(
                f"curriculum_threshold={self.curriculum_threshold}; allowed: (0, 1] or None"
            )
        if self.curriculum_start < 1 or self.curriculum_window < 1:
            raise ValueError(
                f"curriculum_start={self.curriculum_start}, "
                f"curriculum_window={self.curriculum_window}; allowed: integers >= 1"
            )


@dataclass
class DiscoveryConfig(BaseConfig):
    """Skill discovery: a library of ``num_skills`` skills, no task reward (DIAYN)."""

    fixed_layout: bool = False
    """a new layout every episode: skills must not memorise one room"""
    objective: str = "diayn"
    """'diayn' (unsupervised, mutual information) or 'supervised' (one primitive per skill)"""
    num_skills: int = 12
    """K: number of skills"""
    hidden: int = 64
    """library width"""
    init_termination: float = 0.1
    """initial beta_k(s) of the termination heads (trained later by the compositional agent)"""
    training: SkillTrainingConfig = field(default_factory=SkillTrainingConfig)
    """discriminator / PPO settings"""

    def __post_init__(self) -> None:
        if isinstance(self.training, dict):
            self.training = SkillTrainingConfig(**self.training)
        super().__post_init__()  # after the section is built: it reads the rollout length
        check_num_skills(self.num_skills)
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective={self.objective!r}; allowed: {', '.join(OBJECTIVES)}")
        if self.objective == "supervised" and self.episodes_per_trial != 1:
            raise ValueError(
                f"episodes_per_trial={self.episodes_per_trial}; supervised skills need 1"
            )

    def rollout_env_steps(self) -> int:
        return int(self.num_envs) * int(self.training.ppo.num_steps)


# --- discovery features -----------------------------------------------------------------------------


class PhiEncoder:
    """Turns ``info["phi"]`` into discriminator inputs.

    CompoGrid's phi holds integers ``[x, y, carried, on_grid x7, door_open]``: coordinates and
    the carried entity are one-hot encoded (a discriminator over raw integers would have to learn
    the same partition), flags are kept as 0/1. Float phi (Meta-World positions) passes through.
    """

    def __init__(self, kind: str, phi_dim: int, size: int = 8) -> None:
        if kind not in ("grid", "float"):
            raise ValueError(f"phi kind={kind!r}; allowed: 'grid', 'float'")
        self.kind, self.phi_dim, self.size = kind, int(phi_dim), int(size)
        if kind == "grid":
            from envs.grid import ENTITIES

            self.n_carried = len(ENTITIES) + 1
            self.dim = 2 * self.size + self.n_carried + (self.phi_dim - 3)
        else:
            self.dim = self.phi_dim

    @classmethod
    def for_env(cls, env_id: str, env_kwargs: dict, phi: np.ndarray) -> PhiEncoder:
        phi = np.asarray(phi)
        if env_id.startswith("CompoGrid"):
            return cls("grid", phi.shape[-1], int(env_kwargs.get("size", 8)))
        return cls("float", phi.shape[-1])

    def __call__(self, phi: torch.Tensor) -> torch.Tensor:
        if self.kind == "float":
            return phi.float()
        phi = phi.long()
        f = nn.functional.one_hot
        return torch.cat(
            [
                f(phi[..., 0].clamp(0, self.size - 1), self.size).float(),
                f(phi[..., 1].clamp(0, self.size - 1), self.size).float(),
                f(phi[..., 2].clamp(0, self.n_carried - 1), self.n_carried).float(),
                phi[..., 3:].float(),
            ],
            dim=-1,
        )


def probe_env(env_id: str, env_kwargs: dict) -> tuple[int, gym.Space, np.ndarray]:
    """Observation size, action space and one ``info["phi"]`` of ``env_id``."""
    import envs  # noqa: F401  (registers the task families)

    env = gym.make(env_id, disable_env_checker=True, **env_kwargs)
    try:
        obs, info = env.reset(seed=0)
        return int(np.prod(env.observation_space.shape)), env.action_space, np.asarray(info["phi"])
    finally:
        env.close()


# --- acting policy ----------------------------------------------------------------------------------


class SkillPolicy:
    """Acts with one skill per episode (the skill index is the policy memory).

    DIAYN: k ~ uniform at every episode start (``reset_memory`` at trial starts, and a re-draw
    when ``prev.done``, for trials of several episodes). ``skill_of_env(env_indices)`` instead
    pins the skill of each env's new trial (supervised primitives: the skill of the task).
    Per-step extras: ``skill`` (N,).
    """

    def __init__(
        self,
        library: SkillLibrary,
        skill_of_env: Callable[[torch.Tensor], torch.Tensor] | None = None,
        greedy: bool = False,
    ) -> None:
        self.library = library
        self.k = library.num_skills
        #: skills drawn are 0 .. num_active - 1 (a DIAYN curriculum grows it; default all K)
        self.num_active = self.k
        self.skill_of_env = skill_of_env
        self.greedy = greedy
        self._pack: dict | None = None  # fused acting weights (``_packed``)
        n_out = library.head.n_out
        self._offset = torch.cat([torch.arange(n_out), torch.tensor([self.k * n_out])])
        self._stride = torch.tensor([n_out] * n_out + [1])

    def _draw(self, idx: torch.Tensor) -> torch.Tensor:
        if self.skill_of_env is not None:
            return self.skill_of_env(idx)
        return torch.randint(self.num_active, (idx.numel(),))

    def initial_memory(self, n: int) -> torch.Tensor:
        return self._draw(torch.arange(n))

    def reset_memory(self, memory: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        memory = memory.clone()
        idx = torch.nonzero(mask).squeeze(-1)
        memory[idx] = self._draw(idx)
        return memory

    def step(self, obs: torch.Tensor, memory: torch.Tensor, prev: Prev) -> StepOutput:
        skill = memory.clone()
        new_ep = torch.nonzero(prev.done > 0).squeeze(-1)
        if new_ep.numel() and self.skill_of_env is None:
            skill[new_ep] = self._draw(new_ep)
        lib = self.library
        if torch.is_grad_enabled():  # the reference path (module by module)
            out, _ = lib(obs)
            sel = out.gather(1, skill.view(-1, 1, 1).expand(-1, 1, out.shape[-1])).squeeze(1)
            value = lib.value(obs, skill)
        else:  # collectors act under no_grad: the same maths with fused layers
            sel, value = self.fused_outputs(obs, skill)
        if lib.head.discrete:
            # Categorical(logits=sel) written out: log-probs by log_softmax, a draw by the
            # inverse CDF of one uniform per env (the same distribution as ``sample``)
            logp_all = torch.log_softmax(sel, -1)
            if self.greedy:
                action = logp_all.argmax(-1)
            else:
                action = inverse_cdf(logp_all.exp(), torch.rand(sel.shape[0]))
            logp = logp_all.gather(1, action.view(-1, 1)).squeeze(1)
        else:
            dist = lib.head.dist(sel, lib.log_std[skill])
            action = dist.mean if self.greedy else dist.sample()
            logp = dist.log_prob(action)
        return StepOutput(action, logp, value, skill, {"skill": skill.clone()})

    def _packed(self) -> dict[str, torch.Tensor]:
        """Acting weights of the library with layers that share an input fused into one
        matrix each: actor and critic first layers (both read the observation), their second
        layers (block-diagonal) and the skill and value heads (block-diagonal); the termination
        heads are left out (acting does not use them). Rebuilt when a parameter is replaced
        or its version counter moved (in-place writes: optimisers, ``load_state_dict``)."""
        lib = self.library
        l1, l2 = lib.encoder[0][0], lib.encoder[0][2]
        c1, c2, c3 = lib.critic[0], lib.critic[2], lib.critic[4]
        params = [
            l1.weight, l1.bias, c1.weight, c1.bias, l2.weight, l2.bias, c2.weight, c2.bias,
            lib.skill_out.weight, lib.skill_out.bias, c3.weight, c3.bias,
        ]  # fmt: skip
        versions = tuple(p._version for p in params)
        cache = self._pack
        if (
            cache is not None
            and all(a is b for a, b in zip(cache["params"], params))
            and cache["versions"] == versions
        ):
            return cache
        with torch.no_grad():
            cache = {
                "w_in": torch.cat([l1.weight, c1.weight]).t(),
                "b_in": torch.cat([l1.bias, c1.bias]),
                "w_2": torch.block_diag(l2.weight, c2.weight).t(),
                "b_2": torch.cat([l2.bias, c2.bias]),
                "w_out": torch.block_diag(lib.skill_out.weight, c3.weight).t(),
                "b_out": torch.cat([lib.skill_out.bias, c3.bias]),
            }
        cache.update(params=params, versions=versions)
        self._pack = cache
        return cache

    def fused_outputs(self, obs: torch.Tensor, skill: torch.Tensor):
        """The active skills' action-distribution parameters (N, n_out) and values V(s, k)
        (N,) through the fused weights of ``_packed`` (no grad)."""
        w = self._packed()
        n_out = self.library.head.n_out
        z = torch.tanh(torch.addmm(w["b_in"], obs, w["w_in"]))
        z = torch.tanh(torch.addmm(w["b_2"], z, w["w_2"]))
        heads = torch.addmm(w["b_out"], z, w["w_out"])
        # columns k * n_out + a (the skill's outputs) and K * n_out + k (its value)
        both = heads.gather(1, torch.addcmul(self._offset, skill.view(-1, 1), self._stride))
        return both[:, :n_out], both[:, n_out]

    def bootstrap_value(self, obs: torch.Tensor, memory: torch.Tensor, prev: Prev) -> torch.Tensor:
        return self.library.value(obs, memory)


# --- the trainer shared by DiscoveryModule and the compositional agent ------------------------------


def supervised_primitives(
    family_primitives: Sequence, k: int, chosen: Sequence[str] | None, env_id: str
) -> list[str]:
    """The primitives (texts) the supervised library trains, one per skill."""
    if chosen:
        prims = [str(p) for p in chosen]
        if len(prims) != k:
            raise ValueError(
                f"supervised_primitives has {len(prims)} entries but num_skills={k}; "
                "allowed: exactly one primitive per skill"
            )
        return prims
    prims = [str(p) for p in family_primitives]
    if env_id.startswith("CompoGrid"):
        from envs.grid import validate_composition

        def feasible(p: str) -> bool:
            try:
                validate_composition(p)
                return True
            except ValueError:
                return False

        prims = [p for p in prims if feasible(p)]
    if k > len(prims):
        raise ValueError(
            f"num_skills={k} but only {len(prims)} primitives are usable as length-1 tasks; "
            f"allowed for 'supervised': num_skills <= {len(prims)}"
        )
    idx = np.linspace(0, len(prims) - 1, k).round().astype(int)
    return [prims[i] for i in idx]


class Discriminator(nn.Module):
    """q(k | phi(s)): an MLP classifier over encoded discovery features."""

    def __init__(self, in_dim: int, k: int, hidden: int = 64) -> None:
        super().__init__()
        self.net = mlp([in_dim, hidden, hidden, k], act=nn.ReLU)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def next_phi(ro: Rollout, current_phi: np.ndarray | None = None) -> torch.Tensor:
    """phi(s_{t+1}) per step, including an episode's final state (the collector records it
    before resetting the env)."""
    if ro.next_phi is None:
        raise ValueError("the rollout has no next_phi: collect with record_phi=True")
    return ro.next_phi


class SkillTrainer:
    """One phase-1 iteration (rollout + discriminator + PPO) on a ``SkillLibrary``.

    Args:
        library: the skills.
        objective: 'diayn' or 'supervised'.
        phi_encoder: discovery-feature encoder (for the discriminator and heatmaps).
        cfg: ``SkillTrainingConfig``.
        env_id, env_kwargs, num_envs, vectorization, seed: the discovery collector's envs.
        compositions: compositions of the discovery envs (DIAYN ignores their reward).
        primitives: the family's primitives (supervised).
    """

    def __init__(
        self,
        library: SkillLibrary,
        objective: str,
        phi_encoder: PhiEncoder,
        cfg: SkillTrainingConfig,
        *,
        env_id: str,
        env_kwargs: dict,
        num_envs: int,
        vectorization: str,
        seed: int,
        compositions: Sequence[str],
        primitives: Sequence,
        episodes_per_trial: int = 1,
    ) -> None:
        if objective not in OBJECTIVES:
            raise ValueError(f"objective={objective!r}; allowed: {', '.join(OBJECTIVES)}")
        self.library = library
        self.k = library.num_skills
        self.objective = objective
        self.phi_encoder = phi_encoder
        self.cfg = cfg
        self.env_id, self.env_kwargs = env_id, dict(env_kwargs)
        self.num_envs, self.vectorization, self.seed = num_envs, vectorization, seed
        self.E = episodes_per_trial
        self.compositions = list(compositions)
        self.discriminator = Discriminator(phi_encoder.dim, self.k, cfg.disc_hidden)
        self.primitives: list[str] = []
        if objective == "supervised":
            self.primitives = supervised_primitives(
                primitives, self.k, cfg.supervised_primitives, env_id
            )
        self.grid_size = phi_encoder.size if phi_encoder.kind == "grid" else 0
        self.visits = torch.zeros(self.k, self.grid_size, self.grid_size)
        self.buffer_x = torch.zeros(0, phi_encoder.dim)
        self.buffer_k = torch.zeros(0, dtype=torch.long)
        #: DIAYN skills in use (skills 0 .. active - 1); grown by the curriculum
        curriculum = objective == "diayn" and cfg.curriculum_threshold is not None
        self.active = min(cfg.curriculum_start, self.k) if curriculum else self.k
        self._acc_window: list[float] = []  # accuracies at the current ``active``

    def make_collector(self) -> Collector:
        comps = self.primitives if self.objective == "supervised" else self.compositions
        envs = make_vector_env(
            self.env_id, self.num_envs, {**self.env_kwargs, "composition": comps[0]},
            vectorization=self.vectorization,
        )  # fmt: skip
        sampler = uniform_task_sampler(comps, fixed_layout=False)
        col = Collector(
            envs, None, episodes_per_trial=self.E, task_sampler=sampler, seed=self.seed,
            record_phi=self.objective == "diayn" or self.grid_size > 0,
        )  # fmt: skip
        skill_of_env = None
        if self.objective == "supervised":
            index = {p: i for i, p in enumerate(self.primitives)}

            def skill_of_env(idx: torch.Tensor) -> torch.Tensor:
                return torch.tensor(
                    [index[str(col.tasks[int(i)].composition)] for i in idx], dtype=torch.long
                )

        col.policy = SkillPolicy(self.library, skill_of_env)
        col.policy.num_active = self.active
        return col

    def _grow(self, accuracy: float) -> None:
        """Curriculum step: record this iteration's accuracy over the active skills and grow
        the active set when the window's mean reaches the threshold."""
        thr = self.cfg.curriculum_threshold
        if thr is None or self.active >= self.k:
            return
        w = self.cfg.curriculum_window
        self._acc_window = (self._acc_window + [accuracy])[-w:]
        if len(self._acc_window) == w and float(np.mean(self._acc_window)) >= thr:
            self.active = min(int(1.5 * self.active + 1), self.k)
            self._acc_window = []

    def iteration(
        self,
        col: Collector,
        lib_opt: torch.optim.Optimizer,
        disc_opt: torch.optim.Optimizer,
        backward: Callable | None = None,
        record_visits: bool = False,
    ) -> tuple[Rollout, dict[str, float], dict[str, float]]:
        """Collect one rollout and update discriminator and skills.

        Returns:
            (rollout, PPO loss stats, chart scalars).
        """
        ppo = self.cfg.ppo
        if isinstance(col.policy, SkillPolicy):
            col.policy.num_active = self.active
        ro = col.collect(ppo.num_steps)
        skill = ro.extras["skill"]
        charts: dict[str, float] = {}
        if self.objective == "diayn":
            x = self.phi_encoder(next_phi(ro))
            a = self.active  # q and p(k) over the active skills (all K without a curriculum)
            with torch.no_grad():
                logq = torch.log_softmax(self.discriminator(x)[..., :a], -1)
                lq = logq.gather(-1, skill.unsqueeze(-1)).squeeze(-1)
                # log q(k | phi(s')) - log p(k), p uniform (DIAYN eq. 3)
                rewards = lq + math.log(a)
                acc = float((logq.argmax(-1) == skill).float().mean())
                # DDP: every rank's (equal-sized) rollouts, so the curriculum grows alike
                acc = (
                    float(distributed.all_reduce_sum(torch.tensor([acc]).double())[0])
                    / (distributed.world()[1])
                )
                charts["charts/disc_accuracy"] = acc
                charts["charts/mi_estimate"] = float(rewards.mean())  # before any floor
                charts["charts/active_skills"] = float(a)
                if self.cfg.reward_floor is not None:
                    rewards = rewards.clamp(min=self.cfg.reward_floor)
            charts["losses/disc_loss"] = self._update_discriminator(x, skill, disc_opt, backward)
            self._grow(acc)
        else:
            rewards = ro.rewards
        charts["charts/intrinsic_reward"] = float(rewards.mean())
        if record_visits and self.grid_size > 0:
            self._record_visits(ro.phi, skill)
        adv, ret = gae(
            rewards, ro.values, ro.next_values(), ro.episode_cut(), ppo.gamma, ppo.gae_lambda
        )
        b_obs = ro.obs.reshape(-1, ro.obs.shape[-1])
        b_act = ro.actions.reshape(-1, *ro.actions.shape[2:])
        b_skill = skill.reshape(-1)
        lib = self.library

        discrete = lib.head.discrete

        def evaluate(mb: torch.Tensor):
            obs, sk = b_obs.index_select(0, mb), b_skill.index_select(0, mb)
            sel = lib.active_outputs(obs, sk)
            if discrete:  # Categorical(logits=sel)'s log-prob and entropy, written out
                lp_all = torch.log_softmax(sel, -1)
                logp = lp_all.gather(1, b_act.index_select(0, mb).view(-1, 1)).squeeze(1)
                ent = -(lp_all.exp() * lp_all).sum(-1)
            else:
                dist = lib.head.dist(sel, lib.log_std[sk])
                act = b_act.index_select(0, mb)
                logp, ent = dist.log_prob(act), dist.entropy()
            return logp, ent, lib.value(obs, sk)

        stats = ppo_update(
            ro, evaluate, list(lib.parameters()), lib_opt, ppo,
            advantages=adv, returns=ret, backward=backward,
        )  # fmt: skip
        if isinstance(col.policy, SkillPolicy):  # a fused optimiser may not bump versions
            col.policy._pack = None
        return ro, stats, charts

    def _update_discriminator(
        self, x: torch.Tensor, skill: torch.Tensor, opt: torch.optim.Optimizer, backward
    ) -> float:
        """Epochs of cross-entropy over the phi buffer. Under DDP the buffer holds every
        rank's steps in the 1-process order and rank 0 draws the subsets and minibatches:
        every rank takes the same steps (the all-reduce averages equal gradients)."""
        cap = self.cfg.disc_buffer
        x, skill = distributed.gather_envs(x), distributed.gather_envs(skill)
        self.buffer_x = torch.cat([self.buffer_x, x.reshape(-1, x.shape[-1])])[-cap:]
        self.buffer_k = torch.cat([self.buffer_k, skill.reshape(-1)])[-cap:]
        x, y = self.buffer_x, self.buffer_k
        n = min(y.numel(), 4 * skill.numel())
        draws = None
        if distributed.world()[0] == 0:
            # a fixed compute budget per iteration: a random subset of the buffer
            subset = torch.randperm(y.numel())[:n] if n < y.numel() else None
            draws = (subset, [torch.randperm(n) for _ in range(self.cfg.disc_epochs)])
        subset, perms = distributed.broadcast_object(draws)
        if subset is not None:
            x, y = x[subset], y[subset]
        mb = max(1, n // 4)
        losses = []
        for perm in perms:
            for s in range(0, n, mb):
                i = perm[s : s + mb]
                logits = self.discriminator(x[i])[:, : self.active]
                loss = nn.functional.cross_entropy(logits, y[i])
                opt.zero_grad()
                (backward or torch.Tensor.backward)(loss)
                opt.step()
                losses.append(float(loss.detach()))
        return float(np.mean(losses))

    def state_dict(self) -> dict:
        """Non-parameter training state (plain tensors, ``weights_only``-safe)."""
        return {
            "visits": self.visits.clone(), "buffer_x": self.buffer_x, "buffer_k": self.buffer_k,
            "active": int(self.active), "acc_window": list(self._acc_window),
        }  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        if "visits" in state and state["visits"].shape == self.visits.shape:
            self.visits = state["visits"].clone()
        if "active" in state:
            self.active = int(state["active"])
            self._acc_window = [float(a) for a in state.get("acc_window", [])]
        if "buffer_x" in state:
            self.buffer_x, self.buffer_k = state["buffer_x"].clone(), state["buffer_k"].clone()

    def _record_visits(self, phi: torch.Tensor, skill: torch.Tensor) -> None:
        xs = phi[..., 0].long().clamp(0, self.grid_size - 1).reshape(-1)
        ys = phi[..., 1].long().clamp(0, self.grid_size - 1).reshape(-1)
        ks = skill.reshape(-1)
        flat = (ks * self.grid_size + ys) * self.grid_size + xs
        counts = torch.bincount(flat, minlength=self.visits.numel()).double()
        self.visits += distributed.all_reduce_sum(counts).float().view_as(self.visits)


def save_heatmaps(
    visits: torch.Tensor, path: str | Path, title: str = "", layout_seed: int | None = None
) -> None:
    """Per-skill agent-cell visitation of a CompoGrid room (a grid of K panels, rows = y),
    written atomically: each panel is the share of that skill's visits per cell, on one colour
    scale shared by all panels; the room's walls are drawn (the inner wall's door is at a
    random height in each layout) and, with a fixed ``layout_seed``, its objects."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from rl.io import atomic_write_bytes

    k, size = visits.shape[0], visits.shape[-1]
    share = (visits / visits.sum((1, 2), keepdim=True).clamp(min=1)).numpy()
    vmax = max(float(share.max()), 1e-9)
    objects = _room_objects(size, layout_seed) if layout_seed is not None else {}
    cols = min(k, 4)
    rows = -(-k // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.6 * rows + 0.6), squeeze=False)
    im = None
    for i, ax in enumerate(axes.flat):
        ax.set_xticks([])
        ax.set_yticks([])
        if i >= k:
            ax.axis("off")
            continue
        im = ax.imshow(share[i], cmap="viridis", vmin=0, vmax=vmax)
        _draw_room(ax, size, objects)
        ax.set_title(f"skill {i} (n={int(visits[i].sum())})", fontsize=8)
    room = (
        f"hatched: walls; layout {layout_seed}: balls o, keys ^, boxes s, door: open square"
        if objects
        else "hatched: walls (the door is at a random height of the see-through inner wall); "
        "objects are placed at random in each episode (not drawn)"
    )
    fig.suptitle(f"{title or 'agent-cell visitation per skill'}\n{room}", fontsize=9)
    fig.colorbar(
        im, ax=list(axes.flat), fraction=0.03, pad=0.02, label="share of the skill's visits"
    )
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def _room_objects(size: int, layout_seed: int) -> dict[str, tuple[int, int]]:
    """Cell of each entity in CompoGrid's layout ``layout_seed`` (the reference env's own
    ``_gen_grid``, so the picture cannot drift from the env)."""
    from envs.grid import ENTITIES, CompoGridEnv

    env = CompoGridEnv(size=size, layout_seed=layout_seed)
    env.reset(seed=0)
    return {name: env.entity_cell(name) for name in ENTITIES if env.entity_cell(name)}


def _draw_room(ax, size: int, objects: dict[str, tuple[int, int]]) -> None:
    """CompoGrid's walls (outer rectangle, inner wall at x = size - 3) hatched; objects as
    coloured markers (ball: circle, key: triangle, box: square, door: a gap in the wall)."""
    from matplotlib.patches import Rectangle

    from envs.grid import DOOR_COLOR

    wall_x = size - 3
    for x in range(size):
        for y in range(size):
            if x in (0, size - 1, wall_x) or y in (0, size - 1):
                if objects.get("door") == (x, y):
                    continue
                # door at an unknown height: the inner wall is hatched only, so the visits to
                # the open door's cell show through
                see = x == wall_x and 0 < y < size - 1 and "door" not in objects
                ax.add_patch(Rectangle((x - 0.5, y - 0.5), 1, 1, fc="none" if see else "0.55",
                                       ec="0.3", hatch="///", lw=0.3))  # fmt: skip
    marker = {"ball": "o", "key": "^", "box": "s"}
    for name, (x, y) in objects.items():
        if name == "door":  # an open square in the wall's colour gap
            ax.plot(x, y, "s", mfc="none", mec=DOOR_COLOR, mew=2, ms=11)
            continue
        colour, kind = name.split()
        ax.plot(x, y, marker[kind], color=colour, mec="white", mew=0.8, ms=7)


# --- the LightningModule ------------------------------------------------------------------------------


class DiscoveryModule(RLModule):
    """Method ``discovery``: trains a ``SkillLibrary`` with DIAYN (or supervised primitives).

    Its checkpoint is what ``compositional`` loads through ``library_checkpoint``.
    """

    method = "discovery"
    config_cls = DiscoveryConfig

    def build(self) -> None:
        cfg: DiscoveryConfig = self.cfg
        self.train_set = cfg.train_compositions()
        env_kwargs = {**cfg.env_kwargs, "composition": self.train_set[0]}
        obs_dim, self.action_space, phi = probe_env(cfg.env_id, env_kwargs)
        self.obs_dim = obs_dim
        self.library = SkillLibrary(
            obs_dim, self.action_space, cfg.num_skills, cfg.hidden, cfg.init_termination
        )
        from envs import make_split

        prims = make_split(cfg.split_family, seed=cfg.split_seed).primitives
        self.trainer_ = SkillTrainer(
            self.library, cfg.objective, PhiEncoder.for_env(cfg.env_id, cfg.env_kwargs, phi),
            cfg.training, env_id=cfg.env_id, env_kwargs=cfg.env_kwargs, num_envs=cfg.num_envs,
            vectorization=cfg.vectorization, seed=cfg.seed, compositions=self.train_set,
            primitives=prims, episodes_per_trial=cfg.episodes_per_trial,
        )  # fmt: skip
        self.discriminator = self.trainer_.discriminator
        self._steps_done = 0

    @property
    def env_steps(self) -> int:
        """Env steps so far (kept after ``teardown`` closes the collector, so ``final.ckpt``
        still records the library's budget); under DDP summed over the ranks."""
        if self.world_size > 1:
            return RLModule.env_steps.fget(self)
        return self.collector.env_steps if self.collector is not None else self._steps_done

    def teardown(self, stage: str) -> None:
        if self.collector is not None:
            self._steps_done = self.collector.env_steps
        super().teardown(stage)

    def make_collector(self) -> Collector:
        self.trainer_.num_envs = self.num_local_envs  # all of them on one process
        return self.trainer_.make_collector()

    def configure_optimizers(self):
        t = self.cfg.training
        return [
            torch.optim.Adam(self.library.parameters(), lr=t.ppo.lr, eps=1e-5),
            torch.optim.Adam(self.discriminator.parameters(), lr=t.disc_lr),
        ]

    def iterations(self) -> int:
        cfg = self.cfg
        return max(1, -(-cfg.total_env_steps // (cfg.num_envs * cfg.training.ppo.num_steps)))

    def training_step(self, batch, batch_idx):
        t0 = time.perf_counter()
        lib_opt, disc_opt = self.optimizers()
        n = self.iterations()
        record = self.iteration >= n - max(1, int(round(self.cfg.training.heatmap_fraction * n)))
        ro, stats, charts = self.trainer_.iteration(
            self.collector, lib_opt, disc_opt, self.manual_backward, record_visits=record
        )
        self.log_iteration(ro, stats, time.perf_counter() - t0, extra=charts)

    def on_train_end(self) -> None:
        root = getattr(self.trainer, "default_root_dir", None)
        if root and self.trainer_.grid_size > 0 and self.trainer_.visits.sum() > 0:
            save_heatmaps(
                self.trainer_.visits, Path(root) / "heatmaps.png",
                layout_seed=self.cfg.env_kwargs.get("layout_seed"),
            )  # fmt: skip

    def extra_state(self) -> dict:
        return {**self.trainer_.state_dict(), "env_steps": int(self.env_steps)}

    def load_extra_state(self, state: dict) -> None:
        self.trainer_.load_state_dict(state)
        self._steps_done = int(state.get("env_steps", 0))

    def trial_policy(self, envs):
        """A library alone does not adapt: one random skill per episode."""
        return SkillPolicy(self.library), None

    def acting_policy(self) -> SkillPolicy:
        return SkillPolicy(self.library)
