"""PPO (Schulman et al. 2017): the loss as a pure function, and the plain PPO LightningModule.

The update is CleanRL-legible: a (T, N) rollout, GAE from ``rl.gae``, flattened ``b_``
batches, minibatch ``mb_`` slices. The loss returns named terms; the module sums and steps.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from rl import distributed
from rl.collect import Collector, FeedForwardPolicy, Rollout, make_vector_env, uniform_task_sampler
from rl.config import BaseConfig
from rl.gae import gae
from rl.module import RLModule
from rl.nets import ActorCritic


def ppo_loss(
    new_logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    new_values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    entropy: torch.Tensor,
    *,
    clip_coef: float = 0.2,
    vf_coef: float = 0.5,
    ent_coef: float = 0.01,
    clip_vloss: bool = True,
) -> dict[str, torch.Tensor]:
    """Clipped-surrogate PPO loss with named terms (TorchRL style).

    Returns:
        ``loss`` (to minimise) = ``loss_policy + vf_coef * loss_value - ent_coef * entropy``,
        the terms ``loss_policy``, ``loss_value``, ``loss_entropy``, and detached diagnostics
        ``approx_kl`` (the low-variance ``(r - 1) - log r`` estimator) and ``clipfrac``.
    """
    log_ratio = new_logp - old_logp
    ratio = log_ratio.exp()
    pg1 = -advantages * ratio
    pg2 = -advantages * ratio.clamp(1 - clip_coef, 1 + clip_coef)
    loss_policy = torch.max(pg1, pg2).mean()
    if clip_vloss:
        v_clipped = old_values + (new_values - old_values).clamp(-clip_coef, clip_coef)
        loss_value = 0.5 * torch.max((new_values - returns) ** 2, (v_clipped - returns) ** 2).mean()
    else:
        loss_value = 0.5 * ((new_values - returns) ** 2).mean()
    loss_entropy = -entropy.mean()
    with torch.no_grad():
        approx_kl = ((ratio - 1) - log_ratio).mean()
        clipfrac = ((ratio - 1.0).abs() > clip_coef).float().mean()
    return {
        "loss": loss_policy + vf_coef * loss_value + ent_coef * loss_entropy,
        "loss_policy": loss_policy,
        "loss_value": loss_value,
        "loss_entropy": loss_entropy,
        "approx_kl": approx_kl,
        "clipfrac": clipfrac,
    }


def explained_variance(pred: torch.Tensor, target: torch.Tensor) -> float:
    """1 - Var(target - pred) / Var(target); NaN when it is undefined (fewer than two values,
    or constant targets: a rollout with one trained decision)."""
    if target.numel() < 2:
        return float("nan")
    var = target.var()
    return float("nan") if var == 0 else float(1 - (target - pred).var() / var)


@dataclass
class PPOConfig:
    """PPO hyper-parameters shared by every on-policy learner (PPO, RL², skills, composer)."""

    num_steps: int = 128
    """vector steps per rollout (per env)"""
    lr: float = 5e-4
    """Adam learning rate"""
    gamma: float = 0.99
    """discount"""
    gae_lambda: float = 0.95
    """GAE lambda"""
    update_epochs: int = 4
    """passes over each rollout"""
    num_minibatches: int = 4
    """minibatches per pass"""
    clip_coef: float = 0.2
    """surrogate clipping"""
    ent_coef: float = 0.01
    """entropy bonus"""
    vf_coef: float = 0.5
    """value-loss weight"""
    max_grad_norm: float = 0.5
    """global gradient-norm clip"""
    norm_adv: bool = True
    """normalise advantages per minibatch"""

    def __post_init__(self) -> None:
        for name in ("num_steps", "update_epochs", "num_minibatches"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}; allowed: an integer >= 1")
        if self.lr <= 0:
            raise ValueError(f"lr={self.lr}; allowed: a positive number")
        for name in ("gamma", "gae_lambda"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name}={getattr(self, name)}; allowed: a number in [0, 1]")
        for name in ("clip_coef", "ent_coef", "vf_coef", "max_grad_norm"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name}={getattr(self, name)}; allowed: a number >= 0")


def ppo_section(owner, name: str = "ppo") -> PPOConfig:
    """Section ``name`` of the dataclass ``owner`` as a ``PPOConfig``: a dict overrides only the
    settings it names, over the owner's own default for the section (its field's
    ``default_factory``, e.g. the skills' lr 1e-3 and gamma 0.95), not over ``PPOConfig``'s
    class defaults; None: that default.

    Examples:
        >>> from dataclasses import dataclass, field
        >>> @dataclass
        ... class Owner:
        ...     ppo: PPOConfig | dict = field(default_factory=lambda: PPOConfig(lr=1e-3))
        >>> ppo_section(Owner(ppo={"ent_coef": 0.0})).lr
        0.001
    """
    value = getattr(owner, name)
    if isinstance(value, PPOConfig):
        return value
    f = next(f for f in dataclasses.fields(owner) if f.name == name)
    base = f.default_factory() if f.default_factory is not dataclasses.MISSING else PPOConfig()
    if value is None:
        return base
    allowed = [f.name for f in dataclasses.fields(PPOConfig)]
    unknown = sorted(set(value) - set(allowed))
    if unknown:
        raise ValueError(
            f"unknown config key '{name}.{unknown[0]}' of {type(owner).__name__}; allowed: "
            f"{', '.join(allowed)}"
        )
    return dataclasses.replace(base, **value)


#: the loss terms ``ppo_loss`` returns (the logged ``losses/*``)
PPO_TERMS = ("loss", "loss_policy", "loss_value", "loss_entropy", "approx_kl", "clipfrac")


def minibatch_step(
    new_logp, old_logp, adv, new_values, old_values, returns, entropy,
    params: list[nn.Parameter], optimizer: torch.optim.Optimizer, cfg: PPOConfig,
    stats: dict[str, list[float]], backward=None, scale: float | None = None,
    aux: dict[str, torch.Tensor] | None = None,
) -> None:  # fmt: skip
    """One PPO gradient step on a minibatch: normalise its advantages, the clipped loss, the
    step with a clipped gradient norm; the loss terms are appended to ``stats``. Shared by
    ``ppo_update`` and the compositional agent's decision-level update.

    ``scale`` multiplies the loss that is back-propagated (``rl.distributed.minibatch_scale``:
    a rank's part of a minibatch spread over DDP ranks); ``None`` leaves it as it is.
    ``aux`` holds extra loss terms (already weighted), added to the loss and logged by name
    (the compositional agent's KL to its frozen skills).
    """
    if cfg.norm_adv and adv.numel() > 1:
        adv = (adv - adv.mean()) / (adv.std() + 1e-8)
    terms = ppo_loss(
        new_logp, old_logp, adv, new_values, old_values, returns, entropy,
        clip_coef=cfg.clip_coef, vf_coef=cfg.vf_coef, ent_coef=cfg.ent_coef,
    )  # fmt: skip
    for k, v in (aux or {}).items():
        terms["loss"] = terms["loss"] + v
        terms[k] = v
    optimizer.zero_grad()
    loss = terms["loss"] if scale is None else terms["loss"] * scale
    (backward or torch.Tensor.backward)(loss)
    nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
    optimizer.step()
    for k, v in terms.items():
        stats.setdefault(k, []).append(float(v.detach()))


def empty_step(params: list[nn.Parameter], optimizer, cfg: PPOConfig, backward=None) -> None:
    """A DDP rank's step on a minibatch it holds no item of: a zero loss joins the gradient
    all-reduce, then the same clip and step as every other rank (the gradients are the
    average DDP wrote, the same on every rank)."""
    optimizer.zero_grad()
    (backward or torch.Tensor.backward)(distributed.zero_loss(params))
    nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
    optimizer.step()


def ppo_update(
    rollout: Rollout,
    evaluate,
    params: list[nn.Parameter],
    optimizer: torch.optim.Optimizer,
    cfg: PPOConfig,
    *,
    advantages: torch.Tensor,
    returns: torch.Tensor,
    backward=None,
) -> dict[str, float]:
    """Minibatch PPO epochs over a flat (T*N) batch of valid steps.

    Under DDP (``rl.distributed``) the batch is the union of the ranks' rollouts, laid out as
    a 1-process run of all their envs would hold it (rank r's envs are columns
    ``[r n, (r+1) n)``): the permutation comes from rank 0, advantages are normalised over the
    whole minibatch, and each rank evaluates and back-propagates the steps it holds.

    Args:
        evaluate: ``f(idx) -> (new_logp, entropy, new_values)`` for flat step indices ``idx``
            of this process's rollout (so feed-forward and recurrent policies share this
            update); a fourth element, a dict of extra loss terms, is added to the loss
            (``minibatch_step``'s ``aux``).
        backward: ``loss -> None`` (Lightning's ``manual_backward``); defaults to ``loss.backward``.
    """
    rank, size = distributed.world()
    n_local = rollout.valid.shape[1]
    n_envs = n_local * size
    valid = distributed.gather_envs(rollout.valid).reshape(-1)
    b_idx = torch.nonzero(valid).squeeze(-1)
    b_logp = rollout.logp.reshape(-1)
    b_values = rollout.values.reshape(-1)
    b_adv = distributed.gather_envs(advantages).reshape(-1)
    b_ret = returns.reshape(-1)
    n = b_idx.numel()
    mb_size = max(1, n // cfg.num_minibatches)
    flat = dataclasses.replace(cfg, norm_adv=False)  # normalised below, over the whole minibatch
    stats: dict[str, list[float]] = {}
    rows, shares = [], []
    for _epoch in range(cfg.update_epochs):
        perm = torch.randperm(n) if rank == 0 else torch.empty(n, dtype=torch.long)
        perm = b_idx[distributed.broadcast(perm)]
        for start in range(0, n, mb_size):
            mb = perm[start : start + mb_size]
            mine, envs = distributed.local_part(mb % n_envs, n_local, rank)
            local = (mb[mine] // n_envs) * n_local + envs  # flat indices of this rank's steps
            adv = b_adv[mb]
            if cfg.norm_adv and adv.numel() > 1:
                adv = (adv - adv.mean()) / (adv.std() + 1e-8)
            if size == 1:
                new_logp, entropy, new_values, *aux = evaluate(local)
                minibatch_step(
                    new_logp, b_logp[local], adv, new_values, b_values[local], b_ret[local],
                    entropy, params, optimizer, flat, stats, backward, aux=aux[0] if aux else None,
                )  # fmt: skip
                continue
            one: dict[str, list[float]] = {}
            if local.numel():
                new_logp, entropy, new_values, *aux = evaluate(local)
                minibatch_step(
                    new_logp, b_logp[local], adv[mine], new_values, b_values[local],
                    b_ret[local], entropy, params, optimizer, flat, one, backward,
                    scale=distributed.minibatch_scale(local.numel(), mb.numel()),
                    aux=aux[0] if aux else None,
                )  # fmt: skip
            else:
                empty_step(params, optimizer, cfg, backward)
            rows.append({k: v[0] for k, v in one.items()})
            shares.append(local.numel() / mb.numel())
    if size == 1:
        out = {k: float(np.mean(v)) for k, v in stats.items()}
    else:
        # the aux terms too (named alike on every rank; a rank may hold no minibatch's items)
        aux_keys = {k for r in rows for k in r if k not in PPO_TERMS}
        extra = tuple(sorted(set().union(*distributed.gather_objects(aux_keys))))
        out = distributed.weighted_stats(rows, shares, PPO_TERMS + extra)
    g_values = distributed.gather_envs(rollout.values).reshape(-1)
    g_ret = distributed.gather_envs(returns).reshape(-1)
    out["explained_variance"] = explained_variance(g_values[b_idx], g_ret[b_idx])
    return out


@dataclass
class PPOModuleConfig(BaseConfig):
    """Plain PPO: a feed-forward policy trained on ``compositions`` (or the split's train side)."""

    compositions: list | None = field(default_factory=lambda: ["pickup(red ball) > open(door)"])
    """compositions to train on (each trial draws one); None: the split's train side"""
    fixed_layout: bool = False
    """plain PPO sees a new layout every episode"""
    hidden: int = 64
    """MLP width"""
    ppo: PPOConfig = field(default_factory=PPOConfig)
    """PPO hyper-parameters"""

    def __post_init__(self) -> None:
        self.ppo = ppo_section(self)
        super().__post_init__()  # after the section is built: it reads the rollout length
        if self.hidden < 1:
            raise ValueError(f"hidden={self.hidden}; allowed: an integer >= 1")
        if self.ppo.num_minibatches > self.rollout_env_steps():
            raise ValueError(
                f"ppo.num_minibatches={self.ppo.num_minibatches} exceeds the rollout's "
                f"{self.rollout_env_steps()} samples; allowed: at most num_envs x ppo.num_steps"
            )

    def rollout_env_steps(self) -> int:
        return int(self.num_envs) * int(self.ppo.num_steps)


class PPOModule(RLModule):
    """Plain PPO as a LightningModule: one ``training_step`` = one rollout + its update."""

    method = "ppo"
    config_cls = PPOModuleConfig

    def build(self) -> None:
        cfg: PPOModuleConfig = self.cfg
        self.train_set = cfg.train_compositions()
        probe = make_vector_env(cfg.env_id, 1, {**cfg.env_kwargs, "composition": self.train_set[0]})
        obs_dim = probe.single_observation_space.shape[0]
        self.action_space = probe.single_action_space
        probe.close()
        self.net = ActorCritic(obs_dim, self.action_space, cfg.hidden)

    def make_collector(self) -> Collector:
        cfg: PPOModuleConfig = self.cfg
        envs = make_vector_env(
            cfg.env_id, self.num_local_envs, {**cfg.env_kwargs, "composition": self.train_set[0]},
            vectorization=cfg.vectorization,
        )  # fmt: skip
        sampler = uniform_task_sampler(self.train_set, cfg.fixed_layout, cfg.train_layout_seeds())
        return Collector(envs, FeedForwardPolicy(self.net), task_sampler=sampler, seed=cfg.seed)

    def configure_optimizers(self):
        return torch.optim.Adam(self.net.parameters(), lr=self.cfg.ppo.lr, eps=1e-5)

    def iterations(self) -> int:
        cfg = self.cfg
        return max(1, -(-cfg.total_env_steps // (cfg.num_envs * cfg.ppo.num_steps)))

    def training_step(self, batch, batch_idx):
        cfg: PPOModuleConfig = self.cfg
        t0 = time.perf_counter()
        ro = self.collector.collect(cfg.ppo.num_steps)
        adv, ret = gae(
            ro.rewards,
            ro.values,
            ro.next_values(),
            ro.episode_cut(),
            cfg.ppo.gamma,
            cfg.ppo.gae_lambda,
        )
        b_obs = ro.obs.reshape(-1, ro.obs.shape[-1])
        b_act = ro.actions.reshape(-1, *ro.actions.shape[2:])

        def evaluate(mb):
            dist = self.net.dist(b_obs[mb])
            return dist.log_prob(b_act[mb]), dist.entropy(), self.net.value(b_obs[mb])

        stats = ppo_update(
            ro, evaluate, list(self.net.parameters()), self.optimizers(), cfg.ppo,
            advantages=adv, returns=ret, backward=self.manual_backward,
        )  # fmt: skip
        self.log_iteration(ro, stats, time.perf_counter() - t0)

    def trial_policy(self, envs):
        """Evaluation: the trained policy acts; plain PPO has no adaptation mechanism."""
        return FeedForwardPolicy(self.net), None
