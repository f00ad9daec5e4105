"""What the skill-level agent reads off a family's observations.

The controller and the acting policy (``compositional.policy``) need, per family: the outcome
of one env step and how a segment's outcome accumulates over its steps, whether a finished
segment "did something" (the feasibility graph's success), the current sub-task position
(the belief tables are kept per position), the current instruction token and the observation
without its task part.

- ``GridFamily`` (CompoGrid): outcomes are the 19 object events (``envs.grid_events``), a
  segment's outcome is the set of events it caused (element-wise max), a segment succeeds
  when it caused its skill's event (a supervised skill's primitive; a discovered skill's
  main outcome, ``OptionLibrary.outcome_of``, or while that is not measured yet, when its
  termination fired — in phase 1 always the latter); position and token are read off the observation's
  progress one-hot and instruction tokens.
- ``MotionFamily`` (Meta-World): the outcome is the displacement of ``[hand xyz, gripper,
  object xyz]`` (``envs.metaworld.motion``: the first 7 entries of the observation), summed
  over the segment's steps; a segment succeeds when it moved the object by at least
  ``envs.metaworld.MOVED`` (2 cm); the controller reads its mean reward per step / 10 (dense
  0..10 rewards); one sub-task per task (position 0) and no instructions (Meta-World tasks
  are reward-only).

Examples:
    >>> fam = family_for("CompoMetaWorld-v0")
    >>> fam.outcome_dim, fam.max_len, fam.n_tokens
    (7, 1, 1)
"""

from __future__ import annotations

import torch

from envs.grid import MAX_LEN, PRIMITIVES
from envs.grid_events import NUM_PRIMITIVES, outcomes, task_free
from envs.metaworld import MOTION_DIM, motion, moved


class GridFamily:
    """CompoGrid: object events."""

    name = "grid"
    outcome_dim = NUM_PRIMITIVES
    n_tokens = len(PRIMITIVES)
    max_len = MAX_LEN
    continuous = False

    def step_outcome(self, last_obs: torch.Tensor, obs: torch.Tensor):
        """(completed, events, feasible) of the step last_obs -> obs (``envs.grid_events``)."""
        return outcomes(last_obs, obs)

    def accumulate(self, seg: torch.Tensor, ev: torch.Tensor, cont: torch.Tensor) -> torch.Tensor:
        return torch.maximum(seg, (ev & cont[:, None]).float())

    def reward_feature(self, seg_reward: torch.Tensor, seg_len: torch.Tensor) -> torch.Tensor:
        """The segment's reward as the controller reads it (CompoGrid: as collected, 0..1)."""
        return seg_reward

    def progress(self, obs: torch.Tensor) -> torch.Tensor:
        from compositional.controller import progress_of

        return progress_of(obs)

    def token(self, obs: torch.Tensor) -> torch.Tensor:
        from compositional.controller import current_token

        return current_token(obs)

    def task_free(self, obs: torch.Tensor) -> torch.Tensor:
        """The observation without its task part (progress, instruction tokens): what the
        skills and the state-conditioned graph see."""
        return task_free(obs)


class MotionFamily:
    """Meta-World: hand, gripper and object displacement."""

    name = "motion"
    outcome_dim = MOTION_DIM
    n_tokens = 1
    max_len = 1
    continuous = True

    def step_outcome(self, last_obs: torch.Tensor, obs: torch.Tensor):
        return None, motion(obs) - motion(last_obs), None

    def accumulate(self, seg: torch.Tensor, ev: torch.Tensor, cont: torch.Tensor) -> torch.Tensor:
        return seg + ev * cont[:, None].float()

    def moved(self, seg: torch.Tensor) -> torch.Tensor:
        """(B,) bool: the segment's outcome moved the object by at least ``MOVED`` (2 cm)."""
        return moved(seg)

    def reward_feature(self, seg_reward: torch.Tensor, seg_len: torch.Tensor) -> torch.Tensor:
        """Mean reward per step of the segment / 10 (Meta-World's dense reward is 0..10 per
        step: a segment's sum reaches hundreds, which would saturate the input layer)."""
        return seg_reward / seg_len.clamp(min=1) / 10.0

    def progress(self, obs: torch.Tensor) -> torch.Tensor:
        return torch.zeros(obs.shape[0], dtype=torch.long)

    def token(self, obs: torch.Tensor) -> torch.Tensor:
        return torch.zeros(obs.shape[0], self.n_tokens)

    def task_free(self, obs: torch.Tensor) -> torch.Tensor:
        return obs  # the goal is hidden: no task part


FAMILIES = {"CompoGrid-v0": GridFamily, "CompoMetaWorld-v0": MotionFamily}


def family_for(env_id: str):
    """The family of ``env_id``; one clear ``ValueError`` for an env the agent cannot read."""
    if env_id not in FAMILIES:
        raise ValueError(
            f"env_id={env_id!r}; the skill-level agent reads its family's outcomes (allowed: "
            f"{', '.join(FAMILIES)})"
        )
    return FAMILIES[env_id]()
