"""Scripted-skill ceiling of DIAYN's discriminator accuracy (experiments.disc_ceiling)."""

from __future__ import annotations

import json

import pytest
import torch

from envs.grid import ENTITIES
from experiments.disc_ceiling import ScriptedSkills, ceiling, main, make_zones, room_cells
from rl.collect import make_vector_env

torch.set_num_threads(1)


def test_zones_partition_the_room_into_contiguous_runs():
    cells = room_cells(8)
    assert len(cells) == 4 * 6 and len(set(cells)) == len(cells)
    for k in (1, 4, 12, 24):
        zones = make_zones(8, k)
        assert len(zones) == k and sorted(c for z in zones for c in z) == sorted(cells)
        for z in zones:  # consecutive cells of a zone are grid neighbours
            assert all(abs(a[0] - b[0]) + abs(a[1] - b[1]) == 1 for a, b in zip(z, z[1:]))
    with pytest.raises(ValueError, match="25 zones"):
        make_zones(8, 25)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cells_skills_park_on_their_targets_in_a_free_room(seed):
    envs = make_vector_env(
        "CompoGrid-v0", 1, {"composition": "pickup(red ball) > open(door)"}, vectorization="sync"
    )
    try:
        pol = ScriptedSkills(envs, 4, "cells")
        targets = {pol.target(k) for k in range(4)}
        assert len(targets) == 4  # one target cell per skill
        for k in range(4):
            envs.reset(seed=seed * 10 + k)
            e = envs.envs[0].unwrapped
            for name in ENTITIES[:-1]:  # every object but the door: an empty room
                e.grid.set(*e.entity_cell(name), None)
            for _ in range(40):
                a, goal = pol.act(e, k)
                e.step(a)
            assert goal == pol.target(k)
            assert (int(e.agent_pos[0]), int(e.agent_pos[1])) == pol.target(k)
            # parked: the skill's action now changes nothing
            before = e.phi().tolist()
            e.step(pol.act(e, k)[0])
            assert e.phi().tolist() == before
    finally:
        envs.close()


def test_report_on_a_tiny_run(tmp_path):
    # episodes of 30 steps: enough of them (40) that the training envs hold every skill; the
    # held-out accuracy was 0.83-0.93 over seeds 0-4 at this size
    out = tmp_path / "ceiling.json"
    main(
        ["--num-skills", "4", "--steps", "300", "--num-envs", "4", "--test-envs", "1",
         "--epochs", "30", "--set", "env_kwargs.max_steps=30", "--out", str(out)]
    )  # fmt: skip
    rep = json.loads(out.read_text())
    assert rep["num_skills"] == 4 and rep["states"] == 300 * 4 and rep["family"] == "cells"
    keys = (
        "heldout_accuracy", "train_accuracy", "counting_train_accuracy",
        "counting_heldout_accuracy", "counting_heldout_coverage", "reached_target",
        "reached_goal", "steps_heading_for_target",
    )  # fmt: skip
    for key in keys:
        assert 0.0 <= rep[key] <= 1.0, key
    bins = rep["heldout_accuracy_by_step"]
    assert [b["steps"] for b in bins] == ["0-4", "5-9", "10-19", "20+"]
    assert sum(b["share_of_heldout_steps"] for b in bins) == pytest.approx(1.0)
    assert rep["episodes_finished"] >= 30 and rep["env_kwargs"] == {"max_steps": 30}
    # column-sized zones are never all blocked: every finished episode ends on its chosen cell,
    # and once parked the skills are told apart
    assert rep["reached_goal"] >= 0.9
    assert bins[-1]["heldout_accuracy"] > 0.7
    assert rep["heldout_accuracy"] > 2 * rep["chance"]
    assert rep["counting_train_accuracy"] > 0.7


def test_objects_family_carries_its_object():
    rep = ceiling(num_skills=4, steps=120, num_envs=3, test_envs=1, epochs=5, family="objects")
    assert rep["objects"] == ["red ball", "blue ball", "green key", "yellow key"]
    assert rep["episodes_finished"] >= 3 and rep["reached_goal"] >= 0.5


@pytest.mark.parametrize(
    "args, match",
    [
        (["--num-skills", "0"], "num_skills=0"),
        (["--test-envs", "0"], "test_envs=0"),
        (["--num-envs", "4", "--test-envs", "4"], "test_envs=4"),
        (["--steps", "0"], "steps=0"),
        (["--epochs", "0"], "epochs=0"),
        (["--num-skills", "25"], "25 zones"),
        (["--set", "vectorization=async"], "vectorization='async'"),
        (["--set", "objective=supervised"], "objective="),
        (["--set", "no_such_key=1"], "no_such_key"),
    ],
)
def test_bad_arguments_are_refused_before_writing(tmp_path, args, match):
    out = tmp_path / "ceiling.json"
    with pytest.raises(SystemExit, match=match):
        main([*args, "--steps" if "--steps" not in args else "--seed", "8", "--out", str(out)])
    assert not out.exists()


def test_bad_arguments_raise_value_error():
    with pytest.raises(ValueError, match="num_skills=0"):
        ceiling(num_skills=0, steps=8)
    with pytest.raises(ValueError, match="family='x'"):
        ceiling(num_skills=4, steps=8, family="x")
    with pytest.raises(ValueError, match="test_envs=2"):
        ceiling(num_skills=4, steps=8, num_envs=2, test_envs=2)
