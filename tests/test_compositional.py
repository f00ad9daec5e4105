"""The skill-level compositional agent: options at decision points, SMDP advantages, the
pointer composer, the feasibility graph, checkpoints, bad input, end to end."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from compositional.agent import CompositionalAgent
from compositional.composer import PointerComposer
from compositional.controller import current_token
from compositional.decisions import smdp_advantages
from compositional.graph import SkillGraph
from rl.collect import make_vector_env
from rl.train import fit

TINY = {
    "primitives": "supervised",
    "env_kwargs": {"task_info": "reward", "size": 8},
    "num_envs": 4,
    "episodes_per_trial": 2,
    "hidden": 16,
    "key_dim": 8,
    "library_hidden": 32,
    "compositions": ["pickup(red ball) > open(door)", "goto(blue ball) > goto(door)"],
    "total_env_steps": 4 * 32 * 2 + 4 * 64 * 2,
    "library_fraction": 0.25,
    "ppo": {"num_steps": 64, "update_epochs": 1, "num_minibatches": 2},
    "skills": {"num_steps": 32, "ppo": {"update_epochs": 1, "num_minibatches": 2}},
}


def _rollout(agent: CompositionalAgent, steps: int = 150, seed: int = 0):
    agent.iteration = agent.phase1_iters  # act as in phase 2
    col = agent.make_collector()
    torch.manual_seed(seed)
    return col, col.collect(steps)


def test_smdp_advantages_by_hand():
    """Decisions at t = 0, 3, 6 of a 9-step rollout; rewards 1 at t = 2 and 0.5 at t = 4; a
    trial ends at t = 4; the last decision's segment is unfinished."""
    g, lam = 0.9, 0.5
    r = np.zeros(9)
    r[2], r[4] = 1.0, 0.5
    end = np.zeros(9, dtype=bool)
    end[4] = True
    v = np.array([0.2, 0.4, 0.7])
    adv, ret, done = smdp_advantages(r, v, np.array([0, 3, 6]), end, g, lam)
    # decision 1 (t = 3..4) ends the trial: terminal, R = 0 + 0.9 * 0.5
    a1 = 0.9 * 0.5 - 0.4
    # decision 0 (t = 0..2, duration 3): R = 0.81, then gamma^3 V(d1), lambda-trace of d1
    a0 = (0.81 + g**3 * 0.4 - 0.2) + g**3 * lam * a1
    np.testing.assert_allclose(adv[:2], [a0, a1])
    np.testing.assert_allclose(ret[:2], [a0 + 0.2, a1 + 0.4])
    assert done.tolist() == [True, True, False] and adv[2] == 0.0


def test_episode_boundary_inside_a_trial_is_not_terminal():
    r = np.array([0.0, 1.0, 0.0, 0.0])
    v = np.array([0.1, 0.3, 0.5])
    adv, _, done = smdp_advantages(r, v, np.array([0, 2, 3]), np.zeros(4, bool), 0.5, 1.0)
    a1 = 0.0 + 0.5 * 0.5 - 0.3
    np.testing.assert_allclose(adv[:2], [(0.5 + 0.25 * 0.3 - 0.1) + 0.25 * a1, a1])


def test_controller_steps_only_at_decisions_and_the_skill_acts_alone():
    torch.manual_seed(0)
    agent = CompositionalAgent(TINY)
    lib = agent.library
    # make skill k always take action k % 6 (so the action reveals which skill acted)
    with torch.no_grad():
        lib.actor.weight.zero_()
        bias = torch.full((lib.num_skills, 6), -30.0)
        bias[torch.arange(lib.num_skills), torch.arange(lib.num_skills) % 6] = 30.0
        lib.actor.bias.copy_(bias.reshape(-1))
    hs = []

    class Spy:
        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, k):
            return getattr(self.inner, k)

        def step(self, obs, memory, prev):
            out = self.inner.step(obs, memory, prev)
            hs.append(out.memory[0].clone())
            return out

    agent.iteration = agent.phase1_iters
    col = agent.make_collector()
    col.policy = Spy(col.policy)
    ro = col.collect(200)
    ex = ro.extras
    dec = ex["decision"]
    # the controller's state changes exactly at decisions
    h = torch.stack(hs)
    changed = torch.zeros_like(dec)
    changed[1:] = (h[1:] != h[:-1]).any(-1)
    changed[0] = (h[0] != ro.memory_start[0]).any(-1)
    assert torch.equal(changed, dec)
    # decisions are far fewer than steps; each decision starts a segment, nothing else does
    assert 0 < dec.sum() < dec.numel() / 2
    sk = ex["skill"]
    switched = torch.zeros_like(dec)
    switched[1:] = sk[1:] != sk[:-1]
    assert not (switched & ~dec).any()
    assert (dec | ~ro.episode_start).all(), "every episode start is a decision"
    # every action comes from the active skill alone
    assert torch.equal(ro.actions, sk % 6)


