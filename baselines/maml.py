"""MAML for RL with a correct second-order meta-gradient; FOMAML and Reptile as options.

Model-agnostic meta-learning (Finn et al. 2017) meta-learns policy parameters ``theta`` such that
K policy-gradient steps on a task's first episodes (the *pre-update* episodes) give adapted
parameters ``phi_i`` that do well on that task (the *post-update* episodes).

What this file does, and why:

* **Functional parameters.** The policy is a feed-forward MLP (``MAMLPolicyNet``: an
  ActorCritic-like actor, with a state-independent log-std on Box spaces through
  ``rl.nets.ActionHead``). Parameters are plain dicts of tensors evaluated with
  ``torch.func.functional_call``; one task's parameters are a slice of a *stacked* dict
  (leading dim = tasks), so the inner step of all tasks of a meta-batch runs as one batched
  computation (``torch.func.vmap`` over tasks). Nothing on the differentiable path writes
  ``.data`` or deep-copies (the seed's pseudo-code did, which silently cut the second-order
  path; see DESIGN.md).
* **Inner surrogate (meta-gradient correctness).** In RL the inner objective is an expectation
  over the pre-update episodes, whose distribution depends on ``theta``. The meta-gradient
  ``d/dtheta J_outer(theta + a * grad J_inner(theta))`` therefore needs an *unbiased Hessian* of
  ``J_inner`` (ProMP, Rothfuss et al. 2019, sec. 4-5, "formulation II"). The usual
  ``sum logpi * A`` surrogate gets the gradient right but its Hessian misses the
  ``E[R grad logpi grad logpi^T]`` term that comes from the sampling distribution. We use
  DiCE (Foerster et al. 2018), the "magic box" ``[x] = exp(x - stop_grad(x))``, with the
  variance-reducing baseline of Mao et al. 2019 ("A baseline for any order gradient
  estimation in stochastic computation graphs"): every order of derivative is unbiased.
  ProMP's low-variance curvature surrogate LVC (eq. 10 there: per-step likelihood ratio times
  the advantage; unbiased gradient, biased but low-variance Hessian) is the option
  ``surrogate="lvc"``. ``tests/test_maml.py`` checks the meta-gradient against the exact
  gradient of ``J(theta + a * grad J(theta))`` on an enumerable MDP.
* **Outer loss.** The post-update episodes are drawn from ``pi_phi_i``; their score-function
  loss ``-sum gamma^t log pi_phi(a_t|s_t) A_t`` evaluated with the adapted ``phi_i(theta)`` and
  differentiated back to ``theta`` through the inner steps (``create_graph=True``). Collection
  runs without grad, so the inner steps are *recomputed* with graph from the stored
  pre-update episodes. The outer optimiser is Adam by default.
* **TRPO outer step** (``outer_optimizer="trpo"``; ``trpo_step``). Finn et al. 2017 (sec. 5.3)
  meta-train their RL experiments with TRPO (Schulman et al. 2015) as the outer optimiser,
  and so do ProMP (Rothfuss et al. 2019), garage's and learn2learn's MAML-TRPO and the
  Meta-World baselines. The outer objective is TRPO's importance-weighted surrogate of the
  post-update episodes, ``mean_i E[pi_phi_i(theta)(a|s) / pi_phi_i(theta_old)(a|s) A]``,
  maximised subject to ``mean KL(pi_phi(theta_old) || pi_phi(theta)) <= max_kl`` on the
  post-update states, both differentiated through the inner adaptation (second order for
  MAML, identity Jacobian for FOMAML). The natural gradient is solved by conjugate gradient
  on Fisher-vector products (Hessian-vector products of that KL, by double
  back-propagation through the adaptation: ``J^T F J v``) with damping, scaled to the trust
  region, then backtracked until the surrogate improves within the KL bound; if no fraction
  does, theta is kept (logged as ``trpo/accepted = 0``). The accepted step is applied as an
  SGD step of rate 1 on the pseudo-gradient ``theta - theta_new``, so Lightning checkpoints
  and resumes it like any optimiser step (TRPO itself keeps no state across iterations).
  Reptile has no surrogate to constrain and rejects ``trpo``.
* **Baseline.** A per-task linear feature baseline refitted on every batch by ridge
  regression, as in Finn et al. / garage ``LinearFeatureBaseline`` (Duan et al. 2016). Its
  default features are time only (1, t, t^2, t^3): CompoGrid observations have 125 dims,
  more than a task's few pre-update steps, so garage's observation features would interpolate
  the returns and zero the advantages; ``baseline="linear"`` adds them (obs, obs^2) for
  richer families. The baseline never depends on ``theta``, so it keeps every estimator
  unbiased.
* **FOMAML** (Finn et al. 2017, sec. 5.2): the inner gradient is taken without graph, so the
  outer gradient at ``phi`` is applied to ``theta`` unchanged. **Reptile** (Nichol et al.
  2018): ``theta += eps * (mean_i phi_i - theta)``, applied as an SGD step of learning rate
  ``eps`` on the pseudo-gradient ``theta - mean_i phi_i`` (the same update, and resumable as an
  ordinary optimiser state).
* **Meta-batch.** One vector env with one env per task (``num_envs = meta_batch_size``);
  pre-update episodes come from ``Collector.collect_trials`` with ``theta``; post-update
  episodes from the same collector with a policy acting with each env's own ``phi_i``.
* **Evaluation** (``trial_policy``): episode 0 acts with ``theta``; after each episode the
  hook adapts that env's parameters from ``theta`` on all of the trial's episodes so far
  (K inner steps, no graph), so the adaptation curve shows MAML's test-time learning.

``meta_step()`` runs one meta-iteration outside Lightning (benchmarks: see
``meta_iteration_cost``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from torch import nn
from torch.func import functional_call, vmap

from rl.collect import (
    Collector,
    Episode,
    Prev,
    Rollout,
    StepOutput,
    make_vector_env,
    uniform_task_sampler,
)
from rl.config import BaseConfig
from rl.module import RLModule
from rl.nets import ActionHead, mlp

Params = dict[str, torch.Tensor]
log = logging.getLogger(__name__)

ALGOS = ("maml", "fomaml", "reptile")
SURROGATES = ("dice", "lvc")
BASELINES = ("time", "linear", "none")
OUTER_OPTIMIZERS = ("adam", "trpo")


# --- config -----------------------------------------------------------------------------------


@dataclass
class MAMLConfig(BaseConfig):
    """MAML / FOMAML / Reptile. ``num_envs`` is derived: one env per task of the meta-batch."""

    algo: str = "maml"
    """'maml' (second order), 'fomaml' (first order) or 'reptile'"""
    meta_batch_size: int = 8
    """tasks per meta-iteration (= parallel envs)"""
    episodes_per_trial: int = 2
    """pre-update episodes per task (the same number of post-update episodes is collected)"""
    inner_steps: int = 1
    """K: policy-gradient steps of the inner loop (training and evaluation)"""
    inner_lr: float = 0.5
    """inner-loop step size alpha (plain gradient ascent on the surrogate)"""
    outer_lr: float = 1e-3
    """outer Adam learning rate (unused by TRPO)"""
    outer_optimizer: str = "adam"
    """outer optimiser of MAML/FOMAML: 'adam' or 'trpo' (Reptile has its own update)"""
    max_kl: float = 0.01
    """TRPO: trust region, mean KL(pi_phi_old || pi_phi_new) on the post-update states"""
    cg_iters: int = 10
    """TRPO: conjugate-gradient iterations for the natural gradient"""
    cg_damping: float = 0.1
    """TRPO: damping added to the Fisher-vector product (F + damping * I)"""
    ls_steps: int = 10
    """TRPO: backtracking line-search steps (step fractions 1, decay, decay^2, ...)"""
    ls_decay: float = 0.5
    """TRPO: backtracking factor of the line search"""
    reptile_eps: float = 0.1
    """Reptile's outer step size epsilon"""
    surrogate: str = "dice"
    """inner surrogate: 'dice' (DiCE + Mao et al. baseline) or 'lvc' (ProMP's LVC)"""
    baseline: str = "time"
    """per-task linear feature baseline: 'time' (1,t,t^2,t^3), 'linear' (+obs, obs^2), 'none'"""
    gamma: float = 0.99
    """discount"""
    normalize_adv: bool = True
    """normalise the outer loss's advantages per task (as garage's MAML does)"""
    hidden: int = 64
    """MLP width (two hidden layers)"""
    max_grad_norm: float = 1.0
    """global norm clip of the outer gradient (0 disables)"""

    def __post_init__(self) -> None:
        if int(self.meta_batch_size) < 1:
            raise ValueError(f"meta_batch_size={self.meta_batch_size}; allowed: an integer >= 1")
        # one env per task: the meta-batch *is* the vector env
        self.num_envs = int(self.meta_batch_size)
        super().__post_init__()
        if self.algo not in ALGOS:
            raise ValueError(f"algo={self.algo!r}; allowed: {', '.join(ALGOS)}")
        if int(self.inner_steps) < 1:
            raise ValueError(f"inner_steps={self.inner_steps}; allowed: an integer >= 1")
        if not self.inner_lr >= 0:
            raise ValueError(f"inner_lr={self.inner_lr}; allowed: a number >= 0")
        for k in ("outer_lr", "reptile_eps"):
            if not getattr(self, k) > 0:
                raise ValueError(f"{k}={getattr(self, k)}; allowed: a positive number")
        if self.outer_optimizer not in OUTER_OPTIMIZERS:
            raise ValueError(
                f"outer_optimizer={self.outer_optimizer!r}; allowed: {', '.join(OUTER_OPTIMIZERS)}"
            )
        if self.algo == "reptile" and self.outer_optimizer == "trpo":
            raise ValueError(
                "outer_optimizer='trpo' with algo='reptile'; allowed: 'adam' (Reptile's update "
                "theta += eps * (phi - theta) is not a gradient step on a surrogate)"
            )
        if not self.max_kl > 0:
            raise ValueError(f"max_kl={self.max_kl}; allowed: a positive number")
        if int(self.cg_iters) < 1:
            raise ValueError(f"cg_iters={self.cg_iters}; allowed: an integer >= 1")
        if not self.cg_damping >= 0:
            raise ValueError(f"cg_damping={self.cg_damping}; allowed: a number >= 0")
        if int(self.ls_steps) < 1:
            raise ValueError(f"ls_steps={self.ls_steps}; allowed: an integer >= 1")
        if not 0 < self.ls_decay < 1:
            raise ValueError(f"ls_decay={self.ls_decay}; allowed: a number in (0, 1)")
        if self.surrogate not in SURROGATES:
            raise ValueError(f"surrogate={self.surrogate!r}; allowed: {', '.join(SURROGATES)}")
        if self.baseline not in BASELINES:
            raise ValueError(f"baseline={self.baseline!r}; allowed: {', '.join(BASELINES)}")
        if not 0 <= self.gamma <= 1:
            raise ValueError(f"gamma={self.gamma}; allowed: a number in [0, 1]")
        if int(self.hidden) < 1:
            raise ValueError(f"hidden={self.hidden}; allowed: an integer >= 1")
        if self.max_grad_norm < 0:
            raise ValueError(f"max_grad_norm={self.max_grad_norm}; allowed: a number >= 0")


