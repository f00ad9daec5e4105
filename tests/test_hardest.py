"""``python -m experiments.hardest``: the tasks a row fails most, from raw scores."""

from __future__ import annotations

import json

import numpy as np
import pytest

from experiments.hardest import hardest_table, late_success, main


def _doc() -> dict:
    rng = np.random.default_rng(0)
    a = rng.integers(0, 2, size=(3, 4, 5)).astype(float)  # (seed, task, episode)
    a[:, 2, :] = 0.0  # task 2: row "a" never succeeds
    a[:, 1, 2:] = 1.0  # task 1: always from episode 2 on
    b = np.ones((3, 4, 5))
    return {
        "heldout_tasks": ["t0", "t1", "t2", "t3"],
        "scores": {"methods": {"a": {"success": a.tolist()}, "b": {"success": b.tolist()}}},
    }


def test_late_success_averages_seeds_and_the_late_episodes_by_hand():
    doc = _doc()
    a = np.asarray(doc["scores"]["methods"]["a"]["success"])
    got = late_success(doc, "a", 2)
    np.testing.assert_allclose(got, [a[:, t, 2:].mean() for t in range(4)])
    assert got[1] == 1.0 and got[2] == 0.0


def test_table_ranks_by_the_first_row_and_counts_failed_tasks():
    text = hardest_table(_doc(), ["a", "b"], from_episode=2, top=2)
    lines = [ln for ln in text.splitlines() if ln[:4] in ("| t0", "| t1", "| t2", "| t3")]
    assert lines[0].startswith("| t2 | 0.00 | 1.00 |")  # the lowest first
    assert len(lines) == 2 and not any(ln.startswith("| t1 ") for ln in lines)
    assert "| tasks below 0.5 / mean over all | " in text and "0 / 1.000" in text


@pytest.mark.parametrize(
    "args, msg",
    [
        (["--row", "zzz"], "--row 'zzz' is not in"),
        (["--from-episode", "5"], "--from-episode 5; allowed: 0..4"),
        (["--top", "0"], "--top 0; allowed"),
    ],
)
def test_bad_input_one_line_exit_2(tmp_path, capsys, args, msg):
    f = tmp_path / "results.json"
    f.write_text(json.dumps(_doc()))
    with pytest.raises(SystemExit) as e:
        main([str(f), *args])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert msg in err


def test_cli_prints_the_table(tmp_path, capsys):
    f = tmp_path / "results.json"
    f.write_text(json.dumps(_doc()))
    assert main([str(f), "--row", "a", "--from-episode", "2", "--top", "1"]) == 0
    assert "| t2 | 0.00 |" in capsys.readouterr().out
