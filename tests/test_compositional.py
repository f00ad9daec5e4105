"""Compositional agent: composer / graph / controller maths, ablation switches, the inner loop,
exact log-prob recomputation, bad input, and train -> held-out evaluation -> reload."""

from __future__ import annotations

import math

import pytest
import torch

from compositional.agent import (
    FAST_PARAM_SETS,
    FAST_PARAMS,
    CompositionalAgent,
    CompositionalPolicy,
)
from compositional.composer import AttentionComposer
from compositional.controller import MetaController
from compositional.graph import SkillGraph, write_graph
from rl.collect import Episode, EpisodeStats, Prev
from rl.train import fit, load_module

torch.set_num_threads(1)

FAST = {
    "env_kwargs": {"task_info": "reward", "size": 8, "max_steps": 12},
    "num_envs": 2,
    "episodes_per_trial": 2,
    "num_skills": 4,
    "hidden": 16,
    "key_dim": 8,
    "ppo": {"num_steps": 32, "update_epochs": 1, "num_minibatches": 2},
    "discovery": {"ppo": {"num_steps": 16, "update_epochs": 1, "num_minibatches": 2}},
}


def agent(**kw) -> CompositionalAgent:
    return CompositionalAgent({**FAST, "primitives": "random-frozen", **kw})


# --- composer ---------------------------------------------------------------------------------------


def test_composer_modes_weights():
    torch.manual_seed(0)
    u = torch.randn(5, 8)
    soft = AttentionComposer(8, 6, mode="attention")
    a = soft.weights(soft.logits(u))
    assert torch.allclose(a.sum(-1), torch.ones(5)) and bool((a > 0).all())
    assert not torch.allclose(a, torch.full_like(a, 1 / 6))
    hard = AttentionComposer(8, 6, mode="hard")
    h = hard.weights(hard.logits(u))  # Gumbel-softmax sample
    assert torch.allclose(h.sum(-1), torch.ones(5))
    assert bool(((h == 0) | (h == 1)).all())
    skill = torch.tensor([0, 1, 2, 3, 4])
    hs = hard.weights(hard.logits(u), skill)
    assert torch.equal(hs.detach(), torch.nn.functional.one_hot(skill, 6).float())
    uni = AttentionComposer(8, 6, mode="uniform")
    assert torch.allclose(uni.weights(uni.logits(u)), torch.full((5, 6), 1 / 6))


def test_hard_composer_straight_through_gradient_reaches_logits():
    comp = AttentionComposer(4, 3, mode="hard")
    logits = torch.randn(2, 3, requires_grad=True)
    a = comp.weights(logits, torch.tensor([0, 2]))
    (a * torch.randn(2, 3)).sum().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_composer_mix_is_the_alpha_weighted_mixture():
    import gymnasium as gym
    import numpy as np

    from rl.nets import ActionHead

    out = torch.randn(3, 4, 5)
    alpha = torch.softmax(torch.randn(3, 4), -1)
    d = AttentionComposer.mix(out, alpha, ActionHead(gym.spaces.Discrete(5)), torch.zeros(4, 5))
    expect = (alpha.unsqueeze(-1) * torch.softmax(out, -1)).sum(1)
    assert torch.allclose(d.probs, expect, atol=1e-6)
    box = ActionHead(gym.spaces.Box(-1, 1, (5,), np.float32))
    ls = torch.randn(4, 5) * 0.1
    g = AttentionComposer.mix(out, alpha, box, ls)
    assert torch.allclose(g.mean, (alpha.unsqueeze(-1) * out).sum(1), atol=1e-6)
    assert torch.allclose(g.base_dist.scale.log(), alpha @ ls, atol=1e-5)


# --- graph ------------------------------------------------------------------------------------------


def test_graph_rows_are_distributions_and_none_ignores_previous_skill():
    g = SkillGraph(5, "learned")
    with torch.no_grad():
        g.adjacency_logits.copy_(torch.randn(5, 5) * 3)
    P = g.transition()
    assert torch.allclose(P.sum(-1), torch.ones(5)) and bool((P >= 0).all())
    ctrl = torch.zeros(2, 5)
    no_start = torch.zeros(2, dtype=torch.bool)
    a = g.next_skill_logits(ctrl, torch.tensor([0, 0]), no_start)
    b = g.next_skill_logits(ctrl, torch.tensor([3, 3]), no_start)
    assert not torch.allclose(a, b)  # learned: the previous skill matters
    # ... except at an episode start (there is no active skill)
    st = torch.ones(2, dtype=torch.bool)
    assert torch.equal(g.next_skill_logits(ctrl, torch.tensor([0, 3]), st), ctrl)
    n = SkillGraph(5, "none", skill_len=3)
    assert torch.allclose(n.transition(), torch.full((5, 5), 0.2))
    assert torch.equal(
        n.next_skill_logits(ctrl, torch.tensor([0, 0]), no_start),
        n.next_skill_logits(ctrl, torch.tensor([3, 3]), no_start),
    )
    # mode none: fixed-length skills whatever beta says; learned: beta of the active skill
    beta = torch.tensor([[0.9] * 5, [0.9] * 5])
    assert n.switch_prob(beta, torch.tensor([1, 1]), torch.tensor([1, 3]), no_start).tolist() == [
        0.0,
        1.0,
    ]
    beta = torch.tensor([[0.1, 0.7, 0, 0, 0]] * 2)
    p = g.switch_prob(beta, torch.tensor([1, 0]), torch.tensor([1, 1]), no_start)
    assert torch.allclose(p, torch.tensor([0.7, 0.1]))


