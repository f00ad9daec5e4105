"""Can PPO learn K skills from a *perfect, fixed* DIAYN reward? Skill learning without
co-adaptation.

``python -m experiments.disc_fixed [--num-skills 12] [--seed S] [--eval-steps N] [--logit L]
[--out FILE.json] [--set KEY=VALUE ...]``

DIAYN couples two learners: the discriminator q(k | phi(s)) learns from the skills' states
while the skills learn from its reward log q(k | phi(s')) - log p(k). ``experiments.disc_probe``
shows the learned skills overlap and ``experiments.disc_ceiling`` that distinct scripted skills
would reach 0.85 (cells) under the same protocol. This script removes the coupling: q is a
fixed classifier of the ``cells`` family's zones (``disc_ceiling.make_zones``: skill k owns
zone k of K contiguous zones of the room), logits ``L * onehot(zone of the agent cell)`` (0
everywhere outside the room), and everything else is the ``discovery`` method's own training
(``DiscoveryModule`` built from the config and ``--set`` overrides, its ``SkillTrainer``
iteration: same envs, episode lengths, random layouts and starts, PPO, reward formula, budget
``total_env_steps``). Only the discriminator update is skipped.

The report:

* ``accuracy_per_iteration``: the fixed q's accuracy on each fresh training rollout (what
  ``charts/disc_accuracy`` logs for DIAYN) and ``accuracy_last10`` its mean over the last 10;
* ``eval_accuracy`` / ``eval_accuracy_greedy``: the final skills on a fresh rollout of
  ``--eval-steps`` vector steps, sampled / arg-max actions.

If PPO cannot reach the scripted skills' accuracy even with this reward, the skill learner (its
inputs, its budget, its PPO settings) limits DIAYN before the discriminator does.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from torch import nn


class ZoneDiscriminator(nn.Module):
    """A fixed q(k | phi): logit ``logit`` for the zone of the agent cell, 0 for the others
    (and 0 for every skill outside the room). Reads the one-hot x and y of
    ``PhiEncoder('grid')`` (the first 2 * size inputs)."""

    def __init__(self, size: int, num_skills: int, logit: float = 3.0) -> None:
        super().__init__()
        from experiments.disc_ceiling import make_zones

        self.size, self.k, self.logit = int(size), int(num_skills), float(logit)
        zone_of = torch.full((self.size, self.size), -1, dtype=torch.long)
        for z, cells in enumerate(make_zones(self.size, self.k)):
            for x, y in cells:
                zone_of[x, y] = z
        self.register_buffer("zone_of", zone_of)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.size
        zone = self.zone_of[x[..., :s].argmax(-1), x[..., s : 2 * s].argmax(-1)]
        inside = zone >= 0
        onehot = nn.functional.one_hot(zone.clamp(min=0), self.k).float()
        return onehot * inside.unsqueeze(-1).float() * self.logit


def _accuracy(disc: ZoneDiscriminator, trainer, ro) -> float:
    from primitives.discovery import next_phi

    with torch.no_grad():
        pred = disc(trainer.phi_encoder(next_phi(ro))).argmax(-1)
    return float((pred == ro.extras["skill"]).float().mean())


def fixed_reward_run(
    num_skills: int = 12,
    seed: int = 0,
    overrides: dict | None = None,
    eval_steps: int = 512,
    logit: float = 3.0,
) -> dict:
    """Train a library on the fixed zone reward (see the module docstring); returns the report."""
    from primitives.discovery import DiscoveryModule, SkillPolicy
    from rl.config import merge

    if isinstance(eval_steps, bool) or not isinstance(eval_steps, int) or eval_steps < 1:
        raise ValueError(f"eval_steps={eval_steps!r}; allowed: an integer >= 1")
    if not logit > 0:
        raise ValueError(f"logit={logit!r}; allowed: a positive number")
    module = DiscoveryModule(merge(dict(overrides or {}), {"num_skills": num_skills, "seed": seed}))
    cfg = module.cfg
    if not cfg.env_id.startswith("CompoGrid"):
        raise ValueError(f"env_id={cfg.env_id!r}; allowed: a CompoGrid env (zones of its room)")
    if cfg.objective != "diayn":
        raise ValueError(f"objective={cfg.objective!r}; allowed: 'diayn' (the DIAYN reward)")
    if cfg.training.curriculum_threshold is not None:
        raise ValueError(
            f"training.curriculum_threshold={cfg.training.curriculum_threshold}; allowed: None "
            "(the fixed zones are K from the start)"
        )
    trainer = module.trainer_
    disc = ZoneDiscriminator(trainer.phi_encoder.size, cfg.num_skills, logit)
    trainer.discriminator = disc
    trainer._update_discriminator = lambda *a, **k: 0.0  # q stays fixed: no discriminator step
    lib_opt = module.configure_optimizers()[0]
    accs = []
    col = module.make_collector()
    try:
        for _ in range(module.iterations()):
            _, _, charts = trainer.iteration(col, lib_opt, None)
            accs.append(charts["charts/disc_accuracy"])
        env_steps = int(col.env_steps)
    finally:
        col.envs.close()
    evals = {}
    for name, greedy in (("eval_accuracy", False), ("eval_accuracy_greedy", True)):
        col = module.make_collector()
        try:
            col.rng = np.random.default_rng(10_000 + seed)
            col.policy = SkillPolicy(module.library, greedy=greedy)
            with torch.no_grad():
                evals[name] = _accuracy(disc, trainer, col.collect(eval_steps))
        finally:
            col.envs.close()
    return {
        "num_skills": cfg.num_skills,
        "chance": 1.0 / cfg.num_skills,
        "seed": seed,
        "logit": logit,
        "env_kwargs": dict(cfg.env_kwargs),
        "ppo": {"lr": cfg.training.ppo.lr, "update_epochs": cfg.training.ppo.update_epochs},
        "env_steps": env_steps,
        "accuracy_per_iteration": accs,
        "accuracy_last10": float(np.mean(accs[-10:])),
        "eval_steps": eval_steps,
        **evals,
    }


def main(argv: list[str] | None = None) -> None:
    from experiments.disc_ceiling import parse_common_args, write_report

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num-skills", type=int, default=12, help="K (= number of zones)")
    p.add_argument("--eval-steps", type=int, default=512, help="vector steps of the final rollout")
    p.add_argument("--logit", type=float, default=3.0, help="the fixed q's logit for the zone")
    a = parse_common_args(p, argv)
    try:
        rep = fixed_reward_run(a.num_skills, a.seed, a.overrides, a.eval_steps, a.logit)
    except ValueError as e:
        raise SystemExit(f"disc_fixed: error: {e}") from None
    print(
        f"fixed zone reward, K={rep['num_skills']} (chance {rep['chance']:.3f}), "
        f"{rep['env_steps']} env steps: accuracy last 10 iterations {rep['accuracy_last10']:.3f}; "
        f"final skills on a fresh rollout {rep['eval_accuracy']:.3f} "
        f"(greedy {rep['eval_accuracy_greedy']:.3f})"
    )
    write_report(a.out, rep)


if __name__ == "__main__":
    main()
