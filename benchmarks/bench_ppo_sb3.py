"""``ppo_vs_sb3``: our PPO against stable-baselines3 PPO, same task, same hyper-parameters.

Both train on CompoGrid-v0 ``pickup(red ball) > open(door)`` with a new random layout every
episode, 128 steps per env per rollout, 4 epochs of minibatches of 256 steps, Adam lr 5e-4,
gamma 0.99, GAE lambda 0.95, clip 0.2, entropy 0.01, value 0.5, grad-norm 0.5, two tanh layers
of 64 for actor and critic, CPU, seed 0, the same env-step budget. SB3 runs as it is usually
run for speed: 8 ``CompoGridEnv`` in a ``SubprocVecEnv``. Ours runs on the batched CompoGrid
with ``OURS_ENVS`` envs; the minibatch size (256) and so the number of gradient steps per env
step are the same as SB3's (``OURS_ENVS * 128 / 256`` minibatches per epoch).

Remaining differences (each library's own defaults, kept on purpose): ours clips the value
loss (CleanRL), SB3 does not (``clip_range_vf=None``); SB3 wraps envs in ``Monitor``; ours runs
through Lightning and writes a checkpoint every 10 iterations.

Speed: env steps / wall seconds from constructing the learner to the end of training.
Success, like for like: (a) during training, the mean success of the last 10 rollouts (ours:
``charts/success`` of ``module.history``; SB3: a callback reading ``info["success"]`` of the
episodes that end in each rollout); (b) after training, both policies sampled
(non-deterministic) on the same random-layout tasks through the shared
``rl.protocol.run_trials``.

Ceiling: our PPO update alone at these hyper-parameters (``benchmarks.learner_ceiling``)
against SB3's rate; no env makes ours faster than that, so the ratio bounds the speed-up.
"""

from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks import COMPOSITION, Row, load_note
from benchmarks.learner_ceiling import update_steps_per_second

NAME = "ppo_vs_sb3"
NUM_ENVS = 8
OURS_ENVS = 64
NUM_STEPS = 128
MINIBATCH = 256
ENV_KWARGS = {"task_info": "reward", "size": 8}


def train_ours(budget: int, out: Path, seed: int = 0) -> tuple[Any, float]:
    """Train our ``PPOModule`` via ``rl.train.fit``; returns (module, wall seconds)."""
    from experiments.registry import method_class
    from rl.train import fit

    cfg = {
        "compositions": [COMPOSITION],
        "fixed_layout": False,
        "env_kwargs": dict(ENV_KWARGS),
        "num_envs": OURS_ENVS,
        "vectorization": "batched",
        "total_env_steps": budget,
        "seed": seed,
        "hidden": 64,
        "ppo": {
            "num_steps": NUM_STEPS, "lr": 5e-4, "gamma": 0.99, "gae_lambda": 0.95,
            "update_epochs": 4, "num_minibatches": OURS_ENVS * NUM_STEPS // MINIBATCH,
            "clip_coef": 0.2, "ent_coef": 0.01,
            "vf_coef": 0.5, "max_grad_norm": 0.5,
        },
    }  # fmt: skip
    t0 = time.perf_counter()
    module = method_class("ppo")(cfg)
    fit(module, out, logger=False)
    return module, time.perf_counter() - t0


def last_success(values: list[float], last: int = 10) -> float:
    """Mean of the last ``last`` values (NaN if there are none)."""
    vals = values[-last:]
    return float(np.mean(vals)) if vals else float("nan")


def train_sb3(budget: int, seed: int = 0) -> tuple[Any, float, list[float], int]:
    """Train SB3 PPO; returns (model, wall seconds, success per rollout, env steps)."""
    # imported lazily: stable-baselines3 is only in the ``bench`` extra
    from stable_baselines3 import PPO
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.vec_env import SubprocVecEnv

    import envs  # noqa: F401  (registers CompoGrid-v0)

    class SuccessPerRollout(BaseCallback):
        def __init__(self) -> None:
            super().__init__()
            self.current: list[float] = []
            self.per_rollout: list[float] = []

        def _on_step(self) -> bool:
            for info, done in zip(self.locals["infos"], self.locals["dones"]):
                if done:
                    self.current.append(float(bool(info.get("success", False))))
            return True

        def _on_rollout_end(self) -> None:
            if self.current:
                self.per_rollout.append(float(np.mean(self.current)))
            self.current = []

    t0 = time.perf_counter()
    venv = make_vec_env(
        "CompoGrid-v0", n_envs=NUM_ENVS, seed=seed,
        env_kwargs={**ENV_KWARGS, "composition": COMPOSITION},
        vec_env_cls=SubprocVecEnv, vec_env_kwargs={"start_method": "fork"},
    )  # fmt: skip
    model = PPO(
        "MlpPolicy", venv, n_steps=NUM_STEPS, batch_size=MINIBATCH, n_epochs=4,
        learning_rate=5e-4, gamma=0.99, gae_lambda=0.95, clip_range=0.2, ent_coef=0.01,
        vf_coef=0.5, max_grad_norm=0.5,
        policy_kwargs=dict(net_arch=dict(pi=[64, 64], vf=[64, 64]), activation_fn=torch.nn.Tanh),
        device="cpu", seed=seed, verbose=0,
    )  # fmt: skip
    cb = SuccessPerRollout()
    model.learn(total_timesteps=budget, callback=cb)
    wall = time.perf_counter() - t0
    steps = int(model.num_timesteps)
    venv.close()
    return model, wall, cb.per_rollout, steps


