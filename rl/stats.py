"""Aggregate statistics over a raw score matrix, as in rliable (Agarwal et al. 2021).

A *score matrix* has shape (runs, tasks, ...): one row per training seed, one column per
held-out task, optional trailing axes (e.g. the episode index of an adaptation curve). Every
aggregate here comes with a **stratified bootstrap** interval: each resample draws, for every
task independently, ``runs`` seeds with replacement among that task's runs (rliable's
``StratifiedBootstrap`` with ``task_bootstrap=False``). The tasks stay fixed, so the interval is
the uncertainty from repeating the experiment with other seeds on the same tasks.

Intervals are 95% percentile intervals (rliable's default method) of ``resamples`` bootstrap
statistics drawn from ``np.random.default_rng(seed)``, so a statistic is a pure function of
(scores, resamples, seed). With fewer than ``MIN_RUNS_FOR_INTERVAL`` runs no interval is
computed (None): a percentile bootstrap over 1 run has zero width and over 2 runs it cannot
cover 95%, yet both would print as if it did.

Definitions (rliable ``metrics.py``):

- mean: mean over tasks of the per-task mean over runs (``aggregate_mean``);
- IQM: the 25%-trimmed mean of all runs x tasks scores pooled (``aggregate_iqm``, i.e.
  ``scipy.stats.trim_mean(scores, 0.25, axis=None)``: drop ``int(0.25 n)`` lowest and highest);
- probability of improvement P(X > Y): per task, the Mann-Whitney U statistic of X's runs
  against Y's runs divided by ``n_x n_y`` (ties count 1/2), averaged over tasks. Its interval
  resamples X and Y independently, each stratified by task (rliable's
  ``StratifiedIndependentBootstrap``): the two methods' seeds are independent trainings, so
  pairing seed i of X with seed i of Y would mean nothing.

Examples:
    >>> iqm(np.array([[0.0, 1.0], [2.0, 100.0]]))  # drops 0 and 100
    1.5
    >>> probability_of_improvement(np.ones((3, 2)), np.zeros((3, 2)))
    1.0
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

MIN_RUNS_FOR_INTERVAL = 3
"""fewer runs (seeds) than this: no interval (None), printed as "n/a (<3 seeds)" """
CONFIDENCE = 0.95
"""coverage of every interval"""
BOOTSTRAP_SEED = 0
"""default seed of the bootstrap generator (recorded in results.json)"""
_CHUNK = 512  # resamples drawn and evaluated at once: bounds memory for large score matrices

Interval = list[float] | None


def _batched_iqm(a: np.ndarray) -> np.ndarray:
    """IQM of each resample: (B, runs, tasks) -> (B,)."""
    flat = np.sort(a.reshape(a.shape[0], -1), axis=1)
    n = flat.shape[1]
    cut = int(0.25 * n)  # scipy.stats.trim_mean's rule
    return flat[:, cut : n - cut].mean(axis=1)


def _batched_mean(a: np.ndarray) -> np.ndarray:
    """Mean over tasks of per-task means: (B, runs, tasks, ...) -> (B, ...)."""
    return a.mean(axis=1).mean(axis=1)


def _batched_poi(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """P(X > Y) of each resample: (B, runs_x, tasks), (B, runs_y, tasks) -> (B,)."""
    xa, ya = x[:, :, None, :], y[:, None, :, :]
    # Mann-Whitney U / (n_x n_y): the fraction of (x run, y run) pairs with x > y, ties 1/2
    per_task = (xa > ya).mean(axis=(1, 2)) + 0.5 * (xa == ya).mean(axis=(1, 2))
    return per_task.mean(axis=1)


def _check(scores: np.ndarray, name: str, ndim: tuple[int, ...] = (2,)) -> np.ndarray:
    a = np.asarray(scores, dtype=float)
    if a.ndim not in ndim or 0 in a.shape:
        raise ValueError(
            f"{name} has shape {a.shape}; allowed: a non-empty (runs, tasks{', ...' if max(ndim) > 2 else ''}) array"
        )
    if not np.isfinite(a).all():
        raise ValueError(f"{name} contains NaN or inf; allowed: finite scores")
    return a


def _check_resamples(resamples: int) -> None:
    if int(resamples) < 1:
        raise ValueError(f"resamples={resamples}; allowed: an integer >= 1")


def _resample(a: np.ndarray, runs: np.ndarray) -> np.ndarray:
    """``a[runs[b, i, t], t, ...]``: runs of each task replaced by the drawn ones."""
    return a[runs, np.arange(a.shape[1])]


def _bootstrap(
    stat: Callable[..., np.ndarray], arrays: list[np.ndarray], resamples: int, seed: int
) -> np.ndarray:
    """``resamples`` values of ``stat`` over stratified resamples of every array (each array
    resampled independently), shape (resamples, ...)."""
    rng = np.random.default_rng(seed)
    out = []
    for start in range(0, resamples, _CHUNK):
        b = min(_CHUNK, resamples - start)
        drawn = [_resample(a, rng.integers(0, a.shape[0], size=(b, *a.shape[:2]))) for a in arrays]
        out.append(stat(*drawn))
    return np.concatenate(out)


def _percentile_interval(dist: np.ndarray) -> np.ndarray:
    """Percentile interval of a bootstrap distribution (resamples, ...) -> (..., 2)."""
    tail = 100 * (1 - CONFIDENCE) / 2
    return np.moveaxis(np.percentile(dist, [tail, 100 - tail], axis=0), 0, -1)


def _estimate(
    stat: Callable[..., np.ndarray], arrays: list[np.ndarray], resamples: int, seed: int
) -> tuple[np.ndarray, np.ndarray | None]:
    _check_resamples(resamples)
    point = stat(*(a[None] for a in arrays))[0]
    if min(a.shape[0] for a in arrays) < MIN_RUNS_FOR_INTERVAL:
        return point, None
    return point, _percentile_interval(_bootstrap(stat, arrays, int(resamples), seed))


def _as_interval(ci: np.ndarray | None) -> Interval:
    return None if ci is None else [float(ci[0]), float(ci[1])]


def iqm(scores: np.ndarray) -> float:
    """Interquartile mean of a (runs, tasks) score matrix (all scores pooled)."""
    return float(_batched_iqm(_check(scores, "scores")[None])[0])


def aggregate_mean(scores: np.ndarray) -> float:
    """Mean over tasks of the per-task mean over runs of a (runs, tasks) score matrix."""
    return float(_batched_mean(_check(scores, "scores")[None])[0])


def probability_of_improvement(scores_x: np.ndarray, scores_y: np.ndarray) -> float:
    """P(X > Y): per-task Mann-Whitney statistic of X's runs over Y's, averaged over tasks.

    Args:
        scores_x: (runs_x, tasks) scores of method X.
        scores_y: (runs_y, tasks) scores of method Y on the same tasks (column for column).
    """
    x, y = _pair(scores_x, scores_y)
    return float(_batched_poi(x[None], y[None])[0])


def _pair(scores_x: np.ndarray, scores_y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x, y = _check(scores_x, "scores_x"), _check(scores_y, "scores_y")
    if x.shape[1] != y.shape[1]:
        raise ValueError(
            f"scores_x has {x.shape[1]} tasks and scores_y {y.shape[1]}; allowed: the same tasks"
        )
    return x, y


def iqm_with_ci(
    scores: np.ndarray, resamples: int, seed: int = BOOTSTRAP_SEED
) -> tuple[float, Interval]:
    """IQM of a (runs, tasks) matrix and its stratified bootstrap 95% interval (None for
    fewer than ``MIN_RUNS_FOR_INTERVAL`` runs)."""
    point, ci = _estimate(_batched_iqm, [_check(scores, "scores")], resamples, seed)
    return float(point), _as_interval(ci)


def mean_with_ci(
    scores: np.ndarray, resamples: int, seed: int = BOOTSTRAP_SEED
) -> tuple[float, Interval]:
    """Mean of a (runs, tasks) matrix and its stratified bootstrap 95% interval (or None)."""
    point, ci = _estimate(_batched_mean, [_check(scores, "scores")], resamples, seed)
    return float(point), _as_interval(ci)


def probability_of_improvement_with_ci(
    scores_x: np.ndarray, scores_y: np.ndarray, resamples: int, seed: int = BOOTSTRAP_SEED
) -> tuple[float, Interval]:
    """P(X > Y) and its 95% interval, X and Y resampled independently within each task (None
    when either has fewer than ``MIN_RUNS_FOR_INTERVAL`` runs)."""
    point, ci = _estimate(_batched_poi, list(_pair(scores_x, scores_y)), resamples, seed)
    return float(point), _as_interval(ci)


def curve_with_ci(
    scores: np.ndarray, resamples: int, seed: int = BOOTSTRAP_SEED
) -> tuple[list[float], list[Interval]]:
    """Mean per trailing index of a (runs, tasks, E) array (an adaptation curve) and its
    pointwise stratified bootstrap 95% intervals (one resample of seeds serves every index).

    Returns:
        ``(curve, intervals)``: E means and E ``[low, high]`` pairs (every entry None for fewer
        than ``MIN_RUNS_FOR_INTERVAL`` runs).
    """
    a = _check(scores, "scores", ndim=(3,))
    point, ci = _estimate(_batched_mean, [a], resamples, seed)
    curve = [float(v) for v in point]
    if ci is None:
        return curve, [None] * len(curve)
    return curve, [_as_interval(c) for c in ci]


# --- the statistics of results.json ---------------------------------------------------------


def episodes_to_threshold(curve: Sequence[float], threshold: float = 0.8) -> int | None:
    """Adaptation episodes needed before mean success reaches ``threshold``: the first episode
    index whose success is >= ``threshold``. 0 = reached at episode 0 (zero-shot, no adaptation
    episode needed); k = reached at episode index k, after k adaptation episodes; None = never
    within the trial."""
    for i, v in enumerate(curve):
        if v >= threshold - 1e-12:
            return i
    return None


def method_statistics(
    success: np.ndarray, returns: np.ndarray, *, resamples: int, seed: int = BOOTSTRAP_SEED
) -> dict:
    """Every statistic of one method's ``results.json`` entry, from its raw scores.

    Args:
        success: (seeds, tasks, E) success of each (training seed, held-out task, episode index).
        returns: (seeds, tasks, E) returns, same axes.
        resamples: bootstrap resamples of every interval.
        seed: bootstrap seed.

    Returns:
        ``success_at``/``return_at`` (mean per episode index) with pointwise intervals
        ``success_ci``/``return_ci``, ``episodes_to_80``, ``auc`` (mean success over the
        trial's episodes) and ``aggregates``: mean and IQM with intervals of the per-(seed, task)
        scores ``zero_shot`` (success at episode 0), ``final`` (at episode E-1) and ``auc``.
        Intervals are None for fewer than ``MIN_RUNS_FOR_INTERVAL`` seeds.
    """
    success = np.asarray(success, dtype=float)
    returns = np.asarray(returns, dtype=float)
    if success.ndim != 3 or success.shape != returns.shape:
        raise ValueError(
            f"success {success.shape} and return {returns.shape}; allowed: equal (seeds, tasks, episodes) shapes"
        )
    success_at, success_ci = curve_with_ci(success, resamples, seed)
    return_at, return_ci = curve_with_ci(returns, resamples, seed)
    per_run = {"zero_shot": success[:, :, 0], "final": success[:, :, -1], "auc": success.mean(2)}
    aggregates = {}
    for key, scores in per_run.items():
        mean, mean_ci = mean_with_ci(scores, resamples, seed)
        iqm, iqm_ci = iqm_with_ci(scores, resamples, seed)
        aggregates[key] = {"mean": mean, "mean_ci": mean_ci, "iqm": iqm, "iqm_ci": iqm_ci}
    return {
        "success_at": success_at,
        "success_ci": success_ci,
        "return_at": return_at,
        "return_ci": return_ci,
        "episodes_to_80": episodes_to_threshold(success_at, 0.8),
        "auc": aggregates["auc"]["mean"],
        "aggregates": aggregates,
    }


def improvement_matrix(
    scores: dict[str, dict], trained: Sequence[str], *, resamples: int, seed: int = BOOTSTRAP_SEED
) -> dict:
    """Probability of improvement on AUC of every trained method over every other row.

    Args:
        scores: method -> {"success": (seeds, tasks, E)} raw scores.
        trained: the rows (meta-trained methods); columns are every method.

    Returns:
        ``{"metric": "auc", "rows", "columns", "values": {row: {column: {"p", "ci"}}}}``.
    """
    auc = {name: np.asarray(s["success"], dtype=float).mean(axis=2) for name, s in scores.items()}
    values = {}
    for x in trained:
        values[x] = {}
        for y in auc:
            if y != x:
                p, ci = probability_of_improvement_with_ci(auc[x], auc[y], resamples, seed)
                values[x][y] = {"p": p, "ci": ci}
    return {"metric": "auc", "rows": list(trained), "columns": list(auc), "values": values}