# --- policy -------------------------------------------------------------------------------------


class MAMLPolicyNet(nn.Module):
    """Feed-forward policy: ``forward(obs)`` gives logits (Discrete) or the Gaussian mean (Box);
    ``log_std`` (Box only) is a state-independent meta-learned parameter (Finn et al. 2017)."""

    def __init__(self, obs_dim: int, action_space: gym.Space, hidden: int = 64) -> None:
        super().__init__()
        self.head = ActionHead(action_space)
        self.actor = mlp([obs_dim, hidden, hidden, self.head.n_out], out_gain=0.01)
        if not self.head.discrete:
            self.log_std = nn.Parameter(torch.full((self.head.n_out,), -0.5))

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.actor(obs)

    def params(self) -> Params:
        """The meta-parameters ``theta`` as a name -> tensor dict (no copy: live parameters)."""
        return dict(self.named_parameters())


def stack_params(params: Params, n: int) -> Params:
    """``n`` per-task views of ``params`` (leading dim n). ``expand`` keeps the graph to
    ``params``, and the gradient w.r.t. the expanded tensor is per task."""
    return {k: v.unsqueeze(0).expand(n, *v.shape) for k, v in params.items()}


def policy_dist(net: MAMLPolicyNet, params: Params, obs: torch.Tensor):
    """Action distribution of each task's own parameters.

    Args:
        params: stacked parameters, leading dim N (tasks).
        obs: (N, ..., obs_dim).
    """
    names = [k for k in params if k != "log_std"]
    actor = {k: params[k] for k in names}
    shape = obs.shape
    flat = obs.reshape(shape[0], -1, shape[-1])
    out = vmap(lambda p, x: functional_call(net, p, (x,)))(actor, flat)
    out = out.reshape(*shape[:-1], out.shape[-1])
    log_std = None
    if "log_std" in params:
        ls = params["log_std"]
        log_std = ls.reshape(ls.shape[0], *([1] * (out.dim() - 2)), ls.shape[-1])
    return net.head.dist(out, log_std)