def test_graph_networkx_and_files(tmp_path):
    ag = agent()
    with torch.no_grad():
        ag.graph.adjacency_logits[0, 1] = 5.0
    g = ag.graph.to_networkx()
    assert g.number_of_nodes() == 4 and g.number_of_edges() == 16
    assert sum(w for _, _, w in g.out_edges(0, data="weight")) == pytest.approx(1.0)
    assert g[0][1]["weight"] > 0.9
    paths = write_graph(ag, tmp_path / "g")
    assert (tmp_path / "g" / "graph.png").stat().st_size > 1000
    text = (tmp_path / "g" / "graph.graphml").read_text()
    assert "graphml" in text and "weight" in text and "termination" in text
    assert set(paths) == {"png", "graphml"}


# --- controller -------------------------------------------------------------------------------------


def test_controller_chunked_unroll_matches_stepping_from_stored_states():
    torch.manual_seed(0)
    c = MetaController(6, 3, hidden=8)
    T, N = 10, 2
    x = torch.randn(T, N, 8 + 3 + 2)
    reset = torch.zeros(T, N, dtype=torch.bool)
    reset[4, 1] = True
    h, cc = c.initial_state(N)
    hs, h_in, c_in = [], [], []
    for t in range(T):
        keep = (~reset[t]).float().unsqueeze(-1)
        h, cc = h * keep, cc * keep
        h_in.append(h)
        c_in.append(cc)
        h, cc = c.step(x[t], (h, cc))
        hs.append(h)
    hs = torch.stack(hs)
    for L in (1, 3, 4, 16):
        got = c.unroll_chunked(x, torch.stack(h_in), torch.stack(c_in), reset, L)
        assert torch.allclose(got, hs, atol=1e-6), L


# --- agent ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw", [{"num_skills": 0}, {"composer": "softmax"}, {"graph": "dag"}, {"skill_credit": "yes"}]
)
def test_bad_input_names_the_value(kw, tmp_path):
    key, val = next(iter(kw.items()))
    with pytest.raises(ValueError, match=f"{key}={val!r}"):
        CompositionalAgent({**FAST, **kw})
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("fast", ["context", "full"])
def test_fast_path_batched_equals_functional_call_references(fast):
    torch.manual_seed(1)
    ag = agent(fast_params=fast)
    h = torch.randn(6, 16)
    table = torch.randn(3, ag.fast_size) * 0.1
    table[0] = 0
    ids = torch.tensor([0, 1, 2, 1, 0, 2])
    a = ag.ctrl_logits(h, table[ids])
    b = ag.ctrl_logits_vmap(h, table[ids])
    c = ag.ctrl_logits_grouped(h, ids, table)
    assert torch.allclose(a, b, atol=1e-5) and torch.allclose(a, c, atol=1e-5)
    assert torch.allclose(a[0], ag._fastpath(h[:1])[0], atol=1e-6)
    assert not torch.allclose(a[1], ag._fastpath(h[1:2])[0])


def _rollout(ag: CompositionalAgent, steps: int = 40):
    col = ag.make_collector()
    ag.collector = col
    return col, col.collect(steps)


def _outer_update_args(ag: CompositionalAgent, ro) -> dict:
    """Run the agent's outer update on rollout ``ro`` with ``ppo_update`` replaced by a
    recorder; returns the ``evaluate`` closure and parameter list it was given."""
    import compositional.agent as ca

    captured = {}

    def fake_update(ro_, evaluate, params, opt, cfg, **k):
        captured.update(evaluate=evaluate, params=params, n=ro_.valid.numel())
        return {}

    orig, ca.ppo_update = ca.ppo_update, fake_update
    ag.log_scalars = lambda s: None
    try:
        ag.policy.prune = lambda: None
        ag.collector.collect = lambda n: ro  # re-run only the update part on this rollout
        ag._meta_step(ag.configure_optimizers()[0])
    finally:
        ca.ppo_update = orig
    return captured


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"composer": "hard", "bptt_len": 4},
        {"composer": "uniform", "graph": "none", "bptt_len": 1},
        {"inner_loop": "off", "bptt_len": 100},
        {"fast_params": "full", "graph": "none"},
        {"skill_credit": "on", "bptt_len": 4},
    ],
)
def test_outer_update_recomputes_the_acting_log_probs(kw):
    """Before any update the recomputed joint log-prob (switch, skill, action) equals the
    acting one, so PPO's ratio starts at exactly 1 (adapted parameters included)."""
    torch.manual_seed(0)
    ag = agent(**kw)
    col, ro = _rollout(ag)
    try:
        if kw.get("inner_loop", "on") == "on":
            assert bool((ro.extras["fast_id"] != 0).any())  # some steps acted adapted
        args = _outer_update_args(ag, ro)
        with torch.no_grad():
            logp, _, v = args["evaluate"](torch.arange(args["n"]))
        assert torch.allclose(logp, ro.logp.reshape(-1), atol=1e-4)
        assert torch.allclose(v, ro.values.reshape(-1), atol=1e-4)
    finally:
        col.envs.close()


def test_step_extras_are_inspectable():
    ag = agent()
    col, ro = _rollout(ag, 20)
    col.envs.close()
    ex = ro.extras
    assert ex["skill"].shape == (20, 2) and bool((ex["skill"] >= 0).all())
    assert ex["alpha"].shape == (20, 2, 4)
    assert torch.allclose(ex["alpha"].sum(-1), torch.ones(20, 2))
    assert bool(((ex["termination"] >= 0) & (ex["termination"] <= 1)).all())
    # a skill only changes on a switch
    changed = ex["skill"][1:] != ex["skill"][:-1]
    assert bool((~changed | ex["switch"][1:]).all())


