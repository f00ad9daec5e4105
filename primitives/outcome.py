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

Examples:
    >>> cfg = DiscoveryConfig(total_env_steps=2048, num_envs=8, num_steps=64, num_skills=4)
    >>> lib, disc, history = discover(cfg, log=None)
    >>> lib.num_skills, lib.termination
    (4, 'learned')
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from envs.grid_events import NUM_PRIMITIVES, PRIM_VERB, events, object_state
from primitives.option_training import (
    ChainPolicy,
    decision_log_probs,
    decision_targets,
    update_skills,
)
from primitives.options import OptionLibrary, check_positive_int
from rl.collect import Collector, Rollout, make_vector_env, uniform_task_sampler
from rl.io import atomic_torch_save
from rl.nets import mlp
from rl.ppo import PPOConfig

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
    """q(k | outcome): an MLP over ``outcome_features``; logits of skills >= ``active`` are
    masked (VALOR growth)."""

    def __init__(self, num_skills: int, hidden: int = 128) -> None:
        super().__init__()
        self.num_skills = check_positive_int("num_skills", num_skills)
        self.net = mlp([OUTCOME_DIM, hidden, hidden, self.num_skills])

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
) -> torch.Tensor:
    """Negative log-likelihood, under the relabelled skills, of the actions and termination
    decisions at flat step indices ``idx`` (``target`` flat (T*N,) relabelled skills;
    ``weight`` flat (T*N,) per-step weights, default equal)."""
    on, fired = decision_targets(ro)
    obs = ro.obs.reshape(-1, ro.obs.shape[-1])[idx]
    nxt = ro.next_obs.reshape(-1, ro.obs.shape[-1])[idx]
    k = target[idx]
    lp = lib.dist(obs, k).log_prob(ro.actions.reshape(-1)[idx])
    lp = lp + decision_log_probs(lib, obs, nxt, k, on.reshape(-1)[idx], fired.reshape(-1)[idx])
    if weight is None:
        return -lp.mean()
    w = weight[idx]
    return -(w * lp).sum() / w.sum().clamp(min=1e-8)


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
    bc_balance: bool = True
    """weigh imitated segments by 1 / frequency of their terminating events"""
    relabel: str = "assign"
    """``assign`` (one skill per outcome kind, ``relabel_assigned``) or ``argmax`` (the skill
    of highest q)"""
    relabel_min_q: float = 0.0
    """relabel only outcomes whose best skill has at least this probability"""
    disc_lr: float = 1e-3
    disc_steps: int = 8
    """discriminator minibatch steps per rollout"""
    disc_batch: int = 512
    disc_buffer: int = 20_000
    """recent outcomes kept for the discriminator"""
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
        for k in ("disc_steps", "disc_batch", "disc_buffer"):
            check_positive_int(k, getattr(self, k))
        if self.start_skills is not None and not 1 <= self.start_skills <= self.num_skills:
            raise ValueError(
                f"start_skills={self.start_skills!r}; allowed: None or 1..{self.num_skills}"
            )
        if self.relabel not in ("argmax", "assign"):
            raise ValueError(f"relabel={self.relabel!r}; allowed: argmax, assign")
        if self.bc_coef < 0:
            raise ValueError(f"bc_coef={self.bc_coef}; allowed: a number >= 0")
        if isinstance(self.ppo, dict):
            self.ppo = PPOConfig(**self.ppo)


