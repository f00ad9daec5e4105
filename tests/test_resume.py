"""``compo train`` survives SIGKILL: a killed run resumed with ``--resume`` ends bit-for-bit
where the uninterrupted run ends (parameters, optimisers, collector and RNG states, counters,
``train_log.jsonl``); a run folder holds one run (issue 14).

The killed runs are real ``compo`` processes (the console script) killed with SIGKILL at two
points: as soon as the first checkpoint exists, and half-way; the last resume and the
uninterrupted reference run in-process (same code path, ``experiments.cli.main``).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from experiments.cli import main
from rl.io import read_jsonl
from rl.train import read_checkpoint

#: per method: a tiny config and its number of iterations (each a fraction of a second)
GRID7 = {"task_info": "reward", "size": 7, "max_steps": 6}
CONFIGS = {
    "ppo": {
        "total_env_steps": 16 * 2 * 32,
        "num_envs": 2,
        "ppo": {"num_steps": 32, "update_epochs": 1},
    },
    "rl2": {
        "compositions": ["goto(red ball)", "goto(blue ball)"],
        "env_kwargs": GRID7,
        "episodes_per_trial": 2,
        "rnn": "gru",
        "hidden": 16,
        "head_hidden": 16,
        "bptt_len": 8,
        "num_envs": 2,
        "total_env_steps": 16 * 2 * 32,
        "ppo": {"num_steps": 32, "num_minibatches": 2, "update_epochs": 1},
    },
    # phase 1 (skills) is 4 iterations, phase 2 (controller) 8: the first kill lands in
    # phase 1, the second in phase 2, so the first resume crosses the phase boundary
    "compositional": {
        "primitives": "supervised",
        "env_kwargs": {"task_info": "reward", "size": 8, "max_steps": 12},
        "num_envs": 2,
        "episodes_per_trial": 2,
        "hidden": 16,
        "key_dim": 8,
        "library_hidden": 16,
        "total_env_steps": 640,
        "library_fraction": 0.2,
        "ppo": {"num_steps": 32, "update_epochs": 1, "num_minibatches": 2},
        "skills": {"num_steps": 16, "ppo": {"update_epochs": 1, "num_minibatches": 2}},
    },
    "maml": {
        "compositions": ["goto(red ball)", "goto(green key)"],
        "meta_batch_size": 2,
        "episodes_per_trial": 1,
        "env_kwargs": {"size": 7, "max_steps": 10},
        "hidden": 16,
        "total_env_steps": 400,
    },
    "pearl": {
        "compositions": ["goto(red ball) > goto(blue ball)", "pickup(green key) > open(door)"],
        "env_kwargs": {"task_info": "reward", "size": 7, "max_steps": 20},
        "num_envs": 2,
        "total_env_steps": 800,
        "num_train_tasks": 3,
        "meta_batch": 2,
        "num_grad_steps": 2,
        "batch_size": 16,
        "context_batch": 8,
        "hidden": 32,
        "encoder_hidden": 32,
        "replay_capacity": 300,
        "context_capacity": 64,
    },
    "discovery": {
        "num_envs": 2,
        "num_skills": 3,
        "total_env_steps": 12 * 2 * 16,
        "training": {"ppo": {"num_steps": 16, "update_epochs": 1, "num_minibatches": 2}},
    },
}
CONFIGS["fomaml"] = CONFIGS["reptile"] = CONFIGS["maml"]
#: logged values that measure wall-clock time, not training
TIMING = ("charts/SPS", "time/")


def _compo() -> list[str]:
    script = Path(sys.executable).parent / "compo"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "experiments.cli"]


def _args(method: str, out: Path, cfg_file: Path, *extra: str) -> list[str]:
    return ["train", "--method", method, "--config", str(cfg_file), "--out", str(out), *extra]


def _rows(out: Path) -> list[dict]:
    log = out / "train_log.jsonl"
    return read_jsonl(log) if log.is_file() else []


def _kill_when(args: list[str], ready, timeout: float = 180.0) -> None:
    """Run ``compo ARGS`` and SIGKILL it as soon as ``ready()`` holds."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [*_compo(), *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env
    )
    t0 = time.monotonic()
    try:
        while not ready():
            if proc.poll() is not None:
                pytest.fail(f"compo exited ({proc.returncode}) before the kill point: "
                            f"{proc.stderr.read().decode()[-2000:]}")  # fmt: skip
            if time.monotonic() - t0 > timeout:
                pytest.fail("kill point not reached in time")
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL


