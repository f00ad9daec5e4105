"""Soft actor-critic losses as pure functions returning named terms (TorchRL style).

Continuous SAC follows Haarnoja et al. 2018 ("SAC: algorithms and applications"): twin critics,
the minimum of the two target critics in the soft Bellman target, a tanh-squashed Gaussian
actor and an automatically tuned entropy temperature. Discrete SAC follows Christodoulou 2019
("Soft actor-critic for discrete action settings"): the critics output Q(s, .) for every action
and every expectation over actions is computed exactly from the policy's probabilities instead
of being sampled.

The caller builds the inputs (network forward passes), sums the terms it wants and steps its
optimisers; nothing here owns a network or an optimiser. ``terminated`` (not ``truncated``) stops
the bootstrap: a time-limit truncation bootstraps from the next state (as in SB3's buffers).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

LOG_STD_MIN = -20.0
LOG_STD_MAX = 2.0


def soft_target_continuous(
    rewards: torch.Tensor,
    terminated: torch.Tensor,
    next_q1: torch.Tensor,
    next_q2: torch.Tensor,
    next_logp: torch.Tensor,
    *,
    gamma: float,
    alpha: float | torch.Tensor,
) -> torch.Tensor:
    """Soft Bellman target ``r + gamma (1 - term) (min(Q1', Q2') - alpha log pi(a'|s'))``.

    ``next_q*`` are the *target* critics at (s', a' ~ pi(.|s')); the minimum of the twin critics
    counters over-estimation (clipped double-Q, Fujimoto et al. 2018). Returned detached.
    """
    with torch.no_grad():
        soft_v = torch.min(next_q1, next_q2) - alpha * next_logp
        return rewards + gamma * (1.0 - terminated.float()) * soft_v


def soft_target_discrete(
    rewards: torch.Tensor,
    terminated: torch.Tensor,
    next_q1: torch.Tensor,
    next_q2: torch.Tensor,
    next_log_probs: torch.Tensor,
    *,
    gamma: float,
    alpha: float | torch.Tensor,
) -> torch.Tensor:
    """Discrete soft target: the soft value is an exact expectation over next actions,
    ``V(s') = sum_a pi(a|s') [min(Q1', Q2')(s', a) - alpha log pi(a|s')]`` (Christodoulou 2019,
    eq. 10), so no next action is sampled.

    Args:
        next_q1, next_q2: (B, A) target-critic values at s'.
        next_log_probs: (B, A) log pi(. | s').
    """
    with torch.no_grad():
        probs = next_log_probs.exp()
        min_q = torch.min(next_q1, next_q2)
        soft_v = (probs * (min_q - alpha * next_log_probs)).sum(-1)
        return rewards + gamma * (1.0 - terminated.float()) * soft_v


def critic_loss(
    q1: torch.Tensor, q2: torch.Tensor, target: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Mean-squared soft Bellman errors of both critics at the taken actions.

    Returns:
        ``loss_critic = loss_q1 + loss_q2`` and the two terms.
    """
    loss_q1 = F.mse_loss(q1, target)
    loss_q2 = F.mse_loss(q2, target)
    return {"loss_critic": loss_q1 + loss_q2, "loss_q1": loss_q1, "loss_q2": loss_q2}


def actor_loss_continuous(
    logp: torch.Tensor, q1_pi: torch.Tensor, q2_pi: torch.Tensor, alpha: float | torch.Tensor
) -> dict[str, torch.Tensor]:
    """Reparameterised SAC actor loss ``E[alpha log pi(a|s) - min(Q1, Q2)(s, a)]``, a ~ pi.

    ``alpha`` should be detached (the temperature has its own loss); pass critic values computed
    with frozen critic parameters so this loss moves the actor only.
    """
    loss_actor = (alpha * logp - torch.min(q1_pi, q2_pi)).mean()
    return {"loss_actor": loss_actor, "entropy": -logp.detach().mean()}


def actor_loss_discrete(
    log_probs: torch.Tensor, q1: torch.Tensor, q2: torch.Tensor, alpha: float | torch.Tensor
) -> dict[str, torch.Tensor]:
    """Discrete SAC actor loss ``E_s[sum_a pi(a|s) (alpha log pi(a|s) - min(Q1, Q2)(s, a))]``
    (Christodoulou 2019, eq. 12): an exact expectation, no reparameterisation needed.

    Args:
        log_probs: (B, A) log pi(. | s) (with grad).
        q1, q2: (B, A) critic values (treated as constants).
    """
    probs = log_probs.exp()
    min_q = torch.min(q1, q2).detach()
    loss_actor = (probs * (alpha * log_probs - min_q)).sum(-1).mean()
    entropy = -(probs * log_probs).sum(-1)
    return {"loss_actor": loss_actor, "entropy": entropy.detach().mean()}


def alpha_loss(
    log_alpha: torch.Tensor, entropy: torch.Tensor, target_entropy: float
) -> dict[str, torch.Tensor]:
    """Temperature loss ``log_alpha * (H(pi) - H_target)`` (Haarnoja et al. 2018, eq. 18, written
    with the entropy): alpha falls when the policy is more random than the target, rises when
    it is less. ``entropy`` is detached here.

    Args:
        entropy: per-sample entropy estimates: ``-log pi(a|s)`` (continuous) or the exact
            ``-sum_a pi log pi`` (discrete).
    """
    loss = (log_alpha * (entropy.detach() - target_entropy)).mean()
    return {"loss_alpha": loss, "alpha": log_alpha.detach().exp()}


def squashed_gaussian(
    mean: torch.Tensor,
    log_std: torch.Tensor,
    *,
    deterministic: bool = False,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample ``u = tanh(mean + std * eps)`` in [-1, 1]^d with its log-density.

    The change of variables adds ``-sum log(1 - tanh(x)^2)`` (SAC appendix C), computed in the
    stable form ``2 (log 2 - x - softplus(-2x))`` used by SpinningUp. Rescaling to the action
    bounds is affine and left to the caller (its constant log-Jacobian does not change the
    gradients; see ``rescale_action``).

    Returns:
        (u, logp): u of shape (B, d), logp of shape (B,) (with grad through ``mean``/``log_std``).
    """
    log_std = log_std.clamp(LOG_STD_MIN, LOG_STD_MAX)
    std = log_std.exp()
    if deterministic:
        x = mean
    else:
        eps = torch.randn(mean.shape, generator=generator, dtype=mean.dtype)
        x = mean + std * eps
    logp = (-0.5 * ((x - mean) / std) ** 2 - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)
    logp = logp - (2 * (math.log(2) - x - F.softplus(-2 * x))).sum(-1)
    return torch.tanh(x), logp


def rescale_action(u: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """Map u in [-1, 1]^d to the Box [low, high]."""
    return low + (u + 1.0) * 0.5 * (high - low)


def normalize_action(a: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """Inverse of ``rescale_action``: env actions to [-1, 1]^d (critic input)."""
    return 2.0 * (a - low) / (high - low) - 1.0


@torch.no_grad()
def soft_update(target: nn.Module, source: nn.Module, tau: float) -> None:
    """Polyak averaging ``target <- (1 - tau) target + tau source``."""
    for t, s in zip(target.parameters(), source.parameters(), strict=True):
        t.lerp_(s, tau)
