"""Small networks and action distributions shared by every method."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import torch
from torch import nn
from torch.distributions import Categorical, Distribution, Independent, Normal


def mlp(sizes: list[int], act: type[nn.Module] = nn.Tanh, out_gain: float = 1.0) -> nn.Sequential:
    """Linear layers with ``act`` between them; orthogonal init as in CleanRL's PPO."""
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        lin = nn.Linear(sizes[i], sizes[i + 1])
        last = i == len(sizes) - 2
        nn.init.orthogonal_(lin.weight, out_gain if last else np.sqrt(2))
        nn.init.zeros_(lin.bias)
        layers.append(lin)
        if not last:
            layers.append(act())
    return nn.Sequential(*layers)


class ActionHead:
    """Maps network outputs to an action distribution for a gymnasium action space.

    Discrete spaces use a Categorical over logits; Box spaces a diagonal Gaussian with a
    state-independent log-std (actions are clipped to the bounds by the collector, not here).
    """

    def __init__(self, space: gym.Space) -> None:
        if isinstance(space, gym.spaces.Discrete):
            self.discrete = True
            self.n_out = int(space.n)
            self.act_dim = 1
            self.prev_dim = int(space.n)  # one-hot previous action (RL², controller inputs)
        elif isinstance(space, gym.spaces.Box) and len(space.shape) == 1:
            self.discrete = False
            self.n_out = int(space.shape[0])
            self.act_dim = int(space.shape[0])
            self.prev_dim = int(space.shape[0])
        else:
            raise ValueError(f"unsupported action space {space}; allowed: Discrete or 1-d Box")

    def dist(self, out: torch.Tensor, log_std: torch.Tensor | None = None) -> Distribution:
        # argument validation costs ~25% of a small policy's forward pass; inputs are ours
        if self.discrete:
            return Categorical(logits=out, validate_args=False)
        assert log_std is not None
        std = log_std.clamp(-5, 2).exp().expand_as(out)
        return Independent(Normal(out, std, validate_args=False), 1, validate_args=False)

    def encode_prev(self, action: torch.Tensor) -> torch.Tensor:
        """Previous action as a network input (one-hot if discrete)."""
        if self.discrete:
            return nn.functional.one_hot(action.long().reshape(-1), self.n_out).float()
        return action.float().reshape(-1, self.act_dim)


class ActorCritic(nn.Module):
    """Feed-forward actor and critic with separate trunks (CleanRL layout)."""

    def __init__(self, obs_dim: int, action_space: gym.Space, hidden: int = 64) -> None:
        super().__init__()
        self.head = ActionHead(action_space)
        self.actor = mlp([obs_dim, hidden, hidden, self.head.n_out], out_gain=0.01)
        self.critic = mlp([obs_dim, hidden, hidden, 1], out_gain=1.0)
        self.log_std = nn.Parameter(
            torch.full((self.head.n_out,), -0.5), requires_grad=not self.head.discrete
        )

    def dist(self, obs: torch.Tensor) -> Distribution:
        return self.head.dist(self.actor(obs), self.log_std)

    def value(self, obs: torch.Tensor) -> torch.Tensor:
        return self.critic(obs).squeeze(-1)