# --- episode batches ------------------------------------------------------------------------------


@dataclass
class EpisodeBatch:
    """M episodes of each of N tasks, zero-padded to length T.

    Attributes:
        obs: (N, M, T, obs_dim); actions: (N, M, T[, act_dim]); rewards, mask: (N, M, T) float;
        time: (N, M, T) step index within the episode.
        weights: (N, M) weight of each episode in the task's objective (rows sum to 1; uniform
            1/M for sampled episodes; exact probabilities when trajectories are enumerated).
    """

    obs: torch.Tensor
    actions: torch.Tensor
    rewards: torch.Tensor
    mask: torch.Tensor
    time: torch.Tensor
    weights: torch.Tensor

    @staticmethod
    def from_episodes(episodes: Sequence[Sequence[Any]]) -> EpisodeBatch:
        """From ``episodes[task][m]`` objects with ``.obs``, ``.actions``, ``.rewards`` (T, ...)."""
        N = len(episodes)
        M = max(len(e) for e in episodes)
        if N == 0 or M == 0 or any(len(e) != M for e in episodes):
            raise ValueError("every task needs the same number (>= 1) of episodes")
        T = max(int(ep.rewards.shape[0]) for eps in episodes for ep in eps)
        ep0 = episodes[0][0]
        obs = torch.zeros(N, M, T, ep0.obs.shape[-1])
        actions = torch.zeros(N, M, T, *ep0.actions.shape[1:], dtype=ep0.actions.dtype)
        rewards = torch.zeros(N, M, T)
        mask = torch.zeros(N, M, T)
        for i, eps in enumerate(episodes):
            for m, ep in enumerate(eps):
                n = int(ep.rewards.shape[0])
                obs[i, m, :n] = ep.obs
                actions[i, m, :n] = ep.actions
                rewards[i, m, :n] = ep.rewards
                mask[i, m, :n] = 1.0
        time_idx = torch.arange(T, dtype=torch.float32).expand(N, M, T).clone()
        return EpisodeBatch(obs, actions, rewards, mask, time_idx, torch.full((N, M), 1.0 / M))

    @staticmethod
    def from_rollout(ro: Rollout, episodes_per_task: int) -> EpisodeBatch:
        """Split a ``collect_trials`` rollout (T, N) into each env's ``episodes_per_task``."""
        N = ro.valid.shape[1]
        per_task = []
        for i in range(N):
            eps = []
            for m in range(episodes_per_task):
                idx = torch.nonzero(ro.valid[:, i] & (ro.episode_index[:, i] == m)).squeeze(-1)
                eps.append(_Ep(ro.obs[idx, i], ro.actions[idx, i], ro.rewards[idx, i]))
            per_task.append(eps)
        return EpisodeBatch.from_episodes(per_task)


@dataclass
class _Ep:
    obs: torch.Tensor
    actions: torch.Tensor
    rewards: torch.Tensor


def discounted_to_go(rewards: torch.Tensor, gamma: float) -> torch.Tensor:
    """``G_t = sum_{t' >= t} gamma^(t'-t) r_t'`` along the last dim (padding must be 0)."""
    out = torch.zeros_like(rewards)
    run = torch.zeros_like(rewards[..., 0])
    for t in reversed(range(rewards.shape[-1])):
        run = rewards[..., t] + gamma * run
        out[..., t] = run
    return out


def linear_baseline(
    batch: EpisodeBatch, gamma: float, kind: str, reg: float = 1e-5
) -> torch.Tensor:
    """Per-task ridge regression of the return-to-go on features (garage LinearFeatureBaseline).

    Returns:
        (N, M, T) value estimates ``V(s_t)`` (0 on padding), detached.
    """
    if kind == "none":
        return torch.zeros_like(batch.rewards)
    with torch.no_grad():
        al = (batch.time / 100.0).unsqueeze(-1)
        feats = [torch.ones_like(al), al, al**2, al**3]
        if kind == "linear":
            o = batch.obs.clamp(-10, 10)
            feats = [o, o**2, *feats]
        X = torch.cat(feats, -1).double()  # (N, M, T, F)
        N, F = X.shape[0], X.shape[-1]
        w = (batch.mask * batch.weights.unsqueeze(-1)).double()
        y = discounted_to_go(batch.rewards, gamma).double()
        Xf, wf, yf = X.reshape(N, -1, F), w.reshape(N, -1, 1), y.reshape(N, -1, 1)
        A = Xf.transpose(1, 2) @ (wf * Xf)
        b = Xf.transpose(1, 2) @ (wf * yf)
        scale = A.diagonal(dim1=1, dim2=2).mean(-1).clamp_min(1e-8)
        eye = torch.eye(F, dtype=A.dtype).expand(N, F, F)
        coef = torch.linalg.solve(A + (reg * scale)[:, None, None] * eye, b)
        return ((X @ coef.unsqueeze(1)).squeeze(-1) * batch.mask).float()


# --- surrogates ---------------------------------------------------------------------------------


def magic_box(x: torch.Tensor) -> torch.Tensor:
    """DiCE's magic box (Foerster et al. 2018): value 1, derivative ``[x] * dx``."""
    return torch.exp(x - x.detach())


