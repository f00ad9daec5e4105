"""The skill-level compositional agent on Meta-World: Gaussian options of fixed length,
outcome discovery from displacements, decisions every t_max steps, checkpoints, bad input."""

from __future__ import annotations

import pytest
import torch

from compositional.agent import CompositionalAgent
from compositional.family import GridFamily, MotionFamily, family_for
from envs.metaworld import MOVED
from primitives.options import OptionLibrary
from primitives.outcome_motion import MOTION_OUTCOME_DIM, finished_segments
from rl.train import fit

MW = {
    "env_id": "CompoMetaWorld-v0",
    "split_family": "metaworld",
    "env_kwargs": {"max_steps": 30},
    "compositions": ["reach(goal)", "push(puck)"],
    "num_envs": 2,
    "episodes_per_trial": 2,
    "hidden": 16,
    "key_dim": 8,
    "library_hidden": 32,
    "t_max": 10,
    "total_env_steps": 2 * 20 * 2 + 2 * 30 * 2,
    "library_fraction": 0.4,
    "ppo": {"num_steps": 30, "update_epochs": 1, "num_minibatches": 1},
    "skills": {"num_steps": 20, "ppo": {"update_epochs": 1, "num_minibatches": 1}},
}


def test_motion_family_sums_displacements_and_moved_threshold():
    fam = family_for("CompoMetaWorld-v0")
    assert isinstance(fam, MotionFamily) and isinstance(family_for("CompoGrid-v0"), GridFamily)
    a, b, c = torch.zeros(2, 39), torch.zeros(2, 39), torch.zeros(2, 39)
    b[:, 0], b[:, 4] = 0.1, 0.015  # hand +10 cm, object +1.5 cm
    c[:, 0], c[:, 4] = 0.05, 0.03  # hand back 5 cm, object +1.5 cm more
    seg = torch.zeros(2, fam.outcome_dim)
    cont = torch.tensor([True, False])  # env 1's steps are cut by an episode boundary
    for o0, o1 in ((a, b), (b, c)):
        seg = fam.accumulate(seg, fam.step_outcome(o0, o1)[1], cont)
    assert torch.allclose(seg[0, [0, 4]], torch.tensor([0.05, 0.03]))
    assert torch.equal(seg[1], torch.zeros(7))
    assert fam.moved(seg).tolist() == [True, False] and MOVED == 0.02
    # the controller reads the mean reward per step / 10
    r = fam.reward_feature(torch.tensor([50.0]), torch.tensor([10]))
    assert torch.allclose(r, torch.tensor([0.5]))


def test_gaussian_options_of_fixed_duration():
    lib = OptionLibrary(39, 4, 3, 16, termination="duration", continuous=True)
    obs = torch.randn(5, 39)
    skill = torch.tensor([0, 1, 2, 0, 1])
    d = lib.dist(obs, skill)
    a = d.sample()
    assert a.shape == (5, 4) and d.log_prob(a).shape == (5,)
    assert torch.equal(lib.beta(obs, obs, skill), torch.zeros(5))
    # skill k's distribution is k's head and k's log-std alone
    with torch.no_grad():
        lib.log_std[1] = -2.0
    assert torch.allclose(lib.dist(obs, skill).stddev[1], torch.full((4,), torch.e**-2))
    assert "log_std" in lib.state_dict() and "beta_head.weight" not in lib.state_dict()
    # the CompoGrid library's parameters are unchanged by the option
    grid = OptionLibrary(166, 6, 19, 16, termination="learned")
    assert "log_std" not in grid.state_dict() and "beta_head.weight" in grid.state_dict()


def test_finished_segments_by_hand():
    """A segment ends on its t_max-th step; its outcome is (start, end - start) of
    [hand xyz, gripper, object xyz]; nothing elsewhere."""
    T, N, t_max = 4, 1, 2
    next_obs = torch.zeros(T, N, 39)
    next_obs[:, 0, 0] = torch.tensor([1.0, 2.0, 3.0, 4.0])
    start = torch.zeros(T, N, 7)
    start[2:, 0, 0] = 2.0  # the second segment starts after step 1 (hand x = 2)

    class Ro:
        pass

    ro = Ro()
    ro.next_obs = next_obs
    ro.extras = {"seg_len": torch.tensor([[1], [2], [1], [2]]), "start_state": start}
    done, feats = finished_segments(ro, t_max)
    assert done[:, 0].tolist() == [False, True, False, True]
    assert feats.shape == (T, N, MOTION_OUTCOME_DIM)
    assert feats[1, 0, 7].item() == 2.0 and feats[3, 0, 0].item() == 2.0
    assert feats[3, 0, 7].item() == 2.0 and feats[0].abs().sum() == 0


