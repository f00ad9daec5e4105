"""A table run in parts and merged equals the table run at once."""

from __future__ import annotations

import json

from experiments.cli import main
from experiments.merge import main as merge_main

COMMON = [
    "--set", "methods=[ppo]", "--set", "total_env_steps=512", "--set", "num_envs=2",
    "--set", "eval.num_tasks=4", "--set", "eval.episodes=2", "--set", "eval.num_envs=2",
]  # fmt: skip


def _run(tmp_path, name, seeds, refs="[random]"):
    out = tmp_path / name
    args = ["heldout", "--out", str(out), *COMMON, "--set", f"seeds={seeds}"]
    assert main([*args, "--set", f"references={refs}"]) == 0
    return out


def test_parts_merge_to_the_whole(tmp_path, capsys):
    whole = _run(tmp_path, "whole", "[0, 1, 2]")
    a = _run(tmp_path, "a", "[0, 2]")
    b = _run(tmp_path, "b", "[1]")
    assert merge_main([str(a), str(b), "--out", str(tmp_path / "merged")]) == 0
    got = json.loads((tmp_path / "merged" / "results.json").read_text())
    want = json.loads((whole / "results.json").read_text())
    for m in ("ppo", "random"):
        for k in ("success_at", "success_ci", "auc", "aggregates", "seeds"):
            assert got["methods"][m][k] == want["methods"][m][k], (m, k)
    assert got["probability_of_improvement"] == want["probability_of_improvement"]
    assert len(got["merged_from"]) == 2 and "python -m experiments.merge" in got["command"]
    # the same seed twice, or parts of different tables, are refused in one line
    assert merge_main([str(a), str(a), "--out", str(tmp_path / "x")]) == 2
    other = tmp_path / "other"
    args = ["heldout", "--out", str(other), *COMMON, "--set", "seeds=[3]"]
    assert main([*args, "--set", "references=[]", "--set", "eval.seed=7"]) == 0
    assert merge_main([str(a), str(other), "--out", str(tmp_path / "y")]) == 2
    err = capsys.readouterr().err
    assert "seeds [0, 2]" in err and "heldout_tasks" in err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
    # a merged table merges again (its parts stay in merged_from); --replace takes a row from
    # the last part that has it, so a row re-run from scratch replaces the earlier one
    again = tmp_path / "again"
    assert merge_main([str(tmp_path / "merged"), str(whole), "--out", str(again)]) == 2
    args = [str(tmp_path / "merged"), str(whole), "--out", str(again), "--replace", "ppo"]
    assert merge_main(args) == 2  # random clashes still
    assert not again.exists()
    assert merge_main([*args, "--replace", "random"]) == 0
    doc = json.loads((again / "results.json").read_text())
    assert doc["methods"]["ppo"]["seeds"] == [0, 1, 2] and "--replace ppo" in doc["command"]
    assert doc["methods"]["ppo"]["success_at"] == want["methods"]["ppo"]["success_at"]
    assert len(doc["merged_from"][0]["merged_from"]) == 2
    assert merge_main([str(a), "--out", str(tmp_path / "z2"), "--replace", "nope"]) == 2
    assert "--replace 'nope': no part has that row" in capsys.readouterr().err
    # --drop leaves a row out of the merged table; the statistics are those without it
    dropped = tmp_path / "dropped"
    assert (
        merge_main([*args, "--replace", "random", "--drop", "random", "--out", str(dropped)]) == 0
    )
    doc = json.loads((dropped / "results.json").read_text())
    assert "random" not in doc["methods"] and "random" not in doc["scores"]["methods"]
    assert doc["methods"]["ppo"]["success_at"] == want["methods"]["ppo"]["success_at"]
    assert (
        "--drop random" in doc["command"] and "| random |" not in (dropped / "table.md").read_text()
    )
    assert merge_main([str(a), "--out", str(tmp_path / "z3"), "--drop", "nope"]) == 2
    assert "--drop 'nope': no part has that row" in capsys.readouterr().err
    assert not (tmp_path / "z3").exists()


def test_missing_run_is_one_line(tmp_path, capsys):
    assert merge_main([str(tmp_path / "nope"), "--out", str(tmp_path / "z")]) == 2
    assert "merge: error:" in capsys.readouterr().err and not (tmp_path / "z").exists()
