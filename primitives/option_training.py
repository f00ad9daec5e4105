"""Phase 1 of the compositional agent: train an ``OptionLibrary`` on chains of skills.

Every env runs a chain of options: at an episode start, or when the active option terminates
(``OptionLibrary.beta``) or has run ``t_max`` steps, a new skill is drawn and runs alone. What a
skill is rewarded for depends on the library's objective:

- ``supervised``: skill k stands for primitive ``event_of[k]``; it is drawn only where its
  primitive is feasible (so ``drop(x)`` trains from states that carry x, which earlier skills
  of the chain produce) and earns 1 on the step that completes it.
- other objectives (skill discovery, ``primitives.outcome``) supply their own
  ``reward_fn(rollout) -> (rewards, terminal)`` over the same segments.

The skills are trained by PPO (``rl.ppo.ppo_update``) with the skill-conditioned critic;
a segment that ends by termination is terminal, one cut by ``t_max`` or the env's episode end
bootstraps from V(s', k). Segments are also what the skill-transition graph learns from.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from envs.grid_events import completed, events, feasible, object_state
from primitives.options import OptionLibrary
from rl.collect import Prev, Rollout, StepOutput
from rl.gae import gae
from rl.ppo import PPOConfig, ppo_section, ppo_update


@dataclass
class OptionTrainingConfig:
    """Phase-1 settings (the skill library)."""

    t_max: int = 32
    """longest a skill runs before it is cut (steps)"""
    num_steps: int = 128
    """vector steps per rollout"""
    ppo: PPOConfig | dict | None = field(default_factory=lambda: PPOConfig(lr=1e-3, gamma=0.95))
    """PPO settings of the skills (default: PPOConfig with lr 1e-3, gamma 0.95, 4 minibatches;
    a dict overrides the settings it names over these)"""

    def __post_init__(self) -> None:
        for k in ("t_max", "num_steps"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{k}={v!r}; allowed: an integer >= 1")
        self.ppo = ppo_section(self)


class ChainPolicy:
    """Runs options in chains (``RolloutPolicy`` for the shared collector).

    Memory per env: (active skill, steps it has run, the observation before the last step, the
    object state at the active segment's start).

    ``extras`` per step t:

    - ``skill``: the skill that acts at t; ``seg_start``: it starts at t; ``seg_len``: steps the
      active segment has run, t included (a segment with ``seg_len == t_max`` is cut next).
    - ``term``: the segment active at t-1 ended at t by its termination (``beta`` fired).
    - ``beta_on``: the termination of the skill active at t-1 was *sampled* at t (a learned
      termination on an object-event step): the decision is part of that skill's policy and
      ``beta_logp`` is its log-probability (0 elsewhere; see ``decision_log_probs``).
    - ``start_state``: ``start_fn`` of the observation at the active segment's start (its
      outcome's "before"; default CompoGrid's ``object_state`` (22); Meta-World discovery:
      ``envs.metaworld.motion``).
    """

    def __init__(
        self,
        library: OptionLibrary,
        t_max: int,
        draw: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        generator: torch.Generator,
        start_fn: Callable[[torch.Tensor], torch.Tensor] = object_state,
    ) -> None:
        self.lib, self.t_max, self.draw, self.gen = library, t_max, draw, generator
        self.start_fn = start_fn

    def initial_memory(self, n: int):
        return (
            torch.full((n,), -1, dtype=torch.long),
            torch.zeros(n, dtype=torch.long),
            None,
            None,
        )

    def reset_memory(self, memory, mask):
        skill = memory[0].clone()
        skill[mask] = -1
        return (skill, *memory[1:])

    def step(self, obs: torch.Tensor, memory, prev: Prev) -> StepOutput:
        skill, steps, last, start = memory
        n = obs.shape[0]
        new = (skill < 0) | (prev.done > 0) | (steps >= self.t_max)
        term = torch.zeros(n, dtype=torch.bool)
        beta_on = torch.zeros(n, dtype=torch.bool)
        beta_logp = torch.zeros(n)
        if last is not None:
            cont = ~new
            if cont.any():
                ev = events(last[cont], obs[cont]) if self.lib.termination == "learned" else None
                b = self.lib.beta(last[cont], obs[cont], skill[cont], ev)
                u = torch.rand(int(cont.sum()), generator=self.gen)
                fire = u < b
                term[cont] = fire
                if self.lib.termination == "learned":
                    # only object-event steps sample a decision; elsewhere beta is exactly 0
                    on = ev.any(-1)
                    bc = b.clamp(1e-6, 1 - 1e-6)
                    lp = torch.where(fire, bc.log(), (1 - bc).log())
                    beta_on[cont] = on
                    beta_logp[cont] = torch.where(on, lp, torch.zeros_like(lp))
                new[cont] = fire
        skill = skill.clone()
        if new.any():
            skill[new] = self.draw(obs[new], new.nonzero().squeeze(-1))
        steps = torch.where(new, torch.zeros_like(steps), steps)
        state = self.start_fn(obs)
        start = state if start is None else torch.where(new[:, None], state, start)
        dist = self.lib.dist(obs, skill)
        action = dist.sample()
        extras = {
            "skill": skill,
            "seg_start": new,
            "seg_len": steps + 1,
            "term": term,
            "beta_on": beta_on,
            "beta_logp": beta_logp,
            "start_state": start,
        }
        return StepOutput(
            action,
            dist.log_prob(action),
            self.lib.value(obs, skill),
            (skill, steps + 1, obs, start),
            extras,
        )

    def bootstrap_value(self, obs, memory, prev) -> torch.Tensor:
        skill = memory[0].clamp(min=0)
        return self.lib.value(obs, skill)


def decision_targets(ro: Rollout) -> tuple[torch.Tensor, torch.Tensor]:
    """(T, N) ``on`` and ``fired``: the termination decision taken after step t (sampled at
    step t+1 from (obs[t], next_obs[t])) and whether it ended the segment. The decision after a
    rollout's last step is taken in the next rollout (with the updated library), so it is left
    out here and that segment bootstraps instead."""
    on = torch.zeros_like(ro.extras["beta_on"])
    fired = torch.zeros_like(on)
    on[:-1] = ro.extras["beta_on"][1:]
    fired[:-1] = ro.extras["term"][1:] & on[:-1]
    return on, fired


def decision_log_probs(
    lib: OptionLibrary,
    obs0: torch.Tensor,
    obs1: torch.Tensor,
    skill: torch.Tensor,
    on: torch.Tensor,
    fired: torch.Tensor,
) -> torch.Tensor:
    """log-probability of the termination decisions ``fired`` (0 where not ``on``)."""
    out = torch.zeros(on.shape[0])
    if on.any():  # beta needs a second encoder pass: only on the (few) decision steps
        d = lib.beta_dist(obs0[on], obs1[on], skill[on])
        out = out.index_put((on.nonzero().squeeze(-1),), d.log_prob(fired[on].float()))
    return out


def feasible_draw(lib: OptionLibrary, generator: torch.Generator):
    """Supervised chains: a skill whose primitive is feasible at ``obs``, uniformly."""

    def draw(obs: torch.Tensor, _rows: torch.Tensor) -> torch.Tensor:
        ok = feasible(obs)[:, lib.event_of].float()  # (b, K)
        ok = torch.where(ok.sum(-1, keepdim=True) > 0, ok, torch.ones_like(ok))
        return torch.multinomial(ok, 1, generator=generator).squeeze(-1)

    return draw


def supervised_rewards(lib: OptionLibrary, ro: Rollout) -> tuple[torch.Tensor, torch.Tensor]:
    """(T, N) reward (1 when the step completes the acting skill's primitive) and terminal flag
    (the skill's termination fired: completed, or its primitive became infeasible)."""
    skill = ro.extras["skill"]
    T, N = skill.shape
    o0 = ro.obs.reshape(T * N, -1)
    o1 = ro.next_obs.reshape(T * N, -1)
    prim = lib.event_of[skill.reshape(-1)]
    rows = torch.arange(T * N)
    done = completed(o0, o1)[rows, prim]
    infeasible = ~feasible(o1)[rows, prim]
    return done.float().reshape(T, N), (done | infeasible).reshape(T, N)


def segment_advantages(
    lib: OptionLibrary, ro: Rollout, rewards: torch.Tensor, terminal: torch.Tensor, cfg: PPOConfig
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GAE over segments: returns (advantages, returns, segment end mask)."""
    skill = ro.extras["skill"]
    T, N = skill.shape
    with torch.no_grad():
        v_next = lib.value(ro.next_obs.reshape(T * N, -1), skill.reshape(-1)).reshape(T, N)
    seg_end = torch.zeros_like(terminal)
    seg_end[:-1] = ro.extras["seg_start"][1:]
    seg_end |= ro.terminated | ro.truncated | terminal
    seg_end[-1] = True  # cut at the rollout's end (bootstrapped below)
    next_values = torch.where(terminal, torch.zeros_like(v_next), v_next)
    # inside a segment the next state's value is the stored value of the next step
    inside = ~seg_end
    nv = ro.values.clone()
    nv[:-1] = ro.values[1:]
    next_values = torch.where(inside, nv, next_values)
    adv, ret = gae(rewards, ro.values, next_values, seg_end.float(), cfg.gamma, cfg.gae_lambda)
    return adv, ret, seg_end


def update_skills(
    lib: OptionLibrary,
    ro: Rollout,
    rewards: torch.Tensor,
    terminal: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    cfg: PPOConfig,
    backward=None,
    kl_to: tuple[OptionLibrary, float] | None = None,
) -> dict[str, float]:
    """One PPO update of the skills on a chain rollout.

    ``kl_to = (frozen, coef)`` adds ``coef * KL(pi_k(.|s) || frozen_k(.|s))``, averaged over the
    minibatch's steps, to the loss (fine-tuning a library while keeping it close to the skills
    it started from; logged as ``loss_kl_frozen``).

    With a learned termination the action of step t is the pair (a_t, the termination decision
    taken on the object event it caused): both log-probabilities enter the ratio, so the
    termination is trained by the same policy gradient as the actions (its advantage is the
    step's, which includes the terminal reward the decision earned or the value it gave up).
    """
    adv, ret, _ = segment_advantages(lib, ro, rewards, terminal, cfg)
    b_obs = ro.obs.reshape(-1, ro.obs.shape[-1])
    b_act = ro.actions.flatten(0, 1) if lib.continuous else ro.actions.reshape(-1)
    b_skill = ro.extras["skill"].reshape(-1)
    learned = lib.termination == "learned" and "beta_on" in ro.extras
    if learned:
        on, fired = decision_targets(ro)
        b_on, b_fired = on.reshape(-1), fired.reshape(-1)
        b_next = ro.next_obs.reshape(-1, ro.obs.shape[-1])
        old_dec = torch.zeros_like(ro.logp)
        old_dec[:-1] = ro.extras["beta_logp"][1:]
        ro = dataclasses.replace(ro, logp=ro.logp + torch.where(on, old_dec, 0.0))

    def evaluate(mb):
        d = lib.dist(b_obs[mb], b_skill[mb])
        logp = d.log_prob(b_act[mb])
        if learned:
            logp = logp + decision_log_probs(
                lib, b_obs[mb], b_next[mb], b_skill[mb], b_on[mb], b_fired[mb]
            )
        out = (logp, d.entropy(), lib.value(b_obs[mb], b_skill[mb]))
        if kl_to is None:
            return out
        frozen, coef = kl_to
        if lib.continuous:  # Gaussian skills
            with torch.no_grad():
                ref_d = frozen.dist(b_obs[mb], b_skill[mb])
            kl = torch.distributions.kl_divergence(d, ref_d).mean()
            return (*out, {"loss_kl_frozen": coef * kl})
        with torch.no_grad():
            ref = torch.log_softmax(frozen.logits(b_obs[mb], b_skill[mb]), -1)
        kl = (d.probs * (d.logits - ref)).sum(-1).mean()  # Categorical's logits are normalised
        return (*out, {"loss_kl_frozen": coef * kl})

    return ppo_update(
        ro, evaluate, list(lib.parameters()), optimizer, cfg, advantages=adv, returns=ret,
        backward=backward,
    )  # fmt: skip
