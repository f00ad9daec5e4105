"""``batched_env``: the batched CompoGrid (``envs.grid_batch``) against the per-env path.

Two measurements, each side by side in one run:

1. Raw env steps/s: ``CompoGridVectorEnv`` with B = 256 envs, random actions, next-step
   autoreset, a new random layout every episode, observations built every step; reference:
   one ``gym.make("CompoGrid-v0")`` stepped in a plain loop with random actions, reset at episode
   end (``benchmarks.bench_collector.raw_steps_per_second``). Target >= 30x.
2. Training env steps/s of every method on the batched env against the same config on its own
   per-env path (``vectorization="sync"``: gymnasium's SyncVectorEnv over ``CompoGridEnv``),
   ``NUM_ENVS`` envs, the grid split's train compositions, the same budget and seed; wall from
   construction to the end of ``rl.train.fit`` (so rollouts, updates, Lightning, checkpoints).
   Targets >= 4x for PPO, RL² and the compositional agent. The two paths step identically
   (tests/test_grid_batch.py, tests/test_ppo.py), so both runs do the same work but for the env.
3. PPO's ceiling: ``rl.ppo.ppo_update`` alone at the methods' setting
   (``benchmarks.learner_ceiling``), against the per-env PPO run of 2.: with env and collector
   free, no env path trains faster, so its ratio bounds what the batched env can give PPO here.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks import Row, load_note, median_seconds
from benchmarks.bench_collector import raw_steps_per_second
from benchmarks.bench_methods import train_sps
from benchmarks.learner_ceiling import update_steps_per_second

NAME = "batched_env"
BATCH = 256
NUM_ENVS = 32

#: (row label, method, overrides, target on batched / per-env)
METHODS: list[tuple[str, str, dict, str]] = [
    ("ppo", "ppo", {}, ">=4"),
    ("rl2", "rl2", {"rnn": "gru", "hidden": 64, "num_layers": 1, "head_hidden": 64}, ">=4"),
    ("compositional", "compositional", {}, ">=4"),
    ("maml", "maml", {}, ""),
    ("pearl", "pearl", {"updates_per_env_step": 0.02}, ""),
    ("discovery", "discovery", {}, ""),
]


def batched_steps_per_second(steps: int, repeats: int, batch: int = BATCH, seed: int = 0) -> float:
    """Median env steps/s of ``CompoGridVectorEnv`` stepping ``batch`` envs with random actions."""
    from envs.grid_batch import CompoGridVectorEnv

    env = CompoGridVectorEnv(batch, autoreset_mode="NextStep")
    env.reset(seed=seed)
    actions = np.random.default_rng(seed).integers(6, size=(steps, batch))

    def loop() -> None:
        for a in actions:
            env.step(a)

    return steps * batch / median_seconds(loop, repeats=repeats, warmup=1)


class _Timed:
    """Accumulates the seconds spent in ``fn`` (wraps a bound method in place)."""

    def __init__(self, fn) -> None:
        self.fn, self.seconds = fn, 0.0

    def __call__(self, *a, **k):
        t = time.perf_counter()
        try:
            return self.fn(*a, **k)
        finally:
            self.seconds += time.perf_counter() - t


def ceiling_row(per_env_sps: float) -> Row:
    """PPO's update alone at the methods' setting (``NUM_ENVS`` x 128 rollout, PPO's default 4
    minibatches, 4 epochs) against the per-env PPO run: the most the batched env could lift
    ``ppo_train_env_steps_per_s``'s ratio to if env and collector cost nothing."""
    ceiling = update_steps_per_second(NUM_ENVS, 4)
    return Row(
        NAME, "ppo_update_ceiling_env_steps_per_s", ceiling, per_env_sps, "",
        f"value=env steps/s of rl.ppo.ppo_update alone (benchmarks.learner_ceiling: "
        f"{NUM_ENVS} x 128 rollout, minibatch {NUM_ENVS * 128 // 4}, 4 epochs, env and "
        f"collector free); reference=per-env PPO as in ppo_train_env_steps_per_s: the ratio is "
        f"an upper bound on that row's ratio on this machine; {load_note()}",
    )  # fmt: skip