@pytest.mark.parametrize("T", [0.0, 0.5, 1.0])
def test_skill_temperature_tempers_the_acting_skill_alone(T):
    """Skill k puts 0.6 on action k % 6 and 0.4 on (k + 1) % 6: at temperature T the acting
    distribution is softmax(logits / T) (T = 0: the first action always), the skill choice is
    the controller's as before."""
    torch.manual_seed(0)
    agent = CompositionalAgent({**TINY, "skill_temperature": T})
    lib = agent.library
    K = lib.num_skills
    with torch.no_grad():
        lib.actor.weight.zero_()
        bias = torch.full((K, 6), -60.0)
        bias[torch.arange(K), torch.arange(K) % 6] = float(np.log(0.6))
        bias[torch.arange(K), (torch.arange(K) + 1) % 6] = float(np.log(0.4))
        lib.actor.bias.copy_(bias.reshape(-1))
    _, ro = _rollout(agent, 200)
    sk = ro.extras["skill"]
    first = ro.actions == sk % 6
    assert (first | (ro.actions == (sk + 1) % 6)).all()
    p = 0.6 ** (1 / T) / (0.6 ** (1 / T) + 0.4 ** (1 / T)) if T > 0 else 1.0
    ent = -(p * np.log(p) + (1 - p) * np.log(1 - p)) if 0 < p < 1 else 0.0
    torch.testing.assert_close(
        ro.extras["skill_entropy"], torch.full_like(sk, ent, dtype=torch.float)
    )
    if T == 0:
        assert first.all()
    else:  # 800 draws: the share of the first action within 4 standard errors of p
        assert abs(first.float().mean().item() - p) < 4 * np.sqrt(p * (1 - p) / first.numel())


def test_uniform_composer_acts_with_the_drawn_skill():
    torch.manual_seed(1)
    agent = CompositionalAgent({**TINY, "composer": "uniform"})
    _, ro = _rollout(agent, 80)
    d = ro.extras["decision"]
    assert torch.allclose(ro.extras["dec_logp"][d], torch.full((int(d.sum()),), -np.log(19)))


def test_graph_rows_are_distributions_and_none_ignores_the_previous_skill():
    g = SkillGraph(4)
    g.update(torch.tensor([-1, 0, 0, 2]), torch.tensor([1, 1, 3, 0]), torch.tensor([1, 0, 1, 1]))
    P = g.transition()
    assert P.shape == (5, 4) and torch.allclose(P.sum(-1), torch.ones(5))
    assert P[0, 3] > P[0, 1] and float(g.feasibility()[0, 1]) == pytest.approx(1 / 3)
    none = SkillGraph(4, mode="none")
    none.update(torch.tensor([0]), torch.tensor([1]), torch.tensor([1]))
    assert torch.equal(none.log_prior(torch.tensor([-1, 0, 3])), torch.zeros(3, 4))


def test_state_graph_learns_where_a_skill_cannot_run():
    """graph='state': f(s) starts at P = 0.5 for every skill (no preference: the same softmax
    as without a prior) and, fitted on segments where skill 0 fails exactly when feature 0 is
    set (skill 1 always succeeds), gives skill 0 a low probability there only; the log-prior
    never goes below log FLOOR. The other modes build no network."""
    from compositional.graph import FLOOR

    torch.manual_seed(0)
    g = SkillGraph(3, "state", obs_dim=5)
    assert SkillGraph(3).net is None and SkillGraph(3, "none").net is None
    s = torch.randn(400, 5)
    s[:, 0] = (torch.rand(400) < 0.5).float()
    assert torch.equal(g.log_prior(torch.full((4,), -1), s[:4]), torch.full((4, 3), np.log(0.5)))
    skill = torch.randint(2, (400,))
    ok = torch.where(skill == 0, s[:, 0] == 0, torch.ones(400, dtype=torch.bool))
    opt = torch.optim.Adam(g.net.parameters(), lr=1e-2)
    for _ in range(30):
        stats = g.fit_states(s, skill, ok, opt)
    assert stats["graph/state_accuracy"] > 0.95
    p = g.state_feasibility(s)
    blocked, free = s[:, 0] == 1, s[:, 0] == 0
    assert p[blocked, 0].max() < 0.2 and p[free, 0].min() > 0.8 and p[:, 1].min() > 0.8
    prior = g.log_prior(torch.zeros(400, dtype=torch.long), s)
    assert prior.min() >= np.log(FLOOR) - 1e-6
    assert (prior[blocked, 0] < prior[blocked, 1] - 1.0).all()
    with pytest.raises(ValueError, match="obs_dim"):
        SkillGraph(3, "state")


def test_state_graph_data_are_segments_that_ended_as_their_skill_ends():
    """Phase 2 gives the state graph (start observation, skill, reached) of every segment that
    ended by its termination or t_max — never one cut by the episode's end — each starting
    at a decision of its env with the skill chosen there; a supervised skill reached when its
    primitive completed inside the segment."""
    from envs.grid_events import events

    torch.manual_seed(2)
    agent = CompositionalAgent({**TINY, "graph": "state", "t_max": 6})
    col, ro = _rollout(agent, 120)
    ex = ro.extras
    done = ro.terminated | ro.truncated
    assert not (ex["seg_label"][1:] & done[:-1]).any()  # no label on an episode's first step
    obs, skill, ok = agent._phase2_state_segments(ro)
    assert len(skill) == int((ex["seg_label"] & ro.valid).sum()) > 10
    assert 0 < int(ok.sum()) < len(ok)
    ev = events(ro.obs, ro.next_obs)
    n = 0
    for i in range(ro.obs.shape[1]):
        steps = torch.nonzero(ex["decision"][:, i]).squeeze(-1).tolist()
        for a, b in zip(steps[:-1], steps[1:]):
            if not ex["seg_label"][b, i]:
                continue
            k = int(ex["skill"][a, i])
            assert torch.equal(obs[n], agent.family.task_free(ro.obs[a, i])) and skill[n] == k
            assert bool(ok[n]) == bool(ev[a:b, i, k].any())  # skill k stands for primitive k
            n += 1
    assert n == len(skill)


