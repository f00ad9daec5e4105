"""Outcome-based skill discovery (primitives.outcome) and its evaluation harness."""

from __future__ import annotations

import math
from dataclasses import replace

import gymnasium as gym
import numpy as np
import pytest
import torch

from envs.grid import PRIMITIVE_INDEX, PRIMITIVES, Oracle, Primitive
from envs.grid_events import NUM_PRIMITIVES, events
from primitives.option_training import (
    ChainPolicy,
    decision_log_probs,
    decision_targets,
    update_skills,
)
from primitives.options import OptionLibrary
from primitives.outcome import (
    OUTCOME_DIM,
    DiscoveryConfig,
    OutcomeDiscriminator,
    Segments,
    balance_weights,
    discovery_rewards,
    intrinsic_reward,
    main_outcome_of,
    outcome_label,
    relabel,
    relabel_assigned,
    relabelled_steps,
    terminated_segments,
)
from primitives.outcome_eval import skill_names, skill_outcome_table
from primitives.outcome_training import (
    Discovery,
    discover,
    load_discovered,
    make_room,
    uniform_draw,
    value_draw,
)
from rl.collect import Collector, Rollout
from rl.io import safe_torch_load
from rl.ppo import PPOConfig

#: CompoGrid's observation size (166: 4 instruction positions, envs.grid.MAX_LEN)
OBS_DIM = gym.make("CompoGrid-v0").observation_space.shape[0]


class FirstEvents(torch.nn.Module):
    def __init__(self, k: int) -> None:
        super().__init__()
        self.k = k

    def forward(self, feats):
        return 20.0 * feats[..., : self.k]


def EventDiscriminator(k: int) -> OutcomeDiscriminator:
    """Hand-built q(k | outcome): skill k <=> the terminating step's event k, sharply."""
    disc = OutcomeDiscriminator(k)
    disc.net = FirstEvents(k)
    return disc


def hand_rollout(T: int, N: int, seg_start, fired, seg_len=None) -> Rollout:
    """A (T, N) rollout of zeros with the given chain bookkeeping."""
    z = torch.zeros(T, N)
    b = torch.zeros(T, N, dtype=torch.bool)
    seg_start = torch.as_tensor(seg_start, dtype=torch.bool)
    term = torch.zeros(T, N, dtype=torch.bool)
    term[1:] = torch.as_tensor(fired, dtype=torch.bool)[:-1]  # decided one step later
    extras = {
        "skill": torch.zeros(T, N, dtype=torch.long),
        "seg_start": seg_start,
        "seg_len": torch.ones(T, N, dtype=torch.long) if seg_len is None else seg_len,
        "term": term,
        "beta_on": term.clone(),
        "beta_logp": z.clone(),
        "start_state": torch.zeros(T, N, 22),
    }
    obs = torch.zeros(T, N, OBS_DIM)
    return Rollout(
        obs, torch.zeros(T, N, dtype=torch.long), z, z, z, b, b, z, b, b,
        torch.zeros(T, N, dtype=torch.long), torch.zeros(T, N, dtype=torch.long), z, z,
        ~b, torch.zeros(N), None, extras, None, obs.clone(), [],
    )  # fmt: skip


def test_relabelling_on_hand_built_segments():
    # env 0: a segment t=0..2 that terminated after t=2, then one still running at the end;
    # env 1: the tail of an earlier segment (t=0..1, terminated), then one t=2..4 (terminated)
    seg_start = [[1, 0], [0, 0], [0, 1], [1, 0], [0, 0], [0, 1]]
    fired = [[0, 0], [0, 1], [1, 0], [0, 0], [0, 1], [0, 0]]
    ro = hand_rollout(6, 2, seg_start, fired)
    seg = terminated_segments(ro)
    got = sorted(zip(seg.env.tolist(), seg.end.tolist()))
    assert got == [(0, 2), (1, 1), (1, 4)]
    # their outcomes: events 3, 1 and 1; the hand-built discriminator names skill = event
    feats = torch.zeros(3, OUTCOME_DIM)
    order = {(0, 2): 3, (1, 1): 1, (1, 4): 1}
    for r, key in enumerate(zip(seg.env.tolist(), seg.end.tolist())):
        feats[r, order[key]] = 1.0
    k, p = relabel(EventDiscriminator(5), feats, 5)
    assert [int(x) for x in k] == [order[key] for key in zip(seg.env.tolist(), seg.end.tolist())]
    assert torch.all(p > 0.99)
    target = relabelled_steps(ro, seg, k)
    expect = torch.tensor([[3, 1], [3, 1], [3, 1], [-1, 1], [-1, 1], [-1, -1]])
    assert torch.equal(target, expect)