def test_graph_none_re_selects_every_skill_len_steps():
    ag = agent(graph="none", skill_len=3, inner_loop="off")
    col, ro = _rollout(ag, 30)
    col.envs.close()
    sw = ro.extras["switch"]
    ep = ro.episode_start
    for i in range(2):
        since = 0
        for t in range(30):
            if ep[t, i] or since == 3:
                assert sw[t, i]
                since = 1
            else:
                assert not sw[t, i]
                since += 1


def _episode(ag: CompositionalAgent, pol: CompositionalPolicy, T: int = 12):
    """Drive ``pol`` by hand for one episode of env 0 and return the collector-style Episode."""
    torch.manual_seed(0)
    n = 2
    mem = pol.reset_memory(pol.initial_memory(n), torch.ones(n, dtype=torch.bool))
    prev = Prev(torch.zeros(n, dtype=torch.long), torch.zeros(n), torch.zeros(n))
    obs_l, act, rew, logp, val = [], [], [], [], []
    for t in range(T):
        obs = torch.rand(n, ag.obs_dim)
        out = pol.step(obs, mem, prev)
        r = torch.tensor([1.0 if t % 4 == 3 else 0.0, 0.0])
        obs_l.append(obs[0])
        act.append(out.action[0])
        rew.append(r[0])
        logp.append(out.logp[0])
        val.append(out.value[0])
        mem, prev = out.memory, Prev(out.action, r, torch.zeros(n))
    st = EpisodeStats(0, None, 0, float(sum(rew)), False, T, 1)
    obs = torch.stack(obs_l)
    return Episode(
        obs, torch.stack(act), torch.stack(rew), obs, torch.zeros(T, dtype=torch.bool),
        torch.stack(logp), torch.stack(val), st,
    )  # fmt: skip


@pytest.mark.parametrize("fast", ["context", "full"])
def test_inner_loop_changes_only_controller_and_composer(fast):
    ag = agent(inner_lr=1.0, fast_params=fast)
    before = {k: v.clone() for k, v in ag.state_dict().items()}
    pol, hook = ag.trial_policy(None)
    assert hook is not None
    ep = _episode(ag, pol)
    hook(0, ep)
    assert pol.fast_id.tolist() == [1, 0]  # env 0 adapted, env 1 not
    delta = pol.table[1]
    assert delta.abs().sum() > 0
    assert all(n.split(".")[0] in ("controller", "composer") for n in FAST_PARAMS)
    per = ag._unflatten(delta)
    assert set(per) == set(FAST_PARAM_SETS[fast])
    assert any(per[n].abs().sum() > 0 for n in per if n.startswith("controller"))
    assert any(per[n].abs().sum() > 0 for n in per if n.startswith("composer"))
    # functional adaptation: the module's own parameters (library, graph, LSTM...) untouched
    for k, v in ag.state_dict().items():
        assert torch.equal(v, before[k]), k
    # the adapted controller now gives env 0 different skill logits
    h = torch.randn(1, 16)
    assert not torch.allclose(ag.ctrl_logits(h, delta[None]), ag._fastpath(h))
    # the inner step raised the advantage-weighted log-likelihood of the episode (a PG step)
    # and a second episode index beyond inner_episodes does not adapt
    ep2 = _episode(ag, pol)
    ep2.stats.episode_index = 1
    n_table = len(pol.table)
    hook(0, ep2)
    assert len(pol.table) == n_table


def test_inner_loop_off_and_other_switches_change_behaviour():
    assert agent(inner_loop="off").trial_policy(None)[1] is None
    frozen = agent()
    assert frozen.n_disc == 0 and not any(p.requires_grad for p in frozen.library.parameters())
    disc = CompositionalAgent({**FAST, "total_env_steps": 2000, "discovery_fraction": 0.5})
    assert disc.n_disc > 0
    assert all(p.requires_grad for n, p in disc.library.named_parameters() if n != "log_std")
    sup = CompositionalAgent({**FAST, "total_env_steps": 2000, "primitives": "supervised"})
    assert sup.skill_trainer.objective == "supervised" and len(sup.skill_trainer.primitives) == 4
    # composer modes give different weights for the same controller state
    torch.manual_seed(0)
    h = torch.randn(3, 16)
    obs = torch.rand(3, frozen.obs_dim)
    res = {}
    for mode in ("attention", "hard", "uniform"):
        torch.manual_seed(0)
        ag = agent(composer=mode)
        sk = torch.tensor([-1, -1, -1])
        r = ag.act(obs, h, ag.controller.encode(obs), sk, torch.zeros(3, dtype=torch.long),
                   torch.ones(3, dtype=torch.bool), None)  # fmt: skip
        res[mode] = r["alpha"]
    assert torch.allclose(res["uniform"], torch.full((3, 4), 0.25))
    assert bool(((res["hard"] == 0) | (res["hard"] == 1)).all())
    assert not torch.allclose(res["attention"], res["uniform"])


