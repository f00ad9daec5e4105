"""Outcome discovery on Meta-World: fixed-length options told apart by what they move.

Meta-World has no discrete object events, so a skill is an option of the ``"duration"`` kind
(``primitives.options``): drawn uniformly at an episode start or when the previous one ends, it
runs ``t_max`` steps (MLSH / SiMPL's fixed-length high-level steps). Its outcome is the pair
(``[hand xyz, gripper, object xyz]`` at its start, their displacement over the segment)
(``envs.metaworld.motion``); a discriminator q(k | start, displacement) is trained on
finished segments (a replay of recent ones), and the skill earns ``log q(k | outcome) - log
p(k)`` (p uniform; floored at ``reward_floor`` if set) on the segment's last step, which is
terminal for it. The skills are trained by the shared PPO (``primitives.option_training.
update_skills``: segments are the skills' episodes; one cut by the env's time limit bootstraps).
No task reward is read: the envs run the train tasks (fresh goals every episode) only so the
arm meets the objects the tasks are about.

Differences from CompoGrid's discovery (``primitives.outcome_training``), stated: no
relabelled imitation (an outcome of continuous displacement has no discrete kind to assign to
one skill, and relabelled PPO data would be off-policy) and no VALOR growth; ``bc_*``,
``relabel*``, ``start_skills``, ``grow_at``, ``cut_reward`` and ``size`` of the
``DiscoveryConfig`` are not used here.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from envs.metaworld import MOTION_DIM, motion, moved
from primitives.option_training import ChainPolicy, update_skills
from primitives.options import OptionLibrary
from primitives.outcome import DiscoveryConfig, OutcomeDiscriminator, intrinsic_reward
from primitives.outcome_training import DiscoveryLoop, OutcomeReplay, uniform_draw
from rl import distributed
from rl.collect import Collector, Rollout

#: discriminator input: motion features at the segment's start and their displacement
MOTION_OUTCOME_DIM = 2 * MOTION_DIM


def finished_segments(ro: Rollout, t_max: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(T, N) bool ``done`` (step t is the last of a segment that ran ``t_max`` steps) and the
    (T, N, 14) outcome features of those steps (zeros elsewhere)."""
    done = ro.extras["seg_len"] == t_max
    start = ro.extras["start_state"]
    feats = torch.cat([start, motion(ro.next_obs) - start], -1)
    return done, torch.where(done[..., None], feats, torch.zeros_like(feats))


class MotionDiscovery(DiscoveryLoop):
    """Phase 1 of the compositional agent on Meta-World (``discovered`` skills); the interface
    of ``primitives.outcome_training.Discovery`` (``collector``, ``step``, ``last``, ``gen``,
    ``training_state`` / ``load_training_state``).

    Args:
        cfg: settings (see the module docstring for the fields used).
        library: a ``"duration"``, continuous ``OptionLibrary`` with ``cfg.num_skills`` skills.
        discriminator: ``OutcomeDiscriminator(K, in_dim=MOTION_OUTCOME_DIM)``.
        venv: the vector env (train tasks) and ``sampler`` its task sampler.
    """

    def __init__(self, cfg: DiscoveryConfig, library: OptionLibrary,
                 discriminator: OutcomeDiscriminator, venv, sampler) -> None:  # fmt: skip
        if library.termination != "duration" or library.num_skills != cfg.num_skills:
            raise ValueError(
                f"library with K={library.num_skills}, termination={library.termination!r}; "
                f"allowed: K={cfg.num_skills}, 'duration'"
            )
        self.cfg, self.lib, self.disc = cfg, library, discriminator
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.active = [cfg.num_skills]
        self.policy = ChainPolicy(
            library, cfg.t_max, uniform_draw(self.active, self.gen), self.gen, start_fn=motion
        )
        self.collector = Collector(venv, self.policy, task_sampler=sampler, seed=cfg.seed)
        self.opt = torch.optim.Adam(library.parameters(), lr=cfg.ppo.lr, eps=1e-5)
        self.disc_opt = torch.optim.Adam(discriminator.parameters(), lr=cfg.disc_lr)
        self.replay = OutcomeReplay(cfg.disc_buffer, MOTION_OUTCOME_DIM)
        self.iteration = 0

    def step(self, backward: Callable[[torch.Tensor], None] | None = None) -> dict[str, float]:
        """One rollout: rewards from the current discriminator, PPO, then the discriminator's
        update (the logged accuracy is on outcomes it has not trained on). Under DDP the PPO
        update is over every rank's steps and the replay holds every rank's segments."""
        cfg, K = self.cfg, self.cfg.num_skills
        ro = self.collector.collect(cfg.num_steps)
        done, feats = finished_segments(ro, cfg.t_max)
        skill = ro.extras["skill"]
        rewards = torch.zeros(done.shape)
        if done.any():
            r = intrinsic_reward(self.disc, feats[done], skill[done], K)
            if cfg.reward_floor is not None:
                r = r.clamp(min=cfg.reward_floor)
            rewards[done] = r
        self.last = (ro, done)  # the segments, for a caller that counts them (skill graph)
        stats: dict[str, float] = {"active_skills": K}
        ppo = update_skills(self.lib, ro, rewards, done, self.opt, cfg.ppo, backward=backward)
        stats.update({f"ppo/{k}": v for k, v in ppo.items()})
        # every rank's segments, in the (step, env) order one process holding all envs has
        rank, size = distributed.world()
        at, n = done.nonzero(), done.shape[1]
        t, env, seg_feats, seg_skill = distributed.gather_cat(
            at[:, 0], at[:, 1] + rank * n, feats[done], skill[done]
        )
        order = torch.argsort(t * n * size + env)
        seg_feats, seg_skill = seg_feats[order], seg_skill[order]
        stats["segments_finished"] = int(seg_skill.numel())
        if seg_skill.numel():
            with torch.no_grad():
                pred = self.disc(seg_feats, K).argmax(-1)
            stats["disc_acc_unseen"] = float((pred == seg_skill).float().mean())
            stats["intrinsic_reward"] = float(intrinsic_reward(self.disc, seg_feats, seg_skill,
                                                               K).mean())  # fmt: skip
            stats["object_moved"] = float(moved(seg_feats[:, MOTION_DIM:]).float().mean())
            self.replay.add(seg_feats, seg_skill)
            self._name_skills()
        stats["disc_loss"] = self._train_discriminator(K)
        self.iteration += 1
        return stats

    def _name_skills(self) -> None:
        """Each skill's mean displacement over the replay's segments (the library's
        ``motion_of``, which ``OptionLibrary.skill_names`` turns into names)."""
        r, K = self.replay, self.lib.num_skills
        k, d = r.skill[: r.n], r.feats[: r.n, MOTION_DIM:]
        sums = torch.zeros(K, d.shape[1]).index_add_(0, k, d)
        count = torch.bincount(k, minlength=K)
        self.lib.motion_of.copy_(sums / count.clamp(min=1)[:, None])
        self.lib.motion_n.copy_(count)
