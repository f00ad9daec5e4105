"""Generalised advantage estimation (Schulman et al. 2016) as one small, tested function."""

from __future__ import annotations

import torch


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    next_values: torch.Tensor,
    cut: torch.Tensor,
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Advantages and returns for a (T, N) rollout.

    The caller states the bootstrap explicitly, so ``terminated`` and ``truncated`` never get
    merged by accident:

    * ``next_values[t]`` is the value used in ``delta_t = r_t + gamma * next_values[t] - V(s_t)``:
      0 if the episode *terminated* at t, ``V(final obs)`` if it was *truncated* at t,
      ``V(s_{t+1})`` otherwise (including the last step of the rollout).
    * ``cut[t]`` is 1 where the lambda-trace must stop after step t (an episode boundary; for
      RL² only a trial boundary, so the return spans the episodes of a trial).

    Args:
        rewards, values, next_values, cut: float tensors of shape (T, N).
        gamma: discount in [0, 1].
        lam: GAE lambda in [0, 1].

    Returns:
        (advantages, returns), both (T, N); ``returns = advantages + values``.

    Examples:
        >>> r = torch.tensor([[1.0], [1.0]]); v = torch.zeros(2, 1)
        >>> nv = torch.zeros(2, 1); c = torch.tensor([[0.0], [1.0]])
        >>> gae(r, v, nv, c, gamma=0.5, lam=1.0)[0].squeeze(-1).tolist()
        [1.5, 1.0]
    """
    if not (0.0 <= gamma <= 1.0 and 0.0 <= lam <= 1.0):
        raise ValueError(f"gamma={gamma}, lam={lam}; both must lie in [0, 1]")
    T = rewards.shape[0]
    adv = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[0])
    for t in reversed(range(T)):
        delta = rewards[t] + gamma * next_values[t] - values[t]
        last = delta + gamma * lam * (1.0 - cut[t]) * last
        adv[t] = last
    return adv, adv + values
