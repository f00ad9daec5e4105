"""Reference rows of ``compo heldout``: ppo_finetune (uses exactly its trial's episodes, never
modifies the pre-trained weights), ideal_observer wiring, defaults and bad input."""

from __future__ import annotations

import json

import pytest
import torch

import envs
import rl.references as references
from experiments.heldout import HeldoutConfig, method_run_config, run_heldout, run_split
from rl.config import config_from_dict
from rl.nets import ActorCritic
from rl.protocol import FinetunePPOAgent, ScratchPPOAgent, heldout_tasks, run_trials

ENV = {"env_id": "CompoGrid-v0", "env_kwargs": {"task_info": "reward", "size": 7}}


def _tasks(n: int):
    return heldout_tasks(envs.make_split("grid", seed=0).heldout, n, seed=3)


def _pretrained() -> ActorCritic:
    """A small network for CompoGrid observations (its weights stand for pre-trained ones)."""
    import gymnasium as gym

    env = gym.make("CompoGrid-v0", size=7)
    net = ActorCritic(env.observation_space.shape[0], env.action_space, 16)
    env.close()
    return net


def _state(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_finetune_uses_exactly_each_trials_episodes(monkeypatch):
    calls = []
    real = references.ppo_update_on_episode

    def counting(net, opt, cfg, ep):
        calls.append(net)  # the object (kept alive), not its id: ids of freed nets recur
        return real(net, opt, cfg, ep)

    monkeypatch.setattr(references, "ppo_update_on_episode", counting)
    torch.manual_seed(0)
    agent = FinetunePPOAgent(_pretrained())
    tasks, E, k = _tasks(3), 3, 2
    run_trials(agent, tasks, **ENV, episodes=E, num_envs=k, seed=5)
    # 2 batches of 2 trials (the second padded with a copy of its last task), E updates each
    assert len(calls) == len(agent.updates) == 2 * k * E
    per_trial: dict[tuple[int, int], list] = {}
    for u in agent.updates:
        per_trial.setdefault((u.trial_batch, u.env_index), []).append(u)
    assert sorted(per_trial) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    padded = [*tasks, tasks[-1]]
    for (b, i), ups in per_trial.items():
        # exactly the trial's episodes 0..E-1, in order, all of the trial's own task
        assert [u.episode_index for u in ups] == list(range(E))
        assert {u.task for u in ups} == {str(padded[b * k + i])}
        assert all(u.steps >= 1 for u in ups)
    # one network per trial: a trial's updates all went to its own copy, and no copy is shared
    nets_of = {}
    for net, u in zip(calls, agent.updates, strict=True):
        nets_of.setdefault((u.trial_batch, u.env_index), set()).add(id(net))
    assert all(len(s) == 1 for s in nets_of.values())
    assert len({next(iter(s)) for s in nets_of.values()}) == len(nets_of)


def test_finetune_starts_every_trial_from_unmodified_pretrained_weights():
    torch.manual_seed(0)
    net = _pretrained()
    before = _state(net)
    starts, ends = [], []

    class Spy(FinetunePPOAgent):
        def trial_policy(self, envs):
            if self.nets:
                ends.extend(_state(n) for n in self.nets)
            policy, hook = super().trial_policy(envs)
            starts.extend(_state(n) for n in self.nets)
            return policy, hook

    agent = Spy(net)
    run_trials(agent, _tasks(4), **ENV, episodes=2, num_envs=2, seed=1)
    ends.extend(_state(n) for n in agent.nets)
    assert len(starts) == len(ends) == 4
    # every trial starts from the pre-trained weights, even after earlier trials fine-tuned
    assert all(_same(s, before) for s in starts)
    # fine-tuning did change each trial's copy, and neither the caller's network nor the
    # agent's own copy of the pre-trained weights moved
    assert not any(_same(e, before) for e in ends)
    assert _same(_state(net), before) and _same(_state(agent.pretrained), before)


def test_finetune_is_deterministic_and_scratch_counts_the_same_way():
    torch.manual_seed(0)
    net = _pretrained()
    tasks = _tasks(2)
    a = run_trials(FinetunePPOAgent(net), tasks, **ENV, episodes=2, num_envs=2, seed=9)
    b = run_trials(FinetunePPOAgent(net), tasks, **ENV, episodes=2, num_envs=2, seed=9)
    assert (a["return"] == b["return"]).all() and (a["success"] == b["success"]).all()
    s = ScratchPPOAgent(hidden=16)
    run_trials(s, tasks, **ENV, episodes=2, num_envs=2, seed=9)
    got = sorted((u.env_index, u.episode_index, u.task) for u in s.updates)
    assert got == [(i, e, str(tasks[i])) for i in range(2) for e in range(2)]


def test_finetune_bad_input():
    with pytest.raises(ValueError, match="needs a pre-trained ActorCritic; got Linear"):
        FinetunePPOAgent(torch.nn.Linear(2, 2))
    import gymnasium as gym

    wrong = ActorCritic(5, gym.spaces.Discrete(6), 8)
    with pytest.raises(ValueError, match="reads 5 observation features"):
        run_trials(FinetunePPOAgent(wrong), _tasks(1), **ENV, episodes=1, num_envs=1, seed=0)


# --- compo heldout wiring ---------------------------------------------------------------------


def _cfg(**kw) -> HeldoutConfig:
    return config_from_dict(HeldoutConfig, kw)


def test_default_references_are_the_rows_that_apply():
    assert _cfg().references == [
        "random", "oracle", "ideal_observer", "ppo_scratch", "ppo_finetune",
    ]  # fmt: skip
    assert _cfg(methods=["rl2"]).references == [
        "random", "oracle", "ideal_observer", "ppo_scratch",
    ]  # fmt: skip
    instr = _cfg(env_kwargs={"task_info": "instruction", "size": 8})
    assert "ideal_observer" not in instr.references and "oracle" in instr.references
    mw = _cfg(family="metaworld", env_id="CompoMetaWorld-v0", env_kwargs={}, methods=["ppo"])
    assert mw.references == ["random", "ppo_scratch", "ppo_finetune"]
    # an explicit list is kept as given
    assert _cfg(references=["random"]).references == ["random"]


def test_reference_bad_input_one_line():
    with pytest.raises(ValueError, match="unknown reference 'nope'; allowed: random, oracle"):
        _cfg(references=["nope"])
    for kw in (
        {"env_kwargs": {"task_info": "instruction", "size": 8}},
        {"family": "metaworld", "env_id": "CompoMetaWorld-v0", "env_kwargs": {}},
    ):
        with pytest.raises(ValueError, match="'ideal_observer' exists only for CompoGrid-v0 in re"):
            _cfg(references=["ideal_observer"], **kw)
    with pytest.raises(ValueError, match="method name 'ppo_finetune' is also a reference row"):
        _cfg(methods=[{"name": "ppo_finetune", "method": "ppo"}], references=["ppo_finetune"])


def test_split_kwargs_reach_training():
    # without split_kwargs the methods find the split themselves (unchanged configs)
    assert (
        method_run_config(_cfg(), {"name": "ppo", "method": "ppo", "config": {}}, 0)["compositions"]
        is None
    )
    cfg = _cfg(split_kwargs={"pool_size": 60})
    rc = method_run_config(cfg, {"name": "ppo", "method": "ppo", "config": {}}, 0)
    assert rc["compositions"] == [str(c) for c in run_split(cfg).train]
    assert set(rc["compositions"]).isdisjoint(str(c) for c in run_split(cfg).heldout)
    with pytest.raises(ValueError, match="split_kwargs only for families without train layout"):
        method_run_config(
            _cfg(family="metaworld", env_id="CompoMetaWorld-v0", env_kwargs={},
                 references=["random"], split_kwargs={"n_heldout": 8}),
            {"name": "ppo", "method": "ppo", "config": {}}, 0,
        )  # fmt: skip


TINY = {
    "seeds": [0],
    "total_env_steps": 128,
    "num_envs": 2,
    "env_kwargs": {"task_info": "reward", "size": 7},
    "method_config": {"ppo": {"ppo": {"num_steps": 64}, "hidden": 16}},
    "eval": {"episodes": 2, "num_tasks": 2, "num_envs": 2, "bootstrap": 20},
}


def test_heldout_reuses_the_ppo_rows_checkpoint(tmp_path, monkeypatch):
    import experiments.heldout as heldout

    loaded = []
    real = heldout.load_module

    def spy(path, *a, **k):
        loaded.append(path)
        return real(path, *a, **k)

    monkeypatch.setattr(heldout, "load_module", spy)
    cfg = _cfg(methods=["ppo"], references=["ideal_observer", "ppo_finetune"], **TINY)
    doc = run_heldout(cfg, tmp_path / "run", log=lambda *_: None)
    assert loaded == [tmp_path / "run" / "ppo" / "seed0" / "checkpoints" / "final.ckpt"]
    ft = doc["methods"]["ppo_finetune"]
    assert "the run's 'ppo' row" in ft["note"] and ft["trained"]
    assert ft["meta_train_env_steps"] == doc["methods"]["ppo"]["meta_train_env_steps"] >= 128
    assert not (tmp_path / "run" / "ppo_finetune").exists()
    # the ideal-observer row is the agent built on the run's split, on the run's tasks
    split, tasks = heldout.eval_tasks(cfg)
    direct = run_trials(
        heldout.IdealObserverAgent(split), tasks,
        env_id=cfg.env_id, env_kwargs=cfg.env_kwargs, episodes=2, num_envs=2, seed=cfg.eval.seed,
    )  # fmt: skip
    assert doc["methods"]["ideal_observer"]["success_at"] == direct["success"].mean(0).tolist()
    table = (tmp_path / "run" / "table.md").read_text()
    assert "- ppo_finetune: PPO pre-trained on the train compositions" in table
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["methods"]["ppo_finetune"]["note"] == ft["note"]


def test_heldout_trains_a_ppo_for_finetune_when_none_is_in_methods(tmp_path):
    cfg = _cfg(methods=[], references=["ppo_finetune"], **TINY)
    doc = run_heldout(cfg, tmp_path / "run", log=lambda *_: None)
    ft = doc["methods"]["ppo_finetune"]
    assert "a PPO trained for this row with the run's budget" in ft["note"]
    assert ft["meta_train_env_steps"] >= 128
    assert (tmp_path / "run" / "ppo_finetune" / "seed0" / "checkpoints" / "final.ckpt").is_file()
