"""Outcome-based skill discovery: options that differ in what they do to objects.

Phase 1 of the compositional agent without task reward. The env is only a room with objects
(one fixed composition, ``ROOM``, that random behaviour almost never completes; its reward is
never read and an episode end only cuts a segment, which then bootstraps). K options with a
learned termination (``OptionLibrary(termination="learned")``) run in chains, drawn uniformly,
and maximise the mutual information I(k; outcome) between the skill and the *outcome* of its
segment (VIC / SkiLD-style: what changed, not where the agent went):

- **outcome** (``outcome_features``): the object events of the step on which the option
  terminated (``envs.grid_events.events``) plus ``object_state`` at the segment's start and
  end: on-grid / carried / door / faced entity, never the agent's cell. DIAYN over the whole
  state learned *places* here (accuracy 0.74 at K = 12, about 4-7 distinct skills).
- **discriminator** q(k | outcome) (``OutcomeDiscriminator``), trained by cross-entropy on
  the outcomes of terminated segments (a replay of recent ones).
- **intrinsic reward** at termination: log q(k | outcome) - log p(k), p uniform over the
  active skills; a segment cut by ``t_max`` has no outcome and earns ``cut_reward``; one cut
  by the episode's or the rollout's end bootstraps from V(s', k).
- **hindsight relabelling** (``relabel``): every terminated segment is relabelled to the skill
  its outcome best matches and that skill is trained to imitate it (behaviour cloning of its
  actions *and* of its termination decisions: continue on the earlier events, stop on the
  last one), GCSL-style, each kind of outcome weighted equally (``bc_balance``). "Best
  matches" is ``assign`` by default: a greedy one-to-one matching of outcome kinds to skills
  by mean q(k | outcome) (``relabel_assigned``); ``argmax`` (k* = argmax_k q(k | outcome))
  let duplicate skills persist and left outcomes nobody owned without imitation data
  (seed 0: 15/19 primitives, held-out accuracy 0.62 at 4.9M steps, vs 19/19 and 0.69 for
  ``assign`` at 8M, whose on-policy accuracy was ahead at every matched step count).
  Behaviour cloning rather than relabelled
  PPO because the relabelled segment is off-policy for k*: PPO would need the ratio
  pi_k*(a|s) / pi_k(a|s) over up to ``t_max`` steps, which explodes, while imitation of a
  segment that reached the outcome is a valid improvement step for a goal-reaching policy
  (Ghosh et al. 2021) and is what turns a skill that once stumbled on an outcome into one
  that reliably produces it.
- **termination** is part of each option's policy: the decision sampled on an event step is
  in the PPO ratio (``option_training.update_skills``), so the skill learns *which* outcome
  to stop on.
- **growth** (VALOR, Achiam et al. 2018; optional): start with ``start_skills`` active skills
  and grow to ``min(K, 1.5 K + 1)`` whenever the on-policy discriminator accuracy reaches
  ``grow_at``.

Why K = 19 by default: CompoGrid has 19 kinds of object outcome (goto x7, pickup x4, drop x4,
open box x2, open door, close door), so K >= 19, and with the assignment relabelling every kind
gets its own skill. Spare skills were expected to find composite outcomes (open a box, then
face the key); measured, they duplicated owned kinds instead, which costs discriminator
accuracy and buys no coverage (seed 0, 8M steps: K = 24 covered 19/19 primitives with
held-out accuracy 0.69, 0.87 once skills with the same main outcome are merged; K = 19
covered 19/19 with accuracy 0.92). VALOR growth (``start_skills``) is there for larger K.

Measured (``python -m experiments.discover --out DIR --steps 8000000``, seed 0, 8M env steps,
~20 min on one core): every primitive has a skill that completes it from >= 0.94 of 32
feasible start states (the same skills on 32 fresh states: >= 0.94), each skill ends on its
own kind of outcome (one skill per kind), held-out discriminator accuracy 0.92.

This file holds the objective's pieces (outcome features, discriminator, rewards, relabelling,
imitation loss, config); ``primitives.outcome_training`` runs them (``Discovery``, ``discover``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from envs.grid_events import NUM_PRIMITIVES, PRIM_VERB, events, object_state
from primitives.option_training import (
    decision_log_probs,
    decision_targets,
)
from primitives.options import OptionLibrary, check_positive_int
from rl.collect import Rollout
from rl.nets import mlp
from rl.ppo import PPOConfig, ppo_section

#: the room's composition: the env needs one; its reward is never read. Every sub-task is an
#: event in order (not a state that may already hold: opening the door would complete
#: "open(door) > toggle(door) > open(door)" within two steps), so chance completes it rarely
ROOM = "pickup(yellow key) > drop(yellow key) > toggle(door)"
STATE_DIM = 22
OUTCOME_DIM = NUM_PRIMITIVES + 2 * STATE_DIM


def outcome_features(start_state: torch.Tensor, obs0: torch.Tensor, obs1: torch.Tensor):
    """(..., 63): events of the last step obs0 -> obs1, object state at start and at end."""
    return torch.cat([events(obs0, obs1).float(), start_state.float(), object_state(obs1)], -1)


class OutcomeDiscriminator(nn.Module):
    """q(k | outcome): an MLP over ``outcome_features`` (``in_dim``: another family's outcome
    size, e.g. ``primitives.outcome_motion``); logits of skills >= ``active`` are masked
    (VALOR growth)."""

    def __init__(self, num_skills: int, hidden: int = 128, in_dim: int = OUTCOME_DIM) -> None:
        super().__init__()
        self.num_skills = check_positive_int("num_skills", num_skills)
        self.net = mlp([in_dim, hidden, hidden, self.num_skills])

    def forward(self, feats: torch.Tensor, active: int | None = None) -> torch.Tensor:
        logits = self.net(feats)
        if active is not None and active < self.num_skills:
            logits = logits.masked_fill(torch.arange(self.num_skills) >= active, -1e9)
        return logits

    def log_q(self, feats: torch.Tensor, active: int | None = None) -> torch.Tensor:
        return F.log_softmax(self(feats, active), -1)


def intrinsic_reward(
    disc: OutcomeDiscriminator, feats: torch.Tensor, skill: torch.Tensor, active: int
) -> torch.Tensor:
    """log q(k | outcome) - log p(k), p uniform over the ``active`` skills."""
    with torch.no_grad():
        lq = disc.log_q(feats, active)
    return lq[torch.arange(skill.shape[0]), skill] + math.log(active)


def relabel(
    disc: OutcomeDiscriminator, feats: torch.Tensor, active: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(best-matching skill, its probability) per outcome: k* = argmax_k q(k | outcome)."""
    with torch.no_grad():
        q = disc.log_q(feats, active).exp()
    p, k = q.max(-1)
    return k, p


