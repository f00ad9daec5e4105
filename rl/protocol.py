"""The one meta-evaluation protocol every method is measured with.

A method is evaluated on held-out *tasks* (a held-out composition plus a layout/goal seed):
each task gets one trial of E episodes; memory (hidden state, context, adapted parameters)
persists over the trial's episodes and is fresh for every trial. Per episode index we record
success and return, giving the *adaptation curve*. Curves are means over (training seed, task)
pairs; intervals are rliable-style 95% stratified-bootstrap intervals over (seed x task), see
``rl.stats``; results.json (schema 2) keeps the raw scores so all of it can be recomputed.

A method plugs in through ``TrialAgent.trial_policy(envs) -> (policy, on_episode_end)``: the
policy acts through the shared ``Collector``; ``on_episode_end(env_index, episode)`` is where
gradient-based methods adapt (it runs inside the collector's ``no_grad`` step, so adapting
code must open ``torch.enable_grad()`` itself).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import gymnasium as gym
import numpy as np
import torch

from envs.core import Composition, Task
from rl.collect import Collector, Episode, make_vector_env

# the reference rows live in rl.references; re-exported here, where callers import them from
from rl.references import (  # noqa: F401
    FinetunePPOAgent,
    OracleAgent,
    RandomAgent,
    RandomPolicy,
    ScratchPPOAgent,
)
from rl.stats import (
    BOOTSTRAP_SEED,
    CONFIDENCE,
    MIN_RUNS_FOR_INTERVAL,
    improvement_matrix,
    method_statistics,
)

SCHEMA = 2
Hook = Callable[[int, Episode], None] | None


class TrialAgent(Protocol):
    def trial_policy(self, envs: gym.vector.VectorEnv) -> tuple[Any, Hook]: ...


#: upper bounds of the protocol's counts (beyond them an evaluation exhausts the machine)
EVAL_LIMITS = {"episodes": 1000, "num_tasks": 100_000, "num_envs": 4096, "bootstrap": 1_000_000}


@dataclass
class EvalConfig:
    """Evaluation protocol settings (identical for every method of a run)."""

    episodes: int = 10
    """E: episodes per trial (adaptation budget)"""
    num_tasks: int = 20
    """held-out tasks (composition + layout seed) per method and seed"""
    num_envs: int = 10
    """trials run in parallel"""
    seed: int = 1234
    """seed of the task draw and of the episode seeds (same for every method)"""
    bootstrap: int = 2000
    """bootstrap resamples for the 95% intervals"""

    def __post_init__(self) -> None:
        for k, top in EVAL_LIMITS.items():
            if not 1 <= getattr(self, k) <= top:
                raise ValueError(f"eval.{k}={getattr(self, k)}; allowed: an integer in [1, {top}]")
        if self.seed < 0:
            raise ValueError(f"eval.seed={self.seed}; allowed: an integer >= 0")


def heldout_tasks(
    compositions: Sequence[Composition | str],
    n: int,
    seed: int,
    layout_seeds: Sequence[int] | None = None,
) -> list[Task]:
    """``n`` tasks cycling through the compositions (shuffled by ``seed``), each with a layout
    seed — drawn from ``layout_seeds`` when the split prescribes them (Meta-World's held-out
    goals), otherwise any."""
    comps = [Composition.parse(c) for c in compositions]
    if not comps:
        raise ValueError("no held-out compositions to evaluate on")
    rng = np.random.default_rng(seed)
    order = [comps[i] for i in rng.permutation(len(comps))]
    if layout_seeds is not None:
        pool = [int(s) for s in layout_seeds]
        return [Task(order[i % len(order)], pool[int(rng.integers(len(pool)))]) for i in range(n)]
    return [Task(order[i % len(order)], int(rng.integers(2**31))) for i in range(n)]


def run_trials(
    agent: TrialAgent,
    tasks: Sequence[Task],
    *,
    env_id: str,
    env_kwargs: dict,
    episodes: int,
    num_envs: int,
    seed: int,
    vectorization: str = "auto",
) -> dict[str, np.ndarray]:
    """One trial of ``episodes`` episodes per task; returns ``success`` and ``return`` arrays of
    shape (len(tasks), episodes).

    The envs are the batched implementation where one exists (``vectorization="auto"``), which
    steps exactly as the per-env path does; agents that read the env objects themselves (the
    scripted oracle, the ideal observer: ``needs_env_objects = True``) get a sync vector env.

    A pure function of (agent parameters, tasks, ``seed``): torch's global generator, which
    policies sample actions from, is seeded from ``seed`` inside a forked RNG state, so an
    evaluation right after training and one of the reloaded checkpoint agree, and the caller's
    random stream is left as it was.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if getattr(agent, "needs_env_objects", False):
            vectorization = "sync"
        return _run_trials(
            agent, tasks, env_id, env_kwargs, episodes, num_envs, seed, vectorization
        )


