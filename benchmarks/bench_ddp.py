"""``ddp``: PPO's training throughput on 2 DDP processes against 1 on this machine (issue 14).

PPO (default config: 8 envs x 128 steps = 1024 env steps per iteration) is trained through the
real command, ``python -m experiments.cli train --method ppo`` with ``--devices 1`` and with
``--devices 2 --strategy ddp`` (gloo; each process steps 4 of the 8 envs and the gradients are
all-reduced at every minibatch step), alternating 1, 2, 1, ... because the shared machine's
load drifts. A run's throughput is the median over its iterations (the first left out: warm-up)
of ``charts/SPS`` in its ``train_log.jsonl``: env steps of the iteration (summed over the
ranks) over the wall time of its rollout + update (the slowest rank's), so process start-up
is not counted.

One row, ``ppo_env_steps_per_s_2_vs_1_processes``: value = the 2-process median, reference =
the mean of the 1-process runs around it, ratio = their quotient (no target: with 2 cores, both
shared with other jobs, it says what scale-out costs or gains here, not what it would on a
node with free cores).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks import ROOT, Row, load_note

NAME = "ddp"


def train_sps(devices: int, budget: int, out: Path) -> float:
    """Median per-iteration env steps/s (iterations 2..) of one PPO run on ``devices``."""
    cmd = [sys.executable, "-m", "experiments.cli", "train", "--method", "ppo", "--quiet"]
    cmd += ["--out", str(out), "--set", f"total_env_steps={budget}", "--devices", str(devices)]
    if devices > 1:
        cmd += ["--strategy", "ddp"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {r.stderr.strip()[-500:]}")
    rows = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    return statistics.median(r["charts/SPS"] for r in rows[1:] or rows)


def run(quick: bool = False, workdir: str | None = None, **_: object) -> list[Row]:
    budget, pairs = (2048, 1) if quick else (32 * 1024, 2)
    base = Path(tempfile.mkdtemp(prefix="bench_ddp_", dir=workdir))
    one, two = [], []
    for i in range(2 * pairs + 1):
        devices = 1 if i % 2 == 0 else 2
        (one if devices == 1 else two).append(train_sps(devices, budget, base / f"run{i}"))
    ratios = [t / ((one[k] + one[k + 1]) / 2) for k, t in enumerate(two)]
    k = sorted(range(len(ratios)), key=lambda j: ratios[j])[(len(ratios) - 1) // 2]  # median
    note = (
        f"PPO default config (8 envs x 128 steps), {budget} env steps per run; median "
        f"per-iteration env steps/s, 1 process {[round(x) for x in one]}, 2 processes "
        f"{[round(x) for x in two]} (alternating 1, 2, 1, ...); paired ratios "
        f"{[round(r, 3) for r in ratios]}; {load_note()}, {os.cpu_count()} cores shared with "
        "other processes"
    )
    return [
        Row(
            NAME,
            "ppo_env_steps_per_s_2_vs_1_processes",
            two[k],
            (one[k] + one[k + 1]) / 2,
            "",
            note,
        )
    ]