def test_instruction_query_depends_only_on_the_current_token():
    env = make_vector_env(
        "CompoGrid-v0", 2, {"task_info": "instruction",
                            "composition": ["pickup(red ball) > open(door)",
                                            "open(door) > pickup(red ball)"]},
    )  # fmt: skip
    obs, _ = env.reset(seed=0)
    obs = torch.as_tensor(obs)
    tok = current_token(obs)
    assert tok.sum(-1).tolist() == [1.0, 1.0] and not torch.equal(tok[0], tok[1])
    comp = PointerComposer(8, 5, 19, 4, instruction=True)
    h1, h2 = torch.randn(2, 8), torch.randn(2, 8)
    prior = torch.zeros(2, 5)
    assert torch.equal(comp.logits(h1, tok, prior), comp.logits(h2, tok, prior))
    # the same token at different positions gives the same query
    same = torch.stack([tok[0], tok[0]])
    q = comp.query(h1, same)
    assert torch.equal(q[0], q[1])


def test_evidence_pathway_adds_the_weighed_belief_tables_to_each_skill_logit():
    """``belief_logits``: logit_k += w_paid(h) * paid_k + w_tried(h) * tried_k, the two weights
    shared by every skill and zero at initialisation (the same logits as without it); off, the
    composer has no such parameters."""
    torch.manual_seed(0)
    h, tok, prior = torch.randn(3, 8), torch.zeros(3, 19), torch.randn(3, 5)
    paid, tried = (torch.rand(3, 5) > 0.5).float(), (torch.rand(3, 5) > 0.5).float()
    torch.manual_seed(1)
    plain = PointerComposer(8, 5, 19, 4)
    torch.manual_seed(1)
    comp = PointerComposer(8, 5, 19, 4, evidence=True)
    assert not any("evidence" in k for k in plain.state_dict())
    base = plain.logits(h, tok, prior)
    assert torch.equal(comp.logits(h, tok, prior, paid, tried), base)
    with torch.no_grad():
        comp.evidence.weight.normal_()
        comp.evidence.bias.normal_()
    w = comp.evidence(h)
    expected = base + w[:, :1] * paid + w[:, 1:] * tried
    torch.testing.assert_close(comp.logits(h, tok, prior, paid, tried), expected)
    # an env with no evidence at this position decides as without the pathway
    torch.testing.assert_close(comp.logits(h, tok, prior, 0 * paid, 0 * tried), base)


@pytest.mark.parametrize("graph", ["learned", "state"])
def test_checkpoint_holds_every_part_and_resume_crosses_the_phase_boundary(tmp_path, graph):
    cfg = {**TINY, "graph": graph}
    full = fit(CompositionalAgent(cfg), tmp_path / "full", logger=False, checkpoint_every=1)
    assert full.phase1_iters == 2 and full.phase2_iters == 2
    ck = torch.load(tmp_path / "full" / "checkpoints" / "last.ckpt", weights_only=True)
    keys = ck["state_dict"].keys()
    for part in ("library.", "controller.", "composer.", "graph."):
        assert any(k.startswith(part) for k in keys), part
    # the state graph's network and its optimiser (a third one) are in the checkpoint
    assert any(k.startswith("graph.net.") for k in keys) == (graph == "state")
    assert len(ck["optimizer_states"]) == (3 if graph == "state" else 2)
    assert "act_gen" in ck["rl_state"]["extra"]
    assert full.graph.tries.sum() > 0
    # a run that dies at the phase boundary (after phase 1's checkpoint), then resumed

    class Dies(CompositionalAgent):
        def training_step(self, batch, batch_idx):
            if self.iteration == self.phase1_iters:
                raise RuntimeError("killed at the phase boundary")
            return super().training_step(batch, batch_idx)

    with pytest.raises(RuntimeError, match="phase boundary"):
        fit(Dies(cfg), tmp_path / "cut", logger=False, checkpoint_every=1)
    resumed = fit(CompositionalAgent(cfg), tmp_path / "cut", resume=True, logger=False)
    assert resumed.iteration == full.iteration and resumed.env_steps == full.env_steps
    for (n, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), n