def _run_trials(agent, tasks, env_id, env_kwargs, episodes, num_envs, seed, vectorization):
    n_tasks = len(tasks)
    success = np.full((n_tasks, episodes), np.nan)
    returns = np.full((n_tasks, episodes), np.nan)
    k = min(num_envs, n_tasks)
    envs = make_vector_env(
        env_id, k, {**env_kwargs, "composition": tasks[0].composition}, vectorization=vectorization
    )
    try:
        for b, start in enumerate(range(0, n_tasks, k)):
            batch = list(tasks[start : start + k])
            pad = k - len(batch)
            batch += [batch[-1]] * pad
            policy, hook = agent.trial_policy(envs)
            col = Collector(
                envs, policy, episodes_per_trial=episodes, seed=seed + b, on_episode_end=hook
            )
            ro = col.collect_trials(batch)
            for e in ro.episodes:
                if e.env_index < k - pad:
                    success[start + e.env_index, e.episode_index] = float(e.success)
                    returns[start + e.env_index, e.episode_index] = e.ret
    finally:
        envs.close()
    assert not np.isnan(success).any()
    return {"success": success, "return": returns}


# --- statistics ---------------------------------------------------------------------------------


def bootstrap_ci(per_seed: np.ndarray, n_boot: int, seed: int = 0) -> np.ndarray:
    """95% percentile-bootstrap interval of the column means, rows resampled as i.i.d. samples.

    Meant for rows that are independent draws (e.g. (seed, task) pairs of a within-trial gain);
    results.json's intervals come from ``rl.stats`` (stratified over seeds within tasks).

    Args:
        per_seed: (N, E) array, one row per independent sample.

    Returns:
        (E, 2) array of [low, high]; with a single row the interval collapses to the value.
    """
    per_seed = np.asarray(per_seed, dtype=float)
    S = per_seed.shape[0]
    if S == 1:
        return np.stack([per_seed[0], per_seed[0]], axis=-1)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, S, size=(n_boot, S))
    means = per_seed[idx].mean(axis=1)  # (n_boot, E)
    return np.stack(
        [np.percentile(means, 2.5, axis=0), np.percentile(means, 97.5, axis=0)], axis=-1
    )


def summarize(
    per_seed_success: dict[int, np.ndarray],
    per_seed_return: dict[int, np.ndarray],
    *,
    n_boot: int = 2000,
    boot_seed: int = BOOTSTRAP_SEED,
    meta_train_env_steps: int = 0,
    wall_s: float = 0.0,
    trained: bool = False,
) -> dict:
    """The ``results.json`` entry of one method from its per-seed (tasks, E) arrays.

    ``trained`` marks a meta-trained method (a row of the probability-of-improvement matrix);
    reference rows leave it False. The raw arrays travel in ``scores`` (``results_document``
    moves them to the document's ``scores`` section).
    """
    seeds = sorted(per_seed_success)
    if sorted(per_seed_return) != seeds:
        raise ValueError(
            f"success seeds {seeds} and return seeds {sorted(per_seed_return)}; allowed: the same seeds"
        )
    succ = np.stack([np.asarray(per_seed_success[s], dtype=float) for s in seeds])
    ret = np.stack([np.asarray(per_seed_return[s], dtype=float) for s in seeds])
    return {
        **method_statistics(succ, ret, resamples=n_boot, seed=boot_seed),
        "per_seed_success_at": {str(s): succ[i].mean(0).tolist() for i, s in enumerate(seeds)},
        "meta_train_env_steps": int(meta_train_env_steps),
        "wall_s": float(wall_s),
        "seeds": [int(s) for s in seeds],
        "num_tasks": int(succ.shape[1]),
        "trained": bool(trained),
        "scores": {"success": succ.tolist(), "return": ret.tolist()},
    }