def profile_ppo(budget: int, workdir: str, num_envs: int = 64) -> Row:
    """Where one PPO training run's time goes on the batched env: env steps, policy forward,
    the rest of the collector, GAE, the update, logging, and Lightning (the remainder of the
    wall: trainer, checkpoints, construction)."""
    import rl.ppo
    from experiments.registry import method_class
    from rl.train import fit

    cfg = {"compositions": None, "total_env_steps": budget, "num_envs": num_envs, "seed": 0}
    cfg["ppo"] = {"num_minibatches": num_envs * 128 // 256}
    t0 = time.perf_counter()
    module = method_class("ppo")(cfg)
    timers: dict[str, _Timed] = {}
    make = module.make_collector

    def make_timed():
        col = make()
        col.envs.step = timers.setdefault("env", _Timed(col.envs.step))
        col.policy.step = timers.setdefault("policy", _Timed(col.policy.step))
        col.collect = timers.setdefault("collect", _Timed(col.collect))
        return col

    module.make_collector = make_timed
    gae, update = rl.ppo.gae, rl.ppo.ppo_update
    rl.ppo.gae = timers.setdefault("gae", _Timed(gae))
    rl.ppo.ppo_update = timers.setdefault("update", _Timed(update))
    module.log_iteration = timers.setdefault("logging", _Timed(module.log_iteration))
    try:
        fit(module, Path(workdir) / "ppo_profile", logger=True)
    finally:
        rl.ppo.gae, rl.ppo.ppo_update = gae, update
    wall = time.perf_counter() - t0
    sec = {k: v.seconds for k, v in timers.items()}
    parts = {
        "env": sec["env"],
        "policy forward": sec["policy"],
        "collector rest": sec["collect"] - sec["env"] - sec["policy"],
        "GAE": sec["gae"],
        "update": sec["update"],
        "logging": sec["logging"],
    }
    parts["Lightning + checkpoints + construction"] = wall - sum(parts.values())
    text = ", ".join(f"{k} {v:.2f} s ({100 * v / wall:.0f}%)" for k, v in parts.items())
    return Row(
        NAME, "ppo_profile_env_steps_per_s", module.env_steps / wall, None, "",
        f"PPO on the batched env, {num_envs} envs x 128 steps, minibatch 256, 4 epochs, "
        f"{module.env_steps} env steps in {wall:.1f} s: {text}; {load_note()}",
    )  # fmt: skip


def run(
    quick: bool = False,
    workdir: str | None = None,
    methods: list[str] | None = None,
    **_: object,
) -> list[Row]:
    """Raw env rate and every method's (``methods``: labels to keep) training rate, batched vs
    per-env."""
    labels = [m[0] for m in METHODS]
    unknown = sorted(set(methods or []) - set(labels))
    if unknown:
        raise ValueError(f"unknown method label {unknown[0]!r}; allowed: {', '.join(labels)}")
    todo = [m for m in METHODS if methods is None or m[0] in methods]
    steps, repeats = (50, 1) if quick else (1000, 5)
    t0 = time.perf_counter()
    ours = batched_steps_per_second(steps, repeats)
    ref = raw_steps_per_second(500 if quick else 10_000, repeats)
    rows = [
        Row(
            NAME, "raw_env_steps_per_s", ours, ref, ">=30",
            f"value=CompoGridVectorEnv B={BATCH}, random actions, next-step autoreset, fresh "
            f"layouts, {steps} vector steps x {repeats} repeats (median); reference=one "
            f"CompoGridEnv, random actions, plain loop; {load_note()}",
        )
    ]  # fmt: skip
    print(f"[{NAME}] raw: batched {ours:,.0f} vs single {ref:,.0f} steps/s")
    budget = 4096 if quick else 40_000
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        for label, method, overrides, target in todo:
            sps = {}
            for vec in ("sync", "batched"):
                cfg = {**overrides, "num_envs": NUM_ENVS, "vectorization": vec}
                n, wall = train_sps(method, cfg, budget, Path(tmp) / f"{label}_{vec}")
                sps[vec] = n / wall
                print(f"[{NAME}] {label} {vec}: {n} env steps in {wall:.1f} s")
            rows.append(
                Row(
                    NAME, f"{label}_train_env_steps_per_s", sps["batched"], sps["sync"], target,
                    f"value=batched, reference=per-env SyncVectorEnv; method {method!r}"
                    + (f", overrides {overrides}" if overrides else "")
                    + f"; {NUM_ENVS} envs, budget {budget}, seed 0; construction + rl.train.fit;"
                    f" {load_note()}",
                )
            )  # fmt: skip
            if label == "ppo":
                rows.append(ceiling_row(sps["sync"]))
        rows.append(profile_ppo(16_384 if quick else 200_000, tmp))
        print(f"[{NAME}] {rows[-1].notes}")
    print(f"[{NAME}] done in {time.perf_counter() - t0:.1f} s")
    return rows
