"""Pictures that explain themselves (issue 15, item 6): the statistics they print and what
each figure promises to show."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from experiments.embed import mantel_test


def _distances(x: np.ndarray) -> np.ndarray:
    return np.linalg.norm(x[:, None] - x[None], axis=-1)


def test_mantel_r_is_the_pearson_correlation_of_the_upper_triangles():
    rng = np.random.default_rng(0)
    a, b = _distances(rng.normal(size=(12, 3))), _distances(rng.normal(size=(12, 3)))
    iu = np.triu_indices(12, 1)
    r, _ = mantel_test(a, b, permutations=9)
    assert r == pytest.approx(np.corrcoef(a[iu], b[iu])[0, 1])


def test_mantel_detects_a_known_correlation():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(15, 2))
    a = _distances(x)
    b = _distances(x + 0.3 * rng.normal(size=x.shape))  # the same points, jittered
    r, p = mantel_test(a, b, permutations=199, seed=0)
    assert r > 0.8
    assert p == pytest.approx(1 / 200)  # no relabelling comes close
    r_neg, p_neg = mantel_test(a, a.max() - a, permutations=199)
    assert r_neg < -0.9 and p_neg > 0.95  # one-sided: a negative correlation is not evidence


def test_mantel_p_is_roughly_uniform_on_independent_matrices():
    rng = np.random.default_rng(2)
    ps = np.array(
        [
            mantel_test(
                _distances(rng.normal(size=(10, 2))),
                _distances(rng.normal(size=(10, 2))),
                permutations=99,
                seed=i,
            )[1]
            for i in range(200)
        ]
    )
    assert 0.4 < ps.mean() < 0.6
    assert (ps <= 0.05).mean() < 0.1  # about 5% false positives at the 5% level
    assert 0.15 < (ps <= 0.25).mean() < 0.35


def test_mantel_bad_input():
    with pytest.raises(ValueError, match="permutations=0"):
        mantel_test(np.zeros((3, 3)), np.zeros((3, 3)), permutations=0)
    with pytest.raises(ValueError, match=r"\(n, n\)"):
        mantel_test(np.zeros((3, 3)), np.zeros((4, 4)))
    r, p = mantel_test(np.ones((4, 4)), _distances(np.arange(4.0)[:, None]))
    assert np.isnan(r) and np.isnan(p)


# --- trace.gif and trace.png ---------------------------------------------------------------------

TINY_PPO = ["--set", "total_env_steps=256", "--set", "num_envs=2", "--set", "ppo.num_steps=64"]


@pytest.fixture(scope="module")
def ppo_ckpt(tmp_path_factory):
    from experiments.cli import main

    out = tmp_path_factory.mktemp("ppo")
    assert main(["train", "--method", "ppo", "--out", str(out), "--overwrite", *TINY_PPO]) == 0
    return str(out / "checkpoints" / "final.ckpt")


def test_annotated_frame_keeps_the_room_and_writes_the_text_beside_it():
    from experiments.trace_pictures import PANEL_PX, annotate_frame

    room = np.random.default_rng(0).integers(0, 255, size=(320, 320, 3), dtype=np.uint8)
    a = annotate_frame(room, [("step 1", (0, 0, 0)), ("skill 3: goto(red ball)", (0, 0, 0))])
    b = annotate_frame(room, [("step 2", (0, 0, 0)), ("skill 3: goto(red ball)", (0, 0, 0))])
    again = annotate_frame(room, [("step 1", (0, 0, 0)), ("skill 3: goto(red ball)", (0, 0, 0))])
    assert a.shape == (320, 320 + PANEL_PX, 3)
    assert np.array_equal(a[:, :320], room)  # the room itself is untouched
    assert np.array_equal(a, again)
    diff = np.flatnonzero(np.any(a != b, axis=(1, 2)))  # rows where the two frames differ
    assert len(diff) > 0 and diff.max() < 40  # only on the first text line ("step 1" / "2")
    assert not np.any(a[:, :320] != b[:, :320])
    small = annotate_frame(room[:64, :64], [("x", (0, 0, 0))])
    assert small.shape[0] >= 256  # a panel is never shorter than 256 px


def test_trace_gif_frames_are_readable_and_say_what_happens(ppo_ckpt, tmp_path):
    import json

    import imageio.v3 as iio

    from experiments.trace import run_trace
    from experiments.trace_pictures import frame_lines

    out = tmp_path / "trace"
    paths = run_trace(ppo_ckpt, "goto(red ball) > open(door)", out, episodes=2, log=lambda s: None)
    assert paths == [out / "trace.json", out / "trace.png", out / "trace.gif"]
    doc = json.loads((out / "trace.json").read_text())
    gif = iio.imread(out / "trace.gif")
    assert gif.shape[0] == len(doc["steps"]) == sum(e["length"] for e in doc["episodes"])
    assert gif.shape[1] >= 256 and gif.shape[2] >= 256  # was 64 px before issue 15
    lines = [frame_lines(doc, i) for i in range(len(doc["steps"]))]
    assert lines[0][0][0] == "ppo, trial step 0"
    assert any(text.startswith("action: ") for text, _ in lines[0])
    assert ("-->  goto(red ball)", (200, 0, 0)) in lines[0]  # the current sub-task
    last = lines[doc["episodes"][0]["length"] - 1]
    assert any(text.startswith("episode 0 ends: ") for text, _ in last)
    # different text -> different pixels in the panel
    for i in (0, 1, len(gif) - 2):
        assert lines[i] != lines[i + 1]
        assert np.any(gif[i][:, 320:] != gif[i + 1][:, 320:])
    assert (out / "trace.png").stat().st_size > 10_000


def test_trace_png_without_frames_or_sub_tasks(tmp_path):
    """A Meta-World-like trace (continuous actions, no sub-task) still draws."""
    from experiments.trace_pictures import plot_trace

    steps = [
        {"action": [0.1, -0.2, 0.3, 0.0], "value": 0.0, "reward": float(i % 3), "episode": i // 5}
        for i in range(10)
    ]
    doc = {
        "method": "pearl", "composition": "reach(puck) > push(puck)", "layout_seed": 0,
        "steps": steps,
        "episodes": [{"index": e, "return": 5.0, "success": e == 1, "length": 5} for e in (0, 1)],
    }  # fmt: skip
    plot_trace(doc, tmp_path / "t.png")
    assert (tmp_path / "t.png").stat().st_size > 5_000


# --- curves.png ----------------------------------------------------------------------------------


def test_curves_for_equal_and_unequal_seeds_x_tasks(tmp_path):
    from rl.protocol import plot_curves, summarize

    rng = np.random.default_rng(0)

    def method(seeds: int, tasks: int, trained: bool) -> dict:
        s = {i: (rng.uniform(size=(tasks, 4)) < 0.5).astype(float) for i in range(seeds)}
        return summarize(s, s, n_boot=50, meta_train_env_steps=0, wall_s=0.0, trained=trained)

    same = {"ppo": method(3, 4, True), "random": method(3, 4, False)}
    plot_curves(same, tmp_path / "same.png", title="t")
    mixed = {"ppo": method(3, 4, True), "rl2": method(1, 5, True)}
    plot_curves(mixed, tmp_path / "mixed.png", title="t")
    for name in ("same.png", "mixed.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"


# --- graph.png -----------------------------------------------------------------------------------


def test_write_graph_draws_matrix_and_graph(tmp_path):
    import torch

    from compositional.graph import SkillGraph, write_graph

    class Agent:  # what write_graph reads of the compositional agent
        graph = SkillGraph(4)

        def skill_names(self):
            return ["goto(door)", None, "open(door)", None]

    g = torch.Generator().manual_seed(0)
    prev, skill = (
        torch.randint(-1, 4, (300,), generator=g),
        torch.randint(0, 4, (300,), generator=g),
    )
    Agent.graph.update(prev, skill, (skill == (prev + 1) % 4).long())
    paths = write_graph(Agent(), tmp_path)
    assert (tmp_path / "graph.png").read_bytes()[:4] == b"\x89PNG"
    assert "open(door)" in (tmp_path / "graph.graphml").read_text()
    assert paths == {"png": str(tmp_path / "graph.png"), "graphml": str(tmp_path / "graph.graphml")}


def test_state_graph_picture_groups_oracle_states_by_situation(tmp_path):
    """graph='state': the situations are what the Oracle's states really hold (carrying the
    red ball while it solves pickup(red ball) > ..., the door open after open(door)), and
    each column of the picture averages the network over exactly those states."""
    import torch

    from compositional.agent import CompositionalAgent
    from compositional.graph import situation_states, situation_table, write_state_graph

    agent = CompositionalAgent(
        {"primitives": "supervised", "graph": "state", "env_kwargs": {"size": 8},
         "compositions": ["pickup(red ball) > open(door)"], "num_envs": 2}
    )  # fmt: skip
    states, labels = situation_states(agent, episodes=2)
    assert len(labels) == states.shape[0] and "carrying red ball" in labels
    assert any(lab.startswith("hands free, door") for lab in labels)
    # the observation's "red ball carried" bit (entity 0's second feature) agrees with the
    # label; a network that reads only that bit fills exactly that column
    carried = states[:, 1] > 0.5
    assert carried.tolist() == [lab == "carrying red ball" for lab in labels]
    with torch.no_grad():
        net = agent.graph.net
        net[0].weight.zero_()
        net[0].bias.zero_()
        net[0].weight[0, 1] = 1.0  # tanh(1) = 0.76 when carried, 0 otherwise
        net[2].weight[0, 0] = 30.0
        net[2].bias[0] = -11.0
    cols, count, mean = situation_table(agent.graph, states, labels)
    assert sum(count) == len(labels) and cols[0].startswith("hands free")
    j = cols.index("carrying red ball")
    assert mean[0, j] > 0.99 and np.delete(mean[0], j).max() < 1e-4
    assert np.allclose(mean[1:], 0.5)  # the other skills: no preference anywhere
    path = write_state_graph(agent, tmp_path)
    assert path == str(tmp_path / "state_graph.png")
    assert (tmp_path / "state_graph.png").read_bytes()[:4] == b"\x89PNG"


# --- the discovery table's picture ---------------------------------------------------------------


def test_library_picture_from_a_stored_table(tmp_path):
    import json
    from pathlib import Path

    from primitives.outcome_eval import plot_library

    table = Path(__file__).parents[1] / "results" / "discovery_seed0" / "table.json"
    plot_library(json.loads(table.read_text()), tmp_path / "table.png")
    assert (tmp_path / "table.png").stat().st_size > 20_000


# --- visitation heatmaps -------------------------------------------------------------------------


def test_visitation_heatmaps_draw_the_room(tmp_path):
    import torch

    from envs.grid import ENTITIES
    from primitives.discovery import _room_objects, save_heatmaps

    cells = _room_objects(8, layout_seed=3)
    assert set(cells) == set(ENTITIES)  # every object of the layout is drawn
    assert cells["door"][0] == 8 - 3  # in the inner wall
    assert all(1 <= x < 8 - 3 and 1 <= y < 7 for n, (x, y) in cells.items() if n != "door")
    visits = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(0))
    for seed, name in ((3, "fixed.png"), (None, "random.png")):
        save_heatmaps(visits, tmp_path / name, layout_seed=seed)
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"


# --- compo embed through the console script ------------------------------------------------------


def test_embed_prints_the_correlations_with_mantel_p_values(tmp_path):
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    compo = str(Path(sys.executable).parent / "compo")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    small = ["--set", "rnn=gru", "--set", "hidden=16", "--set", "num_layers=1"]
    ck = tmp_path / "rl2"
    subprocess.run(
        [compo, "train", "--method", "rl2", "--out", str(ck), *small, *TINY_PPO],
        check=True, capture_output=True, env=env,
    )  # fmt: skip
    out = tmp_path / "emb"
    run = subprocess.run(
        [compo, "embed", "--checkpoint", str(ck / "checkpoints" / "final.ckpt"), "--out",
         str(out), "--set", "num_tasks=8", "--set", "episodes=1", "--set", "permutations=99"],
        check=True, capture_output=True, text=True, env=env,
    )  # fmt: skip
    corr = json.loads((out / "embed.json").read_text())["correlation"]
    assert corr["permutations"] == 99 and corr["pairs"] == 28
    assert 0.01 <= corr["pearson_p"] <= 1 and 0.01 <= corr["spearman_p"] <= 1
    assert f"Pearson r = {corr['pearson']:.2f} (Mantel p = {corr['pearson_p']:.3g})" in run.stdout
    doc = json.loads((out / "embed.json").read_text())
    assert len(doc["pca_explained_variance"]) == 2 and sum(doc["pca_explained_variance"]) <= 1


def test_axes_figure_from_the_committed_tables(tmp_path, capsys):
    """``python -m experiments.axes_figure``: one picture from stored tables; bad parts are
    one line, exit 2, nothing written."""
    from experiments.axes_figure import bar, main, read_parts

    root = Path(__file__).resolve().parent.parent
    pair, length = root / "results" / "axes_pair", root / "results" / "axes_length"
    out = tmp_path / "axes.png"
    assert main([f"pair={pair}", f"length={length}", "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the bar is the table's zero-shot mean and interval
    ((_, doc),) = read_parts([f"pair={pair}"])
    mean, ci, n = bar(doc, "ppo")
    z = doc["methods"]["ppo"]["aggregates"]["zero_shot"]
    assert (mean, ci, n) == (z["mean"], tuple(z["mean_ci"]), 3)
    assert bar(doc, "compositional[discovered, +8M library]") is None  # not in it: a gap
    for args in (["nolabel"], [f"x={tmp_path / 'missing'}"], [f"pair={pair}"]):
        bad = tmp_path / "bad.png" if args != [f"pair={pair}"] else tmp_path / "bad.jpg"
        assert main([*args, "--out", str(bad)]) == 2
        assert not bad.exists()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("error: ") for line in err)