@pytest.mark.parametrize(
    "over, match",
    [
        ({"primitives": "supervised"}, "primitives='supervised' on CompoMetaWorld-v0"),
        ({"library_finetune": "discovery"}, "'discovery' on CompoMetaWorld-v0"),
        ({"composer": "soft"}, "composer='soft' on CompoMetaWorld-v0"),
        ({"interrupt": "progress"}, "interrupt='progress' on CompoMetaWorld-v0"),
        ({"env_id": "CartPole-v1"}, "env_id='CartPole-v1'"),
    ],
)
def test_bad_metaworld_config_one_line(over, match):
    with pytest.raises(ValueError, match=match) as e:
        CompositionalAgent({**MW, **over})
    assert "\n" not in str(e.value)


def test_discovered_run_decides_every_t_max_steps_and_resumes_across_phases(tmp_path):
    full = fit(CompositionalAgent(MW), tmp_path / "full", logger=False, checkpoint_every=1)
    assert full.phase1_iters == 2 and full.phase2_iters == 2
    assert full.library.termination == "duration" and full.library.continuous
    assert full.discriminator.net[0].in_features == MOTION_OUTCOME_DIM
    ck = torch.load(tmp_path / "full" / "checkpoints" / "last.ckpt", weights_only=True)
    for part in ("library.", "controller.", "composer.", "graph.", "discriminator."):
        assert any(k.startswith(part) for k in ck["state_dict"]), part
    assert full.graph.tries.sum() > 0
    # a segment counts as a success for the graph only if it moved the object (a random arm
    # in 30-step episodes almost never does), in phase 1 as in phase 2
    assert full.graph.successes.sum() <= 0.1 * full.graph.tries.sum()

    class Dies(CompositionalAgent):
        def training_step(self, batch, batch_idx):
            if self.iteration == 1:
                raise RuntimeError("killed in phase 1")
            return super().training_step(batch, batch_idx)

    with pytest.raises(RuntimeError, match="phase 1"):
        fit(Dies(MW), tmp_path / "cut", logger=False, checkpoint_every=1)
    ck1 = torch.load(tmp_path / "cut" / "checkpoints" / "last.ckpt", weights_only=True)
    assert "discovery" in ck1["rl_state"]["extra"]
    # the CompoGrid skills x outcomes table refuses a Meta-World library in one line
    from experiments.discover import discovery_state

    with pytest.raises(SystemExit, match="holds a Meta-World library") as e:
        discovery_state(ck1)
    assert "\n" not in str(e.value)
    resumed = fit(CompositionalAgent(MW), tmp_path / "cut", resume=True, logger=False)
    for (n, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), n
    # phase 2 acts: a decision at every episode start and after every t_max steps, no others
    col = full.make_collector()
    ro = col.collect(30)
    col.envs.close()
    dec = ro.extras["decision"]
    assert dec.sum().item() == 2 * 3  # 2 envs x one 30-step episode of three 10-step skills
    assert dec[ro.episode_start].all()
    skill = ro.extras["skill"]
    assert (skill[1:][~dec[1:]] == skill[:-1][~dec[1:]]).all(), "a skill switched mid-segment"


def test_discovery_rewards_only_finished_segments_and_trains_the_discriminator(tmp_path):
    agent = fit(CompositionalAgent({**MW, "library_fraction": 0.9}), tmp_path / "d", logger=False)
    ro, done = agent.discovery.last
    assert done.any() and (ro.extras["seg_len"][done] == MW["t_max"]).all()
    assert agent.discovery.replay.n > 0 and agent.discovery.iteration == agent.phase1_iters
    # skills are named by their mean displacement over the replay's segments
    r = agent.discovery.replay
    k0 = int(r.skill[0])
    mean = r.feats[: r.n][r.skill[: r.n] == k0, 7:].mean(0)
    assert torch.allclose(agent.library.motion_of[k0], mean)
    names = agent.skill_names()
    assert names[k0] is not None and names[k0].startswith("hand ")
    assert all((n is None) == (int(agent.library.motion_n[i]) == 0) for i, n in enumerate(names))


def test_tiny_metaworld_heldout(tmp_path):
    from experiments.heldout import HeldoutConfig, run_heldout

    keep = ("total_env_steps", "compositions", "num_envs", "env_id", "split_family")
    cfg = HeldoutConfig(  # ML1 reach: one MuJoCo model per env (the split's 40 cost ~10 s)
        family="ML1:reach-v3", env_id="CompoMetaWorld-v0", env_kwargs={"max_steps": 30},
        methods=[{"name": "compositional", "method": "compositional",
                  "config": {k: v for k, v in MW.items() if k not in keep}}],
        references=[], seeds=[0], total_env_steps=MW["total_env_steps"], num_envs=2,
        eval={"episodes": 2, "num_tasks": 2, "num_envs": 2},
    )  # fmt: skip
    doc = run_heldout(cfg, tmp_path / "run", log=lambda *_: None)
    m = doc["methods"]["compositional"]
    assert len(m["success_at"]) == 2 and m["meta_train_env_steps"] >= MW["total_env_steps"]