# --- run folder ---------------------------------------------------------------------------------

#: what each per-method field of results.json means (copied into every document)
FIELDS = {
    "success_at": "mean success per episode index 0..E-1 over all (seed, task) pairs",
    "success_ci": "95% stratified bootstrap interval per episode index; null for < 3 seeds",
    "episodes_to_80": (
        "adaptation episodes needed before mean success >= 0.8: the first episode index reaching"
        " it; 0 = reached at episode 0 (zero-shot), k = after k adaptation episodes, null = never"
    ),
    "auc": "mean success over episodes 0..E-1 (area under the adaptation curve / E)",
    "aggregates": (
        "mean and IQM (interquartile mean) of per-(seed, task) scores with 95% stratified"
        " bootstrap intervals (null for < 3 seeds): zero_shot = success at episode 0,"
        " final = success at episode E-1, auc = mean success over the trial"
    ),
    "probability_of_improvement": (
        "P(row > column) on per-(seed, task) AUC: per task the Mann-Whitney U statistic over the"
        " two methods' seeds / (n_row n_column), ties 1/2, averaged over tasks (rliable)"
    ),
    "scores": "raw success and return per (method, seed, task, episode index)",
}
VERSIONED = ("torch", "lightning", "gymnasium", "minigrid", "metaworld", "numpy")


def provenance() -> dict:
    """The code a result came from: git commit (null outside a git checkout), whether tracked
    files differed from it, and installed versions of the packages that shape the numbers."""
    import importlib.metadata
    import subprocess
    from pathlib import Path

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(
                ["git", *args], cwd=Path(__file__).resolve().parents[1],
                capture_output=True, text=True, timeout=30, check=True,
            )  # fmt: skip
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip()

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    versions: dict[str, str | None] = {}
    for name in VERSIONED:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "git": {"commit": commit, "dirty": None if status is None else bool(status)},
        "versions": versions,
    }


def results_document(
    config: dict,
    split: dict,
    methods: dict[str, dict],
    *,
    resamples: int = 2000,
    seed: int = BOOTSTRAP_SEED,
    tasks: Sequence[str] | None = None,
    command: str = "",
    origin: dict | None = None,
) -> dict:
    """The ``results.json`` document (schema 2) of a run from its ``summarize`` entries.

    The raw scores move from each entry to the ``scores`` section at the end of the document;
    ``resamples`` and ``seed`` must be the ones the entries were summarised with (they are
    recorded, and ``python -m experiments.stats`` recomputes everything from them).
    """
    missing = [name for name, m in methods.items() if "scores" not in m]
    if missing:
        raise ValueError(f"methods {missing} carry no raw scores; allowed: summarize() entries")
    scores = {name: m["scores"] for name, m in methods.items()}
    trained = [name for name, m in methods.items() if m.get("trained")]
    return {
        "schema": SCHEMA,
        "command": command,
        # the code a run *started* from (``origin``, taken before training) unless not given
        **(origin if origin is not None else provenance()),
        "config": config,
        "split": split,
        "heldout_tasks": None if tasks is None else [str(t) for t in tasks],
        "statistics": {
            "interval": f"{CONFIDENCE:.0%} percentile interval, stratified bootstrap (seeds"
            " resampled with replacement within each task; methods resampled independently"
            " for the probability of improvement)",
            "resamples": int(resamples),
            "seed": int(seed),
            "min_seeds_for_interval": MIN_RUNS_FOR_INTERVAL,
        },
        "fields": FIELDS,
        "methods": {n: {k: v for k, v in m.items() if k != "scores"} for n, m in methods.items()},
        "probability_of_improvement": improvement_matrix(
            scores, trained, resamples=resamples, seed=seed
        ),
        "scores": {
            "axes": ["seed (the method's seeds)", "task (heldout_tasks)", "episode index"],
            "methods": {n: {"seeds": methods[n]["seeds"], **s} for n, s in scores.items()},
        },
    }


