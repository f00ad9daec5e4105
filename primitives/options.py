"""The option library: K skills pi(a | s, k), each with a termination beta_k and a value V(s, k).

A skill is an *option* (Sutton, Precup & Singh 1999): once chosen it acts alone until its
termination fires or it has run ``t_max`` steps (call-and-return). Layout: a shared two-layer
encoder, K linear actor heads and a K-headed critic (one forward pass serves a batch of envs
that each run a different skill).

Termination (``termination``):

- ``"event"`` (the supervised library): skill k stands for primitive ``event_of[k]`` and ends
  on the step that completes it by the env's rules, or as soon as it is infeasible in the
  current state (``envs.grid_events``): beta is exact and needs no learning, like the STOP of a
  policy sketch's module.
- ``"learned"`` (discovered skills): beta_k(s', e) = sigmoid(w_k . [enc(s'), e]) is evaluated
  only on steps with an object event e (a step that changed nothing cannot end a skill, which
  keeps options from shrinking to one step, the role of option-critic's deliberation cost), and
  trained with the skill's policy gradient.
- ``"duration"`` (Meta-World, which has no discrete object events): beta is 0 and a skill runs
  exactly ``t_max`` steps (or to the episode's end), as MLSH's and SiMPL's fixed-length
  high-level steps.

Actions: a Categorical per skill (``n_actions`` logits; CompoGrid), or with ``continuous=True``
a diagonal Gaussian per skill over ``n_actions`` dimensions with a per-skill state-independent
log-std (Meta-World; the env clips to its box). Skills never see the task: on CompoGrid the
progress and instruction parts of the observation are zeroed before encoder and critic
(``envs.grid_events.task_free``); Meta-World's observation holds no task information (goal
hidden).

Examples:
    >>> lib = OptionLibrary(166, 6, num_skills=19)
    >>> obs = torch.zeros(3, 166)
    >>> lib.dist(obs, torch.tensor([0, 5, 18])).sample().shape
    torch.Size([3])
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.distributions import Bernoulli, Categorical, Distribution, Independent, Normal

from envs.grid_events import NUM_PRIMITIVES, completed, events, feasible, task_free
from rl.nets import mlp

TERMINATIONS = ("event", "learned", "duration")


def check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or int(value) < 1:
        raise ValueError(f"{name}={value!r}; allowed: an integer >= 1")
    return int(value)


def motion_name(d: torch.Tensor) -> str:
    """A Meta-World skill named by its mean displacement ``d`` of [hand xyz, gripper, object
    xyz]: the hand's main axis, and the object's move when it moved >= 1 cm.

    Examples:
        >>> motion_name(torch.tensor([0.0, -0.06, 0.01, 0.0, 0.0, 0.0, 0.0]))
        'hand -y 6cm'
    """
    axis = int(d[:3].abs().argmax())
    name = f"hand {'+' if d[axis] >= 0 else '-'}{'xyz'[axis]} {abs(float(d[axis])) * 100:.0f}cm"
    moved = float(d[4:7].norm())
    return name + (f", object {moved * 100:.0f}cm" if moved >= 0.01 else "")


class OptionLibrary(nn.Module):
    """K options over a shared encoder (see the module docstring).

    Args:
        obs_dim: observation size.
        n_actions: discrete action count, or the action dimension (``continuous``).
        num_skills: K >= 1.
        hidden: encoder width.
        termination: ``"event"`` (``event_of`` required), ``"learned"`` or ``"duration"``.
        event_of: (K,) primitive index of each skill (``"event"`` termination).
        continuous: Gaussian skills over a Box action space (Meta-World).
    """

    def __init__(
        self,
        obs_dim: int,
        n_actions: int,
        num_skills: int,
        hidden: int = 128,
        termination: str = "learned",
        event_of: list[int] | None = None,
        continuous: bool = False,
    ) -> None:
        super().__init__()
        self.num_skills = K = check_positive_int("num_skills", num_skills)
        if termination not in TERMINATIONS:
            raise ValueError(f"termination={termination!r}; allowed: {', '.join(TERMINATIONS)}")
        if termination == "event":
            if event_of is None or len(event_of) != K:
                raise ValueError(f"termination='event' needs event_of with {K} primitive indices")
            if not all(0 <= int(p) < NUM_PRIMITIVES for p in event_of):
                raise ValueError(f"event_of={event_of}; allowed: indices 0..{NUM_PRIMITIVES - 1}")
        self.obs_dim, self.n_actions, self.termination = int(obs_dim), int(n_actions), termination
        self.continuous = bool(continuous)
        self.register_buffer(
            "event_of", torch.as_tensor(event_of if event_of is not None else [-1] * K)
        )
        # discovered skills: the primitive each one mostly produces (-1: not measured yet), set
        # during discovery from its recent segments (``primitives.outcome.main_outcome_of``)
        # and by ``primitives.outcome_eval.name_skills`` when a library is evaluated; kept in
        # the state dict
        self.register_buffer("outcome_of", torch.full((K,), -1, dtype=torch.long))
        self.encoder = nn.Sequential(mlp([obs_dim, hidden, hidden]), nn.Tanh())
        self.actor = nn.Linear(hidden, K * n_actions)
        nn.init.orthogonal_(self.actor.weight, 0.01)
        nn.init.zeros_(self.actor.bias)
        self.critic = mlp([obs_dim, hidden, hidden, K], out_gain=1.0)
        if self.continuous:
            self.log_std = nn.Parameter(torch.full((K, self.n_actions), -0.5))
            # mean displacement of [hand xyz, gripper, object xyz] over each skill's segments
            # and how many segments it is from (0: not measured), set by Meta-World discovery;
            # names the skills
            self.register_buffer("motion_of", torch.zeros(K, 7))
            self.register_buffer("motion_n", torch.zeros(K, dtype=torch.long))
        else:
            # skills never see the task (CompoGrid's sub-task progress, instruction tokens): one
            # library for reward and instruction mode, and no skill can key on the composition
            for net in (self.encoder, self.critic):
                net.register_forward_pre_hook(lambda _m, args: (task_free(args[0]),))
        if termination != "duration":
            self.beta_head = nn.Linear(hidden + NUM_PRIMITIVES, K)
            nn.init.orthogonal_(self.beta_head.weight, 0.01)
            nn.init.zeros_(self.beta_head.bias)

    # -- acting ---------------------------------------------------------------------------------
    def logits(self, obs: torch.Tensor, skill: torch.Tensor) -> torch.Tensor:
        """Action logits (B, n_actions) of skill ``skill`` (B,) at ``obs`` (B, obs_dim) (the
        Gaussian's mean when ``continuous``)."""
        out = self.actor(self.encoder(obs)).view(-1, self.num_skills, self.n_actions)
        return out[torch.arange(out.shape[0]), skill]

    def all_logits(self, obs: torch.Tensor) -> torch.Tensor:
        """Every skill's action logits (B, K, n_actions) (the ``soft`` composer mixes them)."""
        return self.actor(self.encoder(obs)).view(-1, self.num_skills, self.n_actions)

    def dist(self, obs: torch.Tensor, skill: torch.Tensor) -> Distribution:
        out = self.logits(obs, skill)
        if self.continuous:
            std = self.log_std[skill].clamp(-5, 2).exp()
            return Independent(Normal(out, std, validate_args=False), 1, validate_args=False)
        return Categorical(logits=out, validate_args=False)

    def value(self, obs: torch.Tensor, skill: torch.Tensor) -> torch.Tensor:
        return self.critic(obs)[torch.arange(obs.shape[0]), skill]

    # -- termination ----------------------------------------------------------------------------
    def beta(
        self, obs0: torch.Tensor, obs1: torch.Tensor, skill: torch.Tensor, ev=None
    ) -> torch.Tensor:
        """Termination probability (B,) of skill ``skill`` after the step obs0 -> obs1 (for
        ``"event"``: 0 or 1; ``"duration"``: 0). ``ev``: ``events(obs0, obs1)`` if the caller
        has it already."""
        if self.termination == "duration":
            return torch.zeros(obs1.shape[0], dtype=obs1.dtype)
        if self.termination == "event":
            prim = self.event_of[skill]
            rows = torch.arange(obs1.shape[0])
            done = completed(obs0, obs1)[rows, prim] | ~feasible(obs1)[rows, prim]
            return done.float()
        ev = events(obs0, obs1) if ev is None else ev
        on = ev.any(-1)  # only steps with an object event can end a skill: the head runs there
        p = torch.zeros(obs1.shape[0], dtype=obs1.dtype)
        if on.any():
            logit = self.beta_head(torch.cat([self.encoder(obs1[on]), ev[on].float()], -1))
            p = p.index_put(
                (on.nonzero().squeeze(-1),),
                torch.sigmoid(logit.gather(1, skill[on][:, None]).squeeze(-1)),
            )
        return p

    def beta_dist(self, obs0, obs1, skill) -> Bernoulli:
        return Bernoulli(probs=self.beta(obs0, obs1, skill).clamp(1e-6, 1 - 1e-6))

    def event_step(self, obs0: torch.Tensor, obs1: torch.Tensor) -> torch.Tensor:
        """(B,) bool: the step obs0 -> obs1 changed an object (only such steps can end a
        learned option)."""
        return events(obs0, obs1).any(-1)

    def skill_names(self, primitive_names: list[str]) -> list[str | None]:
        """The primitive each skill stands for (``"event"``) or mostly produces (``"learned"``,
        once measured), else None per skill; Gaussian skills: what they mostly move
        (``motion_name``)."""
        if self.continuous:
            return [
                motion_name(d) if n > 0 else None for d, n in zip(self.motion_of, self.motion_n)
            ]
        of = self.event_of if self.termination == "event" else self.outcome_of
        return [primitive_names[int(p)] if int(p) >= 0 else None for p in of]

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # libraries saved before ``outcome_of`` existed load with it unmeasured
        state_dict.setdefault(prefix + "outcome_of", torch.full_like(self.outcome_of, -1))
        if self.continuous:  # (Meta-World libraries saved before their motions were kept)
            state_dict.setdefault(prefix + "motion_of", torch.zeros_like(self.motion_of))
            state_dict.setdefault(prefix + "motion_n", torch.zeros_like(self.motion_n))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
