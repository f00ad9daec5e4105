"""``compo heldout --resume`` and ``compo ablate --resume`` survive SIGKILL (issue 14): finished
(method, seed) pairs are kept, the interrupted pair continues from its own training checkpoint,
and results.json's scores equal the uninterrupted run's bit for bit; held-out results reach a
Lightning logger (issue 15).

The killed runs are real ``compo heldout`` processes (the console script) killed with SIGKILL
at two points: during the first pair's training, and right after the first pair finished; the
last resume and the uninterrupted reference run in-process (``experiments.cli.main``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from test_resume import (  # the same SIGKILL harness as compo train's resume tests
    CONFIGS,
    _kill_when,
)

from experiments.cli import main
from rl.train import read_checkpoint

#: 2 methods x 2 seeds, 16 iterations of 64 env steps per pair, 4 held-out tasks x 2 episodes
RL2 = {"rnn": "gru", "hidden": 16, "head_hidden": 16, "bptt_len": 8, "episodes_per_trial": 2}
STEP = {"num_steps": 32, "update_epochs": 1, "num_minibatches": 2}
CFG = {
    "methods": ["ppo", "rl2"],
    "references": ["random", "ppo_finetune"],
    "seeds": [0, 1],
    "total_env_steps": 16 * 2 * 32,
    "num_envs": 2,
    "env_kwargs": {"task_info": "reward", "size": 7, "max_steps": 12},
    "method_config": {"ppo": {"hidden": 16, "ppo": STEP}, "rl2": {**RL2, "ppo": STEP}},
    "eval": {"episodes": 2, "num_tasks": 4, "num_envs": 4, "bootstrap": 20},
}


def _scores(out: Path) -> dict:
    doc = json.loads((out / "results.json").read_text())
    rows = {n: {k: m[k] for k in ("success_at", "return_at", "auc", "meta_train_env_steps")}
            for n, m in doc["methods"].items()}  # fmt: skip
    return {"scores": doc["scores"], "rows": rows, "pi": doc["probability_of_improvement"]}


def _pair(out: Path, name: str, seed: int) -> Path:
    return out / "pairs" / name / f"seed{seed}.json"


def _log_rows(folder: Path) -> int:
    log = folder / "train_log.jsonl"
    return len(log.read_text().splitlines()) if log.is_file() else 0


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, Path]:
    """The uninterrupted run and its config file."""
    tmp = tmp_path_factory.mktemp("heldout")
    cfg_file = tmp / "cfg.yaml"
    cfg_file.write_text(yaml.safe_dump(CFG))
    ref = tmp / "ref"
    assert main(["heldout", "--config", str(cfg_file), "--out", str(ref)]) == 0
    return ref, cfg_file


def test_heldout_killed_twice_resumes_to_the_same_table(tmp_path, reference):
    ref, cfg_file = reference
    run = tmp_path / "run"
    argv = ["heldout", "--config", str(cfg_file), "--out", str(run)]
    first = run / "ppo" / "seed0"
    # 1: in the middle of the first pair's training, once it has checkpoints
    _kill_when(argv, lambda: _log_rows(first) >= 6)
    assert (first / "checkpoints" / "last.ckpt").is_file()
    assert not (first / "checkpoints" / "final.ckpt").exists()
    assert not (run / "pairs" / "ppo").exists()
    done = int(read_checkpoint(first / "checkpoints" / "last.ckpt")["rl_state"]["iteration"])
    trained = (first / "train_log.jsonl").read_text().splitlines()[:done]
    # 2: resumed, then killed as soon as the first pair's results are stored
    _kill_when([*argv, "--resume"], lambda: _pair(run, "ppo", 0).is_file())
    kept = _pair(run, "ppo", 0).stat().st_mtime_ns
    first_log = (first / "train_log.jsonl").read_bytes()
    assert not (run / "results.json").exists()

    assert main([*argv, "--resume"]) == 0
    assert _scores(run) == _scores(ref)
    # the finished pair was kept, not trained or evaluated again
    assert _pair(run, "ppo", 0).stat().st_mtime_ns == kept
    assert (first / "train_log.jsonl").read_bytes() == first_log
    # the pair killed mid-training continued from its checkpoint: the rows before it are the
    # first process's (their timings too), and each iteration is logged once
    rows = first_log.decode().splitlines()
    assert rows[:done] == trained
    assert [json.loads(r)["iteration"] for r in rows] == list(range(1, 17))


def test_resume_refuses_another_config(tmp_path, reference, capsys):
    ref, cfg_file = reference
    before = {p: p.stat().st_mtime_ns for p in ref.rglob("*")}
    argv = ["heldout", "--config", str(cfg_file), "--out", str(ref), "--resume"]
    assert main([*argv, "--set", "eval.episodes=3"]) == 2
    err = capsys.readouterr().err
    assert "belongs to another run (eval.episodes=2, this command has eval.episodes=3)" in err
    assert err.count("\n") == 1
    assert {p: p.stat().st_mtime_ns for p in ref.rglob("*")} == before
    # nothing to resume in an empty folder
    assert main([*argv[:-2], str(tmp_path / "none"), "--resume"]) == 2
    assert "holds no run to resume" in capsys.readouterr().err
    assert not (tmp_path / "none").exists()


def test_finished_run_resumed_trains_nothing(tmp_path, reference):
    import shutil

    ref, cfg_file = reference
    run = tmp_path / "run"
    shutil.copytree(ref, run)
    (run / "results.json").unlink()
    ckpts = {p: p.stat().st_mtime_ns for p in run.rglob("*.ckpt")}
    assert main(["heldout", "--config", str(cfg_file), "--out", str(run), "--resume"]) == 0
    assert _scores(run) == _scores(ref)
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*.ckpt")} == ckpts


def test_heldout_results_reach_the_lightning_logger(reference):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ref, _ = reference
    doc = json.loads((ref / "results.json").read_text())
    acc = EventAccumulator(str(ref / "tb"))
    acc.Reload()
    for name, m in doc["methods"].items():
        curve = acc.Scalars(f"heldout/{name}/success")
        assert [e.step for e in curve] == [0, 1]
        assert [e.value for e in curve] == pytest.approx(m["success_at"])
        assert acc.Scalars(f"heldout/{name}/auc")[0].value == pytest.approx(m["auc"])


#: the tiny compositional agent of compo train's resume test: its budget and envs at the top
SHARED = ("env_kwargs", "num_envs", "total_env_steps")
ABLATE = {
    "variants": ["full", "composer=uniform"],
    "seed": 0,
    **{k: CONFIGS["compositional"][k] for k in SHARED},
    "base": {k: v for k, v in CONFIGS["compositional"].items() if k not in SHARED},
    "eval": {"episodes": 2, "num_tasks": 2, "num_envs": 2, "bootstrap": 20},
}


def test_ablate_killed_resumes_to_the_same_table(tmp_path):
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(yaml.safe_dump(ABLATE))
    ref, run = tmp_path / "ref", tmp_path / "run"
    assert main(["ablate", "--config", str(cfg_file), "--out", str(ref)]) == 0
    argv = ["ablate", "--config", str(cfg_file), "--out", str(run)]
    second = run / "compositional[composer=uniform]" / "seed0"
    # killed in the second row's training, after the first row finished
    _kill_when(argv, lambda: _log_rows(second) >= 5)
    kept = _pair(run, "compositional[full]", 0).stat().st_mtime_ns
    assert main([*argv, "--resume"]) == 0
    assert _pair(run, "compositional[full]", 0).stat().st_mtime_ns == kept
    assert _scores(run) == _scores(ref)
