"""Smoke test of the benchmark code paths at tiny sizes: every benchmark runs, and the rows it
appends to the CSV have the documented format. No timing is asserted (speed is measured only
by ``make bench``)."""

from __future__ import annotations

import csv
import math
import sys
from pathlib import Path

import pytest

# ``benchmarks`` is not an installed package (pyproject's package list omits it); ``make bench``
# runs it from the repository root, so the test imports it from there too
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import benchmarks  # noqa: E402
from benchmarks import CSV_COLUMNS, Row, append_rows, bench_methods, check_target, run  # noqa: E402


def _rows(path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == CSV_COLUMNS
        return list(reader)


def _check_numeric_row(r: dict[str, str]) -> None:
    """value > 0; ratio == value / reference; meets_target agrees with target and ratio."""
    value = float(r["value"])
    assert value >= 0 and math.isfinite(value)
    if r["reference"]:
        ref = float(r["reference"])
        if ref > 0:
            assert float(r["ratio"]) == pytest.approx(value / ref, rel=1e-4)
    if r["target"] and r["ratio"]:
        expected = check_target(float(r["ratio"]), r["target"])
        assert r["meets_target"] == ("yes" if expected else "no")


def test_check_target_and_ratio():
    assert check_target(1.5, ">=1.5") is True
    assert check_target(1.49, ">=1.5") is False
    assert check_target(1.2, "<=1.5") is True
    assert check_target(None, ">=1.5") is None
    assert check_target(2.0, "") is None
    with pytest.raises(ValueError, match="target"):
        check_target(1.0, "==1")
    assert Row("b", "m", 3.0, 2.0).ratio == 1.5
    assert Row("b", "m", 3.0, 0.0).ratio is None
    assert Row("b", "m", None, 2.0, ">=1").meets_target is None


def test_append_rows_writes_header_once(tmp_path):
    path = tmp_path / "r.csv"
    append_rows(path, [Row("b", "m", 3.0, 2.0, ">=1.5", "n,with comma")], command="cmd")
    append_rows(path, [Row("b", "m2", None, notes="not available")], command="cmd")
    rows = _rows(path)
    assert [r["metric"] for r in rows] == ["m", "m2"]
    assert rows[0]["ratio"] == "1.5" and rows[0]["meets_target"] == "yes"
    assert rows[0]["notes"] == "n,with comma" and rows[0]["command"] == "cmd"
    assert rows[1]["value"] == "" and rows[1]["ratio"] == ""
    assert open(path).read().count("date,git_commit") == 1


def test_git_commit_reads_head_without_git(tmp_path):
    (tmp_path / ".git" / "refs" / "heads").mkdir(parents=True)
    (tmp_path / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (tmp_path / ".git" / "refs" / "heads" / "main").write_text("abc123\n")
    assert benchmarks.git_commit(tmp_path) == "abc123"
    assert benchmarks.git_commit(tmp_path / "nowhere") == ""


def test_unknown_benchmark_is_rejected(capsys):
    with pytest.raises(SystemExit):
        run.main(["--only", "nope"])
    assert "allowed: collector_throughput" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown method label 'nope'"):
        bench_methods.run(quick=True, methods=["nope"])


def test_quick_suite_rows(tmp_path):
    """collector_throughput, maml_vs_fomaml and ppo_vs_sb3 through the CLI at smoke sizes."""
    path = tmp_path / "results.csv"
    names = "collector_throughput,maml_vs_fomaml,ppo_vs_sb3"
    code = run.main(["--quick", "--only", names, "--csv", str(path), "--workdir", str(tmp_path)])
    assert code == 0
    rows = _rows(path)
    got = {(r["benchmark"], r["metric"]) for r in rows}
    assert got == {
        ("collector_throughput", "sync_env_steps_per_s"),
        ("collector_throughput", "async_env_steps_per_s"),
        ("collector_throughput", "batched_env_steps_per_s"),
        ("maml_vs_fomaml", "seconds_per_meta_iteration"),
        ("maml_vs_fomaml", "outer_update_seconds_same_data"),
        ("maml_vs_fomaml", "graph_saved_MB"),
        ("ppo_vs_sb3", "env_steps_per_s"),
        ("ppo_vs_sb3", "train_success_last10"),
        ("ppo_vs_sb3", "eval_success"),
        ("ppo_vs_sb3", "update_ceiling_env_steps_per_s"),
    }
    for r in rows:
        _check_numeric_row(r)
        assert r["notes"].startswith("QUICK")
        assert r["command"].endswith(f"--only {names} --csv {path} --workdir {tmp_path}")
        assert r["date"].endswith("Z")
    by = {(r["benchmark"], r["metric"]): r for r in rows}
    assert by[("collector_throughput", "sync_env_steps_per_s")]["target"] == ">=1.5"
    assert by[("maml_vs_fomaml", "seconds_per_meta_iteration")]["target"] == "<=1.5"
    # second order keeps more of the graph than first order on identical data
    mem = by[("maml_vs_fomaml", "graph_saved_MB")]
    assert float(mem["value"]) > float(mem["reference"]) > 0
    for metric in ("train_success_last10", "eval_success"):
        r = by[("ppo_vs_sb3", metric)]
        assert 0 <= float(r["value"]) <= 1 and 0 <= float(r["reference"]) <= 1


def test_method_sps_rows_and_unavailable_method(tmp_path, monkeypatch):
    """A method that cannot be imported gets an empty row marked 'not available' and the
    others still run; failures of a method are collected, reported and raised at the end."""
    import experiments.registry as registry

    real = registry.method_class

    def fake(name: str):
        if name == "compositional":
            raise ImportError("No module named 'compositional.agent'")
        if name == "reptile":
            raise RuntimeError("boom")
        return real(name)

    monkeypatch.setattr(registry, "method_class", fake)
    with pytest.raises(RuntimeError, match="training failed for reptile") as info:
        bench_methods.run(
            quick=True, workdir=str(tmp_path), methods=["fomaml", "reptile", "compositional"]
        )
    rows = {r.metric: r for r in info.value.rows}
    assert set(rows) == {
        "ppo_env_steps_per_s",
        "fomaml_env_steps_per_s",
        "reptile_env_steps_per_s",
        "compositional_env_steps_per_s",
    }
    assert rows["ppo_env_steps_per_s"].value > 0
    fo = rows["fomaml_env_steps_per_s"]
    assert fo.value > 0 and fo.reference == rows["ppo_env_steps_per_s"].value
    comp = rows["compositional_env_steps_per_s"]
    assert comp.value is None and "not available" in comp.notes
    assert comp.target == ">=0.8" and comp.meets_target is None
    assert rows["reptile_env_steps_per_s"].value is None
    assert "failed: RuntimeError: boom" in rows["reptile_env_steps_per_s"].notes


def test_method_sps_through_cli_continues_after_failure(tmp_path, monkeypatch):
    """The runner records an error row, keeps the measured rows and exits with status 1."""

    def failing(quick: bool = False, **_):
        err = RuntimeError("method_sps: training failed for x")
        err.rows = [Row("method_sps", "ppo_env_steps_per_s", 1.0)]
        raise err

    monkeypatch.setattr(bench_methods, "run", failing)
    path = tmp_path / "r.csv"
    assert run.main(["--only", "method_sps", "--csv", str(path)]) == 1
    rows = _rows(path)
    assert [r["metric"] for r in rows] == ["ppo_env_steps_per_s", "error"]
    assert "training failed for x" in rows[1]["notes"]


def test_paired_ratio_uses_the_ppo_runs_around_each_method_run(monkeypatch):
    """PPO and the method alternate; each ratio divides by the mean of its two PPO neighbours,
    and the row reports the median (here PPO speeds jump between 100 and 250 while the method runs at
    half of its neighbours' mean: every paired ratio is 0.5, while its ratio to the first PPO run
    alone would be 0.75-0.875)."""
    speeds = iter([100.0, 75.0, 200.0, 75.0, 100.0, 87.5, 250.0])  # ppo, m, ppo, m, ppo, m, ppo
    calls = []

    def fake_train_sps(method, overrides, budget, out, seed=0, num_envs=8, history=None):
        calls.append(method)
        sps = next(speeds)
        if method == "ppo":  # 1000 steps at 1000 us each inside training_step
            history += [
                {"env_steps": 500, "charts/SPS": 1000.0},
                {"env_steps": 1000, "charts/SPS": 1000.0},
            ]
        else:  # phase 1: 300 steps at 3000 us, phase 2: 700 steps at 1500 us
            history += [
                {"env_steps": 300, "charts/phase": 1.0, "charts/SPS": 1e6 / 3000},
                {"env_steps": 1000, "charts/phase": 2.0, "charts/SPS": 1e6 / 1500},
            ]
        return 1000, 1000 / sps

    monkeypatch.setattr(bench_methods, "train_sps", fake_train_sps)
    monkeypatch.setattr(bench_methods, "PAIRED_REPEATS", 3)
    row = bench_methods.paired_row("compositional", "compositional", {}, False, None)
    assert calls == ["ppo", "compositional"] * 3 + ["ppo"]
    assert row.value == pytest.approx(0.5) and row.ratio == pytest.approx(0.5)
    assert row.metric == "compositional_paired_ratio_to_ppo" and row.meets_target is False
    # the per-phase split of the time inside training_step, against PPO's
    assert "phase 1: 3000 us per env step (3.00x PPO's 1000 us)" in row.notes
    assert "phase 2: 1500 us per env step (1.50x PPO's 1000 us)" in row.notes


def test_phase_seconds_splits_a_run_by_phase():
    hist = [
        {"env_steps": 100, "charts/phase": 1.0, "charts/SPS": 50.0},  # 2 s
        {"env_steps": 300, "charts/phase": 1.0, "charts/SPS": 100.0},  # 2 s
        {"env_steps": 400, "charts/phase": 2.0, "charts/SPS": 400.0},  # 0.25 s
        {"env_steps": 400, "charts/phase": 2.0},  # no SPS (e.g. an evaluation row): skipped
    ]
    assert bench_methods.phase_seconds(hist) == {1: (300, 4.0), 2: (100, 0.25)}
    assert bench_methods.phase_seconds([{"env_steps": 10, "charts/SPS": 5.0}]) == {0: (10, 2.0)}


def test_batched_env_rows(tmp_path):
    """batched_env at smoke sizes for one method: the raw-env row and the training row."""
    from benchmarks import bench_batched

    rows = bench_batched.run(quick=True, workdir=str(tmp_path), methods=["ppo"])
    got = {r.metric: r for r in rows}
    assert set(got) == {
        "raw_env_steps_per_s",
        "ppo_train_env_steps_per_s",
        "ppo_update_ceiling_env_steps_per_s",
        "ppo_profile_env_steps_per_s",
    }
    # the ceiling's reference is the per-env PPO run of the training row
    ceiling = got["ppo_update_ceiling_env_steps_per_s"]
    assert ceiling.reference == got["ppo_train_env_steps_per_s"].reference
    assert "update" in got["ppo_profile_env_steps_per_s"].notes
    assert got["raw_env_steps_per_s"].target == ">=30"
    for r in rows:
        assert r.value > 0 and (r.reference is None or r.reference > 0)
    with pytest.raises(ValueError, match="unknown method label 'nope'"):
        bench_batched.run(quick=True, methods=["nope"])
