"""Does a method adapt within a trial? Later-episode minus first-episode success, per task.

``python -m experiments.trial_gain RUN_DIR [--out FILE.md]``

Re-evaluates every trained checkpoint of a ``compo heldout`` run folder
(``<method>/seed<k>/checkpoints/final.ckpt``) on the run's own held-out tasks and protocol
(from its ``config.yaml``; ``run_trials`` is a function of agent, tasks and seed, so this
reproduces the run's evaluation when the run was made with the current code), and reports per
method the success per episode and the gain ``mean(success of episodes 1..E-1) - success of
episode 0`` with a 95% percentile-bootstrap interval over (seed, task) pairs, i.e. over the
draw of tasks as well — an interval ``compo heldout``'s table does not give with fewer than 3
seeds (its stratified bootstrap resamples seeds within each task and keeps the tasks fixed).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import yaml


def trial_gain(run: str | Path, n_boot: int = 5000) -> list[dict]:
    """One row per trained method of the run folder (see the module docstring)."""
    from experiments.heldout import HeldoutConfig, eval_tasks
    from experiments.registry import REGISTRY
    from rl.config import config_from_dict
    from rl.protocol import bootstrap_ci, run_trials
    from rl.train import load_module

    run = Path(run)
    cfg = config_from_dict(HeldoutConfig, yaml.safe_load((run / "config.yaml").read_text()))
    _, tasks = eval_tasks(cfg)
    ev = cfg.eval
    rows = []
    for spec in cfg.method_specs():
        succ = []
        for seed in cfg.seeds:
            ckpt = run / spec["name"] / f"seed{seed}" / "checkpoints" / "final.ckpt"
            if not ckpt.is_file():
                raise ValueError(f"no checkpoint {str(ckpt)!r}; is {str(run)!r} a finished run?")
            agent = load_module(ckpt, REGISTRY, expected=spec["method"])
            succ.append(
                run_trials(
                    agent, tasks, env_id=cfg.env_id, env_kwargs=cfg.env_kwargs,
                    episodes=ev.episodes, num_envs=ev.num_envs, seed=ev.seed,
                )["success"]
            )  # fmt: skip
        s = np.concatenate(succ)  # (seeds * tasks, episodes)
        gain = s[:, 1:].mean(1) - s[:, 0]
        lo, hi = bootstrap_ci(gain[:, None], n_boot)[0]
        rows.append(
            {
                "method": spec["name"],
                "success_at": s.mean(0).tolist(),
                "gain": float(gain.mean()),
                "gain_ci": [float(lo), float(hi)],
                "pairs": int(gain.size),
            }
        )
    return rows


def markdown(rows: list[dict]) -> str:
    out = [
        "| method | success per episode | later − first episode [95% bootstrap over (seed, task)] | (seed, task) pairs |",
        "|---|---|---|---|",
    ]
    for r in rows:
        per = " / ".join(f"{v:.3f}" for v in r["success_at"])
        lo, hi = r["gain_ci"]
        out.append(
            f"| {r['method']} | {per} | {r['gain']:+.3f} [{lo:+.3f}, {hi:+.3f}] | {r['pairs']} |"
        )
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path, help="a finished compo heldout run folder")
    p.add_argument("--out", type=Path, default=None, help="also write the table here")
    a = p.parse_args(argv)
    if not (a.run / "config.yaml").is_file():
        raise SystemExit(f"trial_gain: error: {str(a.run)!r} has no config.yaml (not a run folder)")
    try:
        text = markdown(trial_gain(a.run))
    except ValueError as e:
        raise SystemExit(f"trial_gain: error: {e}") from None
    print(text, end="")
    if a.out is not None:
        from rl.io import atomic_write_text

        atomic_write_text(a.out, text)


if __name__ == "__main__":
    main()
