"""PEARL: encoder maths, SAC losses, gradient routing, a learned-embedding check, and a smoke
run through ``rl.train.fit`` / ``rl.protocol.run_trials`` / ``load_module`` with exact resume."""

from __future__ import annotations

import math

import gymnasium as gym
import numpy as np
import pytest
import torch

from baselines.pearl import (
    ContextEncoder,
    PEARLConfig,
    PEARLModule,
    PEARLNets,
    TaskBuffers,
    kl_to_standard_normal,
    pearl_losses,
)
from rl.sac import (
    actor_loss_discrete,
    alpha_loss,
    critic_loss,
    soft_target_continuous,
    soft_target_discrete,
    squashed_gaussian,
)

torch.set_num_threads(1)

# --- encoder -----------------------------------------------------------------------------------


@pytest.mark.parametrize("aggregation", ["product", "mean"])
def test_encoder_is_permutation_invariant(aggregation):
    torch.manual_seed(0)
    enc = ContextEncoder(9, 5, hidden=32, aggregation=aggregation)
    ctx = torch.randn(3, 17, 9)
    mu, var = enc(ctx)
    perm = torch.randperm(17)
    mu_p, var_p = enc(ctx[:, perm])
    torch.testing.assert_close(mu, mu_p, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(var, var_p, rtol=1e-5, atol=1e-6)
    # and it does depend on the content (not a constant)
    mu_other, _ = enc(torch.randn(3, 17, 9))
    assert not torch.allclose(mu, mu_other)


def test_product_posterior_variance_shrinks_as_context_grows():
    torch.manual_seed(1)
    enc = ContextEncoder(6, 5, hidden=32, aggregation="product")
    ctx = torch.randn(4, 30, 6)
    # the empty context is the prior N(0, I)
    mu0, var0 = enc(ctx, torch.zeros(4, 30, dtype=torch.bool))
    torch.testing.assert_close(var0, torch.ones(4, 5))
    torch.testing.assert_close(mu0, torch.zeros(4, 5))
    # the prior is not one of the factors (as in PEARL), so shrinkage holds from 1 transition on
    _, prev = enc(ctx[:, :1])
    for n in range(2, 31):
        _, var = enc(ctx[:, :n])
        assert (var < prev).all(), f"variance did not shrink when going to {n} transitions"
        prev = var
    # a mask gives the same posterior as cutting the padding off
    mask = torch.zeros(4, 30, dtype=torch.bool)
    mask[:, :12] = True
    mu_m, var_m = enc(ctx, mask)
    mu_c, var_c = enc(ctx[:, :12])
    torch.testing.assert_close(mu_m, mu_c)
    torch.testing.assert_close(var_m, var_c)


def test_kl_to_standard_normal_matches_torch():
    mu, var = torch.randn(3, 5), torch.rand(3, 5) + 0.1
    q = torch.distributions.Normal(mu, var.sqrt())
    p = torch.distributions.Normal(torch.zeros(3, 5), torch.ones(3, 5))
    torch.testing.assert_close(
        kl_to_standard_normal(mu, var), torch.distributions.kl_divergence(q, p).sum(-1)
    )


# --- SAC losses ----------------------------------------------------------------------------------


def test_continuous_target_uses_min_of_twin_critics_and_stops_at_termination():
    r = torch.tensor([0.5, 0.5])
    term = torch.tensor([False, True])
    q1, q2 = torch.tensor([1.0, 5.0]), torch.tensor([3.0, 2.0])
    logp = torch.tensor([0.1, 0.2])
    t = soft_target_continuous(r, term, q1, q2, logp, gamma=0.9, alpha=0.5)
    torch.testing.assert_close(t, torch.tensor([0.5 + 0.9 * (1.0 - 0.5 * 0.1), 0.5]))


def test_discrete_target_equals_hand_computed_expectation():
    r, term = torch.tensor([1.0]), torch.tensor([False])
    probs = torch.tensor([[0.25, 0.75]])
    q1, q2 = torch.tensor([[1.0, 2.0]]), torch.tensor([[0.0, 3.0]])
    alpha, gamma = 0.1, 0.9
    # V(s') = 0.25 * (min(1, 0) - 0.1 log 0.25) + 0.75 * (min(2, 3) - 0.1 log 0.75)
    v = 0.25 * (0.0 - alpha * math.log(0.25)) + 0.75 * (2.0 - alpha * math.log(0.75))
    t = soft_target_discrete(r, term, q1, q2, probs.log(), gamma=gamma, alpha=alpha)
    assert t.item() == pytest.approx(1.0 + gamma * v, abs=1e-6)
    t_term = soft_target_discrete(r, ~term, q1, q2, probs.log(), gamma=gamma, alpha=alpha)
    assert t_term.item() == pytest.approx(1.0)


def test_critic_actor_and_alpha_losses():
    target = torch.tensor([1.0, 2.0])
    terms = critic_loss(torch.tensor([0.0, 2.0]), torch.tensor([1.0, 4.0]), target)
    assert terms["loss_q1"].item() == pytest.approx(0.5)
    assert terms["loss_q2"].item() == pytest.approx(2.0)
    assert terms["loss_critic"].item() == pytest.approx(2.5)
    # the discrete actor loss moves probability towards the action with the larger min-Q
    logits = torch.zeros(1, 2, requires_grad=True)
    q = torch.tensor([[0.0, 1.0]])
    actor_loss_discrete(torch.log_softmax(logits, -1), q, q + 5, 0.01)["loss_actor"].backward()
    assert logits.grad[0, 1] < 0 < logits.grad[0, 0]
    # temperature: entropy above the target pushes alpha down (positive gradient on log alpha)
    log_alpha = torch.zeros((), requires_grad=True)
    alpha_loss(log_alpha, torch.tensor([2.0]), target_entropy=1.0)["loss_alpha"].backward()
    assert log_alpha.grad.item() == pytest.approx(1.0)


def test_squashed_gaussian_log_prob_matches_tanh_transform():
    torch.manual_seed(0)
    mean, log_std = torch.randn(64, 3), torch.randn(64, 3) * 0.3
    g = torch.Generator().manual_seed(3)
    u, logp = squashed_gaussian(mean, log_std, generator=g)
    assert (u.abs() < 1).all()
    ref = torch.distributions.TransformedDistribution(
        torch.distributions.Normal(mean, log_std.exp()),
        [torch.distributions.TanhTransform(cache_size=1)],
    )
    x = torch.atanh(u.clamp(-1 + 1e-6, 1 - 1e-6))
    ref_logp = (
        torch.distributions.Normal(mean, log_std.exp()).log_prob(x)
        - ref.transforms[0].log_abs_det_jacobian(x, u)
    ).sum(-1)
    torch.testing.assert_close(logp, ref_logp, rtol=1e-3, atol=1e-3)


def _fake_batch(nets: PEARLNets, K: int, B: int, discrete: bool):
    obs = torch.randn(K, B, nets.obs_dim)
    acts = torch.randint(nets.n_actions, (K, B)) if discrete else torch.rand(K, B, 2) * 2 - 1
    batch = {
        "obs": obs, "actions": acts, "rewards": torch.randn(K, B),
        "next_obs": torch.randn(K, B, nets.obs_dim), "terminated": torch.rand(K, B) < 0.1,
    }  # fmt: skip
    ctx = nets.features(obs, acts, batch["rewards"], batch["next_obs"])
    return ctx, batch


@pytest.mark.parametrize("discrete", [True, False])
def test_gradient_routing_critic_to_encoder_actor_only_to_actor(discrete):
    """PEARL sec. 4.2: the encoder learns from the critic (and KL), never from the actor."""
    torch.manual_seed(0)
    space = gym.spaces.Discrete(4) if discrete else gym.spaces.Box(-1.0, 1.0, (2,))
    nets = PEARLNets(7, space, latent_dim=5, hidden=32, encoder_hidden=32)
    ctx, batch = _fake_batch(nets, 3, 8, discrete)
    terms = pearl_losses(nets, ctx, batch, gamma=0.9, kl_weight=0.0, target_entropy=-1.0)
    enc = list(nets.encoder.parameters())
    qs = list(nets.q1.parameters()) + list(nets.q2.parameters())
    actor = list(nets.actor.parameters())

    def grads(loss, params):
        gs = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        return [0.0 if g is None else g.abs().sum().item() for g in gs]

    assert sum(grads(terms["loss_critic"], enc)) > 0
    assert sum(grads(terms["loss_kl"], enc)) > 0
    assert sum(grads(terms["loss_actor"], enc)) == 0
    assert sum(grads(terms["loss_actor"], qs)) == 0
    assert sum(grads(terms["loss_actor"], actor)) > 0
    assert sum(grads(terms["loss_critic"], actor)) == 0
    assert sum(grads(terms["loss_alpha"], [nets.log_alpha])) > 0
    assert sum(grads(terms["loss_alpha"], enc + qs + actor)) == 0


# --- buffers -----------------------------------------------------------------------------------


def test_task_buffers_ring_and_round_trip():
    buf = TaskBuffers(2, 5, 3, (), torch.long)

    def data(start, n):
        x = torch.arange(start, start + n, dtype=torch.float32)
        return {
            "obs": x[:, None].repeat(1, 3), "actions": x.long(), "rewards": x,
            "next_obs": x[:, None].repeat(1, 3) + 1, "terminated": torch.zeros(n, dtype=torch.bool),
        }  # fmt: skip

    buf.add(1, data(0, 4))
    buf.add(1, data(4, 3))  # wraps: 7 items into capacity 5 keeps 2..6
    assert buf.size.tolist() == [0, 5]
    assert sorted(buf.rewards[1].tolist()) == [2.0, 3.0, 4.0, 5.0, 6.0]
    s = buf.sample(torch.tensor([1, 1]), 50)
    assert s["obs"].shape == (2, 50, 3) and set(s["rewards"].flatten().tolist()) <= {2, 3, 4, 5, 6}
    torch.testing.assert_close(s["next_obs"], s["obs"] + 1)
    other = TaskBuffers(2, 5, 3, (), torch.long)
    other.load_state_dict(buf.state_dict())
    for k in (*TaskBuffers.FIELDS, "ptr", "size"):
        assert torch.equal(getattr(buf, k), getattr(other, k)), k
    buf.clear(1)
    assert buf.size.tolist() == [0, 0]
    with pytest.raises(ValueError, match="buffer field 'capacity' is 5"):
        TaskBuffers(2, 6, 3, (), torch.long).load_state_dict(other.state_dict())
    with pytest.raises(ValueError, match="buffer field 'ptr'.*num_train_tasks"):
        TaskBuffers(3, 5, 3, (), torch.long).load_state_dict(other.state_dict())


def _ramp(start: int, n: int) -> dict[str, torch.Tensor]:
    x = torch.arange(start, start + n, dtype=torch.float32)
    return {
        "obs": x[:, None].repeat(1, 3), "actions": x.long(), "rewards": x,
        "next_obs": x[:, None] + 1.0 + torch.zeros(n, 3), "terminated": x > start + n - 2,
    }  # fmt: skip


def test_checkpoint_holds_only_filled_rows_and_restores_exactly():
    buf = TaskBuffers(3, 50, 3, (), torch.long)
    buf.add(0, _ramp(0, 7))
    buf.add(2, _ramp(100, 60))  # wrapped: ptr 10, full
    st = buf.state_dict()
    assert st["rewards"].shape == (7 + 50,) and st["obs"].shape == (57, 3)
    # next_obs is kept only where the next row's obs is not it: the ends of the two ramps
    assert st["next_obs_rest"].shape == (2, 3) and int(st["next_obs_from_obs"].sum()) == 55
    other = TaskBuffers(3, 50, 3, (), torch.long)
    other.add(1, _ramp(5, 4))  # stale content must not survive the load
    other.load_state_dict(st)
    for k in (*TaskBuffers.FIELDS, "ptr", "size"):
        assert torch.equal(getattr(buf, k), getattr(other, k)), k
    # and the ring continues identically
    buf.add(2, _ramp(500, 3))
    other.add(2, _ramp(500, 3))
    assert torch.equal(buf.rewards, other.rewards) and torch.equal(buf.ptr, other.ptr)
    # a ring that wrapped mid-episode (rows 0-2 newer than rows 3-49) round-trips exactly
    again = TaskBuffers(3, 50, 3, (), torch.long)
    again.load_state_dict(buf.state_dict())
    assert torch.equal(again.next_obs, buf.next_obs) and torch.equal(again.obs, buf.obs)
    bad = dict(buf.state_dict(), next_obs_rest=torch.zeros(1, 3))
    with pytest.raises(ValueError, match="'next_obs_rest' has shape"):
        again.load_state_dict(bad)
    # a whole-buffer state (checkpoints before issue 12) still loads
    legacy = {k: getattr(buf, k).clone() for k in (*TaskBuffers.FIELDS, "ptr", "size")}
    old = TaskBuffers(3, 50, 3, (), torch.long)
    old.load_state_dict(legacy)
    assert torch.equal(old.obs, buf.obs) and torch.equal(old.size, buf.size)


def test_context_is_distinct_transitions_with_a_mask():
    buf = TaskBuffers(2, 40, 3, (), torch.long)
    buf.add(0, _ramp(0, 5))  # a short episode: 5 transitions, asked for 16
    buf.add(1, _ramp(100, 30))
    torch.manual_seed(0)
    c, mask = buf.sample_distinct(torch.tensor([0, 1, 0]), 16)
    assert c["rewards"].shape == (3, 16) and mask.sum(1).tolist() == [5, 16, 5]
    for row, m in zip(c["rewards"], mask):
        vals = row[m].tolist()
        assert len(set(vals)) == len(vals)  # no transition repeated
    assert sorted(c["rewards"][0][mask[0]].tolist()) == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert set(c["rewards"][1].tolist()) <= set(range(100, 130))
    # every filled row can be drawn (a uniform permutation of the filled rows)
    seen = set()
    for _ in range(50):
        c, _ = buf.sample_distinct(torch.tensor([1]), 4)
        seen |= set(c["rewards"][0].tolist())
    assert seen == set(float(v) for v in range(100, 130))


def test_kl_is_summed_over_the_meta_batch_tasks():
    """oyster sums the KL over tasks: the same context twice gives twice the KL term."""
    torch.manual_seed(0)
    nets = PEARLNets(7, gym.spaces.Discrete(4), latent_dim=5, hidden=16, encoder_hidden=16)
    ctx, batch = _fake_batch(nets, 1, 8, True)
    with torch.no_grad():
        mu, var = nets.encoder(ctx)
    one = pearl_losses(nets, ctx, batch, gamma=0.9, kl_weight=0.1, target_entropy=1.0)
    two = pearl_losses(
        nets, torch.cat([ctx, ctx]), {k: torch.cat([v, v]) for k, v in batch.items()}, gamma=0.9,
        kl_weight=0.1, target_entropy=1.0,
    )  # fmt: skip
    torch.testing.assert_close(one["loss_kl"], kl_to_standard_normal(mu, var)[0])
    torch.testing.assert_close(two["loss_kl"], 2 * one["loss_kl"])


def test_updates_per_env_step_carries_the_fraction_and_num_grad_steps_overrides():
    m = PEARLModule(_tiny_config(100) | {"num_grad_steps": None, "updates_per_env_step": 0.3})
    assert [m.num_updates(7) for _ in range(4)] == [2, 2, 2, 2]  # 2.1, 4.2, 6.3, 8.4 in total
    assert m.num_updates(1) == 0 and m.num_updates(2) == 1  # credit 0.4 -> 0.7 -> 1.0
    assert PEARLModule(_tiny_config(100)).num_updates(1000) == 4  # num_grad_steps: 4
    assert PEARLConfig().updates_per_env_step == 0.5 and PEARLConfig().num_grad_steps is None


def test_meta_test_acts_greedily_by_default():
    m = PEARLModule(_tiny_config(100))
    envs = gym.vector.SyncVectorEnv([lambda: gym.make("CartPole-v1")])
    try:
        policy, hook = m.trial_policy(envs)
    finally:
        envs.close()
    assert policy.greedy and hook is not None
    obs, z = torch.randn(6, m.nets.obs_dim), torch.randn(6, m.nets.latent_dim)
    a, _ = m.nets.act(obs, z, greedy=True)
    assert torch.equal(a, m.nets.actor(torch.cat([obs, z], -1)).argmax(-1))


def test_saved_buffers_give_identical_buffers_and_identical_next_update(tmp_path):
    """save -> load -> the same buffers and, from the same RNG state, the same next update."""
    cfg = _tiny_config(100)
    m = PEARLModule(cfg)
    col = m.make_collector()
    try:
        for _ in range(2):
            ids = [0, 2]
            m._store(col.collect_trials([m.task_pool[k] for k in ids]), ids)
    finally:
        col.envs.close()
    m._update_credit = 0.25
    path = tmp_path / "state.pt"
    torch.save({"nets": m.nets.state_dict(), "extra": m.extra_state()}, path)
    st = torch.load(path, weights_only=True)
    for name, buf in (("replay", m.replay), ("context", m.context_buffer)):
        stored = st["extra"][name]["obs"].shape[0]  # rows kept: exactly the filled ones
        assert stored == int(buf.size.sum()) < buf.obs.shape[0] * buf.capacity
    again = PEARLModule(cfg)
    again.nets.load_state_dict(st["nets"])
    again.load_extra_state(st["extra"])
    assert again._update_credit == 0.25
    for a, b in ((m.replay, again.replay), (m.context_buffer, again.context_buffer)):
        for k in (*TaskBuffers.FIELDS, "ptr", "size"):
            assert torch.equal(getattr(a, k), getattr(b, k)), k

    def next_update(mod):
        torch.manual_seed(11)
        ctx, mask, rb, noise = mod.sample_meta_batch()
        terms = pearl_losses(
            mod.nets, ctx, rb, gamma=0.99, kl_weight=0.1, target_entropy=mod.target_entropy,
            context_mask=mask, z_noise=noise,
        )  # fmt: skip
        grads = torch.autograd.grad(terms["loss"], list(mod.nets.encoder.parameters()))
        return terms["loss"].detach(), grads

    (l1, g1), (l2, g2) = next_update(m), next_update(again)
    assert torch.equal(l1, l2) and all(torch.equal(x, y) for x, y in zip(g1, g2))


# --- bad input -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key,value,match",
    [
        ("latent_dim", 0, "latent_dim=0"),
        ("kl_weight", -0.1, "kl_weight=-0.1"),
        ("aggregation", "max", "aggregation='max'"),
        ("tau", 0.0, "tau=0.0"),
        ("num_grad_steps", -1, "num_grad_steps=-1"),
        ("updates_per_env_step", -0.5, "updates_per_env_step=-0.5"),
        ("pool_layouts", "random", "pool_layouts='random'"),
    ],
)
def test_bad_config_raises_naming_the_value(key, value, match):
    with pytest.raises(ValueError, match=match):
        PEARLConfig(**{key: value})


