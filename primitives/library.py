"""The skill library: K skills pi(a | s, k) with termination functions beta_k(s).

Layout: K linear actor heads over a shared two-layer encoder (one forward pass gives every
skill's output, which the composer needs at every step; per-skill hidden layers cost about
twice the acting time for no gain we could measure on CompoGrid), K termination heads
(beta_k(s) in [0, 1], as in the option-critic, Bacon et al. 2017) and K skill-conditioned
value heads (used when the skills themselves are trained by PPO during discovery).
Discrete and continuous action spaces both go through ``rl.nets.ActionHead``.
"""

from __future__ import annotations

import math

import gymnasium as gym
import numpy as np
import torch
from torch import nn
from torch.distributions import Distribution

from rl.nets import ActionHead, mlp


def check_num_skills(k: int) -> int:
    """Validate the number of skills K; one clear ``ValueError`` otherwise."""
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or int(k) < 1:
        raise ValueError(f"num_skills={k!r}; allowed: an integer >= 1")
    return int(k)


def inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Indices drawn from the rows of ``probs`` (B, n) (not necessarily normalised) with the
    uniforms ``u`` (B,) in [0, 1): exactly Categorical(probs) (scaling u by the row total keeps
    the index below n whatever the rounding of the cumulative sum)."""
    cdf = probs.cumsum(-1)
    return torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(-1)).squeeze(-1)


class SkillLibrary(nn.Module):
    """K skills as K actor heads over a shared encoder, with termination and value heads.

    Args:
        obs_dim: observation size.
        action_space: gymnasium ``Discrete`` or 1-d ``Box``.
        num_skills: K >= 1.
        hidden: width of the encoder and of each skill's hidden layer.
        init_termination: initial beta_k(s) (bias of the termination heads), so a skill
            starts with an expected duration of about ``1 / init_termination`` steps.

    Examples:
        >>> lib = SkillLibrary(5, gym.spaces.Discrete(3), num_skills=4)
        >>> out, beta = lib(torch.zeros(2, 5))
        >>> tuple(out.shape), tuple(beta.shape)
        ((2, 4, 3), (2, 4))
    """

    def __init__(
        self,
        obs_dim: int,
        action_space: gym.Space,
        num_skills: int = 12,
        hidden: int = 64,
        init_termination: float = 0.1,
    ) -> None:
        super().__init__()
        self.num_skills = check_num_skills(num_skills)
        if not 0.0 < init_termination < 1.0:
            raise ValueError(f"init_termination={init_termination}; allowed: a number in (0, 1)")
        self.obs_dim = int(obs_dim)
        self.head = ActionHead(action_space)
        k, n_out = self.num_skills, self.head.n_out
        # the compositional agent's acting path fuses these layers and heads
        # (``CompositionalAgent._packed``; a test checks it against this module)
        self.encoder = nn.Sequential(mlp([obs_dim, hidden, hidden]), nn.Tanh())
        self.skill_out = nn.Linear(hidden, k * n_out)
        nn.init.orthogonal_(self.skill_out.weight, 0.01)
        nn.init.zeros_(self.skill_out.bias)
        self.termination = nn.Linear(hidden, k)
        nn.init.orthogonal_(self.termination.weight, 0.01)
        nn.init.constant_(
            self.termination.bias, math.log(init_termination / (1 - init_termination))
        )
        self.critic = mlp([obs_dim, hidden, hidden, k], out_gain=1.0)
        # per-skill state-independent log-std (continuous only; frozen for discrete spaces)
        self.log_std = nn.Parameter(
            torch.full((k, n_out), -0.5), requires_grad=not self.head.discrete
        )

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Every skill's action-distribution parameters (B, K, n_out) and beta (B, K)."""
        h = self.encoder(obs)
        out = self.skill_out(h).view(*obs.shape[:-1], self.num_skills, self.head.n_out)
        return out, torch.sigmoid(self.termination(h))

    def skill_dist(self, out: torch.Tensor, skill: torch.Tensor) -> Distribution:
        """Distribution of skill ``skill`` (B,) given ``out`` (B, K, n_out) from ``forward``."""
        sel = out.gather(1, skill.view(-1, 1, 1).expand(-1, 1, out.shape[-1])).squeeze(1)
        # discrete heads ignore the log-std: skip its per-row lookup
        return self.head.dist(sel, None if self.head.discrete else self.log_std[skill])

    def active_outputs(self, obs: torch.Tensor, skill: torch.Tensor) -> torch.Tensor:
        """Action-distribution parameters (B, n_out) of skill ``skill`` (B,) only: the skill
        heads of ``forward`` without the termination heads (for the skills' own PPO)."""
        out = self.skill_out(self.encoder(obs)).view(-1, self.num_skills, self.head.n_out)
        return out.gather(1, skill.view(-1, 1, 1).expand(-1, 1, out.shape[-1])).squeeze(1)

    def dist(self, obs: torch.Tensor, skill: torch.Tensor) -> Distribution:
        """pi(. | s, k) for a batch of observations and skill indices."""
        out, _ = self(obs)
        return self.skill_dist(out, skill)

    def value(self, obs: torch.Tensor, skill: torch.Tensor) -> torch.Tensor:
        """Skill-conditioned value V(s, k) (B,)."""
        return self.critic(obs).gather(1, skill.view(-1, 1)).squeeze(1)

    def beta(self, obs: torch.Tensor) -> torch.Tensor:
        """Termination probabilities beta_k(s) in [0, 1], shape (B, K)."""
        return self(obs)[1]