def dice_objective(
    logp: torch.Tensor,
    rewards: torch.Tensor,
    mask: torch.Tensor,
    gamma: float,
    values: torch.Tensor | None = None,
    behaviour_logp: torch.Tensor | None = None,
) -> torch.Tensor:
    """DiCE surrogate of each episode's discounted return, with Mao et al.'s baseline.

    ``sum_t gamma^t [ rho_t r_t + (rho_{t-1} - rho_t) V(s_t) ]`` with
    ``rho_t = exp(sum_{t'<=t} logp_t' - stop_grad(sum_{t'<=t} behaviour_logp_t'))``. On-policy
    (``behaviour_logp`` None = ``logp`` detached) ``rho_t`` is DiCE's magic box of the cumulative
    log-probability (Foerster et al. 2018, eq. 4): the value is the discounted return and
    derivatives of every order are unbiased estimates of those of the expected return. The
    baseline term ``[W_{t-1}] (1 - [logp_t]) V(s_t)`` (Mao et al. 2019, eq. 7) has value 0 and
    zero-mean derivatives of every order. With ``behaviour_logp`` from the policy that
    sampled the episodes, ``rho`` is the importance weight, so later inner steps (K > 1) that
    reuse the pre-update episodes stay unbiased too (the detached denominator is exactly the
    magic box of the sampling distribution times the full importance weight).

    Args:
        logp, rewards, mask, values, behaviour_logp: (..., T); padding must have mask 0.
    """
    logp = logp * mask
    ref = logp.detach() if behaviour_logp is None else behaviour_logp.detach() * mask
    disc = gamma ** torch.arange(logp.shape[-1], dtype=logp.dtype)
    rho = torch.exp(torch.cumsum(logp, -1) - torch.cumsum(ref, -1))
    obj = (disc * rho * rewards * mask).sum(-1)
    if values is not None:
        rho_prev = torch.cat([torch.ones_like(rho[..., :1]), rho[..., :-1]], -1)
        obj = obj + (disc * (rho_prev - rho) * values * mask).sum(-1)
    return obj


def lvc_objective(
    logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    behaviour_logp: torch.Tensor | None = None,
) -> torch.Tensor:
    """ProMP's low-variance curvature surrogate (Rothfuss et al. 2019, eq. 10):
    ``sum_t pi(a_t|s_t) / stop_grad(pi_behaviour(a_t|s_t)) * A_t``; unbiased gradient,
    low-variance (biased) Hessian. Its value is ``sum_t A_t``, not the return."""
    ref = logp.detach() if behaviour_logp is None else behaviour_logp.detach()
    return (torch.exp((logp - ref) * mask) * advantages * mask).sum(-1)


def _log_probs(net: MAMLPolicyNet, params: Params, batch: EpisodeBatch) -> torch.Tensor:
    return policy_dist(net, params, batch.obs).log_prob(batch.actions) * batch.mask


