"""Meta-RL diagnostics during training (rl.diagnostics, issue 16 item 1): the slope against
hand-made curves, the gradient norms against autograd on tiny models, the warnings' conditions,
and the callback inside real (tiny) training runs of every method that has diagnostics."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
from test_resume import CONFIGS as RESUME
from torch import nn

from baselines.maml import MAMLPolicyNet, adapt, inner_objective, stack_params
from baselines.maml_core import EpisodeBatch, PerEnvPolicy
from envs.core import Composition, Task
from experiments.cli import main
from experiments.registry import method_class
from rl.collect import Collector, make_vector_env
from rl.diagnostics import (
    MetaRLDiagnostics,
    adaptation_slopes,
    grad_norm,
    inner_grad_norm,
    slope,
)
from rl.io import read_jsonl
from rl.train import check_same_run, fit

GRID7 = {"task_info": "reward", "size": 7, "max_steps": 8}

#: the resume tests' tiny configs (a second or two each), with trials of > 1 episode and the
#: compositional agent's inner loop on
CONFIGS = {m: dict(RESUME[m]) for m in ("rl2", "maml", "pearl", "compositional")}
CONFIGS["maml"]["episodes_per_trial"] = 2
CONFIGS["compositional"]["inner_loop"] = "on"
CONFIGS["fomaml"] = CONFIGS["reptile"] = CONFIGS["maml"]


# -- slope -----------------------------------------------------------------------------------------
def test_slope_of_hand_made_curves():
    assert slope([0, 1, 2, 3], [0.2, 0.4, 0.6, 0.8]) == pytest.approx(0.2)
    assert slope([0, 1, 2], [1.0, 1.0, 1.0]) == 0.0
    assert slope([0, 1, 2, 3], [1.0, 0.5, 0.0, -0.5]) == pytest.approx(-0.5)
    # a step curve: the least-squares line through (0,0) (1,0) (2,1) (3,1) has slope 0.4
    assert slope([0, 1, 2, 3], [0, 0, 1, 1]) == pytest.approx(0.4)
    # pooled points of several trials: the slope of the per-index means (equal counts)
    assert slope([0, 0, 1, 1, 2, 2], [0, 1, 0, 1, 1, 1]) == pytest.approx(0.25)
    assert math.isnan(slope([0, 0, 0], [0.0, 1.0, 0.5]))  # one index: no slope
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 10, 50), rng.normal(size=50)
    assert slope(x, y) == pytest.approx(np.polyfit(x, y, 1)[0])
    with pytest.raises(ValueError, match="slope of 2 values over 3 positions"):
        slope([0, 1, 2], [0.0, 1.0])


def test_adaptation_slopes_of_return_and_success():
    pts = [(0, 0.0, 0.0), (1, 0.5, 0.0), (2, 1.0, 1.0), (0, 0.0, 0.0), (1, 0.5, 1.0), (2, 1.0, 1.0)]
    s = adaptation_slopes(pts)
    assert s["return"] == pytest.approx(0.5) and s["success"] == pytest.approx(0.5)


# -- gradient norms --------------------------------------------------------------------------------
def test_grad_norm_equals_autograd_global_norm():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3), nn.Linear(3, 1))
    model[2].weight.requires_grad_(False)  # an unused/frozen parameter has no gradient
    loss = model(torch.randn(7, 5)).pow(2).mean()
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params, retain_graph=True)
    expected = torch.cat([g.reshape(-1) for g in grads]).norm().item()
    assert grad_norm([*grads, None]) == pytest.approx(expected, rel=1e-6)
    loss.backward()
    clip = nn.utils.clip_grad_norm_(params, 1e9).item()  # torch's own global norm
    assert grad_norm(p.grad for p in params) == pytest.approx(clip, rel=1e-6)


def _maml_batch(n_tasks: int = 3):
    """A tiny MAML policy and a real meta-batch of pre-update episodes on CompoGrid."""
    torch.manual_seed(0)
    comps = ["goto(red ball)", "goto(blue ball)", "goto(green key)"][:n_tasks]
    env = make_vector_env("CompoGrid-v0", n_tasks, {**GRID7, "composition": comps[0]})
    net = MAMLPolicyNet(env.single_observation_space.shape[0], env.single_action_space, 8)
    col = Collector(env, PerEnvPolicy(net), episodes_per_trial=2, seed=0)
    ro = col.collect_trials([Task(Composition.parse(c), 3) for c in comps])
    env.close()
    return net, EpisodeBatch.from_rollout(ro, 2)


def test_inner_grad_norm_equals_the_autograd_norm_of_each_task_inner_gradient():
    net, batch = _maml_batch()
    theta = {k: v.detach() for k, v in net.params().items()}
    stacked = {k: v.requires_grad_() for k, v in stack_params(theta, 3).items()}
    lr = 0.3
    # advantages of both signs: every task has an inner gradient (sparse rewards alone are 0)
    adv = torch.randn(batch.rewards.shape, generator=torch.Generator().manual_seed(1))
    adv = adv * batch.mask
    phi = adapt(net, stacked, batch, steps=1, lr=lr, gamma=0.99, create_graph=False, advantages=adv)
    # independent: the inner objective's gradient per task, by autograd
    obj = inner_objective(net, stacked, batch, gamma=0.99, advantages=adv)
    keys = list(stacked)
    grads = torch.autograd.grad(obj.sum(), [stacked[k] for k in keys], allow_unused=True)
    expected = torch.zeros(3, dtype=torch.float64)
    for g in grads:
        if g is not None:
            expected += g.double().reshape(3, -1).pow(2).sum(1)
    got = inner_grad_norm(theta, phi, lr, 1)
    assert expected.min() > 0
    assert torch.allclose(got.double(), expected.sqrt(), rtol=1e-4)
    # stacked theta gives the same; two steps report the mean step's norm
    assert torch.allclose(inner_grad_norm(stacked, phi, lr, 1), got)
    assert torch.allclose(inner_grad_norm(theta, phi, lr / 2, 2), got)
    assert torch.isnan(inner_grad_norm(theta, phi, 0.0)).all()


@pytest.mark.parametrize("method", ["maml", "fomaml"])
def test_meta_step_reports_the_meta_gradient_norm_before_clipping(method):
    m = method_class(method)({**CONFIGS["maml"], "max_grad_norm": 1e-3})
    for _ in range(30):  # until a meta-batch with some reward (sparse: often none at first)
        before = {k: v.detach().clone() for k, v in m.net.named_parameters()}
        m.meta_step()
        if m.grad_norms["meta"] > 0:
            break
    ro_pre, ro_post = m.last_rollouts
    reported = m.grad_norms["meta"]
    # recompute the outer loss of the same episodes at the same theta, by autograd
    with torch.no_grad():
        for k, p in m.net.named_parameters():
            p.copy_(before[k])
    pre = EpisodeBatch.from_rollout(ro_pre, 2)
    post = EpisodeBatch.from_rollout(ro_post, 2)
    loss, _ = m.meta_loss(pre, post)
    grads = torch.autograd.grad(loss, list(m.net.parameters()), allow_unused=True)
    expected = math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads if g is not None))
    assert expected > 1e-3  # larger than the clip: the report is the unclipped norm
    assert reported == pytest.approx(expected, rel=1e-4)
    assert m.grad_norms["inner"] >= 0  # 0 when no pre-update episode was rewarded
    m.collector.envs.close()


# -- warnings ----------------------------------------------------------------------------------------
def _flat(n: int = 2):
    return {"diagnostics/adaptation_slope_return": 0.0}, [(0, 0.0, 0.0), (1, 0.0, 0.0)][:n]


def test_slope_warning_fires_once_after_patience_and_only_when_flat(caplog):
    caplog.set_level(logging.WARNING, logger="rl.diagnostics")
    cb = MetaRLDiagnostics(slope_threshold=0.01, slope_patience=3)
    flat, pts = _flat()
    rising = {"diagnostics/adaptation_slope_return": 0.2}
    for s in (flat, flat, rising, flat, flat):  # the rising iteration restarts the count
        cb.check(s, pts, signal=False)
    assert not caplog.records
    cb.check({}, pts, signal=False)  # no slope measured: the count stays
    cb.check(flat, pts, signal=False)
    assert len(caplog.records) == 1
    msg = caplog.records[0].getMessage()
    assert "adaptation not improving" in msg and "below 0.01 per episode for 3 iterations" in msg
    assert "\n" not in msg
    for _ in range(10):
        cb.check(flat, pts, signal=False)
    assert len(caplog.records) == 1  # once per run


def test_slope_warning_skips_tasks_solved_zero_shot(caplog):
    caplog.set_level(logging.WARNING, logger="rl.diagnostics")
    cb = MetaRLDiagnostics(slope_patience=2)
    solved = [(0, 1.0, 1.0), (1, 1.0, 1.0)]
    for _ in range(5):
        cb.check({"diagnostics/adaptation_slope_return": 0.0}, solved, signal=False)
    assert not caplog.records and cb.flat_iterations == 0


def test_meta_grad_warning_needs_a_small_norm_and_a_learning_signal(caplog):
    caplog.set_level(logging.WARNING, logger="rl.diagnostics")
    cb = MetaRLDiagnostics(meta_grad_threshold=1e-5, slope_patience=100)
    pts = [(0, 0.0, 0.0), (1, 1.0, 1.0)]
    cb.check({"diagnostics/meta_grad_norm": 1e-3}, pts, signal=True)
    cb.check({"diagnostics/meta_grad_norm": 0.0}, pts, signal=False)  # no signal: not vanishing
    assert not caplog.records
    cb.check({"diagnostics/meta_grad_norm": 1e-7}, pts, signal=True, iteration=7)
    cb.check({"diagnostics/meta_grad_norm": 1e-8}, pts, signal=True)
    assert len(caplog.records) == 1
    assert "vanishing meta-gradient: norm 1.00e-07 < 1e-05" in caplog.records[0].getMessage()
    assert "(iteration 7)" in caplog.records[0].getMessage()
    # the counters are plain data for the checkpoint; a restored callback does not warn again
    again = MetaRLDiagnostics()
    again.load_state_dict(cb.state_dict())
    again.check({"diagnostics/meta_grad_norm": 0.0}, pts, signal=True)
    assert len(caplog.records) == 1


# -- the callback in real training ---------------------------------------------------------------
EXPECTED = {
    "rl2": {"adaptation_slope_return", "adaptation_slope_success", "entropy_policy"},
    "pearl": {"adaptation_slope_return", "adaptation_slope_success", "entropy_policy"},
    "maml": {"adaptation_slope_return", "entropy_policy", "inner_grad_norm", "meta_grad_norm"},
    "fomaml": {"adaptation_slope_return", "inner_grad_norm", "meta_grad_norm"},
    "reptile": {"adaptation_slope_return", "inner_grad_norm", "meta_grad_norm"},
    "compositional": {
        "adaptation_slope_return", "entropy_controller", "entropy_skills", "inner_grad_norm",
    },
}  # fmt: skip


@pytest.mark.parametrize("method", list(EXPECTED))
def test_training_logs_diagnostics_and_warns_once(method, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="rl.diagnostics")
    cfg = {**CONFIGS[method], "diagnostics": {"slope_patience": 2, "slope_threshold": 10.0}}
    module = method_class(method)(cfg)
    fit(module, tmp_path, logger=False)
    rows = [r for r in read_jsonl(tmp_path / "train_log.jsonl") if "diagnostics/" in str(r)]
    assert rows, "no diagnostics row in train_log.jsonl"
    names = {k.split("/", 1)[1] for r in rows for k in r if k.startswith("diagnostics/")}
    assert EXPECTED[method] <= names
    for r in rows:
        for k, v in r.items():
            if k.startswith("diagnostics/entropy"):
                assert 0 <= v <= math.log(19) + 1e-6  # at most log |choices|
            if k.endswith("grad_norm"):
                assert v >= 0 and math.isfinite(v)
    # every slope is below 10 per episode: the warning fires, once, after 2 flat iterations
    flat = [m for m in caplog.messages if "adaptation not improving" in m]
    assert len(flat) == 1
    assert module.last_rollouts == ()  # read and released after each iteration


def test_no_warning_when_the_condition_never_holds(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="rl.diagnostics")
    cfg = {**CONFIGS["rl2"], "diagnostics": {"slope_threshold": -10.0, "slope_patience": 1}}
    fit(method_class("rl2")(cfg), tmp_path, logger=False)
    assert not caplog.messages


def test_diagnostics_off_logs_nothing(tmp_path):
    cfg = {**CONFIGS["rl2"], "diagnostics": {"enabled": False}}
    fit(method_class("rl2")(cfg), tmp_path, logger=False)
    rows = read_jsonl(tmp_path / "train_log.jsonl")
    assert rows and not any(k.startswith("diagnostics/") for r in rows for k in r)


@pytest.mark.parametrize(
    "value, match",
    [
        ("diagnostics.slope_patience=0", "diagnostics.slope_patience=0; allowed: an integer >= 1"),
        ("diagnostics.meta_grad_threshold=-1", "diagnostics.meta_grad_threshold=-1"),
        ("diagnostics.enabled=maybe", "'diagnostics.enabled'='maybe'; allowed: true or false"),
        ("diagnostics.warn=1", "unknown config key 'diagnostics.warn'"),
        ("diagnostics=3", "'diagnostics'=3; allowed: a mapping"),
    ],
)
def test_bad_diagnostics_config_is_one_line_exit_2(value, match, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--method", "rl2", "--out", str(out), "--set", value]) == 2
    err = capsys.readouterr().err.strip()
    assert match in err and "\n" not in err
    assert not out.exists()


def test_other_diagnostics_thresholds_are_the_same_run():
    base = {"method": "rl2", **CONFIGS["rl2"]}
    check_same_run(base, {**base, "diagnostics": {"slope_patience": 5}}, "x")  # no error
    with pytest.raises(ValueError, match="hidden"):
        check_same_run(base, {**base, "hidden": 32}, "x")
