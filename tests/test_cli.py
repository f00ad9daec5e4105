"""End-to-end smoke runs of the ``compo`` commands with tiny budgets, and their bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from envs.core import Primitive
from envs.grid import PRIMITIVE_INDEX, PRIMITIVES
from experiments.cli import main

TINY = ["--set", "total_env_steps=512", "--set", "num_envs=2", "--set", "ppo.num_steps=64"]


@pytest.fixture(scope="module")
def ppo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ppo")
    assert (
        main(
            [
                "train",
                "--method",
                "ppo",
                "--out",
                str(out),
                "--overwrite",
                "--checkpoint-every",
                "1",
                *TINY,
            ]
        )
        == 0
    )
    return out


def test_train_writes_run_folder(ppo_run):
    assert (ppo_run / "checkpoints" / "final.ckpt").is_file()
    assert (ppo_run / "config.yaml").is_file()
    cfg = yaml.safe_load((ppo_run / "config.yaml").read_text())
    assert cfg["method"] == "ppo" and cfg["total_env_steps"] == 512
    assert any((ppo_run / "tb").rglob("events.out.tfevents*"))


def test_train_resume(ppo_run, tmp_path):
    # resuming a finished run is a no-op that still succeeds; the checkpoint is intact
    assert main(["train", "--method", "ppo", "--out", str(ppo_run), "--resume", *TINY]) == 0


def test_train_refuses_existing_folder(ppo_run, capsys):
    before = sorted(p.name for p in ppo_run.iterdir())
    assert main(["train", "--method", "ppo", "--out", str(ppo_run), *TINY]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert sorted(p.name for p in ppo_run.iterdir()) == before


def test_bad_config_writes_nothing(tmp_path, capsys):
    out = tmp_path / "bad"
    assert main(["train", "--method", "ppo", "--out", str(out), "--set", "ppo.lr=-1"]) == 2
    assert "lr=-1" in capsys.readouterr().err
    assert not out.exists()
    assert (
        main(["train", "--method", "ppo", "--out", str(out), "--composition", "fly(red ball)"]) == 2
    )
    assert "unknown verb 'fly'" in capsys.readouterr().err
    assert not out.exists()


def test_trace(ppo_run, tmp_path):
    out = tmp_path / "trace"
    ckpt = str(ppo_run / "checkpoints" / "final.ckpt")
    assert (
        main(
            [
                "trace",
                "--checkpoint",
                ckpt,
                "--composition",
                "pickup(red ball) > open(door)",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    doc = json.loads((out / "trace.json").read_text())
    assert doc["method"] == "ppo" and len(doc["episodes"]) == 2
    assert len(doc["steps"]) == sum(e["length"] for e in doc["episodes"])
    assert (out / "trace.png").stat().st_size > 0 and (out / "trace.gif").stat().st_size > 0
    bad = tmp_path / "trace_bad"
    assert (
        main(
            ["trace", "--checkpoint", ckpt, "--composition", "pickup(pink ball)", "--out", str(bad)]
        )
        == 2
    )
    assert not bad.exists()


def test_graph_needs_compositional(ppo_run, tmp_path, capsys):
    out = tmp_path / "g"
    assert (
        main(
            [
                "graph",
                "--checkpoint",
                str(ppo_run / "checkpoints" / "final.ckpt"),
                "--out",
                str(out),
            ]
        )
        == 2
    )
    assert "needs 'compositional'" in capsys.readouterr().err
    assert not out.exists()


def test_missing_checkpoint(tmp_path, capsys):
    assert (
        main(
            [
                "trace",
                "--checkpoint",
                str(tmp_path / "nope.ckpt"),
                "--composition",
                "goto(door)",
                "--out",
                str(tmp_path / "t"),
            ]
        )
        == 2
    )
    assert "does not exist" in capsys.readouterr().err


def test_heldout_end_to_end(tmp_path):
    cfg = {
        "methods": ["ppo"],
        "references": ["random", "oracle", "ppo_scratch"],
        "seeds": [0, 1],
        "total_env_steps": 256,
        "num_envs": 2,
        "method_config": {"ppo": {"ppo": {"num_steps": 64}}},
        "eval": {"episodes": 2, "num_tasks": 2, "num_envs": 2, "bootstrap": 50},
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    out = tmp_path / "run"
    assert main(["heldout", "--config", str(tmp_path / "c.yaml"), "--out", str(out)]) == 0
    doc = json.loads((out / "results.json").read_text())
    assert doc["schema"] == 2 and doc["statistics"]["resamples"] == 50
    assert set(doc["methods"]) == {"ppo", "random", "oracle", "ppo_scratch"}
    for m in doc["methods"].values():
        for key in (
            "success_at",
            "success_ci",
            "return_at",
            "episodes_to_80",
            "meta_train_env_steps",
            "wall_s",
            "seeds",
        ):
            assert key in m
        assert len(m["success_at"]) == 2
    assert doc["methods"]["oracle"]["success_at"] == [1.0, 1.0]
    # two seeds: no interval (null), and the raw scores per (seed, task, episode index)
    assert doc["methods"]["ppo"]["success_ci"] == [None, None]
    assert np.asarray(doc["scores"]["methods"]["ppo"]["success"]).shape == (2, 2, 2)
    assert doc["probability_of_improvement"]["rows"] == ["ppo"]
    # an independent recomputation from the raw scores gives every stored number
    from experiments.stats import main as stats_main

    assert stats_main([str(out / "results.json"), "--check"]) == 0
    assert doc["methods"]["ppo"]["meta_train_env_steps"] >= 256
    assert set(doc["split"]["heldout"]).isdisjoint(doc["split"]["train"])
    assert (out / "table.md").read_text().startswith("| method")
    assert (out / "curves.png").stat().st_size > 0
    assert (out / "ppo" / "seed1" / "checkpoints" / "final.ckpt").is_file()
    from experiments.training_summary import markdown, summarize_run

    rows = summarize_run(out)
    assert [r["method"] for r in rows] == ["ppo"] and rows[0]["seeds"] == 2
    assert 0.0 <= rows[0]["train_success"] <= 1.0 and rows[0]["env_steps"] >= 256
    assert "| ppo |" in markdown(rows, 10)
    # another logged scalar: the mean of the last 2 iterations' losses/approx_kl, per seed
    kl = [
        float(np.mean([json.loads(r)["losses/approx_kl"] for r in lines[-2:]]))
        for lines in (
            (out / "ppo" / f"seed{s}" / "train_log.jsonl").read_text().splitlines() for s in (0, 1)
        )
    ]
    # re-evaluating the saved checkpoints reproduces the run's own evaluation exactly
    from experiments.trial_gain import markdown as gain_md
    from experiments.trial_gain import trial_gain

    (g,) = trial_gain(out, n_boot=200)
    assert g["method"] == "ppo" and g["pairs"] == 2 * doc["config"]["eval"]["num_tasks"]
    assert np.allclose(g["success_at"], doc["methods"]["ppo"]["success_at"])
    assert g["gain_ci"][0] <= g["gain"] <= g["gain_ci"][1]
    assert "| ppo |" in gain_md([g])
    (kl_row,) = summarize_run(out, last=2, metric="losses/approx_kl")
    assert kl_row["train_success"] == pytest.approx(np.mean(kl))
    assert "`losses/approx_kl`, last 2" in markdown([kl_row], 2, "losses/approx_kl")


def test_training_summary_phase_filter(tmp_path):
    from experiments.training_summary import summarize_run

    log = tmp_path / "run" / "compositional" / "seed0" / "train_log.jsonl"
    log.parent.mkdir(parents=True)
    hist = [{"env_steps": i, "charts/phase": 1.0 if i < 3 else 2.0, "charts/success": i / 10}
            for i in range(6)]  # fmt: skip
    log.write_text("".join(json.dumps(h) + "\n" for h in hist))
    (p1,) = summarize_run(tmp_path / "run", last=2, phase=1)
    (p2,) = summarize_run(tmp_path / "run", last=2, phase=2)
    (both,) = summarize_run(tmp_path / "run", last=2)
    assert p1["train_success"] == pytest.approx(0.15)  # iterations 1, 2
    assert p2["train_success"] == pytest.approx(0.45) == both["train_success"]
    (start,) = summarize_run(tmp_path / "run", last=2, phase=2, first=True)
    assert start["train_success"] == pytest.approx(0.35)  # iterations 3, 4
    (upto,) = summarize_run(tmp_path / "run", last=2, max_steps=3)
    assert upto["train_success"] == pytest.approx(0.25)  # iterations 2, 3
    from experiments.training_summary import main as summary_main
    from experiments.training_summary import markdown

    assert "first 2 iterations" in markdown([start], 2, first=True)
    with pytest.raises(SystemExit, match="--first 0; allowed"):
        summary_main([str(tmp_path / "run"), "--first", "0"])


def test_heldout_bad_method_writes_nothing(tmp_path, capsys):
    out = tmp_path / "x"
    assert main(["heldout", "--out", str(out), "--set", "methods=[nope]"]) == 2
    assert "unknown method 'nope'" in capsys.readouterr().err
    assert not out.exists()


def test_embed_rl2(tmp_path):
    ck = tmp_path / "rl2"
    small = [
        "--set",
        "rnn=gru",
        "--set",
        "hidden=16",
        "--set",
        "num_layers=1",
        "--set",
        "head_hidden=16",
    ]
    args = ["--set", "total_env_steps=256", "--set", "num_envs=2", "--set", "ppo.num_steps=64"]
    assert main(["train", "--method", "rl2", "--out", str(ck), *small, *args]) == 0
    out = tmp_path / "emb"
    ckpt = str(ck / "checkpoints" / "final.ckpt")
    assert (
        main(
            [
                "embed",
                "--checkpoint",
                ckpt,
                "--out",
                str(out),
                "--set",
                "num_tasks=6",
                "--set",
                "episodes=1",
            ]
        )
        == 0
    )
    doc = json.loads((out / "embed.json").read_text())
    assert doc["method"] == "rl2" and len(doc["embeddings"]) == 6 and doc["embedding_dim"] == 16
    assert (out / "embed.png").stat().st_size > 0


def test_embed_needs_memory(ppo_run, tmp_path, capsys):
    out = tmp_path / "e"
    assert (
        main(
            [
                "embed",
                "--checkpoint",
                str(ppo_run / "checkpoints" / "final.ckpt"),
                "--out",
                str(out),
                "--set",
                "num_tasks=3",
            ]
        )
        == 2
    )
    assert "no task memory" in capsys.readouterr().err
    assert not out.exists()


def test_embed_correlation_maths():
    import numpy as np

    from envs.core import Composition
    from experiments.embed import correlations, task_distance

    a, b, c = (
        Composition.parse(t)
        for t in (
            "goto(door) > goto(red ball)",
            "goto(door) > goto(blue ball)",
            "toggle(door) > goto(blue ball) > goto(door)",
        )
    )
    assert task_distance(a, a) == 0 and task_distance(a, b) == 0.5 and task_distance(a, c) == 1.0
    emb = np.array([[0.0], [0.5], [1.0]])  # distances proportional to task distances
    r = correlations(emb, [a, b, c])
    assert r["pearson"] > 0.8 and r["pairs"] == 3


def test_ablation_rows():
    from experiments.ablate import ABLATIONS, ablation_config

    cfg = ablation_config({"base": {"composer": "attention"}})
    names = [m["name"] for m in cfg.method_specs()]
    assert names == [f"compositional[{v}]" for v in ABLATIONS]
    soft = next(m for m in cfg.method_specs() if m["name"] == "compositional[composer=soft]")
    assert soft["config"] == {"composer": "soft"}
    with pytest.raises(ValueError, match="unknown ablation 'composer=hard'"):
        ablation_config({"variants": ["composer=hard"]})


#: a tiny skill-level agent: 2 phase-1 and 2 phase-2 iterations of 2 envs
TINY_COMPO = [
    "--set", "total_env_steps=384", "--set", "num_envs=2", "--set", "ppo.num_steps=64",
    "--set", "skills.num_steps=32", "--set", "hidden=16", "--set", "library_hidden=16",
    "--set", "episodes_per_trial=2", "--set", "library_fraction=0.3",
    "--set", "primitives=supervised",
]  # fmt: skip


def test_compositional_trace_graph_embed(tmp_path, capsys):
    ck = tmp_path / "compo"
    assert main(["train", "--method", "compositional", "--out", str(ck), *TINY_COMPO]) == 0
    ckpt = str(ck / "checkpoints" / "final.ckpt")
    tr = tmp_path / "trace"
    cmd = ["trace", "--checkpoint", ckpt, "--composition", "goto(red ball) > open(door)"]
    assert main([*cmd, "--out", str(tr), "--nmi-episodes", "20"]) == 0
    doc = json.loads((tr / "trace.json").read_text())
    assert doc["skill_names"] == [str(p) for p in PRIMITIVES]  # the supervised library
    steps = doc["steps"]
    assert steps[0]["decision"] and 0 <= steps[0]["skill"] < 19
    assert all(s["subtask"] in (PRIMITIVE_INDEX[Primitive.parse("goto(red ball)")],
                                PRIMITIVE_INDEX[Primitive.parse("open(door)")]) for s in steps)  # fmt: skip
    # one skill per segment: the skill changes only at decisions
    for s0, s1 in zip(steps, steps[1:]):
        assert s1["skill"] == s0["skill"] or s1["decision"]
    nmi = doc["skill_subtask_nmi"]
    assert 0 <= nmi["nmi"] <= 1 and nmi["episodes"] >= 20
    # where the NMI is lost: the choices at decisions, the composer's spread, per sub-task
    assert 0 < nmi["decisions"] < nmi["steps"] and 0 <= nmi["nmi_at_decisions"] <= 1
    K = len(doc["skill_names"])
    assert 0 <= nmi["pointer_entropy_nats"] <= np.log(K) + 1e-6
    assert 1 / K - 1e-6 <= nmi["pointer_top_probability"] <= 1
    for rows in nmi["skills_per_subtask"].values():
        shares = [r[2] for r in rows]
        assert shares == sorted(shares, reverse=True) and 0 < sum(shares) <= 1 + 1e-6
        assert all(0 <= r[0] < K and r[1] == doc["skill_names"][r[0]] for r in rows)
    assert "normalised mutual information" in capsys.readouterr().out
    assert (tr / "trace.png").stat().st_size > 0 and (tr / "trace.gif").stat().st_size > 0
    g = tmp_path / "graph"
    assert main(["graph", "--checkpoint", ckpt, "--out", str(g)]) == 0
    assert "goto(red ball)" in (g / "graph.graphml").read_text()
    assert not (g / "state_graph.png").exists()  # the counts graph has no network to draw
    e = tmp_path / "embed"
    emb = ["embed", "--checkpoint", ckpt, "--out", str(e), "--set", "num_tasks=5"]
    assert main([*emb, "--set", "episodes=1"]) == 0
    assert json.loads((e / "embed.json").read_text())["embedding_dim"] == 2 * 16


def test_graph_of_a_state_graph_run_draws_its_network(tmp_path):
    ck = tmp_path / "compo"
    args = ["train", "--method", "compositional", "--out", str(ck), *TINY_COMPO]
    assert main([*args, "--set", "graph=state"]) == 0
    g = tmp_path / "graph"
    assert (
        main(["graph", "--checkpoint", str(ck / "checkpoints" / "final.ckpt"), "--out", str(g)])
        == 0
    )
    assert (g / "graph.png").stat().st_size > 0
    assert (g / "state_graph.png").read_bytes()[:4] == b"\x89PNG"


def test_nmi_by_hand():
    from experiments.trace import nmi

    assert nmi([0, 0, 1, 1], [5, 5, 7, 7]) == pytest.approx(1.0)
    assert nmi([0, 1, 0, 1], [5, 5, 7, 7]) == pytest.approx(0.0)
    assert nmi([0, 0, 0, 0], [5, 5, 7, 7]) == 0.0
    # I = log 2 - 0.75 log 1.5 ... hand value for a partly aligned pair
    x, y = [0, 0, 1, 1], [5, 5, 5, 7]
    hx, hy = np.log(2), -(0.75 * np.log(0.75) + 0.25 * np.log(0.25))
    mi = (
        0.5 * np.log(0.5 / (0.5 * 0.75))
        + 0.25 * np.log(0.25 / (0.5 * 0.75))
        + 0.25 * np.log(0.25 / (0.5 * 0.25))
    )
    assert nmi(x, y) == pytest.approx(mi / ((hx + hy) / 2))


def test_numeric_config_values_are_coerced_or_refused():
    """YAML reads ``2e-3`` (no dot) as a string: numeric fields must still get numbers, and a
    non-number for a numeric field is refused by name (it used to fail deep inside validation
    with a TypeError)."""
    from compositional.config import CompositionalConfig
    from rl.config import config_from_dict

    c = config_from_dict(
        CompositionalConfig,
        {"inner_lr": "2e-3", "ppo": {"lr": yaml.safe_load("1e-3")}, "hidden": 32.0},
    )
    assert c.inner_lr == 0.002 and isinstance(c.inner_lr, float)
    assert c.ppo.lr == 0.001 and c.hidden == 32 and isinstance(c.hidden, int)
    # YAML 1.1 reads off/on as booleans (``--set ...inner_loop=off`` used to fail with
    # "inner_loop=False; allowed: on, off")
    for word in ("off", "on"):
        assert (
            config_from_dict(CompositionalConfig, {"inner_loop": yaml.safe_load(word)}).inner_loop
            == word
        )
    with pytest.raises(ValueError, match="composer='on'; allowed"):
        config_from_dict(CompositionalConfig, {"composer": yaml.safe_load("on")})
    for bad, match in (
        ({"inner_lr": "fast"}, "'inner_lr'='fast'; allowed: a number"),
        ({"hidden": 2.5}, "'hidden'=2.5; allowed: an integer"),
        ({"ppo": {"lr": True}}, "'ppo.lr'=True; allowed: a number"),
    ):
        with pytest.raises(ValueError, match=match):
            config_from_dict(CompositionalConfig, bad)


def test_set_scientific_notation_reaches_the_config(tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--method", "ppo", "--out", str(out), *TINY, "--set", "ppo.lr=3e-4"]) == 0
    assert yaml.safe_load((out / "config.yaml").read_text())["ppo"]["lr"] == 0.0003


def test_eval_reproduces_heldout_for_the_same_checkpoint(tmp_path):
    run = tmp_path / "run"
    args = ["heldout", "--out", str(run), "--set", "methods=[ppo]", "--set", "references=[]"]
    args += ["--set", "seeds=[0]", "--set", "total_env_steps=1024", "--set", "num_envs=4"]
    args += ["--set", "eval.num_tasks=6", "--set", "eval.episodes=2", "--set", "eval.num_envs=3"]
    assert main(args) == 0
    held = json.loads((run / "results.json").read_text())["methods"]["ppo"]
    ev = tmp_path / "eval"
    ckpt = run / "ppo" / "seed0" / "checkpoints" / "final.ckpt"
    cmd = ["eval", "--checkpoint", str(ckpt), "--out", str(ev), "--set", "num_tasks=6"]
    assert main([*cmd, "--set", "episodes=2", "--set", "num_envs=3"]) == 0
    got = json.loads((ev / "results.json").read_text())["methods"]["ppo"]
    assert got["success_at"] == held["success_at"] and got["return_at"] == held["return_at"]
    assert (ev / "table.md").is_file() and (ev / "curves.png").is_file()
    assert main([*cmd, "--set", "episodes=0"]) == 2  # bad input: one line, exit 2