@pytest.mark.parametrize(
    "over, match",
    [
        ({"num_skills": 0}, "num_skills=0"),
        ({"t_max": 0}, "t_max=0"),
        ({"composer": "hard"}, "composer='hard'"),
        ({"graph": "dense"}, "graph='dense'"),
        ({"primitives": "scripted"}, "primitives='scripted'"),
        ({"num_skills": 5}, "num_skills=5 with primitives='supervised'"),
        ({"inner_loop": "maybe"}, "inner_loop='maybe'"),
        ({"belief_evidence": "all"}, "belief_evidence='all'; allowed: terminated, any"),
        ({"belief_logits": "yes"}, "belief_logits='yes'; allowed: on, off"),
        ({"interrupt": "reward"}, "interrupt='reward'; allowed: off, progress"),
        ({"skill_temperature": -0.5}, "skill_temperature=-0.5; allowed: a finite number >= 0"),
        ({"skill_temperature": 0.5, "composer": "soft"}, "skill_temperature=0.5 with"),
        ({"skill_temperature": 0.5, "library_finetune": "on"}, "library_finetune='on', composer"),
        ({"discovery": {"draw": "greedy"}}, "draw='greedy'; allowed: uniform, value"),
        ({"discovery": {"bogus": 1}}, "discovery.bogus: not a discovery setting"),
        ({"discovery": {"bc_coef": -1}}, "bc_coef=-1"),
        ({"discovery": {"ppo_epochs": 0}}, "ppo_epochs=0"),
        ({"discovery": {"relabel": "best"}}, "relabel='best'"),
        ({"discovery": {"disc_steps": "many"}}, "disc_steps=.many.; allowed: an integer"),
        ({"discovery": {"bc_coef": "x"}}, "allowed: numbers"),
    ],
)
def test_bad_config_one_line(over, match):
    with pytest.raises(ValueError, match=match) as e:
        CompositionalAgent({**TINY, **over})
    assert "\n" not in str(e.value)


def test_library_checkpoint_must_match(tmp_path):
    other = CompositionalAgent({**TINY, "primitives": "random-frozen", "num_skills": 7})
    path = tmp_path / "lib.pt"
    torch.save({f"library.{k}": v for k, v in other.library.state_dict().items()}, path)
    with pytest.raises(ValueError, match="does not match this agent") as e:
        CompositionalAgent({**TINY, "library_checkpoint": str(path)})
    assert "\n" not in str(e.value)
    ok = CompositionalAgent(
        {**TINY, "primitives": "random-frozen", "num_skills": 7, "library_checkpoint": str(path)}
    )
    assert torch.equal(ok.library.actor.weight, other.library.actor.weight)


def test_tiny_train_then_heldout(tmp_path):
    from experiments.heldout import HeldoutConfig, run_heldout

    cfg = HeldoutConfig(
        methods=[{"name": "compositional", "method": "compositional", "config": {
            k: v for k, v in TINY.items() if k not in ("total_env_steps", "compositions", "num_envs")
        }}],
        references=["random"], seeds=[0], total_env_steps=TINY["total_env_steps"], num_envs=4,
        eval={"episodes": 2, "num_tasks": 4, "num_envs": 4},
    )  # fmt: skip
    doc = run_heldout(cfg, tmp_path / "run", log=lambda *_: None)
    m = doc["methods"]["compositional"]
    assert len(m["success_at"]) == 2 and m["meta_train_env_steps"] >= TINY["total_env_steps"]


def test_soft_composer_mixes_every_step():
    torch.manual_seed(2)
    agent = CompositionalAgent({**TINY, "composer": "soft"})
    _, ro = _rollout(agent, 30)
    assert ro.extras["decision"].all()
    alpha = ro.extras["alpha"]
    assert torch.allclose(alpha.sum(-1), torch.ones_like(alpha[..., 0]))


def test_collector_resume_of_the_skill_level_policy():
    """The policy's memory (controller state, active segment, belief tables) round-trips
    through the collector's checkpoint."""
    torch.manual_seed(3)
    agent = CompositionalAgent(TINY)
    agent.iteration = agent.phase1_iters
    a = agent.make_collector()
    a.collect(40)
    state = a.state_dict()
    gen = agent.act_gen.get_state()
    rng = torch.get_rng_state()
    ra = a.collect(40)
    b = agent.make_collector()
    b.load_state_dict(state)
    agent.act_gen.set_state(gen)
    torch.set_rng_state(rng)
    rb = b.collect(40)
    assert torch.equal(ra.actions, rb.actions) and torch.equal(
        ra.extras["skill"], rb.extras["skill"]
    )