class KindLogits(torch.nn.Module):
    """Fixed logits per outcome kind: kind A (event 0) claimed by skills 0 and 1 alike, kind B
    (pickup(red ball)) owned by nobody, skill 0 slightly ahead."""

    def forward(self, feats):
        a = torch.tensor([2.0, 2.0, -5.0])
        b = torch.tensor([1.0, 0.5, 0.0])
        return torch.where(feats[:, :1] > 0.5, a, b)


def test_assigned_relabelling_gives_each_outcome_kind_its_own_skill():
    disc = OutcomeDiscriminator(3)
    disc.net = KindLogits()
    feats = torch.zeros(5, OUTCOME_DIM)
    feats[:3, 0] = 1.0
    feats[3:, PRIMITIVE_INDEX[Primitive.parse("pickup(red ball)")]] = 1.0
    k_arg, _ = relabel(disc, feats, 3)
    assert k_arg.tolist() == [0, 0, 0, 0, 0]  # a duplicate keeps both kinds on skill 0
    k, q = relabel_assigned(disc, feats, 3)
    assert k.tolist() == [1, 1, 1, 0, 0]  # B's best skill first, then A's best free one
    assert torch.allclose(q, torch.softmax(disc(feats), -1)[torch.arange(5), k])


def test_intrinsic_reward_is_log_q_minus_log_p():
    disc = EventDiscriminator(4)
    feats = torch.zeros(3, OUTCOME_DIM)
    feats[0, 2] = 1.0
    feats[1, 0] = feats[1, 1] = 1.0
    skill = torch.tensor([2, 1, 3])
    logits = 20.0 * feats[:, :4]
    expect = torch.log_softmax(logits, -1)[torch.arange(3), skill] - math.log(1 / 4)
    assert torch.allclose(intrinsic_reward(disc, feats, skill, 4), expect)
    # only two active skills (growth): p = 1/2 over them, q renormalised over them
    lq2 = torch.log_softmax(logits[:, :2], -1)
    r2 = intrinsic_reward(disc, feats, torch.tensor([1, 1, 0]), 2)
    assert torch.allclose(r2, lq2[torch.arange(3), torch.tensor([1, 1, 0])] + math.log(2))
    # placed on the segment's last step; a t_max cut earns cut_reward; both terminal
    seg_len = torch.tensor([[1, 1], [2, 1], [3, 2]])
    ro = hand_rollout(3, 2, [[1, 1], [0, 0], [0, 0]], [[0, 0], [0, 1], [0, 0]], seg_len)
    seg = terminated_segments(ro)
    seg = Segments(seg.env, seg.end, torch.tensor([1]), feats[1:2])
    rew, terminal = discovery_rewards(disc, ro, seg, 4, t_max=3, cut_reward=-0.5)
    assert rew[1, 1] == pytest.approx(float(expect[1]))
    assert rew[2, 0] == -0.5 and terminal[2, 0] and terminal[1, 1]
    assert int(terminal.sum()) == 2 and float(rew.abs().sum()) == pytest.approx(
        abs(float(expect[1])) + 0.5
    )
    # a floor bounds a confidently wrong outcome (log q ~ -20) from below, nothing else
    wrong = Segments(seg.env, seg.end, torch.tensor([3]), feats[1:2])
    raw, _ = discovery_rewards(disc, ro, wrong, 4, t_max=3, cut_reward=-0.5)
    floored, _ = discovery_rewards(disc, ro, wrong, 4, t_max=3, cut_reward=-0.5, floor=-1.0)
    assert raw[1, 1] < -10 and floored[1, 1] == -1.0 and floored[2, 0] == -0.5


def test_balance_weights_equalise_outcome_kinds():
    feats = torch.zeros(6, OUTCOME_DIM)
    feats[:4, 0] = 1.0  # four segments faced the red ball
    feats[4, 15] = 1.0  # one opened a box
    feats[:, 30] = torch.arange(6.0)  # the start state does not make an outcome kind
    w = balance_weights(feats)
    assert torch.allclose(w, torch.tensor([0.25] * 4 + [1.0, 1.0]))


def chain_rollout(lib: OptionLibrary, steps: int = 48, n: int = 16, t_max: int = 32):
    venv, sampler = make_room(n)
    gen = torch.Generator().manual_seed(0)
    pol = ChainPolicy(lib, t_max, uniform_draw([lib.num_skills], gen), gen)
    return Collector(venv, pol, task_sampler=sampler, seed=0).collect(steps)