class SB3Agent:
    """An SB3 model as a ``rl.protocol`` agent, so both learners are evaluated by the shared
    ``run_trials`` (sampled actions, i.e. ``deterministic=False``)."""

    def __init__(self, model: Any) -> None:
        self.model = model

    def trial_policy(self, envs):
        from rl.collect import StepOutput

        model = self.model

        class _Policy:
            def initial_memory(self, n: int) -> None:
                return None

            def reset_memory(self, memory, mask) -> None:
                return None

            def step(self, obs: torch.Tensor, memory, prev) -> StepOutput:
                act, _ = model.predict(obs.numpy(), deterministic=False)
                n = obs.shape[0]
                return StepOutput(
                    torch.as_tensor(act, dtype=torch.long), torch.zeros(n), torch.zeros(n)
                )

            def bootstrap_value(self, obs: torch.Tensor, memory, prev) -> torch.Tensor:
                return torch.zeros(obs.shape[0])

        return _Policy(), None


def eval_success(agent: Any, episodes: int, seed: int = 10_000) -> float:
    """Mean success over ``episodes`` random-layout episodes of the benchmark composition."""
    from rl.protocol import heldout_tasks, run_trials

    tasks = heldout_tasks([COMPOSITION], episodes, seed=seed)
    res = run_trials(
        agent, tasks, env_id="CompoGrid-v0", env_kwargs=dict(ENV_KWARGS), episodes=1,
        num_envs=NUM_ENVS, seed=seed,
    )  # fmt: skip
    return float(res["success"].mean())


def _ci(p: float, n: int) -> str:
    """Normal-approximation 95% half-width of a success rate (for the notes)."""
    if math.isnan(p) or n < 1:
        return "n/a"
    return f"+-{1.96 * math.sqrt(max(p * (1 - p), 1e-12) / n):.2f}"


def run(quick: bool = False, workdir: str | None = None, **_: object) -> list[Row]:
    """Train both learners on the same budget and compare speed and success."""
    # quick: one rollout of our 64 envs x 128 steps (a smaller budget is refused)
    budget, n_eval = (8192, 16) if quick else (300_000, 50)
    seed = 0
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        t0 = time.perf_counter()
        module, wall_ours = train_ours(budget, Path(tmp) / "ppo", seed)
        steps_ours = module.env_steps
        hist = [h["charts/success"] for h in module.history if "charts/success" in h]
        # time inside training_step (rollout + update), from the logged per-iteration SPS;
        # the rest of the wall is construction, Lightning and checkpoints
        iter_s = sum(
            (h["env_steps"] - prev["env_steps"]) / h["charts/SPS"]
            for prev, h in zip([{"env_steps": 0}, *module.history], module.history)
            if h.get("charts/SPS")
        )
        train_ours_s = last_success(hist)
        print(f"[{NAME}] ours: {steps_ours} steps in {wall_ours:.1f} s")
        model, wall_sb3, sb3_hist, steps_sb3 = train_sb3(budget, seed)
        train_sb3_s = last_success(sb3_hist)
        print(f"[{NAME}] sb3: {steps_sb3} steps in {wall_sb3:.1f} s")
        # what SB3's per-env CompoGridEnvs alone cost: the part the batched env removes
        from benchmarks.bench_collector import raw_steps_per_second

        env_s = steps_sb3 / raw_steps_per_second(500 if quick else 4000, 3)
        eval_ours = eval_success(module, n_eval)
        eval_sb3 = eval_success(SB3Agent(model), n_eval)
        ceiling = update_steps_per_second(OURS_ENVS, OURS_ENVS * NUM_STEPS // MINIBATCH)
        print(f"[{NAME}] done in {time.perf_counter() - t0:.1f} s")
    sps_ours, sps_sb3 = steps_ours / wall_ours, steps_sb3 / wall_sb3
    common = (
        f"budget {budget} env steps each, ours {OURS_ENVS} batched envs, SB3 {NUM_ENVS} "
        f"subprocess envs, minibatch {MINIBATCH}, seed {seed}, {COMPOSITION!r}"
    )
    return [
        Row(
            NAME, "env_steps_per_s", sps_ours, sps_sb3, ">=10",
            f"value=ours (rl.train.fit, Lightning, checkpoint every 10 its) "
            f"{steps_ours} steps/{wall_ours:.1f} s ({iter_s:.1f} s inside training_step, "
            f"{wall_ours - iter_s:.1f} s construction + Lightning + checkpoints); "
            f"reference=SB3 {steps_sb3} steps/"
            f"{wall_sb3:.1f} s; wall from construction to end of training; SB3's envs alone "
            f"(raw single-env loop rate) account for ~{env_s:.1f} s of its steps; {common}; "
            f"{load_note()}",
        ),
        Row(
            NAME, "train_success_last10", train_ours_s, train_sb3_s, "",
            f"value=ours mean charts/success of the last 10 iterations; reference=SB3 mean "
            f"success of episodes ending in each of its last 10 rollouts; {common}",
        ),
        Row(
            NAME, "eval_success", eval_ours, eval_sb3, "",
            f"value=ours {eval_ours:.2f}{_ci(eval_ours, n_eval)}, reference=SB3 "
            f"{eval_sb3:.2f}{_ci(eval_sb3, n_eval)} (95% normal CI); {n_eval} episodes each, "
            f"sampled actions (deterministic=False), same random layouts, both through "
            f"rl.protocol.run_trials; {common}",
        ),
        Row(
            NAME, "update_ceiling_env_steps_per_s", ceiling, sps_sb3, "",
            f"value=env steps/s of our PPO update alone (benchmarks.learner_ceiling: "
            f"rl.ppo.ppo_update, {OURS_ENVS} x {NUM_STEPS} rollout, minibatch {MINIBATCH}, 4 "
            f"epochs, env and collector free), reference=SB3 as above: the ratio is an upper "
            f"bound on env_steps_per_s's ratio at these hyper-parameters on this machine; "
            f"{load_note()}",
        ),
    ]  # fmt: skip
