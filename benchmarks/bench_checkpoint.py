"""``checkpoint_overhead``: what checkpointing every iteration costs PPO's training (issue 14).

PPO (default config: 8 envs x 128 steps = 1024 env steps per iteration) is trained by
``rl.train.fit(module, tmpdir, logger=False)`` with ``checkpoint_every=1`` (a full, atomic,
fsynced ``last.ckpt`` after every iteration) and with ``checkpoint_every=1000`` (only the one
at the end), alternating 1000, 1, 1000, ..., 1000 because the shared machine's load drifts;
each ratio is the every-1 run's wall time over the mean of the two every-1000 runs around it.

Two rows:

- ``wall_ratio_every_1_vs_1000``: the median paired ratio of wall times (target <= 1.05, i.e.
  under 5% overhead); noisy on a shared machine;
- ``checkpoint_s_per_iteration_s``: the median time of one checkpoint write (timed around
  ``LastCheckpoint._save``) over the mean time of an iteration in the every-1000 runs; the
  direct and steadier measure of the same fraction.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from unittest import mock

from benchmarks import Row, load_note

NAME = "checkpoint_overhead"
TARGET = "<=1.05"


def train_seconds(every: int, budget: int, out: Path, saves: list[float]) -> tuple[float, int]:
    """Wall seconds of one PPO run (construction + fit) and its iterations; appends the
    duration of each checkpoint write to ``saves``."""
    import rl.train
    from rl.ppo import PPOModule

    save = rl.train.LastCheckpoint._save

    def timed(self, trainer) -> None:
        t0 = time.perf_counter()
        save(self, trainer)
        saves.append(time.perf_counter() - t0)

    with mock.patch.object(rl.train.LastCheckpoint, "_save", timed):
        t0 = time.perf_counter()
        module = PPOModule({"total_env_steps": budget, "seed": 0})
        rl.train.fit(module, out, logger=False, checkpoint_every=every)
        return time.perf_counter() - t0, module.iteration


def run(quick: bool = False, workdir: str | None = None, **_: object) -> list[Row]:
    budget, pairs = (2048, 1) if quick else (30 * 1024, 3)
    base = Path(tempfile.mkdtemp(prefix="bench_ckpt_", dir=workdir))
    sparse, dense, saves, iteration_s = [], [], [], []
    for i in range(2 * pairs + 1):
        every = 1000 if i % 2 == 0 else 1
        wall, iters = train_seconds(every, budget, base / f"run{i}", saves if every == 1 else [])
        (sparse if every == 1000 else dense).append(wall)
        if every == 1000:
            iteration_s.append(wall / iters)
    ratios = [d / ((sparse[k] + sparse[k + 1]) / 2) for k, d in enumerate(dense)]
    note = (
        f"PPO default config, {budget} env steps per run ({budget // 1024} iterations); "
        f"every-1 runs {[round(x, 2) for x in dense]} s, every-1000 runs "
        f"{[round(x, 2) for x in sparse]} s (alternating); {load_note()}, other processes "
        "sharing the CPU"
    )
    save_s = statistics.median(saves)
    return [
        Row(
            NAME,
            "wall_ratio_every_1_vs_1000",
            statistics.median(ratios),
            1.0,
            TARGET,
            f"median of {len(ratios)} paired ratios {[round(r, 3) for r in ratios]}; {note}",
        ),
        Row(
            NAME,
            "checkpoint_s_per_iteration_s",
            save_s,
            statistics.mean(iteration_s),
            "<=0.05",
            f"median of {len(saves)} checkpoint writes (last.ckpt, atomic + fsync) over the "
            f"mean iteration time of the every-1000 runs; {note}",
        ),
    ]