def test_skill_credit_accumulates_reward_per_skill_within_a_trial():
    """With ``skill_credit='on'`` the LSTM reads [alpha_{t-1}, C / sum |C|] where C sums
    r_{t-1} * alpha_{t-1} over the trial: checked by hand over three steps, the credit
    survives an episode boundary (done) but not a trial reset, it changes the controller's
    state, and with it 'off' the skill input is alpha_{t-1} alone."""
    torch.manual_seed(0)
    ag = agent(skill_credit="on", inner_loop="off")
    assert ag.controller.lstm.input_size == 16 + 2 * 4 + 2
    assert agent().controller.lstm.input_size == 16 + 4 + 2
    pol = CompositionalPolicy(ag, inner=False)
    n = 2
    mem = pol.initial_memory(n)
    assert mem[2].shape == (n, 8) and not bool(mem[2].any())
    obs = torch.rand(n, ag.obs_dim)
    expected = torch.zeros(n, 4)
    rewards = [torch.tensor([0.0, 0.0]), torch.tensor([0.5, 0.0]), torch.tensor([1.0, 0.25])]
    dones = [torch.tensor([0.0, 0.0]), torch.tensor([0.0, 0.0]), torch.tensor([1.0, 0.0])]
    with torch.no_grad():
        for r, d in zip(rewards, dones):
            alpha_prev = mem[2][:, :4]
            expected = expected + r.unsqueeze(1) * alpha_prev
            out = pol.step(obs, mem, Prev(torch.zeros(n, dtype=torch.long), r, d))
            share = out.extras["prev_alpha"][:, 4:]
            assert torch.allclose(out.extras["prev_alpha"][:, :4], alpha_prev)
            assert torch.allclose(out.memory[2][:, 4:], expected, atol=1e-6)
            tot = expected.sum(-1, keepdim=True)
            want = torch.where(tot > 0, expected / tot.clamp_min(1e-12), torch.zeros_like(tot))
            assert torch.allclose(share, want, atol=1e-6)
            mem = out.memory
    assert bool((expected > 0).all()) and torch.allclose(share.sum(-1), torch.ones(n))
    # the credit is part of the controller's input: other credit, other hidden state
    other = (mem[0], mem[1], torch.cat([mem[2][:, :4], mem[2][:, 4:].flip(1)], 1), *mem[3:])
    prev = Prev(torch.zeros(n, dtype=torch.long), torch.zeros(n), torch.zeros(n))
    with torch.no_grad():
        h_a = pol.step(obs, mem, prev).memory[0]
        h_b = pol.step(obs, other, prev).memory[0]
    assert not torch.allclose(h_a, h_b)
    # a trial reset clears it
    reset = pol.reset_memory(mem, torch.tensor([True, False]))
    assert not bool(reset[2][0].any()) and torch.equal(reset[2][1], mem[2][1])


def test_budget_counts_discovery_steps():
    ag = CompositionalAgent({**FAST, "total_env_steps": 640, "discovery_fraction": 0.5})
    per_d = 2 * 16
    per_m = 2 * 32
    assert ag.n_disc == 10
    assert ag.n_meta == math.ceil((640 - 10 * per_d) / per_m)


# --- end to end -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("compo")
    ag = CompositionalAgent({**FAST, "total_env_steps": 160, "discovery_fraction": 0.2, "seed": 1})
    fit(ag, out, logger=False)
    return ag, out


def test_train_heldout_eval_reload(trained):
    from envs import make_split
    from experiments.registry import REGISTRY
    from rl.protocol import heldout_tasks, run_trials

    ag, out = trained
    phases = [h["charts/phase"] for h in ag.history]
    assert phases == [1.0] * ag.n_disc + [2.0] * ag.n_meta and ag.n_disc >= 1
    assert ag.history[-1]["env_steps"] >= 160
    assert (out / "heatmaps.png").is_file()
    assert "charts/disc_accuracy" in ag.history[0]
    split = make_split("grid", seed=0)
    tasks = heldout_tasks(split.heldout, 2, seed=5)
    kw = {"env_id": "CompoGrid-v0", "env_kwargs": ag.cfg.env_kwargs, "episodes": 2, "num_envs": 2}
    res = run_trials(ag, tasks, seed=7, **kw)
    assert res["success"].shape == (2, 2)
    back = load_module(out / "checkpoints" / "final.ckpt", REGISTRY, expected="compositional")
    for (n, a), (_, b) in zip(ag.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), n
    torch.manual_seed(3)
    r1 = run_trials(ag, tasks, seed=7, **kw)
    torch.manual_seed(3)
    r2 = run_trials(back, tasks, seed=7, **kw)
    assert (r1["return"] == r2["return"]).all()


def test_library_checkpoint_load_and_mismatch(tmp_path):
    from primitives.discovery import DiscoveryModule

    lib_dir = tmp_path / "lib"
    dm = DiscoveryModule(
        {"num_envs": 2, "num_skills": 4, "hidden": 16, "total_env_steps": 32,
         "training": {"ppo": {"num_steps": 16, "update_epochs": 1}}}
    )  # fmt: skip
    fit(dm, lib_dir, logger=False)
    ckpt = str(lib_dir / "checkpoints" / "final.ckpt")
    ag = CompositionalAgent({**FAST, "library_checkpoint": ckpt, "total_env_steps": 200})
    for (n, a), (_, b) in zip(dm.library.state_dict().items(), ag.library.state_dict().items()):
        assert torch.equal(a, b), n
    assert ag.n_disc == 0 and ag.library_env_steps == 32
    # the compositional checkpoint holds the library: reloading works after the file moved
    run = tmp_path / "trained"
    fit(ag, run, logger=False)
    (lib_dir / "checkpoints" / "final.ckpt").rename(tmp_path / "moved.ckpt")
    from experiments.registry import REGISTRY

    back = load_module(run / "checkpoints" / "final.ckpt", REGISTRY, expected="compositional")
    assert back.library_env_steps == 32 and back.n_meta == ag.n_meta
    for (n, a), (_, b) in zip(ag.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), n
    # ... but training from a missing library file fails loudly
    with pytest.raises(FileNotFoundError, match="final.ckpt"):
        fit(CompositionalAgent({**FAST, "library_checkpoint": ckpt}), tmp_path / "x", logger=False)
    ckpt = str(tmp_path / "moved.ckpt")
    out = tmp_path / "run"
    with pytest.raises(ValueError, match="num_skills=4 but num_skills=5"):
        CompositionalAgent({**FAST, "num_skills": 5, "library_checkpoint": ckpt})
    # a library trained on another observation space (here: a checkpoint with a wider input)
    bad = torch.load(ckpt, weights_only=True)
    w = bad["state_dict"]["library.encoder.0.0.weight"]
    bad["state_dict"]["library.encoder.0.0.weight"] = torch.zeros(w.shape[0], w.shape[1] + 3)
    torch.save(bad, tmp_path / "bad.ckpt")
    with pytest.raises(ValueError, match=f"observation size {w.shape[1] + 3}"):
        CompositionalAgent({**FAST, "library_checkpoint": str(tmp_path / "bad.ckpt")})
    with pytest.raises(ValueError, match="objective='diayn'"):
        CompositionalAgent({**FAST, "library_checkpoint": ckpt, "primitives": "supervised"})
    assert not out.exists()


