"""``collector_throughput``: env steps/s of ``rl.collect.Collector`` with the real policy in the
loop, against a raw single-process gymnasium loop.

Ours: 8 CompoGrid-v0 envs (size 8, ``pickup(red ball) > open(door)``, a new random layout every
episode via ``uniform_task_sampler([...], False)``) in a sync and an async vector env and the
batched CompoGrid (``envs.grid_batch``), acting
with an ``rl.nets.ActorCritic`` through ``FeedForwardPolicy`` and storing the full rollout
(what PPO's ``training_step`` collects). Reference: ``env.step(env.action_space.sample())`` on
one ``gym.make("CompoGrid-v0")``, resetting at episode end (no policy, no storage).

The notes split one vector step into its parts (policy forward, 8 raw env steps, the rest =
collector bookkeeping) so a ratio below target says where the time goes.
"""

from __future__ import annotations

import time

import gymnasium as gym
import torch

from benchmarks import COMPOSITION, Row, load_note, median_seconds

NAME = "collector_throughput"
NUM_ENVS = 8


def raw_steps_per_second(steps: int, repeats: int, seed: int = 0) -> float:
    """Median env steps/s of a plain random-action loop on one env."""
    import envs  # noqa: F401  (registers CompoGrid-v0)

    env = gym.make("CompoGrid-v0")
    env.reset(seed=seed)
    env.action_space.seed(seed)

    def loop() -> None:
        for _ in range(steps):
            _, _, term, trunc, _ = env.step(env.action_space.sample())
            if term or trunc:
                env.reset()

    try:
        return steps / median_seconds(loop, repeats=repeats, warmup=1)
    finally:
        env.close()


def collector_steps_per_second(
    vectorization: str, num_steps: int, repeats: int, seed: int = 0
) -> tuple[float, float]:
    """Median env steps/s of ``Collector.collect(num_steps)`` with the real policy, and the
    median seconds of one policy forward on a (num_envs, obs_dim) batch."""
    from rl.collect import Collector, FeedForwardPolicy, make_vector_env, uniform_task_sampler
    from rl.nets import ActorCritic

    torch.manual_seed(seed)
    envs = make_vector_env(
        "CompoGrid-v0", NUM_ENVS, {"task_info": "reward", "size": 8, "composition": COMPOSITION},
        vectorization=vectorization,
    )  # fmt: skip
    try:
        net = ActorCritic(envs.single_observation_space.shape[0], envs.single_action_space, 64)
        policy = FeedForwardPolicy(net)
        col = Collector(
            envs, policy, task_sampler=uniform_task_sampler([COMPOSITION], False), seed=seed
        )
        sec = median_seconds(lambda: col.collect(num_steps), repeats=repeats, warmup=1)
        obs = torch.as_tensor(col.obs, dtype=torch.float32)
        with torch.no_grad():
            pol = median_seconds(lambda: policy.step(obs, None, None), repeats=200, warmup=20)
        return NUM_ENVS * num_steps / sec, pol
    finally:
        envs.close()


def run(quick: bool = False, **_: object) -> list[Row]:
    """Measure sync, async and batched collection against the raw loop (same run)."""
    raw_steps, num_steps, repeats = (200, 8, 2) if quick else (4000, 128, 5)
    t0 = time.perf_counter()
    raw = raw_steps_per_second(raw_steps, repeats)
    rows = []
    for vec in ("sync", "async", "batched"):
        sps, pol_s = collector_steps_per_second(vec, num_steps, repeats)
        vstep_ms = 1e3 * NUM_ENVS / sps
        env_ms = 1e3 * NUM_ENVS / raw
        pol_ms = 1e3 * pol_s
        notes = (
            f"{vec}; per vector step of {NUM_ENVS} envs: total {vstep_ms:.2f} ms, policy forward "
            f"{pol_ms:.2f} ms, {NUM_ENVS} raw env steps {env_ms:.2f} ms, collector bookkeeping "
            f"+ IPC ~{max(vstep_ms - pol_ms - (env_ms if vec == 'sync' else 0.0), 0.0):.2f} ms"
        )
        if vec == "sync":
            notes += (
                "; sync steps the 8 envs one after another in this process, so it cannot beat "
                "the raw single-env loop (ratio <= 1 by construction)"
            )
        elif vec == "async":
            notes += (
                "; async spreads envs over worker processes: it beats the raw loop only with "
                "idle cores (8 workers + learner share 2 cores here)"
            )
        else:
            notes += (
                "; batched: envs.grid_batch steps all envs as array operations (the raw env "
                "steps column is the per-env cost it replaces)"
            )
        notes += f"; {NUM_ENVS * num_steps} env steps x {repeats} repeats; {load_note()}"
        rows.append(Row(NAME, f"{vec}_env_steps_per_s", sps, raw, ">=1.5", notes))
    print(f"[{NAME}] done in {time.perf_counter() - t0:.1f} s")
    return rows