def test_termination_log_probs_recorded_and_only_event_steps_terminate():
    torch.manual_seed(0)
    lib = OptionLibrary(OBS_DIM, 6, 3, termination="learned")
    ro = chain_rollout(lib)
    ex = ro.extras
    ev = torch.zeros_like(ex["term"])
    ev[1:] = events(ro.obs[:-1], ro.obs[1:]).any(-1) & ~ro.episode_start[1:]
    assert ex["term"].any() and ex["beta_on"].any()
    assert not (ex["term"] & ~ev).any(), "a step without an object event ended a skill"
    assert not (ex["beta_on"] & ~ev).any()
    # new segments start exactly after a termination, an episode end or t_max
    on = ex["beta_on"]
    assert torch.all(ex["beta_logp"][~on] == 0)
    # recorded log-probs are those of the decisions under the library that took them
    d_on, fired = decision_targets(ro)
    T, N = ex["skill"].shape
    flat = decision_log_probs(
        lib, ro.obs.reshape(T * N, -1), ro.next_obs.reshape(T * N, -1),
        ex["skill"].reshape(-1), d_on.reshape(-1), fired.reshape(-1),
    ).reshape(T, N)  # fmt: skip
    assert torch.allclose(flat[:-1], ex["beta_logp"][1:], atol=1e-5)
    b = lib.beta(ro.obs[:-1][d_on[:-1]], ro.next_obs[:-1][d_on[:-1]], ex["skill"][:-1][d_on[:-1]])
    assert torch.allclose(flat[:-1][d_on[:-1]], torch.where(fired[:-1][d_on[:-1]], b, 1 - b).log())
    # the termination head learns through the skills' PPO update
    before = lib.beta_head.weight.clone()
    opt = torch.optim.Adam(lib.parameters(), lr=1e-2)
    rewards = fired.float()  # reward stopping: the policy gradient moves beta
    update_skills(lib, ro, rewards, fired, opt, PPOConfig(update_epochs=1, num_minibatches=1))
    assert not torch.equal(before, lib.beta_head.weight)


def oracle_actor(lib: OptionLibrary):
    """Scripted stand-in for skill k: the oracle executing primitive ``event_of[k]``."""
    oracle, cache = Oracle(), {}

    def act(obs, skill, venv):
        out = []
        for i, k in enumerate(skill.tolist()):
            cache[i] = venv.env_at(i, cache.get(i))
            out.append(oracle.act_for(cache[i], [PRIMITIVES[int(lib.event_of[k])]]))
        return torch.as_tensor(out)

    return act


def test_harness_gives_one_for_oracle_skills():
    prims = [PRIMITIVE_INDEX[Primitive.parse(t)] for t in ("drop(green key)", "open(door)")]
    prims.append(PRIMITIVE_INDEX[Primitive.parse("goto(red ball)")])
    lib = OptionLibrary(OBS_DIM, 6, 3, termination="event", event_of=prims)
    table = skill_outcome_table(lib, n_states=2, primitives=prims, actor=oracle_actor(lib))
    assert np.array_equal(np.diag(table["success"]), np.ones(3))
    assert np.array_equal(np.diag(table["ends_with"]), np.ones(3))
    assert table["best_skill"].tolist() == [0, 1, 2]
    # named by the outcome they end on (the drop skill ends at once where nothing is carried)
    names = skill_names(table)
    assert all(n.startswith(str(PRIMITIVES[p])) for n, p in zip(names, prims)), names


def test_outcome_label_prefers_the_specific_primitive():
    ev = torch.zeros(3, NUM_PRIMITIVES, dtype=torch.bool)
    drop, goto = PRIMITIVE_INDEX[Primitive.parse("drop(red ball)")], 0
    ev[0, [drop, goto]] = True  # a drop also faces the object
    opened = PRIMITIVE_INDEX[Primitive.parse("open(door)")]
    ev[1, [opened, opened + 1]] = True  # opening the door also toggles it
    assert outcome_label(ev).tolist() == [drop, opened, -1]


def test_main_outcome_of_names_each_skill_by_its_most_frequent_outcome_kind():
    drop, pickup = (
        PRIMITIVE_INDEX[Primitive.parse(t)] for t in ("drop(red ball)", "pickup(red ball)")
    )
    feats = torch.zeros(5, OUTCOME_DIM)
    feats[[0, 1], drop] = feats[[0, 1], 0] = 1.0  # a drop that also faces the ball: kind drop
    feats[2, pickup] = 1.0
    feats[3, pickup] = 1.0
    # segment 4 ended on no event: it names nothing
    skill = torch.tensor([0, 0, 0, 2, 1])
    # skill 0: drop twice, pickup once; skill 1: nothing; skill 2: pickup; skill 3: no segment
    assert main_outcome_of(feats, skill, 4).tolist() == [drop, -1, pickup, -1]