def test_resume_is_exact(tmp_path):
    """Kill after phase 1 + 2 meta-iterations (trials and adapted parameters in flight), resume
    with the full config: same parameters as an uninterrupted run."""
    full_cfg = {**FAST, "total_env_steps": 320, "discovery_fraction": 0.2, "seed": 2}
    cut_cfg = {**full_cfg, "total_env_steps": 192, "discovery_fraction": 1 / 3}
    full = fit(CompositionalAgent(full_cfg), tmp_path / "full", checkpoint_every=1, logger=False)
    cut = CompositionalAgent(cut_cfg)
    assert (cut.n_disc, cut.n_meta, full.n_disc, full.n_meta) == (2, 2, 2, 4)
    fit(cut, tmp_path / "cut", checkpoint_every=1, logger=False)
    resumed = fit(
        CompositionalAgent(full_cfg), tmp_path / "cut", resume=True, checkpoint_every=1,
        logger=False,
    )  # fmt: skip
    assert resumed.iteration == 6
    for (n, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), n


def test_continuous_actions_compose_weighted_gaussians_and_recompute_log_probs():
    import gymnasium as gym
    import numpy as np

    from primitives.library import SkillLibrary

    torch.manual_seed(0)
    ag = agent()
    box = gym.spaces.Box(-1.0, 1.0, (4,), np.float32)
    ag.library = SkillLibrary(ag.obs_dim, box, 4, 16)
    obs = torch.rand(3, ag.obs_dim)
    h = torch.randn(3, 16)
    enc = ag.controller.encode(obs)
    sk, st = torch.tensor([-1, 2, 1]), torch.tensor([0, 3, 1])
    start = torch.tensor([True, False, False])
    r = ag.act(obs, h, enc, sk, st, start, None)
    assert r["action"].shape == (3, 4)
    sel, out, _, p = ag._core(obs, h, enc, sk, st, start, None)
    _, alpha, logp, ent = ag._joint(out, sel, p, start, r["switch"], r["skill"], r["action"])
    assert torch.allclose(logp, r["logp"], atol=1e-5) and ent.shape == (3,)
    assert torch.allclose(alpha.sum(-1), torch.ones(3))


# --- fast paths against their references -------------------------------------------------------------


def _randomise(ag: CompositionalAgent) -> None:
    """Weights away from their initial values so every term (graph prior, terminations, skill
    heads) matters."""
    torch.manual_seed(3)
    with torch.no_grad():
        ag.graph.adjacency_logits.copy_(torch.randn_like(ag.graph.adjacency_logits))
        ag.library.termination.bias.copy_(torch.randn_like(ag.library.termination.bias))
        ag.library.skill_out.weight.mul_(100.0)


@pytest.mark.parametrize("adapted", [False, True])
@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"composer": "hard"},
        {"composer": "uniform", "graph": "none"},
        {"fast_params": "full"},
        {"continuous": True},
        {"skill_credit": "on"},
    ],
)
def test_fused_acting_step_equals_the_reference_step(kw, adapted):
    """The collector's no-grad step (fused layers) gives the reference step's numbers: the
    same memory, value, weights and joint log-prob to 1e-5, and with the same random draws the
    same switch, skill and action."""
    kw = dict(kw)
    continuous = kw.pop("continuous", False)
    ag = agent(**kw)
    if continuous:
        import gymnasium as gym
        import numpy as np

        from primitives.library import SkillLibrary

        box = gym.spaces.Box(-1.0, 1.0, (3,), np.float32)
        ag.library = SkillLibrary(ag.obs_dim, box, ag.k, 16)
    _randomise(ag)
    n, k = 6, ag.k
    pol = CompositionalPolicy(ag, inner=True)
    mem = pol.initial_memory(n)
    g = torch.Generator().manual_seed(0)
    h, c = torch.randn(n, 16, generator=g), torch.randn(n, 16, generator=g)
    pa = torch.softmax(torch.randn(n, k, generator=g), -1)
    if kw.get("skill_credit") == "on":  # [alpha, credit so far]
        pa = torch.cat([pa, torch.rand(n, k, generator=g) * (torch.arange(n) % 2).unsqueeze(1)], 1)
    sk = torch.tensor([-1, 0, 1, 2, 3, 1])
    st = torch.tensor([0, 1, 5, 8, 2, 9])
    mem = (h, c, pa, sk, st)
    prev = Prev(torch.zeros(n, dtype=torch.long), torch.rand(n, generator=g),
                torch.tensor([1.0, 0, 0, 1, 0, 0]))  # fmt: skip
    if adapted:
        pol.table = [torch.zeros(ag.fast_size)] + [
            torch.randn(ag.fast_size, generator=g) * 0.3 for _ in range(2)
        ]
        pol.fast_id = torch.tensor([0, 1, 2, 1, 0, 2])
    obs = torch.rand(n, ag.obs_dim, generator=g)
    for seed in range(5):
        torch.manual_seed(seed)
        with torch.enable_grad():
            ref = pol.step(obs, mem, prev)
        torch.manual_seed(seed)
        with torch.no_grad():
            fast = pol.step(obs, mem, prev)
        for a, b in zip(ref.memory[:3], fast.memory[:3]):
            assert torch.allclose(a.detach(), b, atol=1e-5)
        assert torch.allclose(ref.value.detach(), fast.value, atol=1e-5)
        assert torch.allclose(ref.logp.detach(), fast.logp, atol=1e-5)
        assert torch.allclose(ref.action.float(), fast.action.float(), atol=1e-5)
        for key in ("skill", "switch"):
            assert torch.equal(ref.extras[key], fast.extras[key]), key
        for key in ("alpha", "termination"):
            assert torch.allclose(ref.extras[key].detach(), fast.extras[key], atol=1e-5), key
    # the fused weights follow in-place parameter changes (here an optimiser-like write)
    with torch.no_grad():
        ag.library.skill_out.bias.add_(1.0)
        ag.controller.lstm.bias_hh.add_(0.5)
    torch.manual_seed(0)
    with torch.enable_grad():
        ref = pol.step(obs, mem, prev)
    torch.manual_seed(0)
    with torch.no_grad():
        fast = pol.step(obs, mem, prev)
    assert torch.allclose(ref.logp.detach(), fast.logp, atol=1e-5)
    assert torch.allclose(ref.memory[0].detach(), fast.memory[0], atol=1e-5)