def results_json_text(doc: dict) -> str:
    """``doc`` as indented JSON with every innermost list of numbers on one line (the raw
    scores would otherwise take one line per number)."""
    import json
    import re

    text = json.dumps(doc, indent=2)
    number = r"(?:-?[0-9][0-9.eE+-]*|null)"
    return (
        re.sub(
            rf"\[\s*({number}(?:,\s*{number})*)\s*\]",
            lambda m: "[" + ", ".join(v.strip() for v in m.group(1).split(",")) + "]",
            text,
        )
        + "\n"
    )


def _cell(value: float, ci: list | None) -> str:
    if ci is None:
        return f"{value:.2f} [n/a (<{MIN_RUNS_FOR_INTERVAL} seeds)]"
    return f"{value:.2f} [{ci[0]:.2f}, {ci[1]:.2f}]"


def table_markdown(doc: dict) -> str:
    """The held-out table of a results document: zero-shot success, final success, adaptation
    episodes to 0.8, AUC (mean and IQM with intervals), budget; then the probability-of-
    improvement matrix and how the numbers were computed."""
    methods = doc["methods"]
    k = max(len(m["success_at"]) for m in methods.values()) - 1
    lines = [
        "| method | zero-shot success (episode 0) [95% CI] | IQM [95% CI] "
        f"| success at episode {k} [95% CI] | IQM [95% CI] "
        "| adaptation episodes to 0.8 (0 = zero-shot) | AUC [95% CI] | IQM [95% CI] "
        "| meta-train env steps | seeds × tasks | wall s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, m in methods.items():
        agg = m["aggregates"]
        cells = [name]
        for key in ("zero_shot", "final"):
            cells += [_cell(agg[key]["mean"], agg[key]["mean_ci"])]
            cells += [_cell(agg[key]["iqm"], agg[key]["iqm_ci"])]
        cells += ["never" if m["episodes_to_80"] is None else str(m["episodes_to_80"])]
        cells += [_cell(agg["auc"]["mean"], agg["auc"]["mean_ci"])]
        cells += [_cell(agg["auc"]["iqm"], agg["auc"]["iqm_ci"])]
        cells += [f"{m['meta_train_env_steps']:,}", f"{len(m['seeds'])} × {m['num_tasks']}"]
        cells += [f"{m['wall_s']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    st = doc["statistics"]
    lines += [
        "",
        f"Intervals: {st['interval']}; {st['resamples']} resamples, bootstrap seed {st['seed']};"
        f" none for fewer than {st['min_seeds_for_interval']} seeds. IQM: interquartile mean of"
        " the (seed, task) scores. AUC: mean success over the trial's episodes. Adaptation"
        " episodes to 0.8: the first episode index whose mean success reaches 0.8 (0 = already"
        " at episode 0, zero-shot; k = after k adaptation episodes; never = not in the trial).",
    ]
    poi = doc.get("probability_of_improvement") or {}
    if poi.get("rows"):
        cols = poi["columns"]
        lines += [
            "",
            "Probability of improvement P(row > column) on AUC [95% CI] (per task: Mann-Whitney"
            " over the two methods' seeds; averaged over tasks):",
            "",
            "| | " + " | ".join(cols) + " |",
            "|---|" + "---|" * len(cols),
        ]
        for x in poi["rows"]:
            v = poi["values"][x]
            row = ["—" if y == x else _cell(v[y]["p"], v[y]["ci"]) for y in cols]
            lines.append(f"| {x} | " + " | ".join(row) + " |")
    git = doc.get("git") or {}
    if git.get("commit"):
        dirty = " (with uncommitted changes)" if git.get("dirty") else ""
        lines += ["", f"Code: commit {git['commit'][:12]}{dirty}."]
    text = "\n".join(lines) + "\n"
    if doc.get("command"):
        text += f"\nProduced by: `{doc['command']}`\n"
    return text


def plot_curves(methods: dict[str, dict], path, title: str = "Held-out adaptation curves") -> None:
    """Success and return per episode index, one line per method, with the 95% stratified
    bootstrap band (none for fewer than ``MIN_RUNS_FOR_INTERVAL`` seeds); the caption says what
    the band is and over how many seeds × tasks."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    from rl.io import atomic_write_bytes

    sizes = {(len(m["seeds"]), m["num_tasks"]) for m in methods.values()}
    same = len(sizes) == 1
    if same:
        ((s, t),) = sizes
        who = f"{s} seeds × {t} held-out tasks"
        title = f"{title}\n{who}"
    else:
        who = "the seeds × tasks given per method"
    fig, axes = plt.subplots(1, 2, figsize=(12.5, 4.8))
    # one colour per row: the default cycle repeats after 10 rows
    palette = [*plt.get_cmap("tab10").colors, "black", "gold", "navy", "lime", "teal", "magenta"]
    for i, (name, m) in enumerate(methods.items()):
        x = np.arange(len(m["success_at"]))
        style = "--" if not m.get("trained", True) else "-"
        label = name if same else f"{name} ({len(m['seeds'])} seeds × {m['num_tasks']} tasks)"
        c = palette[i % len(palette)]
        axes[0].plot(x, m["success_at"], style, marker="o", ms=3, color=c, label=label)
        axes[1].plot(x, m["return_at"], style, marker="o", ms=3, color=c, label=label)
        for ax, key in ((axes[0], "success_ci"), (axes[1], "return_ci")):
            ci = m[key]
            if all(b is not None for b in ci):
                ci = np.asarray(ci, dtype=float)
                if len(x) == 1:  # one episode (zero-shot): an error bar, not a band
                    mid = m["success_at" if key == "success_ci" else "return_at"][0]
                    ax.errorbar(x, [mid], yerr=[[mid - ci[0, 0]], [ci[0, 1] - mid]], color=c,
                                capsize=3, lw=1)  # fmt: skip
                else:
                    ax.fill_between(x, ci[:, 0], ci[:, 1], color=c, alpha=0.15, lw=0)
    axes[0].axhline(0.8, color="grey", lw=0.8, ls=":", label="0.8 (episodes to 0.8)")
    axes[0].set(
        xlabel="episode index in trial (0 = zero-shot)", ylabel="success rate",
        ylim=(-0.02, 1.02), title=title,
    )  # fmt: skip
    axes[1].set(xlabel="episode index in trial (0 = zero-shot)", ylabel="return", title="Return")
    axes[0].title.set_fontsize(10)
    axes[1].legend(
        *axes[0].get_legend_handles_labels(), fontsize=8, loc="upper left",
        bbox_to_anchor=(1.02, 1.0), frameon=False,
    )  # fmt: skip
    n_eps = max(len(m["success_at"]) for m in methods.values())
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if n_eps == 1:  # zero-shot only: one tick, not fractional ones around it
            ax.set_xticks([0])
            ax.set_xlim(-0.5, 0.5)
    if all(len(m["seeds"]) < MIN_RUNS_FOR_INTERVAL for m in methods.values()):
        bands = f"No bands: an interval needs at least {MIN_RUNS_FOR_INTERVAL} seeds."
    else:
        bands = (
            f"Bands: 95% stratified bootstrap CI over {who} (seeds resampled within each task);"
            f" none for a method with fewer than {MIN_RUNS_FOR_INTERVAL} seeds."
        )
    fig.text(
        0.5, 0.01, f"Lines: mean over {who}. {bands} Dashed: reference rows (not meta-trained).",
        ha="center", va="bottom", fontsize=8, wrap=True,
    )  # fmt: skip
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def is_finite_curve(xs: Sequence[float]) -> bool:
    return all(math.isfinite(x) for x in xs)