def test_discovery_names_its_skills_from_the_segments_it_saw():
    """After a discovery step, a skill's name is the outcome kind most of its replayed
    segments ended on (``compo graph`` and ``compo trace`` show it)."""
    run = Discovery(DiscoveryConfig(num_skills=4, total_env_steps=512, num_envs=8, num_steps=64))
    assert run.lib.outcome_of.tolist() == [-1] * 4
    run.step()
    rp = run.replay
    assert rp.n > 0
    want = main_outcome_of(rp.feats[: rp.n], rp.skill[: rp.n], 4)
    assert torch.equal(run.lib.outcome_of, want) and (want >= 0).any()
    names = run.lib.skill_names([str(p) for p in PRIMITIVES])
    assert [n is not None for n in names] == (want >= 0).tolist()


def test_tiny_discovery_end_to_end(tmp_path):
    cfg = DiscoveryConfig(num_skills=4, total_env_steps=1024, num_envs=8, num_steps=64)
    lib, disc, hist = discover(cfg, log=None, checkpoint=tmp_path / "lib.pt")
    assert len(hist) == 2 and hist[-1]["env_steps"] == 1024
    assert all(h["segments_terminated"] > 0 for h in hist)
    lib2, disc2 = load_discovered(safe_torch_load(tmp_path / "lib.pt"))
    x = torch.randn(5, OBS_DIM)
    k = torch.arange(5) % 4
    assert torch.equal(lib.dist(x, k).logits, lib2.dist(x, k).logits)
    f = torch.rand(5, OUTCOME_DIM)
    assert torch.equal(disc(f), disc2(f))
    # same seed, same run
    lib3, _, hist3 = discover(cfg, log=None)
    assert hist3[-1]["ppo/loss"] == hist[-1]["ppo/loss"]


@pytest.mark.parametrize(
    "kw",
    [
        {"num_skills": 0},
        {"t_max": 0},
        {"start_skills": 30},
        {"bc_coef": -1.0},
        {"bc_epochs": 0},
        {"ppo_epochs": 0},
        {"disc_balance": "yes"},
    ],
)
def test_bad_discovery_config(kw):
    with pytest.raises(ValueError, match=next(iter(kw))):
        DiscoveryConfig(**kw)


def test_valor_growth_draws_only_active_skills_and_grows():
    cfg = DiscoveryConfig(
        num_skills=6, total_env_steps=512, num_envs=8, num_steps=32, start_skills=2, grow_at=0.0
    )
    run = Discovery(cfg)
    ro_skills = []
    run.collector.policy.step = wrap_step(run.collector.policy.step, ro_skills)
    run.step()
    assert max(ro_skills[0]) < 2  # the first rollout drew from the 2 active skills only
    assert run.active[0] == 4  # accuracy >= grow_at: 1.5 * 2 + 1 skills
    run.step()
    assert run.active[0] == 6  # capped at K


def wrap_step(step, seen: list):
    def wrapped(obs, memory, prev):
        out = step(obs, memory, prev)
        if not seen:
            seen.append([])
        seen[0].extend(out.extras["skill"].tolist())
        return out

    return wrapped


@pytest.mark.parametrize(
    "args, message",
    [
        (["--update-epochs", "0"], "ppo_epochs=0"),
        (["--gamma", "2"], "gamma=2.0"),
        (["--num-skills", "0"], "num_skills=0"),
        (["--disc-steps", "0"], "disc_steps=0"),
        (["--bc-epochs", "0"], "bc_epochs=0"),
    ],
)
def test_discover_command_bad_input_one_line(tmp_path, capsys, args, message):
    """``python -m experiments.discover``: a bad setting is one line, exit 2, nothing written."""
    from experiments.discover import main

    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        main(["--out", str(out), "--steps", "1000", *args])
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_imitation_takes_bc_epochs_passes_over_the_relabelled_steps(monkeypatch):
    """Each pass is a fresh order of the same relabelled steps, in PPO-sized minibatches:
    with E passes the optimiser takes E times the imitation steps of one pass, and every
    relabelled step is imitated exactly E times."""
    import primitives.outcome_training as ot

    steps = {}
    for epochs in (1, 3):
        cfg = DiscoveryConfig(
            num_skills=4, total_env_steps=512, num_envs=8, num_steps=64, bc_epochs=epochs
        )
        run = Discovery(cfg)
        calls: list[torch.Tensor] = []

        def spy(lib, ro, target, idx, weight=None, total=None, _real=ot.bc_loss, _seen=calls):
            _seen.append(idx.clone())
            return _real(lib, ro, target, idx, weight, total)

        monkeypatch.setattr(ot, "bc_loss", spy)
        stats = run.step()
        monkeypatch.undo()
        n = stats["relabelled_steps"]
        counts = torch.bincount(torch.cat(calls))
        assert n > 0 and int(counts.sum()) == epochs * n
        assert set(counts[counts > 0].tolist()) == {epochs}  # each step, E times
        assert int((counts > 0).sum()) == n
        steps[epochs] = len(calls)
    assert steps[3] == 3 * steps[1] == 3 * PPOConfig().num_minibatches


