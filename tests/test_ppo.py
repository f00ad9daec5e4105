"""PPO loss terms, the Lightning module end to end, exact resume from a checkpoint."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from rl.ppo import PPOConfig, PPOModule, ppo_loss
from rl.train import fit, load_module


def test_ppo_loss_terms_by_hand():
    old = torch.log(torch.tensor([0.5, 0.5]))
    new = torch.log(torch.tensor([0.75, 0.25]))  # ratios 1.5 and 0.5
    adv = torch.tensor([1.0, -1.0])
    v = torch.tensor([0.0, 0.0])
    out = ppo_loss(
        new,
        old,
        adv,
        v,
        v,
        torch.tensor([1.0, 1.0]),
        torch.tensor([0.3, 0.3]),
        clip_coef=0.2,
        vf_coef=0.5,
        ent_coef=0.1,
    )
    # clipped surrogate: max(-A r, -A clip(r)) -> [-1.2, 0.8]; mean = -0.2
    assert out["loss_policy"].item() == pytest.approx(-0.2)
    # value loss with clipping: the clipped prediction (0 + clamp(0, +-0.2)) = 0 -> 0.5 * 1
    assert out["loss_value"].item() == pytest.approx(0.5)
    assert out["loss_entropy"].item() == pytest.approx(-0.3)
    assert out["loss"].item() == pytest.approx(-0.2 + 0.25 - 0.03)
    assert out["clipfrac"].item() == pytest.approx(1.0)
    assert out["approx_kl"].item() > 0


def test_ppo_loss_gradient_zero_when_clipped_in_direction_of_advantage():
    new = torch.log(torch.tensor([0.9])).requires_grad_()
    out = ppo_loss(
        new,
        torch.log(torch.tensor([0.5])),
        torch.tensor([1.0]),
        torch.zeros(1),
        torch.zeros(1),
        torch.zeros(1),
        torch.zeros(1),
    )
    out["loss_policy"].backward()
    assert new.grad.abs().item() == 0.0


def test_config_validation():
    with pytest.raises(ValueError, match="lr=-1"):
        PPOConfig(lr=-1)
    with pytest.raises(ValueError, match="unknown config key 'ppo.lrr'"):
        PPOModule({"ppo": {"lrr": 1}})
    with pytest.raises(ValueError, match="num_envs=0"):
        PPOModule({"num_envs": 0})


TINY = {"total_env_steps": 4 * 2 * 64, "num_envs": 2, "ppo": {"num_steps": 64, "update_epochs": 2}}


def test_fit_writes_logs_and_checkpoints(tmp_path):
    m = fit(PPOModule(TINY), tmp_path, checkpoint_every=1)
    assert m.iteration == 4 and m.env_steps == 512
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    assert any((tmp_path / "tb").rglob("events.out.tfevents*"))
    for key in ("losses/approx_kl", "losses/clipfrac", "losses/explained_variance", "charts/SPS"):
        assert key in m.history[-1]
    again = load_module(tmp_path / "checkpoints" / "final.ckpt", {"ppo": PPOModule}, expected="ppo")
    for a, b in zip(m.parameters(), again.parameters()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="holds method 'ppo'; expected 'rl2'"):
        load_module(tmp_path / "checkpoints" / "final.ckpt", {"ppo": PPOModule}, expected="rl2")


def test_resume_is_exact(tmp_path):
    full = fit(PPOModule(TINY), tmp_path / "full", checkpoint_every=1, logger=False)
    half = dict(TINY, total_env_steps=2 * 2 * 64)
    fit(PPOModule(half), tmp_path / "cut", checkpoint_every=1, logger=False)
    resumed = fit(PPOModule(TINY), tmp_path / "cut", resume=True, checkpoint_every=1, logger=False)
    assert resumed.iteration == 4
    for a, b in zip(full.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_same_seed_same_parameters(tmp_path):
    a = fit(PPOModule(TINY), tmp_path / "a", logger=False)
    b = fit(PPOModule(TINY), tmp_path / "b", logger=False)
    c = fit(PPOModule(dict(TINY, seed=1)), tmp_path / "c", logger=False)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    assert not all(torch.equal(x, y) for x, y in zip(a.parameters(), c.parameters()))


def test_batched_and_per_env_paths_train_identically(tmp_path):
    """The batched CompoGrid steps exactly as CompoGridEnv does, so the same config and seed
    give the same parameters and the same held-out numbers on either path."""
    from rl.protocol import heldout_tasks, run_trials

    mods = {
        vec: fit(PPOModule(dict(TINY, vectorization=vec)), tmp_path / vec, logger=False)
        for vec in ("sync", "batched")
    }
    for a, b in zip(mods["sync"].parameters(), mods["batched"].parameters()):
        assert torch.equal(a, b)
    tasks = heldout_tasks(["goto(red ball) > goto(door)", "pickup(green key) > open(door)"], 4, 0)
    kw = dict(env_id="CompoGrid-v0", env_kwargs={"size": 7}, episodes=2, num_envs=2, seed=0)
    res = {vec: run_trials(mods["sync"], tasks, vectorization=vec, **kw) for vec in mods}
    assert np.array_equal(res["sync"]["success"], res["batched"]["success"])
    assert np.array_equal(res["sync"]["return"], res["batched"]["return"])


def test_initialisation_does_not_depend_on_thread_count():
    # orthogonal init (a QR decomposition) differs with the number of BLAS threads; modules
    # pin the learner to one thread before they build, so the same seed gives the same weights
    torch.set_num_threads(2)
    a = PPOModule(TINY)
    torch.set_num_threads(1)
    b = PPOModule(TINY)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))


def test_explained_variance_undefined_is_nan_without_a_warning():
    import warnings

    from rl.ppo import explained_variance

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's "degrees of freedom <= 0" would raise here
        assert math.isnan(explained_variance(torch.zeros(1), torch.ones(1)))
        assert math.isnan(explained_variance(torch.zeros(3), torch.ones(3)))
    assert explained_variance(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1.0, 2.0, 3.0])) == 1.0