def test_joint_log_prob_and_entropy_match_torch_distributions():
    """``_joint`` (written out for speed) against the same policy built from
    ``torch.distributions``: log-prob of (switch, skill, action) and the entropy term."""
    from torch.distributions import Bernoulli, Categorical

    ag = agent()
    _randomise(ag)
    g = torch.Generator().manual_seed(1)
    b, k = 7, ag.k
    out, _ = ag.library(torch.rand(b, ag.obs_dim, generator=g))
    sel = torch.randn(b, k, generator=g)
    p_sw = torch.rand(b, generator=g)
    start = torch.tensor([True, False, False, False, True, False, False])
    switch = start | torch.tensor([False, True, False, True, False, False, True])
    skill = torch.randint(0, k, (b,), generator=g)
    action = torch.randint(0, out.shape[-1], (b,), generator=g)
    _, alpha, logp, ent = ag._joint(out, sel, p_sw, start, switch, skill, action)
    mix = Categorical(probs=(alpha.unsqueeze(-1) * torch.softmax(out, -1)).sum(1))
    expect = mix.log_prob(action)
    expect = expect + torch.where(start, 0.0, Bernoulli(probs=p_sw).log_prob(switch.float()))
    expect = expect + torch.where(switch, Categorical(logits=sel).log_prob(skill), 0.0)
    assert torch.allclose(logp, expect, atol=1e-5)
    ent_expect = mix.entropy() + switch.float() * Categorical(logits=sel).entropy()
    assert torch.allclose(ent, ent_expect, atol=1e-5)


def test_inverse_cdf_draws_follow_the_probabilities():
    from compositional.agent import _inverse_cdf

    torch.manual_seed(0)
    probs = torch.tensor([[0.1, 0.0, 0.6, 0.3], [2.0, 2.0, 0.0, 4.0]])  # rows need not sum to 1
    n = 40000
    idx = _inverse_cdf(probs.repeat(n, 1), torch.rand(2 * n)).view(n, 2)
    for row in range(2):
        freq = torch.bincount(idx[:, row], minlength=4).float() / n
        assert torch.allclose(freq, probs[row] / probs[row].sum(), atol=0.01)
        assert int(idx[:, row].max()) <= 3 and (freq[probs[row] == 0] == 0).all()
    # the largest uniform below 1 still lands inside the row
    assert _inverse_cdf(probs, torch.full((2,), 1 - 2**-24)).tolist() == [3, 3]


def _reference_inner_step(ag, delta, ep, trace):
    """The inner policy-gradient step written plainly: returns-to-go by a reversed tensor loop,
    the fast path through ``functional_call``, the action distribution from
    ``AttentionComposer.mix``, the switch and skill terms from ``torch.distributions``."""
    from torch.distributions import Bernoulli, Categorical
    from torch.func import functional_call

    cfg = ag.cfg
    with torch.no_grad():
        out, beta = ag.library(ep.obs)
        p_sw = ag.graph.switch_prob(beta, trace["prev_skill"], trace["steps"], trace["start"])
        r = ep.rewards.float()
        ret, run = torch.zeros_like(r), 0.0
        for t in reversed(range(r.shape[0])):
            run = r[t] + cfg.ppo.gamma * run
            ret[t] = run
        adv = ret - ep.values
        adv = (adv - adv.mean()) / (adv.std() + 1e-8)
    d = delta.clone().requires_grad_(True)
    base = ag.fast_params()
    params = {n: base[n].detach() + v for n, v in ag._unflatten(d).items()}
    ctrl = functional_call(ag._fastpath, params, (trace["h"],))
    sel = ag.graph.next_skill_logits(ctrl, trace["prev_skill"], trace["start"])
    alpha = ag.composer.weights(sel, trace["skill"])
    dist = ag.composer.mix(out, alpha, ag.library.head, ag.library.log_std)
    logp = dist.log_prob(ep.actions)
    sw = trace["switch"]
    logp = logp + torch.where(trace["start"], 0.0, Bernoulli(probs=p_sw).log_prob(sw.float()))
    logp = logp + torch.where(sw, Categorical(logits=sel).log_prob(trace["skill"]), 0.0)
    (grad,) = torch.autograd.grad(-(logp * adv).mean(), d)
    return delta - cfg.inner_lr * grad