def test_encoder_rejects_unknown_aggregation():
    with pytest.raises(ValueError, match="aggregation='sum'"):
        ContextEncoder(4, 5, aggregation="sum")


# --- learned embedding on a goal family --------------------------------------------------------


def _goal_family_batch(goals: torch.Tensor, n: int, gen: torch.Generator):
    """2-D point family: s ~ U[-1,1]^2, a ~ U[-1,1]^2, s' = s + 0.3 a, r = -||s' - g||."""
    K = goals.shape[0]
    s = torch.rand(K, n, 2, generator=gen) * 2 - 1
    a = torch.rand(K, n, 2, generator=gen) * 2 - 1
    s2 = s + 0.3 * a
    r = -(s2 - goals[:, None]).norm(dim=-1)
    return {"obs": s, "actions": a, "rewards": r, "next_obs": s2, "terminated": torch.zeros(K, n)}


@pytest.mark.slow
def test_learned_embedding_distances_track_goal_distances():
    """Trained with the PEARL loss (critic Bellman error + KL), the posterior means of tasks
    whose transitions reveal a 2-D goal are as far apart as the goals are (Pearson > 0.5)."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    nets = PEARLNets(2, gym.spaces.Box(-1.0, 1.0, (2,)), latent_dim=5, hidden=64, encoder_hidden=64)
    opt = torch.optim.Adam(nets.parameters(), lr=1e-3)
    eval_goals = torch.rand(24, 2, generator=gen) * 2 - 1
    eval_ctx = _goal_family_batch(eval_goals, 64, gen)
    iu = torch.triu_indices(24, 24, 1)
    dg = torch.cdist(eval_goals, eval_goals)[iu[0], iu[1]].numpy()

    def correlation() -> float:
        c = eval_ctx
        with torch.no_grad():
            feats = nets.features(c["obs"], c["actions"], c["rewards"], c["next_obs"])
            mu, _ = nets.encoder(feats)
        dz = torch.cdist(mu, mu)[iu[0], iu[1]].numpy()
        return float(np.corrcoef(dz, dg)[0, 1])

    before = correlation()
    for _ in range(600):
        goals = torch.rand(8, 2, generator=gen) * 2 - 1
        b = _goal_family_batch(goals, 64, gen)
        c = _goal_family_batch(goals, 32, gen)
        ctx = nets.features(c["obs"], c["actions"], c["rewards"], c["next_obs"])
        terms = pearl_losses(nets, ctx, b, gamma=0.5, kl_weight=0.1, target_entropy=-2.0)
        opt.zero_grad()
        terms["loss"].backward()
        opt.step()
    corr = correlation()
    print(f"embedding/goal distance correlation: {before:.3f} untrained -> {corr:.3f} trained")
    assert corr > 0.5 and corr > before + 0.2, (before, corr)


# --- smoke: fit, evaluate, reload, resume ------------------------------------------------------


def _tiny_config(total: int) -> dict:
    return {
        "compositions": ["goto(red ball) > goto(blue ball)", "pickup(green key) > open(door)"],
        "env_kwargs": {"task_info": "reward", "size": 7, "max_steps": 40},
        "num_envs": 2, "total_env_steps": total, "num_train_tasks": 3, "meta_batch": 2,
        "num_grad_steps": 4, "batch_size": 16, "context_batch": 8, "hidden": 32,
        "encoder_hidden": 32, "replay_capacity": 300, "context_capacity": 64, "seed": 3,
    }  # fmt: skip


def _state(m: PEARLModule) -> dict:
    out = {f"net.{k}": v for k, v in m.nets.state_dict().items()}
    for name, buf in (("replay", m.replay), ("ctx", m.context_buffer)):
        out |= {f"{name}.{k}": getattr(buf, k) for k in (*TaskBuffers.FIELDS, "ptr", "size")}
    return out


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_smoke_fit_eval_reload_and_exact_resume(tmp_path):
    from experiments.registry import REGISTRY
    from rl.protocol import heldout_tasks, run_trials
    from rl.train import fit, load_module

    cfg = _tiny_config(600)
    m = fit(PEARLModule(cfg), tmp_path / "full", checkpoint_every=1, logger=False)
    assert m.env_steps >= 600 and m.iteration >= 2
    assert int(m.replay.size.sum()) > 0 and int(m.context_buffer.size.sum()) > 0
    row = m.history[-1]
    for k in ("losses/loss_critic", "losses/loss_kl", "losses/loss_actor", "charts/SPS"):
        assert math.isfinite(row[k]), k

    tasks = heldout_tasks(["goto(grey box) > goto(red ball)"], 2, seed=0)
    kw = {"env_id": "CompoGrid-v0", "env_kwargs": cfg["env_kwargs"], "episodes": 2}
    res = run_trials(m, tasks, num_envs=2, seed=0, **kw)
    assert res["success"].shape == (2, 2) and res["return"].shape == (2, 2)

    loaded = load_module(tmp_path / "full" / "checkpoints" / "final.ckpt", REGISTRY, "pearl")
    _assert_same(_state(m), _state(loaded))  # weights and replay/context buffers round-trip
    res2 = run_trials(loaded, tasks, num_envs=2, seed=0, **kw)
    np.testing.assert_array_equal(res["return"], res2["return"])

    # a run stopped early and resumed from last.ckpt ends exactly where the full run ended
    cut = fit(PEARLModule(_tiny_config(200)), tmp_path / "cut", checkpoint_every=1, logger=False)
    assert 1 <= cut.iteration < m.iteration
    resumed = fit(PEARLModule(cfg), tmp_path / "cut", resume=True, checkpoint_every=1, logger=False)
    assert resumed.iteration == m.iteration and resumed.env_steps == m.env_steps
    _assert_same(_state(m), _state(resumed))


@pytest.mark.slow
@pytest.mark.skipif(
    not __import__("os").environ.get("COMPO_SLOW_LEARNING"),
    reason="40k env steps: ~1-2 min with the 40 updates per iteration it was measured with; "
    "at the default updates_per_env_step 0.5 (20k updates) expect ~10 min; not re-run since "
    "issue 12 changed the KL, the context and the update ratio; set COMPO_SLOW_LEARNING=1",
)
def test_discrete_pearl_learns_a_single_sparse_reward_task(tmp_path):
    """goto(red ball), 20-step episodes: with the default reward_scale the training success of
    the last 10 iterations is >= 0.5 (with reward_scale 1 it fell from 0.19 to 0.00: the entropy
    bonus of never finishing outweighed the terminal reward)."""
    from rl.train import fit

    m = fit(
        PEARLModule(
            {"compositions": ["goto(red ball)"], "env_kwargs": {"size": 7, "max_steps": 20},
             "total_env_steps": 40_000, "seed": 0}
        ),
        tmp_path, logger=False, checkpoint_every=1000,
    )  # fmt: skip
    succ = [h["charts/success"] for h in m.history if "charts/success" in h][-10:]
    print(f"training success, last 10 iterations: {np.round(succ, 2).tolist()}")
    assert np.mean(succ) >= 0.5


def test_per_trial_pool_layouts_keep_the_composition_and_draw_new_layouts():
    """'per_trial': a pool task is its composition, each trial a fresh layout; 'fixed': the
    pool's (composition, layout) pair every time."""
    fixed = PEARLModule(_tiny_config(100))
    assert [fixed._trial_task(0) for _ in range(3)] == [fixed.task_pool[0]] * 3
    torch.manual_seed(0)
    m = PEARLModule({**_tiny_config(100), "pool_layouts": "per_trial"})
    drawn = [m._trial_task(0) for _ in range(20)]
    assert {t.composition for t in drawn} == {m.task_pool[0].composition}
    assert len({t.layout_seed for t in drawn}) == 20