def inner_objective(
    net: MAMLPolicyNet,
    params: Params,
    batch: EpisodeBatch,
    *,
    gamma: float,
    surrogate: str = "dice",
    values: torch.Tensor | None = None,
    behaviour_logp: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-task inner surrogate objective (to maximise), shape (N,).

    ``behaviour_logp``: log-probabilities of the policy that sampled ``batch`` (None: the
    current ``params``, i.e. on-policy)."""
    logp = _log_probs(net, params, batch)
    if surrogate == "dice":
        per_ep = dice_objective(logp, batch.rewards, batch.mask, gamma, values, behaviour_logp)
    elif surrogate == "lvc":
        disc = gamma ** torch.arange(logp.shape[-1], dtype=logp.dtype)
        v = torch.zeros_like(batch.rewards) if values is None else values
        adv = disc * (discounted_to_go(batch.rewards, gamma) - v) * batch.mask
        per_ep = lvc_objective(logp, adv, batch.mask, behaviour_logp)
    else:
        raise ValueError(f"surrogate={surrogate!r}; allowed: {', '.join(SURROGATES)}")
    return (batch.weights * per_ep).sum(-1)


def adapt(
    net: MAMLPolicyNet,
    params: Params,
    batch: EpisodeBatch,
    *,
    steps: int,
    lr: float,
    gamma: float,
    surrogate: str = "dice",
    values: torch.Tensor | None = None,
    create_graph: bool = True,
) -> Params:
    """K inner policy-gradient steps, one per task: ``phi_i <- phi_i + lr * grad J_i(phi_i)``.

    All K steps reuse the pre-update episodes (sampled by ``params``); steps after the first
    weight them by ``pi_phi / pi_params`` (see ``dice_objective``).

    Args:
        params: stacked per-task parameters (leading dim N = tasks), e.g.
            ``stack_params(theta, N)``; the result keeps its graph to them.
        create_graph: True for MAML (second order); False gives FOMAML/Reptile's first-order
            step (``phi`` depends on ``params`` only through the identity).

    Returns:
        The adapted stacked parameters (new tensors; ``params`` is never modified).
    """
    if steps < 1:
        raise ValueError(f"inner_steps={steps}; allowed: an integer >= 1")
    phi = dict(params)
    keys = list(phi)
    # the pre-update episodes were sampled by ``params``: later steps importance-weight them
    with torch.no_grad():
        behaviour = _log_probs(net, params, batch)
    for _ in range(steps):
        # J_i depends only on task i's slice, so d(sum_i J_i)/d(phi) is the per-task gradient
        obj = inner_objective(
            net, phi, batch, gamma=gamma, surrogate=surrogate, values=values,
            behaviour_logp=behaviour,
        )  # fmt: skip
        grads = torch.autograd.grad(
            obj.sum(), [phi[k] for k in keys], create_graph=create_graph, allow_unused=True
        )
        phi = {
            k: phi[k] if g is None else phi[k] + lr * g for k, g in zip(keys, grads, strict=True)
        }
    return phi


def outer_loss(
    net: MAMLPolicyNet,
    params: Params,
    batch: EpisodeBatch,
    *,
    gamma: float,
    values: torch.Tensor | None = None,
    normalize_adv: bool = False,
) -> torch.Tensor:
    """Per-task score-function loss on post-update episodes, shape (N,):
    ``-sum_m w_m sum_t log pi_phi(a_t|s_t) gamma^t (G_t - V(s_t))`` (its gradient in ``phi`` is
    minus the policy gradient of the expected discounted return)."""
    logp = _log_probs(net, params, batch)
    adv = outer_advantages(batch, gamma=gamma, values=values, normalize_adv=normalize_adv)
    return -(batch.weights * (logp * adv).sum(-1)).sum(-1)


def outer_advantages(
    batch: EpisodeBatch,
    *,
    gamma: float,
    values: torch.Tensor | None = None,
    normalize_adv: bool = False,
) -> torch.Tensor:
    """``gamma^t (G_t - V(s_t))`` of the post-update episodes, (N, M, T), detached, 0 on padding;
    with ``normalize_adv`` standardised per task over its valid steps."""
    disc = gamma ** torch.arange(batch.rewards.shape[-1], dtype=batch.rewards.dtype)
    v = torch.zeros_like(batch.rewards) if values is None else values
    adv = disc * (discounted_to_go(batch.rewards, gamma) - v) * batch.mask
    if normalize_adv:
        n = batch.mask.sum((1, 2), keepdim=True).clamp_min(1)
        mean = adv.sum((1, 2), keepdim=True) / n
        var = (((adv - mean) * batch.mask) ** 2).sum((1, 2), keepdim=True) / n
        adv = (adv - mean) / (var.sqrt() + 1e-8) * batch.mask
    return adv.detach()


# --- TRPO outer step ------------------------------------------------------------------------------


def conjugate_gradient(
    avp: Callable[[torch.Tensor], torch.Tensor],
    b: torch.Tensor,
    iters: int,
    residual_tol: float = 1e-10,
) -> torch.Tensor:
    """Solve ``A x = b`` for symmetric positive-definite ``A`` given only ``avp(v) = A v``
    (Hestenes & Stiefel 1952; the TRPO natural-gradient solve, Schulman et al. 2015, app. C).
    Starts at x = 0 and stops after ``iters`` iterations or when ``|r|^2 < residual_tol``."""
    x = torch.zeros_like(b)
    r = b.clone()
    p = b.clone()
    rr = r @ r
    for _ in range(iters):
        if rr < residual_tol:
            break
        ap = avp(p)
        alpha = rr / (p @ ap)
        x = x + alpha * p
        r = r - alpha * ap
        rr_new = r @ r
        p = r + (rr_new / rr) * p
        rr = rr_new
    return x


def mean_kl(
    net: MAMLPolicyNet, old_params: Params, new_params: Params, batch: EpisodeBatch
) -> torch.Tensor:
    """Mean over the valid steps of ``batch`` (all tasks) of ``KL(pi_old(.|s) || pi_new(.|s))``,
    each task with its own stacked parameters; differentiable in ``new_params``."""
    old = policy_dist(net, {k: v.detach() for k, v in old_params.items()}, batch.obs)
    new = policy_dist(net, new_params, batch.obs)
    kl = torch.distributions.kl_divergence(old, new)
    return (kl * batch.mask).sum() / batch.mask.sum().clamp_min(1)


def fisher_vector_product(
    kl: torch.Tensor, params: Sequence[torch.Tensor], damping: float = 0.0
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``v -> (H + damping I) v`` with ``H`` the Hessian of the scalar ``kl`` w.r.t. ``params``
    (flattened and concatenated), by double back-propagation (Pearlmutter 1994). At the
    old parameters the KL's gradient vanishes, so ``H`` is the Fisher information of the
    policy *as a function of* ``params``: through the inner adaptation when ``kl`` was
    computed from ``phi(theta)`` (``J^T F J``, as in ProMP / garage's MAML-TRPO)."""
    grads = torch.autograd.grad(kl, list(params), create_graph=True)
    flat_grad = torch.cat([g.reshape(-1) for g in grads])

    def fvp(v: torch.Tensor) -> torch.Tensor:
        hv = torch.autograd.grad(flat_grad @ v, list(params), retain_graph=True)
        return torch.cat([h.reshape(-1) for h in hv]) + damping * v

    return fvp


def trpo_surrogate(
    net: MAMLPolicyNet,
    params: Params,
    batch: EpisodeBatch,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
) -> torch.Tensor:
    """TRPO's importance-weighted surrogate (Schulman et al. 2015, eq. 14), per task (N,):
    ``sum_m w_m sum_t pi_params(a_t|s_t) / pi_old(a_t|s_t) A_t``, to maximise. At
    ``params`` = old its gradient is minus ``outer_loss``'s."""
    logp = _log_probs(net, params, batch)
    ratio = torch.exp((logp - old_logp.detach()) * batch.mask)
    return (batch.weights * (ratio * advantages * batch.mask).sum(-1)).sum(-1)


def _flat(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def trpo_step(
    net: MAMLPolicyNet,
    theta: Params,
    post: EpisodeBatch,
    adapt_fn: Callable[[Params, bool], Params],
    *,
    advantages: torch.Tensor,
    create_graph: bool,
    max_kl: float,
    cg_iters: int,
    damping: float,
    ls_steps: int,
    ls_decay: float,
) -> tuple[Params | None, dict[str, float]]:
    """One TRPO step on the meta-parameters (the MAML-TRPO outer step of Finn et al. 2017,
    sec. 5.3, as in ProMP, Rothfuss et al. 2019, and garage / learn2learn).

    Maximise ``L(theta) = mean_i trpo_surrogate(phi_i(theta))`` on the post-update episodes
    (sampled by ``phi_i(theta_old)``) subject to ``mean KL(pi_phi(theta_old) || pi_phi(theta))
    <= max_kl`` on their states. ``phi(theta) = adapt_fn(stack_params(theta, N), create_graph)``
    recomputes the inner steps from the pre-update episodes: with ``create_graph`` (MAML) both
    the gradient and the KL's Hessian go through the adaptation (second order); without it
    (FOMAML) ``d phi / d theta = I``. Natural gradient ``s = (H + damping I)^-1 g`` by
    ``cg_iters`` conjugate-gradient iterations of Fisher-vector products, full step
    ``sqrt(2 max_kl / s^T (H + damping I) s) s``, then backtracking by ``ls_decay`` for up to
    ``ls_steps`` fractions: the first that improves ``L`` and satisfies the KL bound is taken.

    Args:
        theta: the current meta-parameters (unstacked; read, never modified).
        adapt_fn: ``(stacked params, create_graph) -> stacked adapted params``.
        advantages: (N, M, T) advantages of ``post`` (see ``outer_advantages``).

    Returns:
        ``(new theta, stats)``; new theta is None when no step was accepted (keep theta).
    """
    N = post.obs.shape[0]
    keys = list(theta)
    with torch.enable_grad():
        th = {k: v.detach().clone().requires_grad_() for k, v in theta.items()}
        phi = adapt_fn(stack_params(th, N), create_graph)
        phi_old = {k: v.detach() for k, v in phi.items()}
        with torch.no_grad():
            old_logp = _log_probs(net, phi_old, post)
        surr = trpo_surrogate(net, phi, post, old_logp, advantages).mean()
        g = _flat(torch.autograd.grad(surr, [th[k] for k in keys], retain_graph=True))
        kl = mean_kl(net, phi_old, phi, post)
        fvp = fisher_vector_product(kl, [th[k] for k in keys], damping)
        s = conjugate_gradient(fvp, g, cg_iters)
        shs = float(s @ fvp(s))
    surr0 = float(surr.detach())
    stats = {
        "trpo/surrogate_before": surr0,
        "trpo/grad_norm": float(g.norm()),
        "trpo/accepted": 0.0,
        "trpo/step_fraction": 0.0,
        "trpo/kl": 0.0,
        "trpo/surrogate_gain": 0.0,
        "trpo/ls_tries": 0.0,
    }
    if not (shs > 0 and np.isfinite(shs)):
        return None, stats  # zero gradient (e.g. no advantage signal): nothing to step
    full = (2 * max_kl / shs) ** 0.5 * s.detach()
    sizes = [v.numel() for v in th.values()]
    full_step = dict(zip(keys, (c.reshape(th[k].shape) for k, c in zip(keys, full.split(sizes)))))
    frac = 1.0
    for j in range(ls_steps):
        cand = {k: theta[k].detach() + frac * full_step[k] for k in keys}
        with torch.enable_grad():
            start = {k: v.clone().requires_grad_() for k, v in cand.items()}
            phi_new = {k: v.detach() for k, v in adapt_fn(stack_params(start, N), False).items()}
        with torch.no_grad():
            surr_new = float(trpo_surrogate(net, phi_new, post, old_logp, advantages).mean())
            kl_new = float(mean_kl(net, phi_old, phi_new, post))
        stats["trpo/ls_tries"] = float(j + 1)
        if kl_new <= max_kl and surr_new > surr0 and np.isfinite(surr_new):
            stats.update({
                "trpo/accepted": 1.0, "trpo/step_fraction": frac, "trpo/kl": kl_new,
                "trpo/surrogate_gain": surr_new - surr0,
            })  # fmt: skip
            return cand, stats
        frac *= ls_decay
    return None, stats


# --- acting policies ------------------------------------------------------------------------------


class PerEnvPolicy:
    """A ``RolloutPolicy`` acting in env i with parameters ``params[k][i]`` (vmap over envs),
    or with the shared ``theta`` (plain forward) when ``params`` is None."""

    def __init__(self, net: MAMLPolicyNet, params: Params | None = None) -> None:
        self.net = net
        self.params = params

    def initial_memory(self, n: int) -> None:
        return None

    def reset_memory(self, memory: Any, mask: torch.Tensor) -> None:
        return None

    def step(self, obs: torch.Tensor, memory: Any, prev: Prev) -> StepOutput:
        if self.params is None:
            ls = getattr(self.net, "log_std", None)
            dist = self.net.head.dist(self.net(obs), ls)
        else:
            dist = policy_dist(self.net, self.params, obs.unsqueeze(1))
            # drop the singleton batch dim of each env
            action = dist.sample().squeeze(1)
            return StepOutput(
                action, dist.log_prob(action.unsqueeze(1)).squeeze(1), torch.zeros(obs.shape[0])
            )
        action = dist.sample()
        return StepOutput(action, dist.log_prob(action), torch.zeros(obs.shape[0]))

    def bootstrap_value(self, obs: torch.Tensor, memory: Any, prev: Prev) -> torch.Tensor:
        # MAML uses Monte-Carlo returns within an episode (truncation is treated as the end)
        return torch.zeros(obs.shape[0])


# --- module -------------------------------------------------------------------------------------


class MAMLModule(RLModule):
    """MAML (``algo`` from the config; the subclasses pin it). One ``training_step`` = one
    meta-iteration: pre-update trials with theta, K inner steps per task, post-update trials
    with each phi_i, one outer update."""

    method = "maml"
    config_cls = MAMLConfig
    algo: str = "maml"  # each class pins the config's ``algo`` (= its method name)

    def __init__(self, config: dict | None = None) -> None:
        config = dict(config or {})
        if config.get("algo", self.algo) != self.algo:
            raise ValueError(
                f"algo={config['algo']!r} contradicts method {self.method!r}; allowed: {self.algo!r}"
            )
        config["algo"] = self.algo
        super().__init__(config)

    def build(self) -> None:
        cfg: MAMLConfig = self.cfg
        self.train_set = cfg.train_compositions()
        probe = make_vector_env(cfg.env_id, 1, {**cfg.env_kwargs, "composition": self.train_set[0]})
        obs_dim = probe.single_observation_space.shape[0]
        self.action_space = probe.single_action_space
        probe.close()
        self.net = MAMLPolicyNet(obs_dim, self.action_space, cfg.hidden)
        self._acting = PerEnvPolicy(self.net)
        self._standalone_opt: torch.optim.Optimizer | None = None
        # TRPO line-search outcomes so far (logged; kept in checkpoints)
        self.trpo_accepted = 0
        self.trpo_rejected = 0

    def make_collector(self) -> Collector:
        cfg: MAMLConfig = self.cfg
        envs = make_vector_env(
            cfg.env_id, cfg.meta_batch_size, {**cfg.env_kwargs, "composition": self.train_set[0]},
            vectorization=cfg.vectorization,
        )  # fmt: skip
        sampler = uniform_task_sampler(self.train_set, cfg.fixed_layout, cfg.train_layout_seeds())
        return Collector(
            envs, self._acting, episodes_per_trial=cfg.episodes_per_trial,
            task_sampler=sampler, seed=cfg.seed,
        )  # fmt: skip

    def configure_optimizers(self):
        if self.cfg.algo == "reptile":
            # theta - eps * (theta - mean phi) == theta + eps * (mean phi - theta)
            return torch.optim.SGD(self.net.parameters(), lr=self.cfg.reptile_eps)
        if self.cfg.outer_optimizer == "trpo":
            # TRPO's step is found by the line search (``trpo_step``); it is applied as an SGD
            # step of rate 1 on the pseudo-gradient ``-step``, so Lightning counts it (its
            # checkpointing keys on optimizer steps) and TRPO keeps no state beyond theta.
            return torch.optim.SGD(self.net.parameters(), lr=1.0)
        return torch.optim.Adam(self.net.parameters(), lr=self.cfg.outer_lr)

    def extra_state(self) -> dict:
        return {"trpo_accepted": self.trpo_accepted, "trpo_rejected": self.trpo_rejected}

    def load_extra_state(self, state: dict) -> None:
        self.trpo_accepted = int(state.get("trpo_accepted", 0))
        self.trpo_rejected = int(state.get("trpo_rejected", 0))

    def iterations(self) -> int:
        """Upper bound on meta-iterations (every episode takes >= 1 step); training stops as
        soon as ``total_env_steps`` is reached (episode lengths vary)."""
        cfg: MAMLConfig = self.cfg
        return max(1, -(-cfg.total_env_steps // (2 * cfg.meta_batch_size * cfg.episodes_per_trial)))

    # -- the maths, bound to this module's config ------------------------------------------------
    def _values(self, batch: EpisodeBatch) -> torch.Tensor:
        return linear_baseline(batch, self.cfg.gamma, self.cfg.baseline)

    def adapt(
        self,
        params: Params,
        batch: EpisodeBatch,
        create_graph: bool | None = None,
        values: torch.Tensor | None = None,
    ) -> Params:
        """``adapt(params, episodes) -> params`` with this config's K, alpha and surrogate;
        ``create_graph`` defaults to True for MAML only."""
        cfg: MAMLConfig = self.cfg
        if create_graph is None:
            create_graph = cfg.algo == "maml"
        return adapt(
            self.net, params, batch, steps=cfg.inner_steps, lr=cfg.inner_lr, gamma=cfg.gamma,
            surrogate=cfg.surrogate,
            values=self._values(batch) if values is None else values,
            create_graph=create_graph,
        )  # fmt: skip

    def meta_loss(self, pre: EpisodeBatch, post: EpisodeBatch) -> tuple[torch.Tensor, Params]:
        """Outer loss (mean over tasks) of the adapted parameters, with graph back to theta
        (second order for MAML, identity Jacobian for FOMAML)."""
        theta = self.net.params()
        phi = self.adapt(stack_params(theta, pre.obs.shape[0]), pre)
        loss = outer_loss(
            self.net, phi, post, gamma=self.cfg.gamma, values=self._values(post),
            normalize_adv=self.cfg.normalize_adv,
        ).mean()  # fmt: skip
        return loss, phi

    def trpo_update(self, pre: EpisodeBatch, post: EpisodeBatch) -> tuple[Params | None, dict]:
        """The TRPO outer step (``trpo_step``) with this config; counts accepted and rejected
        line searches. Returns the new theta (None: keep theta) and the logged scalars."""
        cfg: MAMLConfig = self.cfg
        values_pre = self._values(pre)
        new_theta, stats = trpo_step(
            self.net, self.net.params(), post,
            lambda p, graph: self.adapt(p, pre, create_graph=graph, values=values_pre),
            advantages=outer_advantages(
                post, gamma=cfg.gamma, values=self._values(post), normalize_adv=cfg.normalize_adv
            ),
            create_graph=cfg.algo == "maml", max_kl=cfg.max_kl, cg_iters=cfg.cg_iters,
            damping=cfg.cg_damping, ls_steps=cfg.ls_steps, ls_decay=cfg.ls_decay,
        )  # fmt: skip
        if new_theta is None:
            self.trpo_rejected += 1
            log.info(
                "TRPO: no step of the line search improved the surrogate within max_kl=%g "
                "(%d tries); theta kept", cfg.max_kl, int(stats["trpo/ls_tries"]),
            )  # fmt: skip
        else:
            self.trpo_accepted += 1
        stats["trpo/rejected_total"] = float(self.trpo_rejected)
        return new_theta, stats

    # -- one meta-iteration ------------------------------------------------------------------------
    def meta_step(
        self,
        optimizer: torch.optim.Optimizer | None = None,
        backward: Callable[[torch.Tensor], None] | None = None,
    ) -> dict[str, float]:
        """One meta-iteration; usable outside Lightning (creates the collector and an optimiser
        on first use). Returns the logged scalars."""
        cfg: MAMLConfig = self.cfg
        if self.collector is None:
            self.collector = self.make_collector()
        if optimizer is None:
            if self._standalone_opt is None:
                self._standalone_opt = self.configure_optimizers()
            optimizer = self._standalone_opt
        backward = backward or torch.Tensor.backward
        col = self.collector
        steps0 = col.env_steps
        t0 = time.perf_counter()
        tasks = [col.task_sampler(col.rng) for _ in range(cfg.meta_batch_size)]

        # 1. pre-update trials with theta (shared by every env)
        self._acting.params = None
        ro_pre = col.collect_trials(tasks)
        pre = EpisodeBatch.from_rollout(ro_pre, cfg.episodes_per_trial)
        t1 = time.perf_counter()

        # 2. adapt per task (no graph: only to act), 3. post-update trials with phi_i
        with torch.enable_grad():
            theta = {k: v.detach() for k, v in self.net.params().items()}
            theta = {k: v.requires_grad_() for k, v in theta.items()}
            phi_act = self.adapt(stack_params(theta, cfg.meta_batch_size), pre, create_graph=False)
        self._acting.params = {k: v.detach() for k, v in phi_act.items()}
        t2 = time.perf_counter()
        ro_post = col.collect_trials(tasks)
        self._acting.params = None
        post = EpisodeBatch.from_rollout(ro_post, cfg.episodes_per_trial)
        t3 = time.perf_counter()

        # 4. outer update: recompute the inner steps with graph from the stored pre-update
        #    episodes (collection ran without grad) and differentiate the outer loss to theta
        optimizer.zero_grad()
        extra: dict[str, float] = {}
        if cfg.algo == "reptile":
            phi_mean = {k: v.detach().mean(0) for k, v in phi_act.items()}
            for k, p in self.net.named_parameters():
                p.grad = (p.detach() - phi_mean[k]).clone()
            loss = outer_loss(
                self.net, phi_act, post, gamma=cfg.gamma, values=self._values(post),
                normalize_adv=cfg.normalize_adv,
            ).mean().detach()  # fmt: skip
        elif cfg.outer_optimizer == "trpo":
            new_theta, trpo_stats = self.trpo_update(pre, post)
            extra.update(trpo_stats)
            loss = -torch.tensor(trpo_stats["trpo/surrogate_before"])
            # theta + step as an SGD step of rate 1 (zero pseudo-gradient: keep theta)
            for k, p in self.net.named_parameters():
                p.grad = torch.zeros_like(p) if new_theta is None else p.detach() - new_theta[k]
        else:
            loss, _ = self.meta_loss(pre, post)
            backward(loss)
            if cfg.max_grad_norm > 0:
                nn.utils.clip_grad_norm_(self.net.parameters(), cfg.max_grad_norm)
        optimizer.step()
        t4 = time.perf_counter()

        pre_eps, post_eps = ro_pre.episodes, ro_post.episodes
        secs = t4 - t0
        return {
            "losses/outer_loss": float(loss.detach()),
            "charts/pre_return": float(np.mean([e.ret for e in pre_eps])),
            "charts/post_return": float(np.mean([e.ret for e in post_eps])),
            "charts/pre_success": float(np.mean([e.success for e in pre_eps])),
            "charts/post_success": float(np.mean([e.success for e in post_eps])),
            "charts/success": float(np.mean([e.success for e in post_eps])),
            "charts/SPS": (col.env_steps - steps0) / max(secs, 1e-9),
            "time/collect_pre_s": t1 - t0,
            "time/adapt_s": t2 - t1,
            "time/collect_post_s": t3 - t2,
            "time/update_s": t4 - t3,
            "time/meta_iteration_s": secs,
            **extra,
        }

    def training_step(self, batch, batch_idx):
        stats = self.meta_step(self.optimizers(), self.manual_backward)
        self.iteration += 1
        self.log_scalars(stats)
        if self.env_steps >= self.cfg.total_env_steps and self._trainer is not None:
            self.trainer.should_stop = True

    # -- evaluation ----------------------------------------------------------------------------------
    def trial_policy(self, envs: gym.vector.VectorEnv):
        """Fresh per-env parameters (= theta) for every call; after each episode of env i, its
        parameters are re-adapted from theta on all of the trial's episodes so far."""
        n = envs.num_envs
        theta = {k: v.detach().clone() for k, v in self.net.params().items()}
        policy = PerEnvPolicy(
            self.net, {k: v.unsqueeze(0).repeat(n, *[1] * v.dim()) for k, v in theta.items()}
        )
        seen: list[list[Episode]] = [[] for _ in range(n)]

        def hook(i: int, ep: Episode) -> None:
            seen[i].append(ep)
            batch = EpisodeBatch.from_episodes([seen[i]])
            with torch.enable_grad():
                start = {k: v.clone().requires_grad_() for k, v in theta.items()}
                phi = self.adapt(stack_params(start, 1), batch, create_graph=False)
            with torch.no_grad():
                for k, v in phi.items():
                    policy.params[k][i] = v[0]

        return policy, hook

    def acting_policy(self) -> PerEnvPolicy:
        return PerEnvPolicy(self.net)


class FOMAMLModule(MAMLModule):
    """First-order MAML: the outer gradient at phi is applied to theta (no second order)."""

    method = "fomaml"
    algo = "fomaml"


class ReptileModule(MAMLModule):
    """Reptile: theta += eps * (mean_i phi_i - theta)."""

    method = "reptile"
    algo = "reptile"


# --- benchmark hook -------------------------------------------------------------------------------


def graph_saved_bytes(fn: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Run ``fn`` and add up the bytes of the tensors autograd saves for backward (the memory
    a second-order graph costs), via ``torch.autograd.graph.saved_tensors_hooks``."""
    total = 0
    seen: set[tuple[int, int]] = set()

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        key = (t.untyped_storage().data_ptr(), t.numel())
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, total


def meta_iteration_cost(module: MAMLModule, iterations: int = 3, warmup: int = 1) -> dict:
    """Time ``iterations`` meta-iterations of ``module`` (after ``warmup``) and measure the
    autograd memory of its meta-loss on the last batch.

    Returns:
        ``{"method", "seconds_per_iteration", "phase_seconds": {...}, "graph_saved_MB",
        "env_steps_per_iteration"}``.
    """
    for _ in range(warmup):
        module.meta_step()
    rows = []
    steps0 = module.env_steps
    for _ in range(iterations):
        rows.append(module.meta_step())
    steps = (module.env_steps - steps0) / max(iterations, 1)
    # the graph of one meta-loss on fresh episodes (theta-shared pre and post batches)
    col = module.collector
    tasks = [col.task_sampler(col.rng) for _ in range(module.cfg.meta_batch_size)]
    module._acting.params = None
    pre = EpisodeBatch.from_rollout(col.collect_trials(tasks), module.cfg.episodes_per_trial)
    post = EpisodeBatch.from_rollout(col.collect_trials(tasks), module.cfg.episodes_per_trial)
    if module.cfg.algo == "reptile":
        saved = 0
    else:
        _, saved = graph_saved_bytes(lambda: module.meta_loss(pre, post)[0])
    phases = {
        k.removeprefix("time/"): float(np.mean([r[k] for r in rows]))
        for k in rows[0]
        if k.startswith("time/")
    }
    return {
        "method": module.method,
        "seconds_per_iteration": phases["meta_iteration_s"],
        "phase_seconds": phases,
        "graph_saved_MB": saved / 2**20,
        "env_steps_per_iteration": steps,
    }


__all__ = [
    "EpisodeBatch",
    "FOMAMLModule",
    "MAMLConfig",
    "MAMLModule",
    "MAMLPolicyNet",
    "conjugate_gradient",
    "fisher_vector_product",
    "mean_kl",
    "outer_advantages",
    "trpo_step",
    "trpo_surrogate",
    "PerEnvPolicy",
    "ReptileModule",
    "adapt",
    "dice_objective",
    "graph_saved_bytes",
    "inner_objective",
    "linear_baseline",
    "lvc_objective",
    "magic_box",
    "meta_iteration_cost",
    "outer_loss",
    "policy_dist",
    "stack_params",
]