class OutcomeReplay:
    """The most recent (outcome, skill) pairs, a ring of fixed capacity."""

    def __init__(self, capacity: int) -> None:
        self.feats = torch.zeros(capacity, OUTCOME_DIM)
        self.skill = torch.zeros(capacity, dtype=torch.long)
        self.n, self.at, self.cap = 0, 0, capacity

    def add(self, feats: torch.Tensor, skill: torch.Tensor) -> None:
        for f, k in zip(feats.split(self.cap), skill.split(self.cap)):
            idx = (self.at + torch.arange(f.shape[0])) % self.cap
            self.feats[idx], self.skill[idx] = f, k
            self.at = int((self.at + f.shape[0]) % self.cap)
            self.n = min(self.cap, self.n + f.shape[0])

    def sample(self, batch: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randint(self.n, (batch,), generator=gen)
        return self.feats[idx], self.skill[idx]


def uniform_draw(active: list[int], generator: torch.Generator):
    """Chain draw: a skill uniformly among the ``active[0]`` active ones (a list so growth can
    change it in place)."""

    def draw(obs: torch.Tensor, _rows: torch.Tensor) -> torch.Tensor:
        return torch.randint(active[0], (obs.shape[0],), generator=generator)

    return draw


def make_room(num_envs: int, size: int = 8, max_steps: int | None = None):
    """The vector env discovery runs on, and a task sampler that gives it the room."""
    kw = {"size": size, "composition": ROOM, "max_steps": max_steps}
    venv = make_vector_env("CompoGrid-v0", num_envs, kw)
    return venv, uniform_task_sampler([ROOM], False)


class Discovery:
    """The discovery loop's state: library, discriminator, optimisers, collector."""

    def __init__(
        self,
        cfg: DiscoveryConfig,
        library: OptionLibrary | None = None,
        discriminator: OutcomeDiscriminator | None = None,
    ) -> None:
        """``library`` / ``discriminator``: train these (the compositional agent's phase 1)
        instead of new ones; they must have ``cfg.num_skills`` skills."""
        self.cfg = cfg
        torch.manual_seed(cfg.seed)
        self.venv, sampler = make_room(cfg.num_envs, cfg.size, cfg.max_steps)
        obs_dim = self.venv.single_observation_space.shape[0]
        n_act = int(self.venv.single_action_space.n)
        if library is None:
            library = OptionLibrary(obs_dim, n_act, cfg.num_skills, cfg.hidden, "learned")
        self.lib = library
        self.disc = (
            discriminator
            if discriminator is not None
            else OutcomeDiscriminator(cfg.num_skills, cfg.hidden)
        )
        if self.lib.num_skills != cfg.num_skills or self.lib.termination != "learned":
            raise ValueError(
                f"library with K={self.lib.num_skills}, termination={self.lib.termination!r};"
                f" allowed: K={cfg.num_skills}, 'learned'"
            )
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.active = [cfg.start_skills or cfg.num_skills]
        self.policy = ChainPolicy(
            self.lib, cfg.t_max, uniform_draw(self.active, self.gen), self.gen
        )
        self.collector = Collector(self.venv, self.policy, task_sampler=sampler, seed=cfg.seed)
        self.opt = torch.optim.Adam(self.lib.parameters(), lr=cfg.ppo.lr, eps=1e-5)
        self.disc_opt = torch.optim.Adam(self.disc.parameters(), lr=cfg.disc_lr)
        self.replay = OutcomeReplay(cfg.disc_buffer)
        self.iteration = 0

    def step(self) -> dict[str, float]:
        """One rollout: rewards from the current discriminator, PPO, relabelled imitation,
        then the discriminator's update (so the logged accuracy is on unseen outcomes)."""
        cfg, K = self.cfg, self.active[0]
        ro = self.collector.collect(cfg.num_steps)
        seg = terminated_segments(ro)
        rewards, terminal = discovery_rewards(
            self.disc, ro, seg, K, cfg.t_max, cfg.cut_reward, cfg.reward_floor
        )
        self.last = (ro, terminal)  # the segments, for a caller that counts them (skill graph)
        stats = {"env_steps": self.collector.env_steps, "active_skills": K}
        ppo = update_skills(self.lib, ro, rewards, terminal, self.opt, cfg.ppo)
        stats.update({f"ppo/{k}": v for k, v in ppo.items()})
        n_seg = int(seg.env.numel())
        stats["segments_terminated"] = n_seg
        stats["segments_cut"] = int(tmax_cuts(ro, cfg.t_max).sum())
        if n_seg:
            with torch.no_grad():
                pred = self.disc(seg.feats, K).argmax(-1)
            stats["disc_acc_unseen"] = float((pred == seg.skill).float().mean())
            stats["intrinsic_reward"] = float(rewards[seg.end, seg.env].mean())
            if cfg.bc_coef > 0:
                stats.update(self._imitate(ro, seg, K))
            self.replay.add(seg.feats, seg.skill)
        stats["disc_loss"] = self._train_discriminator(K)
        if cfg.start_skills and stats.get("disc_acc_unseen", 0.0) >= cfg.grow_at:
            self.active[0] = min(cfg.num_skills, int(1.5 * K) + 1)
        self.iteration += 1
        return stats

    def _imitate(self, ro: Rollout, seg: Segments, K: int) -> dict[str, float]:
        how = relabel if self.cfg.relabel == "argmax" else relabel_assigned
        k_star, q_star = how(self.disc, seg.feats, K)
        keep = q_star >= self.cfg.relabel_min_q
        kept = Segments(seg.env[keep], seg.end[keep], seg.skill[keep], seg.feats[keep])
        target = relabelled_steps(ro, kept, k_star[keep]).reshape(-1)
        weight = None
        if self.cfg.bc_balance:
            weight = relabelled_steps(ro, kept, torch.arange(int(keep.sum()))).reshape(-1)
            weight = torch.where(weight >= 0, balance_weights(kept.feats)[weight.clamp(min=0)], 0.0)
        idx = (target >= 0).nonzero().squeeze(-1)
        if idx.numel() == 0:
            return {"relabelled_steps": 0}
        perm = idx[torch.randperm(idx.numel(), generator=self.gen)]
        losses = []
        for mb in perm.chunk(self.cfg.ppo.num_minibatches):
            loss = self.cfg.bc_coef * bc_loss(self.lib, ro, target, mb, weight)
            self.opt.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(self.lib.parameters(), self.cfg.ppo.max_grad_norm)
            self.opt.step()
            losses.append(float(loss.detach()))
        return {
            "relabelled_steps": int(idx.numel()),
            "relabel_changed": float((k_star[keep] != seg.skill[keep]).float().mean()),
            "bc_loss": float(np.mean(losses)),
        }

    def _train_discriminator(self, K: int) -> float:
        if self.replay.n == 0:
            return float("nan")
        losses = []
        for _ in range(self.cfg.disc_steps):
            x, k = self.replay.sample(self.cfg.disc_batch, self.gen)
            loss = F.cross_entropy(self.disc(x, K), k)
            self.disc_opt.zero_grad()
            loss.backward()
            self.disc_opt.step()
            losses.append(float(loss.detach()))
        return float(np.mean(losses))

    def training_state(self) -> dict:
        """Everything beyond library and discriminator weights that training continues from
        (optimisers, the outcome replay, the generator, growth, counters): plain data."""
        r = self.replay
        return {
            "opt": self.opt.state_dict(),
            "disc_opt": self.disc_opt.state_dict(),
            "replay": {"feats": r.feats[: r.n].clone(), "skill": r.skill[: r.n].clone(),
                       "at": r.at},
            "gen": self.gen.get_state(),
            "active": self.active[0],
            "iteration": self.iteration,
        }  # fmt: skip

    def load_training_state(self, st: dict) -> None:
        self.opt.load_state_dict(st["opt"])
        self.disc_opt.load_state_dict(st["disc_opt"])
        n = int(st["replay"]["feats"].shape[0])
        self.replay.feats[:n] = st["replay"]["feats"]
        self.replay.skill[:n] = st["replay"]["skill"]
        self.replay.n, self.replay.at = n, int(st["replay"]["at"])
        self.gen.set_state(st["gen"])
        self.active[0] = int(st["active"])
        self.iteration = int(st["iteration"])

    def state_dict(self) -> dict:
        """Plain tensors and numbers (loads with ``weights_only=True``)."""
        cfg = asdict(self.cfg)
        cfg["ppo"] = asdict(self.cfg.ppo)
        return {
            "library": self.lib.state_dict(),
            "discriminator": self.disc.state_dict(),
            "active_skills": self.active[0],
            "iteration": self.iteration,
            "env_steps": self.collector.env_steps,
            "config": cfg,
            "obs_dim": self.lib.obs_dim,
            "n_actions": self.lib.n_actions,
        }


def discover(
    cfg: DiscoveryConfig,
    log: Callable[[dict], None] | None = print,
    checkpoint: str | Path | None = None,
    checkpoint_every: int = 50,
) -> tuple[OptionLibrary, OutcomeDiscriminator, list[dict]]:
    """Run discovery for ``cfg.total_env_steps``; returns (library, discriminator, history).

    ``checkpoint``: path of the plain state dict written every ``checkpoint_every`` rollouts
    and at the end (``Discovery.state_dict``)."""
    run = Discovery(cfg)
    history: list[dict] = []
    t0 = time.perf_counter()
    while run.collector.env_steps < cfg.total_env_steps:
        stats = run.step()
        stats["wall_s"] = time.perf_counter() - t0
        history.append(stats)
        if log is not None:
            log(stats)
        if checkpoint is not None and run.iteration % checkpoint_every == 0:
            atomic_torch_save(run.state_dict(), checkpoint)
    if checkpoint is not None:
        atomic_torch_save(run.state_dict(), checkpoint)
    return run.lib, run.disc, history


def load_discovered(state: dict) -> tuple[OptionLibrary, OutcomeDiscriminator]:
    """Library and discriminator from ``Discovery.state_dict`` (as ``safe_torch_load`` gives
    it)."""
    cfg = state["config"]
    lib = OptionLibrary(
        state["obs_dim"], state["n_actions"], cfg["num_skills"], cfg["hidden"], "learned"
    )
    lib.load_state_dict(state["library"])
    disc = OutcomeDiscriminator(cfg["num_skills"], cfg["hidden"])
    disc.load_state_dict(state["discriminator"])
    return lib, disc
