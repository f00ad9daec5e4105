"""``compo`` talks to its user (issue 15, items 1-3), tested through the real console script:
a progress bar on a terminal only, the files written listed at the end, every config key
printable with type and default, a saved config.yaml that replays its run, the same scalars
in TensorBoard and CSV, ``--threads`` honoured, and conflicting keys refused."""

from __future__ import annotations

import csv
import json
import os
import pty
import re
import select
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from experiments.cli import main
from experiments.registry import METHODS, method_class
from rl.config import config_to_dict
from rl.config_keys import config_keys
from rl.io import safe_torch_load

COMPO = str(Path(sys.executable).with_name("compo"))
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TINY = ["--set", "total_env_steps=512", "--set", "num_envs=2", "--set", "ppo.num_steps=64"]
# what a progress bar draws: tqdm's bar and rate, carriage-return redraws
BAR_MARKS = ("env steps/s", "%|", "\r")


def compo(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [COMPO, *args], capture_output=True, text=True, env=ENV, cwd=cwd, timeout=600
    )


def compo_on_terminal(*args: str, cwd: Path) -> tuple[int, str]:
    """Run ``compo`` with stdout and stderr on a pseudo-terminal; its exit code and output."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [COMPO, *args], stdout=slave, stderr=slave, stdin=subprocess.DEVNULL, env=ENV, cwd=cwd
    )
    os.close(slave)
    chunks = []
    while True:
        ready, _, _ = select.select([master], [], [], 600)
        if not ready:
            proc.kill()
            raise TimeoutError("compo on a terminal did not finish")
        try:
            data = os.read(master, 4096)
        except OSError:  # the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    return proc.wait(), b"".join(chunks).decode(errors="replace")


def tb_scalar_tags(folder: Path) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return set(acc.Tags()["scalars"])


@pytest.fixture(scope="module")
def tb_run(tmp_path_factory):
    """A tiny PPO run, TensorBoard logger (the default), two threads, output not a terminal."""
    root = tmp_path_factory.mktemp("talk")
    out = root / "tb_run"
    r = compo("train", "--method", "ppo", "--out", str(out), "--threads", "2", *TINY, cwd=root)
    assert r.returncode == 0, r.stderr
    return root, out, r


def test_no_progress_bar_off_a_terminal_and_written_files_listed(tb_run):
    _root, out, r = tb_run
    for mark in BAR_MARKS:
        assert mark not in r.stdout + r.stderr
    wrote = [
        line.removeprefix("wrote ") for line in r.stdout.splitlines() if line.startswith("wrote ")
    ]
    assert wrote == [
        f"{out}/checkpoints/",
        f"{out}/config.yaml",
        f"{out}/tb/",
        f"{out}/train_log.jsonl",
    ]
    assert all(Path(p).exists() for p in wrote)


def test_threads_honoured(tb_run):
    # the count torch reports after training, not an echo of the option
    assert "2 torch threads" in tb_run[2].stdout


def test_saved_config_replays_the_run_and_csv_logs_the_same_scalars(tb_run):
    root, first, _ = tb_run
    out = root / "csv_run"
    saved = first / "config.yaml"
    r = compo(
        "train", "--config", str(saved), "--out", str(out), "--threads", "2", "--logger", "csv",
        cwd=root,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert yaml.safe_load((out / "config.yaml").read_text()) == yaml.safe_load(saved.read_text())
    a = safe_torch_load(first / "checkpoints" / "final.ckpt")["state_dict"]
    b = safe_torch_load(out / "checkpoints" / "final.ckpt")["state_dict"]
    assert a.keys() == b.keys() and a
    for k in a:
        assert torch.equal(a[k], b[k]), k
    with (out / "csv" / "metrics.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    names = set(rows[0]) - {"step"}
    assert names == tb_scalar_tags(first / "tb")
    assert "charts/SPS" in names and "losses/approx_kl" in names
    # x = env steps, as in train_log.jsonl
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [int(r["step"]) for r in rows] == [row["env_steps"] for row in log]
    assert not (out / "tb").exists()


@pytest.mark.parametrize("quiet", [False, True])
def test_progress_bar_on_a_terminal_unless_quiet(tmp_path, quiet):
    args = ["train", "--method", "ppo", "--out", str(tmp_path / "run"), *TINY]
    args += ["--set", "total_env_steps=256"] + (["--quiet"] if quiet else [])
    code, text = compo_on_terminal(*args, cwd=tmp_path)
    assert code == 0, text
    shown = "env steps/s" in text and "256/256" in text
    assert shown != quiet, text
    assert f"wrote {tmp_path / 'run'}/config.yaml" in text


def check_printed_config(method: str, text: str) -> None:
    """``text`` (``--print-config`` of ``method``) is a config file of every key of the method,
    each under a comment with its type and description."""
    cls = method_class(method).config_cls
    doc = yaml.safe_load(text)
    assert doc.pop("method") == method
    assert doc == config_to_dict(cls())  # loaded back: the method's default config
    lines = text.splitlines()
    keyed = [i for i, line in enumerate(lines) if re.fullmatch(r" *\w+: .+", line)]
    assert len(keyed) == 1 + len(config_keys(cls()))  # + the method line
    for i in keyed[1:]:
        assert re.fullmatch(r" *# [\w\[\] |,]+(, default .+)?: .+", lines[i - 1]), lines[i - 1]
    assert "# int: meta-training env-step budget\ntotal_env_steps: 300000" in text


def test_print_config_through_the_console_script(tmp_path):
    # the deepest config (sections two levels down: skills.ppo)
    r = compo("train", "--method", "compositional", "--print-config", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    check_printed_config("compositional", r.stdout)
    assert "\nskills:\n" in r.stdout and "\n  ppo:\n    # int" in r.stdout
    assert not list(tmp_path.iterdir())  # nothing written


@pytest.mark.parametrize("method", list(METHODS))
def test_print_config_lists_every_key_of_every_method(method, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--method", method, "--print-config"]) == 0
    check_printed_config(method, capsys.readouterr().out)
    assert not list(tmp_path.iterdir())


def test_print_config_shows_the_users_values_and_the_defaults(capsys):
    assert main(["train", "--method", "rl2", "--print-config", "--set", "ppo.lr=0.01"]) == 0
    text = capsys.readouterr().out
    assert "  # float, default 0.0005: Adam learning rate\n  lr: 0.01\n" in text


def test_help_points_at_print_config(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "--print-config" in out and "--logger" in out


def test_user_set_split_beats_the_default_compositions(capsys):
    # plain PPO's default compositions would otherwise silently replace the split's train side
    assert main(["train", "--method", "ppo", "--print-config", "--set", "split_seed=3"]) == 0
    doc = yaml.safe_load(capsys.readouterr().out)
    assert doc["compositions"] is None and doc["split_seed"] == 3


@pytest.mark.parametrize(
    "args, names",
    [
        (
            ["--set", "split_family=metaworld", "--composition", "pickup(red ball) > open(door)"],
            ("compositions=", "split_family='metaworld'"),
        ),
        (
            ["--composition", "open(door)", "--set", "compositions=[open(door)]"],
            ("--composition", "--set compositions"),
        ),
    ],
)
def test_conflicting_or_bad_keys_exit_2_and_write_nothing(tmp_path, args, names):
    out = tmp_path / "run"
    r = compo("train", "--method", "ppo", "--out", str(out), *args, cwd=tmp_path)
    assert r.returncode == 2
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and all(n in err[0] for n in names), r.stderr
    assert not out.exists() and not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    "args, names",
    [(["--threads", "0"], ("--threads 0", "allowed")), (["--accelerator", "tpu"], ("'tpu'",))],
)
def test_bad_trainer_options_exit_2_and_write_nothing(tmp_path, capsys, args, names):
    out = tmp_path / "run"
    assert main(["train", "--method", "ppo", "--out", str(out), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and all(n in err[0] for n in names)
    assert not out.exists()


def test_method_of_a_saved_config_must_agree(tb_run, tmp_path):
    root, first, _ = tb_run
    saved = str(first / "config.yaml")
    r = compo("train", "--method", "rl2", "--config", saved, "--out", str(tmp_path / "x"), cwd=root)
    assert r.returncode == 2
    assert "--method rl2 and config key method='ppo' conflict" in r.stderr
    assert not (tmp_path / "x").exists()


def test_csv_logger_of_a_resumed_run_keeps_the_rows_up_to_the_checkpoint(tmp_path):
    from rl.train import _make_logger

    first = _make_logger("csv", tmp_path, None)
    for step in (128, 256, 384):
        first.log_metrics({"charts/success": step / 1000, "losses/approx_kl": 0.01}, step=step)
    first.save()
    # resumed from a checkpoint at 256 env steps: it logs 384 again
    again = _make_logger("csv", tmp_path, purge_step=257)
    again.log_metrics({"charts/success": 0.5, "losses/approx_kl": 0.02}, step=384)
    again.save()
    with (tmp_path / "csv" / "metrics.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(int(r["step"]), float(r["charts/success"])) for r in rows] == [
        (128, 0.128), (256, 0.256), (384, 0.5),
    ]  # fmt: skip
