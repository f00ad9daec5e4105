"""The learner's ceiling: PPO's env steps/s if the env and the collector cost nothing.

Runs the real ``rl.ppo.ppo_update`` (the real ``ActorCritic``, Adam, the clipped loss, the
gradient clip) on a synthetic rollout of CompoGrid's shapes and reports the env steps/s that
the update alone allows: rollout steps / update seconds. Any env path's training rate is below
it, so it bounds how far a faster env can lift a training-rate ratio: with the per-env run at
``p`` env steps/s, the batched run cannot exceed ``ceiling`` and their ratio cannot exceed
``ceiling / p`` (``benchmarks.bench_batched``, ``benchmarks.bench_ppo_sb3`` report it beside
the measured ratios).
"""

from __future__ import annotations

import time
from types import SimpleNamespace

import gymnasium as gym
import torch

from rl.nets import ActorCritic
from rl.ppo import PPOConfig, ppo_update

ACTIONS = 6  # CompoGrid's


def update_steps_per_second(
    num_envs: int, num_minibatches: int, *, num_steps: int = 128, epochs: int = 4,
    hidden: int = 64, nets: int = 3, repeats: int = 5,
) -> float:  # fmt: skip
    """Env steps/s of ``ppo_update`` alone on a (num_steps, num_envs) rollout: the fastest of
    ``repeats`` updates of each of ``nets`` freshly built learners (an upper bound, so the best
    case: single updates vary by ~30% on this machine, between calls and between builds)."""
    return max(
        _fastest(num_envs, num_minibatches, num_steps, epochs, hidden, repeats, seed)
        for seed in range(nets)
    )


def _fastest(num_envs, num_minibatches, num_steps, epochs, hidden, repeats, seed) -> float:
    from envs.grid_batch import CompoGridVectorEnv

    obs_dim = CompoGridVectorEnv(1).obs_dim  # task_info=reward, size 8: the benchmarks' env
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # the net's initialisation and the update's minibatch order
    net = ActorCritic(obs_dim, gym.spaces.Discrete(ACTIONS), hidden)
    opt = torch.optim.Adam(net.parameters(), lr=2.5e-4, eps=1e-5)
    cfg = PPOConfig(num_steps=num_steps, update_epochs=epochs, num_minibatches=num_minibatches)
    T, N = num_steps, num_envs
    obs = torch.rand(T * N, obs_dim, generator=g)
    act = torch.randint(ACTIONS, (T * N,), generator=g)
    with torch.no_grad():
        dist = net.dist(obs)
        logp, values = dist.log_prob(act), net.value(obs)
    rollout = SimpleNamespace(
        valid=torch.ones(T, N, dtype=torch.bool),
        logp=logp.reshape(T, N),
        values=values.reshape(T, N),
    )
    adv, ret = torch.randn(T, N, generator=g), torch.randn(T, N, generator=g)

    def evaluate(mb):
        d = net.dist(obs[mb])
        return d.log_prob(act[mb]), d.entropy(), net.value(obs[mb])

    def once() -> float:
        t = time.perf_counter()
        ppo_update(rollout, evaluate, list(net.parameters()), opt, cfg, advantages=adv, returns=ret)
        return time.perf_counter() - t

    once()  # warm-up
    return T * N / min(once() for _ in range(repeats))