@pytest.mark.parametrize("fast", ["context", "full"])
def test_inner_step_equals_the_plain_policy_gradient_step(fast):
    ag = agent(inner_lr=1.0, fast_params=fast)
    _randomise(ag)
    pol, hook = ag.trial_policy(None)
    ep = _episode(ag, pol, T=16)
    n = ep.obs.shape[0]
    trace = {k: torch.stack([r[k] for r in pol.rows[-n:]])[:, 0] for k in pol.rows[0]}
    delta = torch.randn(ag.fast_size) * 0.1
    got = ag.adapt_fast(delta, ep, trace)
    want = _reference_inner_step(ag, delta, ep, trace)
    assert torch.allclose(got, want, atol=1e-5)
    assert not torch.allclose(got, delta)


def test_policy_state_keeps_only_unfinished_episodes_and_round_trips():
    ag = agent()
    pol, _ = ag.trial_policy(None)
    _episode(ag, pol, T=12)  # env 0 and env 1 both start at row 0
    pol.ep_start = [5, 9]  # as if env 0 restarted at row 5 and env 1 at row 9
    st = pol.state_dict()
    assert st["row_base"] == 5 and all(v.shape[0] == 7 for v in st["rows"].values())
    assert len(pol.rows) == 12  # saving does not drop anything
    new, _ = ag.trial_policy(None)
    new.load_state_dict(st)
    assert len(new.rows) == 7 and new.row_base == 5
    for a, b in zip(pol.rows[5:], new.rows):
        assert all(torch.equal(a[key], b[key]) for key in a)
    # a state saved as a list of per-step dicts (older checkpoints) still loads
    new.load_state_dict({**st, "rows": pol.rows[5:]})
    assert len(new.rows) == 7


@pytest.mark.parametrize("continuous", [False, True])
def test_fused_skill_policy_step_equals_the_reference_step(continuous):
    """Discovery's no-grad acting step (fused actor/critic layers, no termination heads) gives
    the module path's numbers: with the same random draws the same actions, log-probs and
    values to 1e-5, log-probs equal to ``SkillLibrary.dist``'s, and the fused weights follow
    in-place parameter changes."""
    import gymnasium as gym
    import numpy as np

    from primitives.discovery import SkillPolicy
    from primitives.library import SkillLibrary

    space = gym.spaces.Box(-1.0, 1.0, (3,), np.float32) if continuous else gym.spaces.Discrete(5)
    torch.manual_seed(0)
    lib = SkillLibrary(9, space, num_skills=4, hidden=16)
    with torch.no_grad():
        lib.skill_out.weight.mul_(100.0)  # peaked, distinct skills
    pol = SkillPolicy(lib)
    n = 6
    g = torch.Generator().manual_seed(1)
    obs = torch.rand(n, 9, generator=g)
    mem = torch.tensor([0, 1, 2, 3, 1, 2])
    prev = Prev(torch.zeros(n, dtype=torch.long), torch.zeros(n),
                torch.tensor([1.0, 0, 0, 1, 0, 0]))  # fmt: skip
    for step in range(6):
        if step == 3:  # an optimiser-like in-place write
            with torch.no_grad():
                lib.critic[2].bias.add_(0.5)
                lib.encoder[0][0].weight.mul_(1.5)
        torch.manual_seed(step)
        with torch.enable_grad():
            ref = pol.step(obs, mem, prev)
        torch.manual_seed(step)
        with torch.no_grad():
            fast = pol.step(obs, mem, prev)
        assert torch.equal(ref.memory, fast.memory)  # the same skills (re)drawn
        assert torch.allclose(ref.action.float(), fast.action.float(), atol=1e-5)
        assert torch.allclose(ref.logp.detach(), fast.logp, atol=1e-5)
        assert torch.allclose(ref.value.detach(), fast.value, atol=1e-5)
        with torch.no_grad():
            want = lib.dist(obs, fast.memory).log_prob(fast.action)
            assert torch.allclose(fast.logp, want, atol=1e-5)
            assert torch.allclose(fast.value, lib.value(obs, fast.memory), atol=1e-5)
    if not continuous:  # the draws follow Categorical(logits) of the active skill
        lib2 = SkillLibrary(9, space, num_skills=4, hidden=16)
        pol2 = SkillPolicy(lib2)
        o = obs[:1].repeat(20000, 1)
        m = torch.full((20000,), 2)
        p0 = Prev(torch.zeros(20000, dtype=torch.long), torch.zeros(20000), torch.zeros(20000))
        with torch.no_grad():
            a = pol2.step(o, m, p0).action
            probs = lib2.dist(o[:1], m[:1]).probs[0]
        freq = torch.bincount(a, minlength=5).float() / 20000
        assert torch.allclose(freq, probs, atol=0.015)


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"composer": "hard"},
        {"composer": "uniform", "graph": "none"},
        {"fast_params": "full"},
        {"inner_loop": "off"},
        {"skill_credit": "on"},
    ],
)
def test_one_step_outer_evaluate_equals_the_module_path(kw):
    """The outer update's ``evaluate`` for ``bptt_len=1`` (gathered input blocks, every
    adapted set's keys in one matmul) gives the module-by-module maths' log-probs, entropies,
    values and parameter gradients."""
    torch.manual_seed(0)
    ag = agent(bptt_len=1, **kw)
    _randomise(ag)
    col, ro = _rollout(ag)
    try:
        if kw.get("inner_loop", "on") == "on":
            assert bool((ro.extras["fast_id"] != 0).any())
        table = torch.stack(ag.policy.table)
        captured = _outer_update_args(ag, ro)
        T, N = ro.rewards.shape
        flat = {k: v.reshape(T * N, *v.shape[2:]) for k, v in ro.extras.items()}
        keep = (~ro.trial_start.reshape(-1)).float().unsqueeze(-1)
        obs_all, act_all = ro.obs.reshape(T * N, -1), ro.actions.reshape(T * N)
        ctrl = ag.controller

        def reference(mb):
            obs = obs_all[mb]
            e = ctrl.encode(obs)
            x = ctrl.inputs(
                e, flat["prev_alpha"][mb], ro.prev_reward.reshape(-1)[mb],
                ro.prev_done.reshape(-1)[mb],
            )  # fmt: skip
            h, _ = ctrl.step(x, ((flat["h_in"] * keep)[mb], (flat["c_in"] * keep)[mb]))
            sel, out, _, p_sw = ag._core(
                obs, h, e, flat["prev_skill"][mb], flat["steps"][mb], flat["start"][mb], None,
                ids=flat["fast_id"][mb], table=table,
            )  # fmt: skip
            _, _, logp, ent = ag._joint(
                out, sel, p_sw, flat["start"][mb], flat["switch"][mb], flat["skill"][mb],
                act_all[mb],
            )  # fmt: skip
            return logp, ent, ctrl.value(h, e)

        params = captured["params"]
        g = torch.Generator().manual_seed(2)
        for mb in (torch.randperm(T * N, generator=g)[:24], torch.arange(T * N)):
            results = []
            for fn in (captured["evaluate"], reference):
                for p in params:
                    p.grad = None
                logp, ent, v = fn(mb)
                w = torch.linspace(-1.0, 1.0, len(mb))
                ((logp * w).sum() + ent.sum() + (v * w).sum()).backward()
                grads = [None if p.grad is None else p.grad.clone() for p in params]
                results.append((logp.detach(), ent.detach(), v.detach(), grads))
            (a_lp, a_ent, a_v, a_g), (b_lp, b_ent, b_v, b_g) = results
            assert torch.allclose(a_lp, b_lp, atol=1e-5)
            assert torch.allclose(a_ent, b_ent, atol=1e-5)
            assert torch.allclose(a_v, b_v, atol=1e-5)
            for ga, gb in zip(a_g, b_g):
                assert (ga is None) == (gb is None)
                if ga is not None:
                    assert torch.allclose(ga, gb, atol=1e-5, rtol=1e-4)
    finally:
        col.envs.close()


