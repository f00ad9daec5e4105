"""Skill learning from a fixed, perfect DIAYN reward (experiments.disc_fixed)."""

from __future__ import annotations

import json

import pytest
import torch

from experiments.disc_ceiling import make_zones, room_cells
from experiments.disc_fixed import ZoneDiscriminator, fixed_reward_run, main
from primitives.discovery import PhiEncoder

torch.set_num_threads(1)


def _phi(x: int, y: int) -> torch.Tensor:
    # [x, y, carried, on_grid x7, door_open] as CompoGridEnv.phi lays it out
    return torch.tensor([x, y, 0, 1, 1, 1, 1, 1, 1, 1, 0])


def test_zone_discriminator_labels_every_room_cell_with_its_zone():
    enc = PhiEncoder("grid", 11, 8)
    disc = ZoneDiscriminator(8, 12, logit=3.0)
    for z, cells in enumerate(make_zones(8, 12)):
        for x, y in cells:
            logits = disc(enc(_phi(x, y).unsqueeze(0)))[0]
            assert int(logits.argmax()) == z and float(logits[z]) == 3.0
            assert float(logits.sum()) == 3.0  # one-hot
    assert (6, 3) not in room_cells(8)  # the corridor behind the inner wall
    assert float(disc(enc(_phi(6, 3).unsqueeze(0))).abs().sum()) == 0.0  # uniform q there


def test_tiny_run_reports_per_iteration_and_final_accuracy(tmp_path):
    over = {
        "num_envs": 2, "total_env_steps": 64,
        "training": {"ppo": {"num_steps": 16, "update_epochs": 1, "num_minibatches": 2}},
    }  # fmt: skip
    rep = fixed_reward_run(4, 0, over, eval_steps=8)
    assert rep["env_steps"] == 64 and len(rep["accuracy_per_iteration"]) == 2
    for key in ("accuracy_last10", "eval_accuracy", "eval_accuracy_greedy"):
        assert 0.0 <= rep[key] <= 1.0
    out = tmp_path / "r.json"
    main(["--num-skills", "4", "--eval-steps", "8", "--out", str(out), "--set", "num_envs=2",
          "--set", "total_env_steps=32", "--set", "training.ppo.num_steps=16"])  # fmt: skip
    assert json.loads(out.read_text())["num_skills"] == 4


@pytest.mark.parametrize(
    "args, match",
    [
        (["--eval-steps", "0"], "eval_steps=0"),
        (["--logit", "-1"], "logit=-1.0"),
        (["--set", "objective=supervised"], "objective='supervised'"),
        (["--set", "training.curriculum_threshold=0.8"], "curriculum_threshold=0.8"),
    ],
)
def test_bad_arguments_are_refused_before_writing(tmp_path, args, match):
    out = tmp_path / "never.json"
    with pytest.raises(SystemExit, match=match):
        main([*args, "--out", str(out)])
    assert not out.exists()
