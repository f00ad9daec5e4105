"""PEARL's networks and losses: the permutation-invariant context encoder q(z | c) (product of
Gaussians or mean pooling), the context-conditioned actor and twin critics, and one update's
loss terms with their gradient routing. ``baselines.pearl`` explains the method.
"""

from __future__ import annotations

import copy
import math

import gymnasium as gym
import torch
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F

from rl.nets import mlp
from rl.sac import (
    LOG_STD_MAX,
    LOG_STD_MIN,
    actor_loss_continuous,
    actor_loss_discrete,
    alpha_loss,
    critic_loss,
    normalize_action,
    rescale_action,
    soft_target_continuous,
    soft_target_discrete,
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
        with_entropy: bool = False,
    ) -> tuple[torch.Tensor, ...]:
        """Env actions and their log-probabilities for (N, obs) and (N, latent); with
        ``with_entropy`` also the (N,) entropy of the sampling distribution (discrete: exact;
        continuous: of the Gaussian before the tanh squashing, an upper bound), which
        ``rl.diagnostics`` reads."""
        out = self.actor(torch.cat([obs, z], -1))
        if self.discrete:
            logp_all = torch.log_softmax(out, -1)
            if greedy:
                a = logp_all.argmax(-1)
            else:
                a = torch.multinomial(logp_all.exp(), 1, generator=generator).squeeze(-1)
            res = (a, logp_all.gather(-1, a[:, None]).squeeze(-1))
            return (*res, -(logp_all.exp() * logp_all).sum(-1)) if with_entropy else res
        mean, log_std = out.chunk(2, -1)
        u, logp = squashed_gaussian(mean, log_std, deterministic=greedy, generator=generator)
        res = (rescale_action(u, self.low, self.high), logp)
        if not with_entropy:
            return res
        # the clamp squashed_gaussian applies to log_std
        ls = log_std.clamp(LOG_STD_MIN, LOG_STD_MAX)
        return (*res, (ls + 0.5 * math.log(2 * math.pi * math.e)).sum(-1))


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
    z_noise: torch.Tensor | None = None,
    meta_batch_shards: int = 1,
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
        z_noise: (K, latent) standard-normal noise of z's reparameterisation (default: drawn
            here from the global RNG).
        meta_batch_shards: the K tasks are one of this many equal shares of the meta-batch
            (DDP: each rank computes its share, DDP averages the gradients): every term is a
            mean over tasks except the KL, a sum, which is therefore multiplied by the shares,
            so that its average over the ranks is the meta-batch's sum.

    Returns:
        ``loss`` (sum to minimise) and the terms ``loss_critic``, ``loss_q1``, ``loss_q2``,
        ``loss_kl`` (unweighted, summed over the K tasks), ``loss_actor``, ``loss_alpha``, plus detached ``alpha``,
        ``entropy``, ``q_mean``, ``z_var`` (mean posterior variance).
    """
    K, B = batch["rewards"].shape
    mu, var = nets.encoder(context, context_mask)
    eps = torch.randn_like(mu) if z_noise is None else z_noise
    z_task = mu + var.sqrt() * eps  # reparameterised, PEARL eq. 3
    # summed over the meta-batch's tasks, as oyster's ``compute_kl_div`` (kl_lambda multiplies
    # the sum): a mean would weaken the information bottleneck by a factor K
    kl = kl_to_standard_normal(mu, var).sum() * meta_batch_shards
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