@pytest.mark.parametrize("composer", ["attention", "soft", "attention+evidence", "attention+state"])
def test_update_replays_the_acting_policy_exactly(composer):
    """Before any update, the controller replayed over the stored decisions (packed sequences
    cut at trial starts, from the rollout's start state) gives the acting log-probabilities
    and values: PPO's first ratio is exactly 1 (with the evidence pathway, on non-zero
    weights: the belief tables are read back from the stored controller inputs)."""
    from compositional.decisions import collect_decisions, replay

    torch.manual_seed(4)
    evidence = composer.endswith("+evidence")
    composer = composer.split("+")[0]
    over = {"composer": composer, "episodes_per_trial": 1}
    state = composer.endswith("+state")  # the state graph's prior, stored with the decision
    if state:
        over["graph"] = "state"
    agent = CompositionalAgent({**TINY, **over, "belief_logits": "on" if evidence else "off"})
    if state:
        with torch.no_grad():
            for p in agent.graph.net.parameters():
                p.normal_(0, 0.5)
    if evidence:
        with torch.no_grad():
            agent.composer.evidence.weight.normal_(0, 0.5)
            agent.composer.evidence.bias.copy_(torch.tensor([3.0, -3.0]))
    col, _ = _rollout(agent, 60)  # trials start inside the next rollout too
    ro = col.collect(90)
    D = collect_decisions(ro, 0.99, 0.95, composer == "soft")
    assert D.reset[:, 1:].any(), "a trial starts mid-rollout"
    if state:  # the prior differs between decisions
        assert D.prior[D.valid].std(0).min() > 0.01
    if evidence:  # skills tried without pay at a position: the pathway is exercised
        T, K = agent.family.n_tokens, agent.composer.num_skills
        assert D.x[..., -T - K : -T][D.valid].sum() > 0
    with torch.no_grad():
        logits, values = replay(agent, D, torch.arange(D.x.shape[0]))
    logp = torch.log_softmax(logits, -1)
    if composer == "soft":
        new = torch.logsumexp(logp + D.pi_a.clamp_min(1e-12).log(), -1)
    else:
        new = logp.gather(-1, D.skill[..., None]).squeeze(-1)
    v = D.valid
    torch.testing.assert_close(new[v], D.logp[v], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(values[v], D.value[v], atol=1e-5, rtol=1e-5)


def test_discovery_section_reaches_phase_one(tmp_path):
    cfg = {**TINY, "primitives": "discovered", "library_fraction": 0.5,
           "discovery": {"bc_coef": 3.0, "disc_steps": 2, "ppo_epochs": 3}}  # fmt: skip
    agent = CompositionalAgent(cfg)
    agent.make_collector().envs.close()
    assert agent.discovery.cfg.bc_coef == 3.0 and agent.discovery.cfg.disc_steps == 2
    # discovery's PPO epochs are its own; the skills' PPO (supervised, fine-tuning) keeps its
    assert agent.discovery.ppo.update_epochs == 3
    assert agent.cfg.skills.ppo.update_epochs == TINY["skills"]["ppo"]["update_epochs"] != 3
    assert agent.discovery.cfg.t_max == TINY.get("t_max", 32)


def test_discovered_segments_cut_by_t_max_are_no_success_for_the_graph(tmp_path):
    """A discovered skill's segment succeeds when its termination fired (or, once measured,
    when it caused its main outcome), not when ``t_max`` cut it: skills that never terminate
    leave the graph with tries and no success, in both phases (discovery's PPO treats a cut
    as terminal; the graph must not)."""

    class NeverEnds(CompositionalAgent):
        def build(self) -> None:
            super().build()
            with torch.no_grad():
                self.library.beta_head.bias.fill_(-30.0)

    cfg = {**TINY, "primitives": "discovered", "library_fraction": 0.5, "t_max": 8}
    agent = fit(NeverEnds(cfg), tmp_path / "run", logger=False)
    assert bool((agent.library.outcome_of < 0).all())  # no skill's outcome measured
    assert agent.graph.tries.sum() > 50 and agent.graph.successes.sum() == 0


def test_discovered_library_phase_and_resume(tmp_path):
    """primitives='discovered': phase 1 is outcome-based discovery (no task reward) on the
    agent's own library and discriminator; its state is in the checkpoint and a run killed
    inside phase 1 resumes to the same parameters."""
    cfg = {**TINY, "primitives": "discovered", "library_fraction": 0.5, "t_max": 24}
    full = fit(CompositionalAgent(cfg), tmp_path / "full", logger=False, checkpoint_every=1)
    assert full.phase1_iters >= 2
    ck = torch.load(tmp_path / "full" / "checkpoints" / "last.ckpt", weights_only=True)
    assert any(k.startswith("discriminator.") for k in ck["state_dict"])
    assert full.graph.tries.sum() > 0 and full.library.termination == "learned"
    # `python -m experiments.discover --evaluate` reads the run's library and discriminator
    from experiments.discover import discovery_state
    from primitives.outcome_training import load_discovered

    state = discovery_state(ck)
    lib, disc = load_discovered(state)
    assert state["config"]["t_max"] == full.cfg.t_max  # measured with the run's own cut
    assert torch.equal(lib.actor.weight, full.library.actor.weight)
    assert torch.equal(
        disc.state_dict()["net.0.weight"], full.discriminator.state_dict()["net.0.weight"]
    )

    class Dies(CompositionalAgent):
        def training_step(self, batch, batch_idx):
            if self.iteration == 1:
                raise RuntimeError("killed in phase 1")
            return super().training_step(batch, batch_idx)

    with pytest.raises(RuntimeError, match="phase 1"):
        fit(Dies(cfg), tmp_path / "cut", logger=False, checkpoint_every=1)
    ck1 = torch.load(tmp_path / "cut" / "checkpoints" / "last.ckpt", weights_only=True)
    assert "discovery" in ck1["rl_state"]["extra"]
    resumed = fit(CompositionalAgent(cfg), tmp_path / "cut", resume=True, logger=False)
    for (n, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), n


@pytest.mark.parametrize(
    "over, match",
    [
        ({"library_finetune": "maybe"}, "library_finetune='maybe'"),
        ({"library_finetune": "on", "finetune_kl": -1.0}, "finetune_kl=-1.0"),
        ({"library_finetune": "on", "finetune_kl": float("nan")}, "'finetune_kl'=nan"),
        ({"library_finetune": "on", "composer": "soft"}, "with composer='soft'"),
        ({"library_finetune": "on", "primitives": "random-frozen"}, "primitives='random-frozen'"),
        (
            {"library_finetune": "discovery", "primitives": "random-frozen"},
            "'discovery' with primitives='random-frozen'",
        ),
        (
            {"library_finetune": "discovery", "primitives": "discovered", "composer": "soft"},
            "'discovery' with composer='soft'",
        ),
        (
            {
                "library_finetune": "discovery",
                "primitives": "discovered",
                "library_checkpoint": "lib.pt",
            },
            "'discovery' with a library_checkpoint",
        ),  # fmt: skip
        (
            {"library_finetune": "discovery", "primitives": "discovered", "discovery_share": 1.0},
            "discovery_share=1.0; allowed: a number in",
        ),
        ({"discovery_share": 0.25}, "discovery_share=0.25 with library_finetune='off'"),
        (
            {
                "library_finetune": "discovery",
                "primitives": "discovered",
                "discovery_share": 0.25,
                "ppo": {"num_steps": 48},
            },
            "ppo.num_steps=48 and skills.num_steps=32",
        ),
    ],
)
def test_bad_finetune_config_one_line(over, match):
    with pytest.raises(ValueError, match=match) as e:
        CompositionalAgent({**TINY, **over})
    assert "\n" not in str(e.value)


def test_library_finetune_starts_from_phase_one_and_moves_the_skills(tmp_path):
    """library_finetune='on': phase 1 is unchanged (the frozen copy equals the library a frozen
    run ends with), phase 2 moves the skills away from it, and the copy is in the checkpoint."""
    off = fit(CompositionalAgent(TINY), tmp_path / "off", logger=False)
    on_cfg = {**TINY, "library_finetune": "on"}
    on = fit(CompositionalAgent(on_cfg), tmp_path / "on", logger=False, checkpoint_every=1)
    for (n, a), (_, b) in zip(
        off.library.state_dict().items(), on.frozen_library.state_dict().items()
    ):
        assert torch.equal(a, b), n
    moved = [
        not torch.equal(a, b)
        for a, b in zip(on.library.parameters(), on.frozen_library.parameters())
    ]
    assert any(moved)
    assert any("losses/skills_loss_kl_frozen" in h for h in on.history)
    ck = torch.load(tmp_path / "on" / "checkpoints" / "last.ckpt", weights_only=True)
    assert any(k.startswith("frozen_library.") for k in ck["state_dict"])


def _kl_after_finetune(coef: float) -> float:
    from copy import deepcopy

    from primitives.option_training import update_skills

    torch.manual_seed(5)
    agent = CompositionalAgent({**TINY, "library_finetune": "on"})
    frozen = deepcopy(agent.library).requires_grad_(False)
    _, ro = _rollout(agent, 64)
    ro.rewards[::7] = 1.0  # reward on some steps, so the policy gradient is not zero
    opt = torch.optim.Adam(agent.library.parameters(), lr=3e-2)
    cfg = agent.cfg.skills.ppo
    terminal = torch.zeros_like(ro.terminated)
    for _ in range(5):
        update_skills(agent.library, ro, ro.rewards, terminal, opt, cfg, kl_to=(frozen, coef))
    obs = ro.obs.reshape(-1, ro.obs.shape[-1])
    skill = ro.extras["skill"].reshape(-1).clamp(min=0)
    with torch.no_grad():
        p = torch.log_softmax(agent.library.logits(obs, skill), -1)
        q = torch.log_softmax(frozen.logits(obs, skill), -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def test_kl_to_the_frozen_skills_holds_them_close():
    """The same fine-tuning steps drift less from the frozen skills with a large KL weight."""
    free, held = _kl_after_finetune(0.0), _kl_after_finetune(100.0)
    assert free > 0 and held < 0.5 * free, (free, held)


def _tried(evidence: str, beta_bias: float) -> float:
    """Largest "tried here without pay" entry over a phase-2 rollout of discovered-style
    skills (learned termination) whose termination always (bias +30) or never (-30) fires."""
    from compositional.policy import TRIED

    torch.manual_seed(5)
    cfg = {**TINY, "primitives": "discovered", "belief_evidence": evidence, "t_max": 4}
    agent = CompositionalAgent(cfg)
    with torch.no_grad():
        agent.library.beta_head.weight.zero_()
        agent.library.beta_head.bias.fill_(beta_bias)
    agent.iteration = agent.phase1_iters
    col = agent.make_collector()
    tried = 0.0
    for _ in range(6):
        col.collect(20)
        tried = max(tried, float(col.memory[TRIED].max()))
    return tried


def _advances_without_decision(interrupt: str) -> tuple[int, int]:
    """(sub-task completions inside an episode, those not followed by a decision) over a
    phase-2 rollout whose skills never terminate by themselves (beta bias -30, long t_max)."""
    from compositional.controller import progress_of

    torch.manual_seed(3)
    cfg = {**TINY, "primitives": "discovered", "t_max": 200, "interrupt": interrupt,
           "compositions": ["goto(blue ball) > goto(red ball) > goto(door)"]}  # fmt: skip
    agent = CompositionalAgent(cfg)
    with torch.no_grad():
        agent.library.beta_head.weight.zero_()
        agent.library.beta_head.bias.fill_(-30.0)
    _, ro = _rollout(agent, steps=400, seed=3)
    T, N = ro.actions.shape
    p0 = progress_of(ro.obs.reshape(T * N, -1)).reshape(T, N)
    p1 = progress_of(ro.next_obs.reshape(T * N, -1)).reshape(T, N)
    advanced = (p1 > p0) & ~(ro.terminated | ro.truncated)
    advanced[-1] = False  # its decision would be in the next rollout
    nxt = torch.zeros_like(advanced)
    nxt[:-1] = ro.extras["decision"][1:]
    return int(advanced.sum()), int((advanced & ~nxt).sum())


def test_interrupt_on_progress_ends_the_skill_at_each_completed_subtask():
    n, missed = _advances_without_decision("progress")
    assert n >= 5 and missed == 0
    # without interruption the never-terminating skills run on past the completions
    n, missed = _advances_without_decision("off")
    assert n >= 5 and missed == n


def test_belief_counts_only_segments_that_ended_by_their_own_termination():
    # never terminating: every segment is cut by t_max (or the episode's end): no evidence
    assert _tried("terminated", -30.0) == 0.0
    # the earlier rule counts the cut segments too
    assert _tried("any", -30.0) == 1.0
    # terminating at the first step: a skill that ended by itself and was not paid is tried
    assert _tried("terminated", 30.0) == 1.0


CONT = {**TINY, "primitives": "discovered", "library_fraction": 0.5,
        "library_finetune": "discovery"}  # fmt: skip


def test_continued_discovery_records_chain_extras_in_phase_two():
    """library_finetune='discovery': a phase-2 rollout carries what ``Discovery.learn`` reads,
    with ChainPolicy's meaning — seg_len restarts at 1 on each decision and counts up inside
    a segment, the start state is the object state where the segment began, a termination
    decision is sampled (and fires) only on object-event steps, and logp / value are the
    acting skill's."""
    from envs.grid_events import events, object_state

    torch.manual_seed(3)
    agent = CompositionalAgent({**CONT, "t_max": 6})
    _, ro = _rollout(agent, 120)
    ex = ro.extras
    start, seg_len = ex["seg_start"], ex["seg_len"]
    assert start.any() and (~start).any()
    assert (seg_len[start] == 1).all()
    assert (seg_len[1:][~start[1:]] == seg_len[:-1][~start[1:]] + 1).all()
    assert seg_len.max() <= 6
    T, N = start.shape
    for i in range(N):
        for t in range(T):
            s0 = t if start[t, i] else s0  # noqa: F821 (a rollout starts with a decision)
            assert torch.equal(ex["start_state"][t, i], object_state(ro.obs[s0, i]))
    # a decision at t judges the step t-1 -> t
    ev = torch.zeros(T, N, dtype=torch.bool)
    ev[1:] = events(ro.obs[:-1], ro.obs[1:]).any(-1) & ~(ro.terminated | ro.truncated)[:-1]
    assert not (ex["beta_on"] & ~ev).any() and not (ex["term"] & ~ex["beta_on"]).any()
    assert ((ex["beta_logp"] != 0) == ex["beta_on"]).all() and ex["beta_on"].any()
    obs, skill = ro.obs.reshape(T * N, -1), ex["skill"].reshape(-1)
    with torch.no_grad():
        lp = agent.library.dist(obs, skill).log_prob(ro.actions.reshape(-1)).reshape(T, N)
        v = agent.library.value(obs, skill).reshape(T, N)
    torch.testing.assert_close(ro.logp, lp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ro.values, v)


def test_continued_discovery_sees_no_task_reward():
    """``Discovery.learn`` on a phase-2 rollout updates the library identically whatever task
    reward the rollout collected: only the outcome objective trains the skills."""
    from copy import deepcopy

    torch.manual_seed(4)
    agent = CompositionalAgent(CONT)
    _, ro = _rollout(agent, 64)
    agent.discovery = None
    agent.make_collector().envs.close()  # builds the phase-2 learner (no room)
    learners = []
    for r in (torch.zeros_like(ro.rewards), torch.rand(ro.rewards.shape)):
        d = deepcopy(agent.discovery)
        torch.manual_seed(0)  # the PPO minibatches' order
        d.learn(dataclasses.replace(ro, rewards=r))
        learners.append(d)
    a, b = (d.lib.state_dict() for d in learners)
    moved = any(not torch.equal(a[k], v) for k, v in agent.library.state_dict().items())
    assert moved and all(torch.equal(a[k], b[k]) for k in a)


def _killed_in_phase_two_then_resumed(cfg: dict, kill_at: int, out) -> CompositionalAgent:
    """Train ``cfg`` until phase 2's iteration ``kill_at`` raises (checkpoints after every
    iteration), then resume it from its last checkpoint to the end; returns the resumed agent."""

    class Dies(CompositionalAgent):
        def training_step(self, batch, batch_idx):
            if self.iteration == self.phase1_iters + kill_at:
                raise RuntimeError("killed")
            return super().training_step(batch, batch_idx)

    with pytest.raises(RuntimeError, match="killed"):
        fit(Dies(cfg), out, logger=False, checkpoint_every=1)
    return fit(CompositionalAgent(cfg), out, resume=True, logger=False)


@pytest.mark.parametrize("kill_at", [0, 1], ids=["phase-boundary", "inside-phase-2"])
def test_continued_discovery_resumes_exactly(tmp_path, kill_at):
    """The objective's state (optimisers, replay, generator) is in phase 2's checkpoints: a
    run killed at the phase boundary or inside phase 2 resumes to the same parameters."""
    full = fit(CompositionalAgent(CONT), tmp_path / "full", logger=False, checkpoint_every=1)
    assert full.phase2_iters >= 2
    assert any("losses/discovery_bc_loss" in h for h in full.history)
    ck = torch.load(tmp_path / "full" / "checkpoints" / "last.ckpt", weights_only=True)
    assert "discovery" in ck["rl_state"]["extra"]
    resumed = _killed_in_phase_two_then_resumed(CONT, kill_at, tmp_path / "cut")
    assert resumed.iteration == full.iteration
    for (n, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), n


SHARED = {**CONT, "discovery_share": 0.5, "total_env_steps": 1408, "library_fraction": 0.27}


@pytest.mark.parametrize("kill_at", [0, 1, 2], ids=["boundary", "at-a-turn", "after-a-turn"])
def test_discovery_turns_in_phase_two_count_and_resume_exactly(tmp_path, kill_at):
    """discovery_share=0.5: every second phase-2 iteration runs phase 1's discovery in its
    room (kept open across the boundary) for a controller rollout's env steps, which count
    against the budget; the room's state is in the checkpoint, so a run killed at the
    boundary, at a turn or after one resumes to the same parameters."""
    full = fit(CompositionalAgent(SHARED), tmp_path / "full", logger=False, checkpoint_every=1)
    p1 = full.phase1_iters
    assert (p1, full.phase2_iters) == (3, 4)
    turns = [h["iteration"] for h in full.history if h.get("charts/discovery_turn")]
    assert turns == [p1 + 2, p1 + 4]  # (counted after the step); phase 1's own log no turn
    assert full.env_steps == 3 * 4 * 32 + 4 * 4 * 64 == SHARED["total_env_steps"]
    controller = [h for h in full.history if h.get("charts/phase") == 2.0 and "iteration" in h]
    assert len([h for h in controller if not h.get("charts/discovery_turn")]) == 2
    assert full.discovery.collector.env_steps == 3 * 4 * 32 + 2 * 4 * 64  # phase 1 + turns
    resumed = _killed_in_phase_two_then_resumed(SHARED, kill_at, tmp_path / "cut")
    assert resumed.env_steps == full.env_steps
    for (n, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), n


def test_continued_supervised_objective_trains_on_completion_not_task_reward(tmp_path):
    """library_finetune='discovery' with the supervised library: phase 2 trains each skill on
    the completion of its own primitive (the phase-1 objective) on the controller's segments,
    identically whatever task reward the rollout collected; phase 1 is unchanged; a run killed
    inside phase 2 resumes to the same parameters."""
    from copy import deepcopy

    cfg = {**TINY, "library_finetune": "discovery"}
    torch.manual_seed(4)
    agent = CompositionalAgent(cfg)
    agent.configure_optimizers()
    _, ro = _rollout(agent, 64)
    assert "skill_logp" not in ro.extras and "seg_start" in ro.extras and "seg_len" not in ro.extras
    libs = []
    for r in (torch.zeros_like(ro.rewards), torch.rand(ro.rewards.shape)):
        a = deepcopy(agent)
        opt = torch.optim.Adam(a.library.parameters(), lr=1e-2)
        torch.manual_seed(0)  # the PPO minibatches' order
        a.manual_backward = lambda loss: loss.backward()
        a._continue_supervised(dataclasses.replace(ro, rewards=r), opt)
        libs.append(a.library.state_dict())
    moved = any(not torch.equal(libs[0][k], v) for k, v in agent.library.state_dict().items())
    assert moved and all(torch.equal(libs[0][k], libs[1][k]) for k in libs[0])

    off = fit(CompositionalAgent(TINY), tmp_path / "off", logger=False)
    full = fit(CompositionalAgent(cfg), tmp_path / "full", logger=False, checkpoint_every=1)
    phase2 = [h for h in full.history if h["charts/phase"] == 2.0]
    assert phase2 and all("losses/skills_loss_policy" in h for h in phase2)
    assert not all(
        torch.equal(a, b) for a, b in zip(off.library.parameters(), full.library.parameters())
    )

    class Dies(CompositionalAgent):
        def training_step(self, batch, batch_idx):
            if self.iteration == self.phase1_iters + 1:
                raise RuntimeError("killed")
            return super().training_step(batch, batch_idx)

    with pytest.raises(RuntimeError, match="killed"):
        fit(Dies(cfg), tmp_path / "cut", logger=False, checkpoint_every=1)
    resumed = fit(CompositionalAgent(cfg), tmp_path / "cut", resume=True, logger=False)
    for (n, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), n
