"""MAML's maths as pure functions: the functional policy, episode batches, the linear feature
baseline, the inner surrogates (DiCE, LVC), the inner step ``adapt``, the outer loss, and the
acting policy with per-env parameters.

``baselines.maml`` explains the choices and binds these to a config; everything here takes its
hyper-parameters as arguments, so the tests can check each piece against exact gradients.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import gymnasium as gym
import torch
from torch import nn
from torch.func import functional_call, vmap

from rl.collect import Prev, Rollout, StepOutput
from rl.nets import ActionHead, mlp

Params = dict[str, torch.Tensor]

SURROGATES = ("dice", "lvc")
BASELINES = ("time", "linear", "none")


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

    def rows(self, tasks: slice) -> EpisodeBatch:
        """The batch of the tasks ``tasks`` (a DDP rank's share of the meta-batch)."""
        return EpisodeBatch(*(getattr(self, f.name)[tasks] for f in fields(self)))

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


def baseline_features(batch: EpisodeBatch, kind: str) -> torch.Tensor:
    """Features (N, M, T, F) of the linear baseline: time (1, t, t^2, t^3) with t/100 as in
    garage's ``LinearFeatureBaseline``; ``kind='linear'`` prepends obs and obs^2."""
    if kind not in ("time", "linear"):
        raise ValueError(f"baseline={kind!r} has no features; allowed: 'time', 'linear'")
    al = (batch.time / 100.0).unsqueeze(-1)
    feats = [torch.ones_like(al), al, al**2, al**3]
    if kind == "linear":
        o = batch.obs.clamp(-10, 10)
        feats = [o, o**2, *feats]
    return torch.cat(feats, -1).double()


def fit_baseline(
    batch: EpisodeBatch, gamma: float, kind: str, reg: float = 1e-5
) -> torch.Tensor | None:
    """Ridge regression of the return-to-go on ``baseline_features``, pooled over *all* tasks
    and episodes of ``batch`` (each task weighted by its episode weights, so tasks count
    equally). Returns the (F,) coefficients, or None for ``kind='none'``.

    Why pooled, where garage and ProMP fit one baseline per task: they sample 10-40 episodes
    per task, we sample 1-4. On so few episodes a per-task cubic in t interpolates the returns
    of a sparse terminal reward, so the advantage of the one successful episode (the whole
    inner-loop signal) is fitted away: 1.5e-3 of the parameter movement without a baseline,
    issue 12. A fit across the meta-batch is the average return-to-go at time t over many
    tasks; one task's success moves it by about 1/N, so most of the signal survives.
    """
    if kind == "none":
        return None
    with torch.no_grad():
        X = baseline_features(batch, kind)
        F = X.shape[-1]
        w = (batch.mask * batch.weights.unsqueeze(-1)).double().reshape(-1, 1)
        y = discounted_to_go(batch.rewards, gamma).double().reshape(-1, 1)
        Xf = X.reshape(-1, F)
        A = Xf.T @ (w * Xf)
        b = Xf.T @ (w * y)
        scale = A.diagonal().mean().clamp_min(1e-8)
        return torch.linalg.solve(A + reg * scale * torch.eye(F, dtype=A.dtype), b).squeeze(-1)


def baseline_values(coef: torch.Tensor | None, batch: EpisodeBatch, kind: str) -> torch.Tensor:
    """``V(s_t)`` (N, M, T) of fitted coefficients (0 on padding; all 0 when ``coef`` is None)."""
    if coef is None or kind == "none":
        return torch.zeros_like(batch.rewards)
    with torch.no_grad():
        return ((baseline_features(batch, kind) @ coef) * batch.mask).float()


def linear_baseline(
    batch: EpisodeBatch, gamma: float, kind: str, reg: float = 1e-5
) -> torch.Tensor:
    """``fit_baseline`` on ``batch`` and its values on ``batch``: (N, M, T), detached."""
    return baseline_values(fit_baseline(batch, gamma, kind, reg), batch, kind)


def advantages_to_go(
    batch: EpisodeBatch, gamma: float, values: torch.Tensor | None = None
) -> torch.Tensor:
    """``gamma^t (G_t - V(s_t))`` (N, M, T), detached, 0 on padding: the per-step weight of
    ``grad log pi(a_t|s_t)`` in the policy gradient of the discounted return."""
    disc = gamma ** torch.arange(batch.rewards.shape[-1], dtype=batch.rewards.dtype)
    v = torch.zeros_like(batch.rewards) if values is None else values
    return (disc * (discounted_to_go(batch.rewards, gamma) - v) * batch.mask).detach()


def advantage_moments(adv: torch.Tensor, mask: torch.Tensor) -> tuple[float, float]:
    """(mean, std) of ``adv`` over the valid steps of a whole batch (all tasks pooled)."""
    n = mask.sum().clamp_min(1)
    mean = (adv * mask).sum() / n
    var = (((adv - mean) * mask) ** 2).sum() / n
    return float(mean), float(var.sqrt())


def standardise(adv: torch.Tensor, mask: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """``(adv - mean) / (std + 1e-8)`` on valid steps, 0 on padding (ProMP's
    ``normalize_advantages``, with the moments passed in)."""
    return ((adv - mean) / (std + 1e-8) * mask).detach()


# --- surrogates ---------------------------------------------------------------------------------


def magic_box(x: torch.Tensor) -> torch.Tensor:
    """DiCE's magic box (Foerster et al. 2018): value 1, derivative ``[x] * dx``."""
    return torch.exp(x - x.detach())


def _dice_weights(
    logp: torch.Tensor, mask: torch.Tensor, behaviour_logp: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``rho_t = exp(cumsum logp - stop_grad(cumsum behaviour_logp))`` and ``rho_{t-1}``
    (``rho_{-1} = 1``), padding masked: DiCE's magic box, importance-weighted off-policy."""
    logp = logp * mask
    ref = logp.detach() if behaviour_logp is None else behaviour_logp.detach() * mask
    rho = torch.exp(torch.cumsum(logp, -1) - torch.cumsum(ref, -1))
    return rho, torch.cat([torch.ones_like(rho[..., :1]), rho[..., :-1]], -1)


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
    rho, rho_prev = _dice_weights(logp, mask, behaviour_logp)
    disc = gamma ** torch.arange(logp.shape[-1], dtype=logp.dtype)
    obj = (disc * rho * rewards * mask).sum(-1)
    if values is not None:
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


def dice_advantage_objective(
    logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    behaviour_logp: torch.Tensor | None = None,
) -> torch.Tensor:
    """DiCE with the baseline, written on advantages: ``sum_t (rho_t - rho_{t-1}) A_t``.

    With ``A_t = gamma^t (G_t - V(s_t))`` this equals ``dice_objective`` minus the constant
    discounted return (summation by parts), so every derivative is the same; written this way
    it also takes standardised advantages, as ProMP's DiCE-MAML does.

    Args:
        logp, advantages, mask, behaviour_logp: (..., T); padding must have mask 0.
    """
    rho, rho_prev = _dice_weights(logp, mask, behaviour_logp)
    return ((rho - rho_prev) * advantages * mask).sum(-1)


def inner_objective(
    net: MAMLPolicyNet,
    params: Params,
    batch: EpisodeBatch,
    *,
    gamma: float,
    surrogate: str = "dice",
    values: torch.Tensor | None = None,
    behaviour_logp: torch.Tensor | None = None,
    advantages: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-task inner surrogate objective (to maximise), shape (N,).

    ``behaviour_logp``: log-probabilities of the policy that sampled ``batch`` (None: the
    current ``params``, i.e. on-policy). ``advantages`` (N, M, T, detached): the per-step
    advantages to use (e.g. standardised); None derives ``gamma^t (G_t - V(s_t))`` from
    ``values``."""
    logp = _log_probs(net, params, batch)
    if surrogate not in SURROGATES:
        raise ValueError(f"surrogate={surrogate!r}; allowed: {', '.join(SURROGATES)}")
    if surrogate == "dice" and advantages is None:
        per_ep = dice_objective(logp, batch.rewards, batch.mask, gamma, values, behaviour_logp)
    elif surrogate == "dice":
        per_ep = dice_advantage_objective(logp, advantages, batch.mask, behaviour_logp)
    else:
        adv = advantages_to_go(batch, gamma, values) if advantages is None else advantages
        per_ep = lvc_objective(logp, adv, batch.mask, behaviour_logp)
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
    advantages: torch.Tensor | None = None,
    behaviour_logp: torch.Tensor | None = None,
) -> Params:
    """K inner policy-gradient steps, one per task: ``phi_i <- phi_i + lr * grad J_i(phi_i)``.

    All K steps reuse the same episodes; they are weighted by ``pi_phi / pi_behaviour``
    (see ``dice_objective``), where the behaviour policy is ``params`` unless
    ``behaviour_logp`` says otherwise (episodes sampled by earlier parameters, reused at
    meta-test).

    Args:
        params: stacked per-task parameters (leading dim N = tasks), e.g.
            ``stack_params(theta, N)``; the result keeps its graph to them.
        values: baseline ``V(s_t)`` (N, M, T); ignored when ``advantages`` is given.
        create_graph: True for MAML (second order); False gives FOMAML/Reptile's first-order
            step (``phi`` depends on ``params`` only through the identity).
        advantages: (N, M, T) per-step advantages to use instead of
            ``gamma^t (G_t - V(s_t))`` (e.g. standardised ones).
        behaviour_logp: (N, M, T) log-probabilities of the actions under the policy that
            sampled them (default: ``params``, i.e. on-policy).

    Returns:
        The adapted stacked parameters (new tensors; ``params`` is never modified).
    """
    if steps < 1:
        raise ValueError(f"inner_steps={steps}; allowed: an integer >= 1")
    phi = dict(params)
    keys = list(phi)
    # the episodes were sampled by ``params`` (or by ``behaviour_logp``'s policy): every step
    # importance-weights them by pi_phi / pi_behaviour
    if behaviour_logp is None:
        with torch.no_grad():
            behaviour = _log_probs(net, params, batch)
    else:
        behaviour = behaviour_logp.detach() * batch.mask
    for _ in range(steps):
        # J_i depends only on task i's slice, so d(sum_i J_i)/d(phi) is the per-task gradient
        obj = inner_objective(
            net, phi, batch, gamma=gamma, surrogate=surrogate, values=values,
            behaviour_logp=behaviour, advantages=advantages,
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
    advantages: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-task score-function loss on post-update episodes, shape (N,):
    ``-sum_m w_m sum_t log pi_phi(a_t|s_t) gamma^t (G_t - V(s_t))`` (its gradient in ``phi`` is
    minus the policy gradient of the expected discounted return). ``advantages``: already
    computed by ``outer_advantages`` (then ``values`` and ``normalize_adv`` are not used)."""
    logp = _log_probs(net, params, batch)
    adv = advantages
    if adv is None:
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
    with ``normalize_adv`` standardised over the valid steps of the whole meta-batch.

    Pooled rather than per task (garage, ProMP): with 1-4 episodes per task, a task whose
    episodes all failed has advantages ``-gamma^t V(s_t)`` only, and standardising those alone
    would blow the baseline's time profile up to unit size (issue 12)."""
    adv = advantages_to_go(batch, gamma, values)
    if normalize_adv:
        adv = standardise(adv, batch.mask, *advantage_moments(adv, batch.mask))
    return adv


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
                action, dist.log_prob(action.unsqueeze(1)).squeeze(1), torch.zeros(obs.shape[0]),
                extras={"entropy": dist.entropy().squeeze(1)},  # for rl.diagnostics
            )  # fmt: skip
        action = dist.sample()
        return StepOutput(
            action, dist.log_prob(action), torch.zeros(obs.shape[0]),
            extras={"entropy": dist.entropy()},
        )  # fmt: skip

    def bootstrap_value(self, obs: torch.Tensor, memory: Any, prev: Prev) -> torch.Tensor:
        # MAML uses Monte-Carlo returns within an episode (truncation is treated as the end)
        return torch.zeros(obs.shape[0])