#: the most specific primitive of a step's events names it (a drop also faces the object;
#: opening the door also toggles it): verb code (``PRIM_VERB``) -> rank
_PRIORITY = {2: 4, 1: 3, 3: 2, 4: 1, 0: 0}
_RANK = torch.as_tensor([_PRIORITY[int(v)] for v in PRIM_VERB], dtype=torch.float32)


def outcome_label(ev: torch.Tensor) -> torch.Tensor:
    """(B,) primitive index a step's events (B, 19) stand for, -1 if none."""
    score = torch.where(ev, _RANK + 1.0, torch.zeros_like(_RANK))
    best = score.argmax(-1)
    return torch.where(ev.any(-1), best, torch.full_like(best, -1))


def main_outcome_of(feats: torch.Tensor, skill: torch.Tensor, K: int) -> torch.Tensor:
    """(K,) the outcome kind (``outcome_label``, a primitive index) most of each skill's
    terminated segments ended on, -1 for a skill none of whose segments ended on an event:
    the name ``OptionLibrary.skill_names`` gives a discovered skill (graphs, traces).
    ``feats``/``skill``: segments' outcome features and the skills that ran them."""
    kind = outcome_label(feats[:, :NUM_PRIMITIVES] > 0.5)
    ok = kind >= 0
    counts = torch.zeros(K * NUM_PRIMITIVES)
    counts.index_add_(0, skill[ok] * NUM_PRIMITIVES + kind[ok], torch.ones(int(ok.sum())))
    counts = counts.view(K, NUM_PRIMITIVES)
    return torch.where(counts.sum(1) > 0, counts.argmax(1), torch.full((K,), -1))