def _ckpt_iteration(out: Path) -> int:
    return int(read_checkpoint(out / "checkpoints" / "last.ckpt")["rl_state"]["iteration"])


def _assert_equal(a, b, where: str = "") -> None:
    """Recursive equality of checkpoint contents (tensors bit-for-bit)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            _assert_equal(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b or (a != a and b != b), f"{where}: {a!r} != {b!r}"


def _untimed(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith(TIMING)} for r in rows]


def _assert_same_run(ref: Path, run: Path) -> None:
    a = read_checkpoint(ref / "checkpoints" / "final.ckpt")
    b = read_checkpoint(run / "checkpoints" / "final.ckpt")
    for key in ("state_dict", "optimizer_states", "hyper_parameters"):
        _assert_equal(a[key], b[key], key)
    # counters, collector, RNG states and method extras (buffers, skill trainer...)
    _assert_equal(a["rl_state"], b["rl_state"], "rl_state")
    ra, rb = _rows(ref), _rows(run)
    assert [r["iteration"] for r in rb] == list(range(1, a["rl_state"]["iteration"] + 1))
    assert _untimed(ra) == _untimed(rb)


def _kill_and_resume(tmp_path: Path, method: str, kill_at: tuple[int, ...]) -> None:
    """Kill at each of ``kill_at`` (0: as soon as the first checkpoint exists; n: once n
    iterations are logged), each time resuming with ``--resume``; then resume to the end and
    compare with the uninterrupted run."""
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(yaml.safe_dump({**CONFIGS[method], "seed": 3}))
    ref, run = tmp_path / "ref", tmp_path / "run"
    assert main(_args(method, ref, cfg_file)) == 0
    total = len(_rows(ref))
    reached = [0]
    for i, n in enumerate(kill_at):
        resume = ("--resume",) if i else ()

        def ready(n=n) -> bool:
            if n == 0:
                return (run / "checkpoints" / "last.ckpt").is_file()
            return len(_rows(run)) >= n

        _kill_when(_args(method, run, cfg_file, *resume), ready)
        reached.append(_ckpt_iteration(run))
    # every kill landed mid-run, each further on than the one before
    assert reached == sorted(set(reached)) and reached[-1] < total
    assert not (run / "checkpoints" / "final.ckpt").exists()

    assert main(_args(method, run, cfg_file, "--resume")) == 0
    _assert_same_run(ref, run)


@pytest.mark.parametrize("method", ["ppo", "rl2"])
def test_killed_twice_resumes_bit_for_bit(tmp_path, method):
    _kill_and_resume(tmp_path, method, kill_at=(0, 10))


def test_compositional_killed_in_each_phase_resumes_bit_for_bit(tmp_path):
    from compositional.agent import CompositionalAgent

    ag = CompositionalAgent({**CONFIGS["compositional"], "seed": 3})
    assert (ag.phase1_iters, ag.phase2_iters) == (4, 8)
    # first kill in phase 1, second in phase 2: the run resumes across the phase boundary
    _kill_and_resume(tmp_path, "compositional", kill_at=(0, ag.phase1_iters + 3))


@pytest.mark.slow
@pytest.mark.parametrize("method", ["maml", "fomaml", "reptile", "pearl", "discovery"])
def test_other_methods_killed_resume_bit_for_bit(tmp_path, method):
    """One kill each (two real processes per method would double the cost)."""
    from experiments.registry import method_class

    n = method_class(method)({**CONFIGS[method], "seed": 3}).iterations()
    _kill_and_resume(tmp_path, method, kill_at=(max(2, min(n // 2, 3)),))


# -- a run folder belongs to one run ---------------------------------------------------------------
TINY = ["--set", "total_env_steps=256", "--set", "num_envs=2", "--set", "ppo.num_steps=32"]


def _snapshot(folder: Path) -> dict:
    return {
        str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None)
        for p in sorted(folder.rglob("*"))
    }


@pytest.fixture()
def finished(tmp_path) -> Path:
    out = tmp_path / "run"
    assert main(["train", "--method", "ppo", "--out", str(out), *TINY]) == 0
    return out


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--seed", "5"], "seed=0, this command has seed=5"),
        (["--set", "ppo.lr=0.001"], "ppo.lr=0.0005, this command has ppo.lr=0.001"),
        (["--set", "total_env_steps=512"], "total_env_steps=256"),
    ],
)
def test_resume_refuses_another_config(finished, capsys, extra, match):
    before = _snapshot(finished)
    assert (
        main(["train", "--method", "ppo", "--out", str(finished), *TINY, *extra, "--resume"]) == 2
    )
    err = capsys.readouterr().err
    assert match in err and err.count("\n") == 1
    assert _snapshot(finished) == before


def test_resume_refuses_another_method(finished, capsys):
    before = _snapshot(finished)
    assert main(["train", "--method", "rl2", "--out", str(finished), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "method='ppo', this command has method='rl2'" in err and err.count("\n") == 1
    assert _snapshot(finished) == before


@pytest.mark.parametrize(
    "content", [b"", b"\x00garbage" * 7, None], ids=["empty", "random", "truncated"]
)
def test_resume_refuses_unreadable_checkpoint(finished, capsys, content):
    last = finished / "checkpoints" / "last.ckpt"
    data = last.read_bytes()
    (finished / "checkpoints" / "final.ckpt").unlink()
    last.unlink()  # final.ckpt was a hard link to it: write a fresh file, not through the link
    last.write_bytes(data[: len(data) // 2] if content is None else content)
    before = _snapshot(finished)
    assert main(["train", "--method", "ppo", "--out", str(finished), *TINY, "--resume"]) == 2
    err = capsys.readouterr().err
    assert "is not a readable checkpoint" in err and err.count("\n") == 1
    assert "weights_only" not in err
    assert _snapshot(finished) == before


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--resume"], "holds no run to resume"),
        (["--resume", "--overwrite"], "--resume and --overwrite exclude each other"),
        (["--checkpoint-every", "0"], "--checkpoint-every 0"),
    ],
)
def test_bad_resume_arguments(tmp_path, capsys, argv, match):
    out = tmp_path / "none"
    assert main(["train", "--method", "ppo", "--out", str(out), *TINY, *argv]) == 2
    err = capsys.readouterr().err
    assert match in err and err.count("\n") == 1
    assert not out.exists()


def test_finished_run_resumed_trains_nothing(finished, capsys):
    capsys.readouterr()
    before = _snapshot(finished)
    assert main(["train", "--method", "ppo", "--out", str(finished), *TINY, "--resume"]) == 0
    assert "256 env steps, 4 iterations" in capsys.readouterr().out
    assert _snapshot(finished) == before
    # final.ckpt is the finished run's last.ckpt, not a second copy of it
    ckpts = finished / "checkpoints"
    assert os.path.samefile(ckpts / "final.ckpt", ckpts / "last.ckpt")


def test_overwrite_clears_the_old_run(finished):
    (finished / "checkpoints" / "last-v1.ckpt").write_bytes(b"from an older version")
    argv = ["train", "--method", "ppo", "--out", str(finished), "--overwrite", "--seed", "5"]
    assert main([*argv, "--set", "total_env_steps=128", "--set", "num_envs=2",
                 "--set", "ppo.num_steps=32"]) == 0  # fmt: skip
    assert [r["iteration"] for r in _rows(finished)] == [1, 2]
    assert sorted(p.name for p in (finished / "checkpoints").iterdir()) == [
        "final.ckpt",
        "last.ckpt",
    ]
    assert len(list((finished / "tb").rglob("events.out.tfevents*"))) == 1
    cfg = yaml.safe_load((finished / "config.yaml").read_text())
    ckpt = read_checkpoint(finished / "checkpoints" / "last.ckpt")
    assert cfg["seed"] == ckpt["hyper_parameters"]["config"]["seed"] == 5


def test_overwrite_refuses_a_folder_of_something_else(finished, capsys):
    (finished / "notes.txt").write_text("mine")
    before = _snapshot(finished)
    assert main(["train", "--method", "ppo", "--out", str(finished), *TINY, "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "holds 'notes.txt', which compo train did not write" in err
    assert _snapshot(finished) == before


def test_resume_repairs_torn_log_and_removes_temp_files(tmp_path, monkeypatch):
    """A run killed mid-way (rows logged after its checkpoint, a torn last line, temp files
    of interrupted writes) resumes to the uninterrupted run's log and checkpoint."""
    import rl.train

    snaps = tmp_path / "snaps"
    snaps.mkdir()
    save = rl.train.LastCheckpoint._save

    def save_and_keep(self, trainer):  # keep every checkpoint the run writes
        save(self, trainer)
        shutil.copy(self.dir / "last.ckpt", snaps / f"{trainer.current_epoch + 1}.ckpt")

    monkeypatch.setattr(rl.train.LastCheckpoint, "_save", save_and_keep)
    ref = tmp_path / "ref"
    assert main(["train", "--method", "ppo", "--out", str(ref), *TINY]) == 0
    monkeypatch.undo()
    # the folder of a run killed while writing row 4, with the checkpoint of iteration 2
    run = tmp_path / "cut"
    shutil.copytree(ref, run)
    shutil.rmtree(run / "checkpoints")
    (run / "checkpoints").mkdir()
    shutil.copy(snaps / "2.ckpt", run / "checkpoints" / "last.ckpt")
    rows = (run / "train_log.jsonl").read_text().splitlines(keepends=True)
    (run / "train_log.jsonl").write_text("".join(rows[:3]) + rows[3][:17])
    temps = [run / "checkpoints" / ".last.ckpt.x1y2.tmp", run / ".train_log.jsonl.ab.tmp"]
    for t in temps:
        t.write_bytes(b"half")

    assert main(["train", "--method", "ppo", "--out", str(run), *TINY, "--resume"]) == 0
    assert not any(t.exists() for t in temps)
    _assert_same_run(ref, run)


