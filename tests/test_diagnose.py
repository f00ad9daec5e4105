"""``compo diagnose`` (experiments.diagnose, issue 16 item 2): end to end through the real
console script on tiny checkpoints trained here, the edit distance, and bad input."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from test_resume import CONFIGS, _compo

from envs.core import Composition
from experiments.cli import main
from experiments.diagnose import edit_distance, nearest_by_edit_distance
from experiments.registry import method_class
from rl.train import fit

P = Composition.parse
TASK = "goto(red ball) > open(door)"
SMALL = ["--set", "trials=3", "--set", "episodes=3", "--set", "train_tasks=8", "--set", "k=2"]


def test_edit_distance_of_hand_made_pairs():
    a = P("goto(red ball) > open(door)")
    assert edit_distance(a, a) == 0
    assert edit_distance(a, P("open(door)")) == 1  # one deletion
    assert edit_distance(a, P("goto(blue ball) > open(door)")) == 1  # one substitution
    assert edit_distance(a, P("open(door) > goto(red ball)")) == 2  # order matters
    b = P("goto(red ball) > pickup(green key) > open(door)")
    assert edit_distance(a, b) == edit_distance(b, a) == 1  # one insertion
    train = [P("open(door)"), P("goto(grey box) > goto(red ball)"), b]
    near = nearest_by_edit_distance(a, train, 2)
    assert [d["edit_distance"] for d in near] == [1, 1]
    assert {d["composition"] for d in near} == {"open(door)", str(b)}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Tiny trained checkpoints (a few hundred env steps each) of methods with and without a
    task embedding."""
    root = tmp_path_factory.mktemp("ckpt")
    out = {}
    for m in ("rl2", "pearl", "compositional", "maml"):
        fit(method_class(m)(dict(CONFIGS[m])), root / m, logger=False)
        out[m] = root / m / "checkpoints" / "final.ckpt"
    return out


def _diagnose(ckpt, out, *extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [*_compo(), "diagnose", "--checkpoint", str(ckpt), "--out", str(out), *SMALL, *extra]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.parametrize("method", ["rl2", "pearl", "compositional", "maml"])
def test_diagnose_end_to_end(method, checkpoints, tmp_path):
    out = tmp_path / "diag"
    r = _diagnose(checkpoints[method], out, "--composition", TASK)
    assert r.returncode == 0, r.stderr
    doc = json.loads((out / "diagnose.json").read_text())
    png = (out / "diagnose.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert doc["method"] == method and doc["composition"] == TASK
    a = doc["adaptation"]
    assert len(a["success_at"]) == len(a["return_at"]) == 3
    assert all(0 <= s <= 1 for s in a["success_at"])
    assert set(doc["verdicts"]) == {"adaptation", "gradients", "entropy", "embedding", "similar"}
    for line in doc["verdicts"].values():
        assert line and "\n" not in line
        assert line in r.stdout  # printed, one line each
    # entropy per episode of every acting distribution
    names = {"compositional": {"controller", "skills"}}.get(method, {"policy"})
    assert set(doc["entropy"]) == names
    assert all(len(c) == 3 and min(c) >= 0 for c in doc["entropy"].values())
    edit = doc["similar"]["by_edit_distance"]
    assert len(edit) == 2 and edit[0]["edit_distance"] <= edit[1]["edit_distance"]
    e = doc["embedding"]
    if method == "maml":  # no task memory: skipped and said so, the rest ran
        assert "no task memory" in e["skipped"] and "skipped" in doc["verdicts"]["embedding"]
        norms = doc["gradients"]["inner_grad_norm_after"]
        # meta-test adapts after every episodes_per_trial (1) episodes, the last one included
        assert set(norms) == {"0", "1", "2"} and all(v >= 0 for v in norms.values())
    else:
        assert len(e["pca"]) == len(e["train_tasks"]) + 1  # the training tasks, then this task
        assert len(e["nearest_by_embedding"]) == 2 and e["embedding_dim"] >= 2
        d = [n["distance"] for n in e["nearest_by_embedding"]]
        assert d == sorted(d)
        assert "skipped" in doc["gradients"]  # adapts through memory, not gradient steps


def test_diagnose_by_heldout_index(checkpoints, tmp_path):
    out = tmp_path / "diag"
    r = _diagnose(checkpoints["rl2"], out, "--task", "0")
    assert r.returncode == 0, r.stderr
    doc = json.loads((out / "diagnose.json").read_text())
    assert doc["heldout"] is True


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--composition", "fly(red ball)"], "is not in the checkpoint's task family 'grid'"),
        (["--composition", "door-open"], "cannot parse primitive 'door-open'"),
        (["--task", "100000"], "--task 100000; allowed: 0.."),
        (["--composition", TASK, "--set", "trials=0"], "trials=0; allowed: an integer >= 1"),
        (["--composition", TASK, "--set", "depth=2"], "unknown config key 'depth'"),
    ],
)
def test_bad_input_is_one_line_exit_2_nothing_written(argv, match, checkpoints, tmp_path, capsys):
    out = tmp_path / "diag"
    args = ["diagnose", "--checkpoint", str(checkpoints["rl2"]), "--out", str(out), *argv]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert match in err and "\n" not in err
    assert not out.exists()


def test_composition_and_task_exclude_each_other(checkpoints, tmp_path):
    args = ["diagnose", "--checkpoint", str(checkpoints["rl2"]), "--out", str(tmp_path / "d")]
    with pytest.raises(SystemExit) as e:
        main([*args, "--composition", TASK, "--task", "0"])
    assert e.value.code == 2
    with pytest.raises(SystemExit):
        main(args)