def relabel_assigned(
    disc: OutcomeDiscriminator, feats: torch.Tensor, active: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Relabelling under a one-to-one assignment of outcome kinds to skills.

    Kinds are ``outcome_label`` of the terminating events (the 19 primitives' outcomes).
    Greedily, the (kind, skill) pair of highest mean q(k | outcome) over the kind's segments
    is matched first, then the next among the unmatched kinds and skills, and so on; a
    segment is relabelled to its kind's skill. Plain argmax relabelling lets duplicates
    persist (four skills that all face the green key each earn log(K / 4) and no skill gets
    the imitation data of an outcome nobody owns yet); the assignment gives every kind seen in
    the batch its own skill when K allows. Returns (skill, q of that skill) per outcome.
    """
    with torch.no_grad():
        q = disc.log_q(feats, active).exp()
    kind = outcome_label(feats[:, :NUM_PRIMITIVES] > 0.5)
    kinds = kind.unique()
    score = torch.stack([q[kind == c].mean(0) for c in kinds])  # (C, K)
    owner = torch.full((len(kinds),), -1, dtype=torch.long)
    score = score.clone()
    for _ in range(min(len(kinds), active)):
        c, k = divmod(int(score.argmax()), score.shape[1])
        owner[c] = k
        score[c, :] = -1.0
        score[:, k] = -1.0
    # kinds beyond K (none on CompoGrid with K >= 19) fall back to argmax
    target = torch.where(owner[torch.searchsorted(kinds, kind)] >= 0,
                         owner[torch.searchsorted(kinds, kind)], q.argmax(-1))  # fmt: skip
    return target, q[torch.arange(q.shape[0]), target]


@dataclass
class Segments:
    """Segments of a chain rollout that ended by their learned termination inside it."""

    env: torch.Tensor
    """(M,) env index"""
    end: torch.Tensor
    """(M,) index of the segment's last step (the step that caused the terminating event)"""
    skill: torch.Tensor
    """(M,) the skill that ran it"""
    feats: torch.Tensor
    """(M, OUTCOME_DIM) its outcome"""


def terminated_segments(ro: Rollout) -> Segments:
    """The segments whose termination fired after step t (decided at t+1, same rollout)."""
    _, fired = decision_targets(ro)
    t, i = fired.nonzero(as_tuple=True)
    feats = outcome_features(ro.extras["start_state"][t, i], ro.obs[t, i], ro.next_obs[t, i])
    return Segments(i, t, ro.extras["skill"][t, i], feats)


def tmax_cuts(ro: Rollout, t_max: int) -> torch.Tensor:
    """(T, N) bool: the segment is cut after this step by ``t_max`` (not by the episode)."""
    done = ro.terminated | ro.truncated
    return (ro.extras["seg_len"] >= t_max) & ~done


def discovery_rewards(
    disc: OutcomeDiscriminator,
    ro: Rollout,
    seg: Segments,
    active: int,
    t_max: int,
    cut_reward: float,
    floor: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(T, N) intrinsic rewards and terminal flags: log q(k | outcome) - log p(k) (at least
    ``floor`` if given) on a terminated segment's last step, ``cut_reward`` on a ``t_max`` cut
    (both terminal)."""
    rewards = torch.zeros(ro.rewards.shape)
    cut = tmax_cuts(ro, t_max)
    rewards[cut] = cut_reward
    terminal = cut.clone()
    if seg.env.numel():
        r = intrinsic_reward(disc, seg.feats, seg.skill, active)
        rewards[seg.end, seg.env] = r if floor is None else r.clamp(min=floor)
        terminal[seg.end, seg.env] = True
    return rewards, terminal


def relabelled_steps(ro: Rollout, seg: Segments, target: torch.Tensor) -> torch.Tensor:
    """(T, N) long: for each step of a terminated segment (the part inside this rollout), the
    skill ``target`` it is relabelled to; -1 elsewhere."""
    T, N = ro.actions.shape[:2]
    sid = ro.extras["seg_start"].long().cumsum(0)  # segment id per env, constant in a segment
    table = torch.full((N, T + 2), -1, dtype=torch.long)
    table[seg.env, sid[seg.end, seg.env]] = target
    out = table[torch.arange(N)[None, :].expand(T, N), sid]
    # steps after a terminated segment's end share its id only until the next start: none
    return out


def bc_loss(
    lib: OptionLibrary,
    ro: Rollout,
    target: torch.Tensor,
    idx: torch.Tensor,
    weight: torch.Tensor | None = None,
    total: float | None = None,
) -> torch.Tensor:
    """Negative log-likelihood, under the relabelled skills, of the actions and termination
    decisions at flat step indices ``idx`` (``target`` flat (T*N,) relabelled skills;
    ``weight`` flat (T*N,) per-step weights, default equal). ``total``: divide the (weighted)
    sum by this instead of by ``idx``'s own count or weight (``idx`` is one DDP rank's part
    of a minibatch and ``total`` the whole minibatch's)."""
    on, fired = decision_targets(ro)
    obs = ro.obs.reshape(-1, ro.obs.shape[-1])[idx]
    nxt = ro.next_obs.reshape(-1, ro.obs.shape[-1])[idx]
    k = target[idx]
    lp = lib.dist(obs, k).log_prob(ro.actions.reshape(-1)[idx])
    lp = lp + decision_log_probs(lib, obs, nxt, k, on.reshape(-1)[idx], fired.reshape(-1)[idx])
    if weight is None:
        return -lp.mean() if total is None else -lp.sum() / total
    w = weight[idx]
    return -(w * lp).sum() / (w.sum().clamp(min=1e-8) if total is None else total)


def balance_weights(feats: torch.Tensor) -> torch.Tensor:
    """(M,) weight 1 / (how many segments of the batch ended on the same events): each kind of
    outcome weighs the same in the imitation, so a rare one (open a box, the door) is learned
    as fast as facing a ball, which chance produces a hundred times more often."""
    _, inv, counts = torch.unique(feats[:, :NUM_PRIMITIVES], dim=0, return_inverse=True,
                                  return_counts=True)  # fmt: skip
    return 1.0 / counts[inv].float()


@dataclass
class DiscoveryConfig:
    """Outcome-based discovery settings (see the module docstring)."""

    num_skills: int = 19
    """K (>= 19 covers CompoGrid's outcomes; see the module docstring)"""
    total_env_steps: int = 8_000_000
    """budget (env steps; counts against the method's total)"""
    t_max: int = 32
    """longest a skill runs"""
    num_envs: int = 128
    num_steps: int = 64
    """vector steps per rollout"""
    size: int = 8
    max_steps: int = 64
    """episode length: short episodes keep fresh rooms (closed boxes and door) frequent"""
    hidden: int = 128
    cut_reward: float = -1.0
    """reward of a segment cut by t_max (no outcome); a shared outcome earns about 0"""
    reward_floor: float | None = None
    """lower bound of the intrinsic reward (None: none). log q of an outcome the
    discriminator confidently gives to another skill is about -20, which punishes a skill for
    trying an outcome a duplicate already owns more than it pays to find a free one"""
    bc_coef: float = 1.0
    """weight of the relabelled behaviour cloning (0: off)"""
    bc_epochs: int = 5
    """passes of the imitation over each rollout's relabelled segments, in minibatches of
    PPO's size (600k env steps, seeds 0-2: 1 pass 8 / 8 / 5 primitives at >= 0.9, held-out
    accuracy 0.59 / 0.62 / 0.48; 5 passes, at ~25% more wall time, 14 / 12 / 14 and
    0.88 / 0.88 / 0.87; RESULTS.md "Skill discovery")"""
    ppo_epochs: int | None = 8
    """the skills' PPO epochs per rollout (None: ``ppo.update_epochs``); its own setting
    because ``ppo`` is also the supervised library's and the fine-tuning's PPO in the
    compositional agent. 8 rather than PPO's usual 4 makes the skills robust from fresh start
    states (600k env steps, seeds 0-2, with 5 imitation passes: a skill at >= 0.9 from fresh
    states on 13 / 13 / 13 primitives, against 12 / 10 / 8 with 4 epochs; RESULTS.md "Skill
    discovery"). Meta-World's motion discovery (``primitives.outcome_motion``) uses
    ``ppo.update_epochs``"""
    bc_balance: bool = True
    """weigh imitated segments by 1 / frequency of their terminating events"""
    relabel: str = "assign"
    """``assign`` (one skill per outcome kind, ``relabel_assigned``) or ``argmax`` (the skill
    of highest q)"""
    relabel_min_q: float = 0.0
    """relabel only outcomes whose best skill has at least this probability"""
    draw: str = "uniform"
    """how chains choose the next skill: 'uniform' over the active skills, or 'value' (among
    the skills whose critic expects better than chance from the current state, with
    ``draw_explore`` of the draws uniform; ``outcome_training.value_draw``)"""
    draw_explore: float = 0.25
    """share of uniform draws when ``draw='value'``"""
    disc_lr: float = 1e-3
    disc_steps: int = 8
    """discriminator minibatch steps per rollout"""
    disc_batch: int = 512
    disc_buffer: int = 20_000
    """recent outcomes kept for the discriminator"""
    disc_balance: bool = False
    """draw the discriminator's minibatches class-balanced (each replayed outcome with
    probability 1 / the count of its skill in the replay), so q(k | outcome) is the posterior
    under the uniform p(k) the intrinsic reward assumes even when the skills are not run
    equally often (the compositional agent's phase 2 with ``library_finetune="discovery"``:
    the controller picks them); False: uniform over the replay (chains draw skills uniformly,
    so the classes are balanced already)"""
    start_skills: int | None = None
    """VALOR growth: skills active at the start (None: all K, no growth)"""
    grow_at: float = 0.9
    """grow when the on-policy discriminator accuracy reaches this"""
    seed: int = 0
    ppo: PPOConfig | dict = field(default_factory=lambda: PPOConfig(lr=1e-3, gamma=0.95))

    def __post_init__(self) -> None:
        for k in ("num_skills", "total_env_steps", "t_max", "num_envs", "num_steps", "hidden",
                  "max_steps"):  # fmt: skip
            check_positive_int(k, getattr(self, k))
        for k in ("disc_steps", "disc_batch", "disc_buffer", "bc_epochs"):
            check_positive_int(k, getattr(self, k))
        if self.ppo_epochs is not None:
            check_positive_int("ppo_epochs", self.ppo_epochs)
        if self.start_skills is not None and not 1 <= self.start_skills <= self.num_skills:
            raise ValueError(
                f"start_skills={self.start_skills!r}; allowed: None or 1..{self.num_skills}"
            )
        if self.draw not in ("uniform", "value"):
            raise ValueError(f"draw={self.draw!r}; allowed: uniform, value")
        if not 0.0 <= float(self.draw_explore) <= 1.0:
            raise ValueError(f"draw_explore={self.draw_explore!r}; allowed: a number in [0, 1]")
        if self.relabel not in ("argmax", "assign"):
            raise ValueError(f"relabel={self.relabel!r}; allowed: argmax, assign")
        if not isinstance(self.disc_balance, bool):
            raise ValueError(f"disc_balance={self.disc_balance!r}; allowed: true, false")
        if self.bc_coef < 0:
            raise ValueError(f"bc_coef={self.bc_coef}; allowed: a number >= 0")
        self.ppo = ppo_section(self)