def test_one_step_outer_evaluate_continuous_actions_equal_the_module_path():
    """The same check on synthetic stored steps with a continuous-action library (the float
    action columns ride in the gathered float block)."""
    import gymnasium as gym
    import numpy as np

    from primitives.library import SkillLibrary

    torch.manual_seed(0)
    ag = agent(bptt_len=1)
    ag.library = SkillLibrary(ag.obs_dim, gym.spaces.Box(-1.0, 1.0, (3,), np.float32), ag.k, 16)
    _randomise(ag)
    n, k = 12, ag.k
    g = torch.Generator().manual_seed(0)
    table = torch.stack([torch.zeros(ag.fast_size), torch.randn(ag.fast_size, generator=g) * 0.3])
    start = torch.tensor([True, False, False, True] * 3)
    prev_skill = torch.randint(0, k, (n,), generator=g)
    prev_skill[::4] = -1  # trial starts have no active skill; row 3 etc. restart with one
    flat = {
        "fast_id": torch.tensor([0, 1, 1] * 4),
        "prev_alpha": torch.softmax(torch.randn(n, k, generator=g), -1),
        "prev_skill": prev_skill,
        "steps": torch.randint(0, 6, (n,), generator=g),
        "start": start,
        "switch": start | (torch.rand(n, generator=g) < 0.5),
        "skill": torch.randint(0, k, (n,), generator=g),
    }
    obs, act = torch.rand(n, ag.obs_dim, generator=g), torch.randn(n, 3, generator=g)
    pr, pd = torch.rand(n, generator=g), (torch.rand(n, generator=g) < 0.3).float()
    h0, c0 = torch.randn(n, 16, generator=g), torch.randn(n, 16, generator=g)
    evaluate = ag._one_step_evaluator(flat, obs, act, pr, pd, h0, c0, table)
    ctrl, mb = ag.controller, torch.tensor([3, 0, 7, 7, 2, 11, 5])

    def reference():
        e = ctrl.encode(obs[mb])
        h, _ = ctrl.step(ctrl.inputs(e, flat["prev_alpha"][mb], pr[mb], pd[mb]), (h0[mb], c0[mb]))
        sel, out, _, p_sw = ag._core(
            obs[mb], h, e, prev_skill[mb], flat["steps"][mb], start[mb], None,
            ids=flat["fast_id"][mb], table=table,
        )  # fmt: skip
        _, _, logp, ent = ag._joint(
            out, sel, p_sw, start[mb], flat["switch"][mb], flat["skill"][mb], act[mb]
        )
        return logp, ent, ctrl.value(h, e)

    params = [p for p in ag.parameters() if p.requires_grad]
    results = []
    for fn in (lambda: evaluate(mb), reference):
        for p in params:
            p.grad = None
        logp, ent, v = fn()
        (logp.sum() + ent.sum() + v.sum()).backward()
        grads = [None if p.grad is None else p.grad.clone() for p in params]
        results.append((logp.detach(), ent.detach(), v.detach(), grads))
    (a_lp, a_ent, a_v, a_g), (b_lp, b_ent, b_v, b_g) = results
    assert torch.allclose(a_lp, b_lp, atol=1e-5) and torch.allclose(a_ent, b_ent, atol=1e-5)
    assert torch.allclose(a_v, b_v, atol=1e-5)
    for ga, gb in zip(a_g, b_g):
        assert (ga is None) == (gb is None)
        if ga is not None:
            assert torch.allclose(ga, gb, atol=1e-5, rtol=1e-4)