@pytest.mark.parametrize("ppo_epochs, update_epochs, expected", [(None, 3, 3), (8, 3, 8)])
def test_discovery_ppo_epochs_sets_the_skills_ppo_epochs(monkeypatch, ppo_epochs, update_epochs,
                                                         expected):  # fmt: skip
    """Discovery's PPO runs ``ppo_epochs`` passes (None: ``ppo.update_epochs``), and the
    ``ppo`` it was given (the compositional agent's ``skills.ppo``) is left as it was."""
    import primitives.outcome_training as ot

    seen: list[int] = []

    def spy(lib, ro, rewards, terminal, opt, cfg, backward=None, _real=ot.update_skills):
        seen.append(cfg.update_epochs)
        return _real(lib, ro, rewards, terminal, opt, cfg, backward=backward)

    monkeypatch.setattr(ot, "update_skills", spy)
    skills_ppo = PPOConfig(update_epochs=update_epochs)
    cfg = DiscoveryConfig(num_skills=4, total_env_steps=512, num_envs=8, num_steps=64,
                          ppo_epochs=ppo_epochs, ppo=skills_ppo)  # fmt: skip
    Discovery(cfg).step()
    assert seen == [expected]
    assert skills_ppo.update_epochs == update_epochs


def test_balanced_discriminator_draws_equalise_the_skills():
    """``disc_balance``: a replay holding skill 0 nine times as often as skill 1 is drawn
    about half and half; without it, as it is stored (and with the same generator calls as
    before the option existed: ``torch.randint`` over the replay)."""
    cfg = DiscoveryConfig(num_skills=4, total_env_steps=512, num_envs=8, num_steps=64,
                          disc_batch=4000)  # fmt: skip
    for balance in (False, True):
        run = Discovery(replace(cfg, disc_balance=balance), room=False, library=OptionLibrary(
            OBS_DIM, 6, 4, 32, "learned"))  # fmt: skip
        skill = torch.tensor([0] * 900 + [1] * 100)
        run.replay.add(torch.rand(1000, OUTCOME_DIM), skill)
        gen = torch.Generator().manual_seed(0).get_state()
        run.gen.set_state(gen)
        idx = run._draw_replay()
        share = float((run.replay.skill[idx] == 1).float().mean())
        if balance:
            assert abs(share - 0.5) < 0.05
        else:
            assert abs(share - 0.1) < 0.03
            ref = torch.Generator()
            ref.set_state(gen)
            assert torch.equal(idx, torch.randint(1000, (4000,), generator=ref))


def test_value_draw_picks_skills_above_chance_and_explores_uniformly():
    """Only skills whose critic is above 0 are drawn, except the ``draw_explore`` share drawn
    uniformly; no skill above chance: uniform."""
    torch.manual_seed(0)
    lib = OptionLibrary(OBS_DIM, 6, 5, termination="learned")
    with torch.no_grad():  # values -1, +1, -1, +1, -1 everywhere
        last = lib.critic[-1]
        last.weight.zero_()
        last.bias.copy_(torch.tensor([-1.0, 1.0, -1.0, 1.0, -1.0]))
    obs = torch.rand(4000, OBS_DIM)
    gen = torch.Generator().manual_seed(0)
    greedy = value_draw(lib, [5], gen, 0.0)(obs, None)
    assert set(greedy.tolist()) == {1, 3}
    mixed = value_draw(lib, [5], gen, 0.5)(obs, None)
    share = torch.bincount(mixed, minlength=5).float() / len(mixed)
    # 1 and 3: 0.25 + 0.1 each; the others 0.1 each
    assert torch.allclose(share, torch.tensor([0.1, 0.35, 0.1, 0.35, 0.1]), atol=0.03)
    with torch.no_grad():
        last.bias.fill_(-1.0)
    assert len(set(value_draw(lib, [5], gen, 0.0)(obs, None).tolist())) == 5
    # only the active skills are drawn (growth)
    with torch.no_grad():
        last.bias.fill_(1.0)
    assert value_draw(lib, [2], gen, 0.3)(obs, None).max() < 2