def test_resume_before_first_checkpoint_starts_over(tmp_path, finished):
    run = tmp_path / "early"
    shutil.copytree(finished, run)
    shutil.rmtree(run / "checkpoints")  # killed before the first checkpoint was written
    (run / "train_log.jsonl").write_text('{"iteration": 1, "env_')
    assert main(["train", "--method", "ppo", "--out", str(run), *TINY, "--resume"]) == 0
    _assert_same_run(finished, run)


def test_read_jsonl_skips_only_a_torn_last_line(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text('{"a": 1}\n{"a": 2}\n{"a": 3, "b"')
    assert read_jsonl(log) == [{"a": 1}, {"a": 2}]
    log.write_text('{"a": 1}\n{"a": \n{"a": 3}\n')
    with pytest.raises(ValueError, match="line 2 is not JSON"):
        read_jsonl(log)


def test_unreadable_checkpoint_is_one_error_without_torch_warnings(tmp_path):
    """Bytes that start like a pickle of an unknown protocol make torch warn before it fails
    (os.urandom gives such a file once in 256): the caller gets our ValueError and no warning,
    so the CLI's error stays one line. A readable checkpoint still loads."""
    import warnings

    from rl.io import safe_torch_load

    bad = tmp_path / "proto241.ckpt"
    bad.write_bytes(b"\x80\xf1" + bytes(range(256)) * 8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ValueError, match="is not a readable checkpoint"):
            safe_torch_load(bad)
    assert [str(w.message) for w in caught] == []
    good = tmp_path / "good.ckpt"
    torch.save({"w": torch.arange(3)}, good)
    assert torch.equal(safe_torch_load(good)["w"], torch.arange(3))
