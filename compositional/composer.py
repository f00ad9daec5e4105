"""The attention composer: controller query vs learned skill keys -> weights alpha over skills.

``alpha = softmax(q . k_j / sqrt(d) + prior_j)``, with ``q`` a projection of the controller's
output and ``k_j`` a learned key per skill (scaled dot-product attention, Vaswani et al. 2017);
``prior`` is the skill graph's row for the active skill (see ``compositional.graph``).

How the action distribution is built from the alpha-weighted skills:

* discrete actions: the mixture of the skills' action *probabilities*,
  ``pi(a | s) = sum_j alpha_j pi_j(a | s)`` (exact mixture, so log-probs and entropy are exact);
* continuous actions: one Gaussian whose mean and log-std are the alpha-weighted means and
  log-stds of the skills (a mixture of Gaussians has no closed-form entropy, and averaging
  means is what the seed design's ``sum_i w_i * action_i`` does).

Modes: ``attention`` (soft weights), ``hard`` (one skill at a time: a straight-through
Gumbel-softmax one-hot, Jang et al. 2017, of the active skill), ``uniform`` (1/K, the ablation).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.distributions import Categorical, Distribution, Independent, Normal

from rl.nets import ActionHead

COMPOSER_MODES = ("attention", "hard", "uniform")


def check_composer_mode(mode: str) -> str:
    if mode not in COMPOSER_MODES:
        raise ValueError(f"composer={mode!r}; allowed: {', '.join(COMPOSER_MODES)}")
    return mode


class AttentionComposer(nn.Module):
    """Skill weights from a controller query against learned skill keys.

    Args:
        ctrl_dim: size of the controller output.
        num_skills: K.
        key_dim: d, size of queries and keys.
        mode: 'attention', 'hard' or 'uniform'.
        tau: Gumbel-softmax temperature of ``hard`` mode's straight-through gradient.

    Examples:
        >>> comp = AttentionComposer(8, num_skills=4)
        >>> a = comp.weights(comp.logits(torch.randn(3, 8)))
        >>> torch.allclose(a.sum(-1), torch.ones(3))
        True
    """

    def __init__(
        self, ctrl_dim: int, num_skills: int, key_dim: int = 32, mode: str = "attention",
        tau: float = 1.0,
    ) -> None:  # fmt: skip
        super().__init__()
        self.mode = check_composer_mode(mode)
        if tau <= 0:
            raise ValueError(f"gumbel_tau={tau}; allowed: a positive number")
        self.num_skills, self.key_dim, self.tau = num_skills, key_dim, tau
        self.query = nn.Linear(ctrl_dim, key_dim)
        self.keys = nn.Parameter(torch.randn(num_skills, key_dim) / math.sqrt(key_dim))

    def logits(self, u: torch.Tensor) -> torch.Tensor:
        """Attention scores q . k_j / sqrt(d), shape (..., K)."""
        return self.query(u) @ self.keys.t() / math.sqrt(self.key_dim)

    def weights(self, logits: torch.Tensor, skill: torch.Tensor | None = None) -> torch.Tensor:
        """alpha over the K skills (rows sum to 1).

        ``hard`` mode: the one-hot of ``skill`` (the active skill) with the straight-through
        gradient of ``softmax(logits / tau)``; without ``skill`` a Gumbel-softmax sample.
        """
        if self.mode == "uniform":
            return torch.full_like(logits, 1.0 / self.num_skills)
        if self.mode == "attention":
            return torch.softmax(logits, -1)
        soft = torch.softmax(logits / self.tau, -1)
        if skill is None:
            return nn.functional.gumbel_softmax(logits, tau=self.tau, hard=True)
        hard = nn.functional.one_hot(skill.long(), self.num_skills).to(soft.dtype)
        return hard - soft.detach() + soft

    @staticmethod
    def mix(
        out: torch.Tensor, alpha: torch.Tensor, head: ActionHead, log_std: torch.Tensor
    ) -> Distribution:
        """The composed action distribution from every skill's outputs ``out`` (B, K, n_out),
        weights ``alpha`` (B, K) and per-skill log-stds (K, n_out) (see the module docstring)."""
        if head.discrete:
            probs = (alpha.unsqueeze(-1) * torch.softmax(out, -1)).sum(1)
            return Categorical(probs=probs.clamp_min(1e-12), validate_args=False)
        mean = (alpha.unsqueeze(-1) * out).sum(1)
        ls = (alpha @ log_std).clamp(-5, 2)
        return Independent(Normal(mean, ls.exp(), validate_args=False), 1, validate_args=False)
