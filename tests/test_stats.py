"""rliable-style aggregates: IQM, mean, probability of improvement, stratified bootstrap."""

from __future__ import annotations

import numpy as np
import pytest

from rl.stats import (
    MIN_RUNS_FOR_INTERVAL,
    aggregate_mean,
    curve_with_ci,
    episodes_to_threshold,
    iqm,
    iqm_with_ci,
    mean_with_ci,
    probability_of_improvement,
    probability_of_improvement_with_ci,
)


def test_iqm_by_hand():
    # 8 scores: int(0.25 * 8) = 2 dropped at each end -> mean of 3, 4, 5, 6
    scores = np.array([[9.0, 1.0, 4.0, 100.0], [3.0, -50.0, 6.0, 5.0]])
    assert iqm(scores) == pytest.approx((3 + 4 + 5 + 6) / 4)
    # 4 scores: one dropped at each end
    assert iqm(np.array([[0.0, 1.0], [2.0, 100.0]])) == pytest.approx(1.5)
    # 3 scores: int(0.75) = 0, nothing is trimmed
    assert iqm(np.array([[1.0, 2.0, 9.0]])) == pytest.approx(4.0)
    assert aggregate_mean(scores) == pytest.approx(scores.mean())


def test_iqm_matches_scipy_trim_mean():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    for shape in [(3, 5), (5, 20), (2, 7), (10, 3)]:
        a = rng.normal(size=shape)
        assert iqm(a) == pytest.approx(stats.trim_mean(a, 0.25, axis=None))


def test_probability_of_improvement_by_hand():
    hi, lo = np.ones((3, 4)), np.zeros((3, 4))
    assert probability_of_improvement(hi, lo) == 1.0
    assert probability_of_improvement(lo, hi) == 0.0
    assert probability_of_improvement(lo, lo) == 0.5  # all ties count 1/2
    # one task: pairs (1,2) (1,2) (3,2) (3,2) -> 2 of 4 wins
    assert probability_of_improvement(np.array([[1.0], [3.0]]), np.array([[2.0], [2.0]])) == 0.5
    # ties count 1/2: (1,1)=.5 (1,0)=1 (2,1)=1 (2,0)=1 -> 3.5 / 4; unequal run counts
    x, y = np.array([[1.0], [2.0]]), np.array([[1.0], [0.0], [0.0]])
    assert probability_of_improvement(x, y) == pytest.approx((0.5 + 1 + 1 + 1 + 1 + 1) / 6)
    # averaged over tasks: X wins task 0, loses task 1
    assert probability_of_improvement(np.array([[1.0, 0.0]]), np.array([[0.0, 1.0]])) == 0.5


def test_probability_of_improvement_matches_mann_whitney():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(1)
    x = rng.integers(0, 4, size=(5, 6)).astype(float)
    y = rng.integers(0, 4, size=(4, 6)).astype(float)
    per_task = [
        stats.mannwhitneyu(x[:, t], y[:, t], alternative="greater")[0] / (5 * 4) for t in range(6)
    ]
    assert probability_of_improvement(x, y) == pytest.approx(np.mean(per_task))


def test_intervals_contain_the_estimate_and_are_deterministic():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(5, 20)), rng.normal(0.5, size=(4, 20))
    for fn, args in (
        (iqm_with_ci, (a,)),
        (mean_with_ci, (a,)),
        (probability_of_improvement_with_ci, (b, a)),
    ):
        point, ci = fn(*args, 500, seed=3)
        assert ci[0] < point < ci[1]
        assert fn(*args, 500, seed=3) == (point, ci)  # same seed, same numbers
        assert fn(*args, 500, seed=4)[1] != ci  # the seed is what drives the resampling
    assert mean_with_ci(a, 500)[0] == pytest.approx(a.mean())


def test_no_interval_below_three_seeds():
    assert MIN_RUNS_FOR_INTERVAL == 3
    two = np.array([[0.0, 1.0], [1.0, 1.0]])
    assert iqm_with_ci(two, 100) == (iqm(two), None)
    assert mean_with_ci(two, 100)[1] is None
    assert probability_of_improvement_with_ci(two, np.zeros((5, 2)), 100)[1] is None
    curve, ci = curve_with_ci(np.zeros((2, 3, 4)), 100)
    assert curve == [0.0] * 4 and ci == [None] * 4
    assert mean_with_ci(np.vstack([two, two[:1]]), 100)[1] is not None


def test_bootstrap_is_stratified_by_task():
    """Seeds are resampled within each task; tasks are never resampled. When every task's seeds
    agree, no resample can move the estimate, however different the tasks are (a bootstrap over
    (seed, task) pairs would give a wide interval here)."""
    per_task = np.array([0.0, 0.2, 0.9, 1.0, 0.4])
    scores = np.tile(per_task, (4, 1))
    for fn in (mean_with_ci, iqm_with_ci):
        point, (lo, hi) = fn(scores, 300)
        assert lo == pytest.approx(point) and hi == pytest.approx(point)
    curve, ci = curve_with_ci(np.repeat(scores[:, :, None], 2, axis=2), 300)
    assert all(c[0] == pytest.approx(v) == c[1] for v, c in zip(curve, ci))


def test_interval_shrinks_with_more_seeds():
    rng = np.random.default_rng(5)
    widths = []
    for seeds in (3, 12, 48):
        scores = rng.normal(size=(seeds, 10))
        _, (lo, hi) = mean_with_ci(scores, 1000)
        widths.append(hi - lo)
    assert widths[0] > widths[1] > widths[2]
    # and it roughly follows 1 / sqrt(seeds): 16x the seeds, about a quarter of the width
    assert 0.1 < widths[2] / widths[0] < 0.5


def test_curve_with_ci_per_episode_index():
    rng = np.random.default_rng(6)
    s = rng.integers(0, 2, size=(3, 8, 4)).astype(float)
    curve, ci = curve_with_ci(s, 400)
    assert curve == pytest.approx(s.mean(axis=(0, 1)).tolist())
    assert all(lo <= v <= hi for v, (lo, hi) in zip(curve, ci))
    # each index's interval is that index's mean interval (same seed, same resamples)
    assert ci[2] == pytest.approx(mean_with_ci(s[:, :, 2], 400)[1])


def test_episodes_to_threshold_counts_adaptation_episodes():
    assert episodes_to_threshold([0.85, 0.9]) == 0  # zero-shot: no adaptation episode needed
    assert episodes_to_threshold([0.1, 0.5, 0.8, 0.9]) == 2  # after 2 adaptation episodes
    assert episodes_to_threshold([0.1, 0.79]) is None


def test_bad_input_is_a_clear_value_error():
    with pytest.raises(ValueError, match="the same tasks"):
        probability_of_improvement(np.zeros((3, 2)), np.zeros((3, 4)))
    with pytest.raises(ValueError, match="NaN"):
        iqm(np.array([[np.nan, 1.0]]))
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        mean_with_ci(np.zeros(3), 10)
    with pytest.raises(ValueError, match="resamples=0"):
        mean_with_ci(np.zeros((3, 2)), 0)
