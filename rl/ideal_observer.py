"""The ideal observer: the reward-mode reference row (the ceiling of adaptation on CompoGrid).

Scripted skills plus exact Bayesian elimination of composition hypotheses:

* **Hypotheses**: every feasible CompoGrid composition of the split's lengths
  (``envs.grid.all_compositions``; 2,950 for lengths 2 and 3; 38,108 for split kind
  ``length``, whose lengths are 2, 3 and the held-out 4).
* **Prior** (``prior="frequency"``, the default): the train split's primitive-position
  frequencies with add-``smoothing`` (alpha) counts. With ``n_L`` train compositions of length
  ``L`` (only the hypotheses' lengths count) and ``n_{L,i}(p)`` of them having primitive ``p``
  at position ``i``::

      P(L)        = (n_L + alpha) / sum_L' (n_L' + alpha)
      P(p | L, i) = (n_{L,i}(p) + alpha) / (n_L + alpha * 19)
      prior(c)    proportional to P(len c) * prod_i P(c_i | len c, i), normalised over the
                  hypotheses.

  A hypothesis length no train composition has (split kind ``length``: its held-out 4; train
  has 2 and 3) gets its mass from the smoothing alone, ``P(L) = alpha / sum_L' (n_L' +
  alpha)`` (about 1/103 for 100 train compositions and alpha = 1), and since train says
  nothing about *position* i of that length, ``P(p | L, i)`` is the train's primitive
  frequency pooled over every position and length, ``(n(p) + alpha) / (N + alpha * 19)``
  with ``n(p)`` occurrences of ``p`` among ``N`` train sub-tasks. The small length mass
  costs little: the first reward, ``1/L``, tells the length, and every hypothesis of
  another length is eliminated then.

  ``prior="uniform"`` gives every hypothesis the same mass.
* **Likelihood**: 1 if a hypothesis predicts exactly the observed reward at every step of the
  trial so far, else 0; so the posterior is the prior restricted to the surviving hypotheses.
  After each env step the observer computes which of the 19 primitives the step completed,
  with the env's own completion test (``CompoGridEnv._completed`` on the before/after states),
  then advances every hypothesis's progress up to ``MAX_LEN`` (4) times, exactly as
  ``CompoGridEnv.step`` does (several sub-tasks can complete in one step), and drops the
  hypotheses whose predicted reward ``k / L`` differs from the observed one. Progress resets at
  every episode start; the surviving set persists over the trial's episodes and is reset
  between trials. Only reward is used: the time limit (which depends on the composition's
  length) is not read.
* **Acting**: the next sub-task of the most probable surviving hypothesis is executed by the
  BFS oracle (``Oracle().act_for(env, remaining)``). Ties go to the earlier hypothesis in
  ``all_compositions`` order, so the agent is deterministic. Hypotheses that cannot be
  completed in the current episode any more (they still need to face a box that was opened,
  i.e. removed, earlier in it) are passed over while another survivor can; the agent's own
  exploration can leave the room in a state the composition's first sub-tasks never create
  (e.g. a hypothesis now wants to go to the object being carried), so a short repair is put in
  front (drop it first; pick up an object before dropping it) and a sub-task that is already
  satisfied (pick up what is carried, open what is open) is completed by turning left.

It reads the unwrapped envs of a sync vector env (``needs_env_objects``) and is defined only
for CompoGrid with ``task_info="reward"``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import gymnasium as gym
import numpy as np
import torch

from envs.core import Composition, Primitive, Split
from envs.grid import (
    BOXES,
    DOOR,
    MAX_LEN,
    PRIMITIVE_INDEX,
    PRIMITIVES,
    CompoGridEnv,
    Oracle,
    all_compositions,
    validate_composition,
)
from rl.collect import Episode, Prev, StepOutput

PRIORS = ("frequency", "uniform")
#: turning left changes no object state: it completes an already-satisfied sub-task safely
IDLE = 0
#: tolerance when comparing rewards (the collector stores float32; rewards differ by >= 1/6)
REWARD_TOL = 1e-4


# --- hypotheses and prior -----------------------------------------------------------------------


def frequency_prior(
    train: Sequence[Composition], hypotheses: Sequence[Composition], smoothing: float = 1.0
) -> np.ndarray:
    """Prior over ``hypotheses`` from the primitive-position frequencies of ``train`` (see the
    module docstring for the formula); sums to 1."""
    if not smoothing > 0:
        raise ValueError(f"smoothing={smoothing!r}; allowed: a number > 0")
    lengths = sorted({len(c) for c in hypotheses})
    n_prims = len(PRIMITIVES)
    n_len = {L: 0 for L in lengths}
    counts = {L: np.zeros((L, n_prims)) for L in lengths}
    pooled = np.zeros(n_prims)  # every train sub-task, any position and length
    for c in train:
        for p in c:
            pooled[PRIMITIVE_INDEX[p]] += 1
        if len(c) not in n_len:
            continue  # a train length the hypotheses do not have says nothing about them
        n_len[len(c)] += 1
        for i, p in enumerate(c):
            counts[len(c)][i, PRIMITIVE_INDEX[p]] += 1
    total = sum(n + smoothing for n in n_len.values())
    p_len = {L: (n_len[L] + smoothing) / total for L in lengths}
    p_at = {L: (counts[L] + smoothing) / (n_len[L] + smoothing * n_prims) for L in lengths}
    for L in lengths:
        if n_len[L] == 0:  # a length train lacks (split kind 'length'): pooled frequencies
            freq = (pooled + smoothing) / (pooled.sum() + smoothing * n_prims)
            p_at[L] = np.tile(freq, (L, 1))
    w = np.array(
        [
            p_len[len(c)] * np.prod([p_at[len(c)][i, PRIMITIVE_INDEX[p]] for i, p in enumerate(c)])
            for c in hypotheses
        ]
    )
    return w / w.sum()


class Hypotheses:
    """The hypothesis set as arrays: primitive indices per position, lengths, prior, rank.

    Args:
        compositions: the hypotheses (feasible CompoGrid compositions).
        prior: their prior probabilities (normalised here).
    """

    def __init__(self, compositions: Sequence[Composition], prior: np.ndarray) -> None:
        if not compositions:
            raise ValueError("ideal observer with no hypotheses; give at least one composition")
        prior = np.asarray(prior, dtype=float)
        if prior.shape != (len(compositions),) or (prior < 0).any() or not prior.sum() > 0:
            raise ValueError(
                f"prior of shape {prior.shape} for {len(compositions)} hypotheses; "
                "allowed: one non-negative weight per hypothesis, not all zero"
            )
        self.compositions = list(compositions)
        self.index = {c: h for h, c in enumerate(self.compositions)}
        self.table = np.full((len(compositions), MAX_LEN), -1, dtype=np.int64)
        for h, c in enumerate(compositions):
            self.table[h, : len(c)] = [PRIMITIVE_INDEX[p] for p in c]
        self.length = np.array([len(c) for c in compositions], dtype=np.int64)
        self.prior = prior / prior.sum()
        # most probable first; a stable sort breaks ties by hypothesis order (deterministic)
        self.order = np.argsort(-self.prior, kind="stable")
        #: each hypothesis's place in ``order`` (0: the most probable)
        self.rank = np.empty(len(self.order), dtype=np.int64)
        self.rank[self.order] = np.arange(len(self.order))

    def __len__(self) -> int:
        return len(self.compositions)


def advance(
    table: np.ndarray, length: np.ndarray, progress: np.ndarray, completed: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Every hypothesis's progress after one env step, as ``CompoGridEnv.step`` computes it.

    Args:
        table: (H, MAX_LEN) primitive indices (-1 beyond a hypothesis's length).
        length: (H,) lengths.
        progress: (H,) completed sub-tasks before the step.
        completed: (19,) bool, which primitives' completion tests hold after the step.

    Returns:
        ``(progress, n)``: progress after the step and the number of sub-tasks it completed
        (the env pays ``n / L``).
    """
    rows = np.arange(table.shape[0])
    prog = progress.copy()
    n = np.zeros_like(prog)
    # the env re-checks the next sub-task while it keeps completing: at most MAX_LEN times
    for _ in range(table.shape[1]):
        nxt = table[rows, np.minimum(prog, table.shape[1] - 1)]
        done = (prog < length) & completed[nxt]
        prog += done
        n += done
    return prog, n


def before_state(env: CompoGridEnv) -> dict:
    """What ``CompoGridEnv.step`` records before acting (its completion tests read it)."""
    return {"carrying": env.carried_name(), "door_open": bool(env.objects[DOOR].is_open)}


def completed_primitives(env: CompoGridEnv, before: dict) -> np.ndarray:
    """(19,) bool: the primitives whose completion test holds after a step from ``before``.

    Uses the env's own (private) test so the observer cannot drift from the env's rules.
    """
    return np.fromiter(
        (env._completed(p, before) for p in PRIMITIVES), dtype=bool, count=len(PRIMITIVES)
    )


class Belief:
    """One trial's surviving hypotheses and each one's progress in the current episode."""

    def __init__(self, hyp: Hypotheses) -> None:
        self.hyp = hyp
        self.alive = np.ones(len(hyp), dtype=bool)
        self.progress = np.zeros(len(hyp), dtype=np.int64)

    def reset(self) -> None:
        """A new trial: every hypothesis is possible again."""
        self.alive[:] = True
        self.progress[:] = 0

    def new_episode(self) -> None:
        self.progress[:] = 0

    def observe(self, completed: np.ndarray, reward: float) -> None:
        """Advance every surviving hypothesis by one step and drop those predicting another
        reward (only survivors are computed: eliminated ones never come back, and with the
        38,108 hypotheses of split kind ``length`` the full arrays cost ms per step)."""
        live = np.flatnonzero(self.alive)
        length = self.hyp.length[live]
        prog, n = advance(self.hyp.table[live], length, self.progress[live], completed)
        self.progress[live] = prog
        self.alive[live] = np.abs(n / length - reward) < REWARD_TOL
        if not self.alive.any():
            raise RuntimeError(
                "ideal observer: every hypothesis was eliminated (the task's composition is "
                "not among the hypotheses: check the split's lengths)"
            )

    def survivors(self) -> list[Composition]:
        return [self.hyp.compositions[h] for h in np.flatnonzero(self.alive)]

    def choose(self, env: CompoGridEnv) -> int | None:
        """Index of the hypothesis to execute: the most probable survivor that can still be
        completed in this episode, else the most probable one whose next sub-task can be
        worked on; None if there is none."""
        # only the survivors still unfinished in this episode are candidates
        live = np.flatnonzero(self.alive & (self.progress < self.hyp.length))
        table, length, progress = self.hyp.table[live], self.hyp.length[live], self.progress[live]
        # goto(box) is impossible once the box was opened (removed) in this episode
        blocked = np.zeros(len(PRIMITIVES) + 1, dtype=bool)  # last entry: the -1 padding
        for b in BOXES:
            if env.entity_cell(b) is None:
                blocked[PRIMITIVE_INDEX[Primitive("goto", b)]] = True
        pos = np.arange(table.shape[1])
        ahead = (pos >= progress[:, None]) & (pos < length[:, None])
        completable = ~(blocked[table] & ahead).any(axis=1)
        nxt = table[np.arange(len(table)), np.minimum(progress, table.shape[1] - 1)]
        workable = ~blocked[nxt]
        for mask in (completable, workable):
            if mask.any():  # the most probable: the lowest rank (ties: hypothesis order)
                cands = live[mask]
                return int(cands[np.argmin(self.hyp.rank[cands])])
        return None


def act_towards(oracle: Oracle, env: CompoGridEnv, rest: Sequence[Primitive]) -> int:
    """The oracle's action towards ``rest`` from any state the agent's exploration left.

    The oracle plans from states a feasible composition creates; a hypothesis tried after
    others can start elsewhere, so repair first (see the module docstring).
    """
    p = rest[0]
    carried = env.carried_name()
    if p.verb == "pickup" and carried == p.obj:
        return IDLE
    if p.verb == "open" and (
        env.entity_cell(p.obj) is None if p.obj in BOXES else env.objects[DOOR].is_open
    ):
        return IDLE
    if p.verb == "goto" and carried == p.obj:
        rest = [Primitive("drop", p.obj), *rest]
    elif p.verb == "drop" and carried != p.obj:
        rest = [Primitive("pickup", p.obj), *rest]
    return oracle.act_for(env, rest)


# --- the agent ----------------------------------------------------------------------------------


class IdealObserverAgent:
    """Reference row for reward mode: scripted skills plus exact hypothesis elimination.

    Args:
        split: the CompoGrid split; its train compositions give the frequency prior and its
            ``meta["lengths"]`` (else the train lengths) the hypotheses' lengths.
        prior: ``"frequency"`` (train primitive-position frequencies) or ``"uniform"``.
        smoothing: alpha of the add-alpha counts of the frequency prior.
        hypotheses: override the hypothesis set (default: every feasible composition of the
            split's lengths); each must be a feasible CompoGrid composition.
    """

    #: the protocol must give a sync vector env whose ``envs.envs[i].unwrapped`` it can read
    needs_env_objects = True

    def __init__(
        self,
        split: Split,
        prior: str = "frequency",
        smoothing: float = 1.0,
        hypotheses: Sequence[Composition | str] | None = None,
    ) -> None:
        if split.family != "grid" and not split.family.startswith("grid-layouts:"):
            raise ValueError(
                f"ideal_observer on family {split.family!r}; allowed: CompoGrid ('grid', "
                "'grid-layouts:...')"
            )
        if prior not in PRIORS:
            raise ValueError(f"prior={prior!r}; allowed: {', '.join(map(repr, PRIORS))}")
        if hypotheses is None:
            lengths = split.meta.get("lengths") or sorted({len(c) for c in split.train})
            comps = all_compositions(tuple(int(n) for n in lengths))
        else:
            comps = [validate_composition(c) for c in hypotheses]
        if prior == "frequency":
            weights = frequency_prior(split.train, comps, smoothing)
        else:
            weights = np.ones(len(comps))
        self.hypotheses = Hypotheses(comps, weights)
        self.prior_name = prior

    def trial_policy(self, envs: gym.vector.VectorEnv) -> tuple[ObserverPolicy, Any]:
        policy = ObserverPolicy(self.hypotheses, _compogrid_envs(envs))
        return policy, policy.on_episode_end


def _compogrid_envs(envs: gym.vector.VectorEnv) -> list[CompoGridEnv]:
    inner = getattr(envs, "envs", None)
    if inner is None:
        raise ValueError(
            f"ideal_observer needs a sync vector env (it reads envs.envs); got {type(envs).__name__}"
        )
    out = [e.unwrapped for e in inner]
    for e in out:
        if not isinstance(e, CompoGridEnv):
            raise ValueError(f"ideal_observer on env {type(e).__name__}; allowed: CompoGrid-v0")
        if e.task_info != "reward":
            raise ValueError(
                f"ideal_observer with task_info={e.task_info!r}; allowed: 'reward' (it infers "
                "the composition; with the instruction the oracle row is the ceiling)"
            )
    return out


class ObserverPolicy:
    """The collector-facing policy: one ``Belief`` per env, updated after every env step.

    The evidence of a step is read at the next ``step`` call (the env then still shows the
    state the step reached) or, when the step ended the episode, in ``on_episode_end``, which
    the collector calls before it resets the env.
    """

    def __init__(self, hyp: Hypotheses, envs: list[CompoGridEnv]) -> None:
        self.envs = envs
        self.beliefs = [Belief(hyp) for _ in envs]
        self.oracle = Oracle()
        #: per env: the state before the last action whose outcome is not yet observed
        self.pending: list[dict | None] = [None] * len(envs)

    # -- RolloutPolicy protocol (the belief lives here, not in the collector's memory) --------
    def initial_memory(self, n: int) -> None:
        return None

    def reset_memory(self, memory: Any, mask: torch.Tensor) -> None:
        for i in np.flatnonzero(mask.numpy()):
            self.beliefs[i].reset()
            self.pending[i] = None
        return None

    def bootstrap_value(self, obs: torch.Tensor, memory: Any, prev: Prev) -> torch.Tensor:
        return torch.zeros(obs.shape[0])

    def step(self, obs: torch.Tensor, memory: Any, prev: Prev) -> StepOutput:
        actions = []
        for i, env in enumerate(self.envs):
            belief = self.beliefs[i]
            before = self.pending[i]
            if before is not None:
                if env.step_count == 0:
                    # the episode ended without ``on_episode_end`` (the collector skips it on
                    # throw-away trials): that step's outcome is lost, so it is not used
                    belief.new_episode()
                else:
                    belief.observe(completed_primitives(env, before), float(prev.reward[i]))
            self.pending[i] = before_state(env)
            actions.append(self.act(env, belief))
        n = obs.shape[0]
        return StepOutput(torch.tensor(actions), torch.zeros(n), torch.zeros(n))

    def on_episode_end(self, i: int, episode: Episode) -> None:
        before = self.pending[i]
        if before is not None:
            reward = float(episode.rewards[-1])
            self.beliefs[i].observe(completed_primitives(self.envs[i], before), reward)
        self.pending[i] = None
        self.beliefs[i].new_episode()

    def act(self, env: CompoGridEnv, belief: Belief) -> int:
        """The action for one env given its belief (no update: ``step`` observes first)."""
        h = belief.choose(env)
        if h is None:
            return IDLE  # every survivor is blocked in this episode: nothing useful to do
        rest = belief.hyp.compositions[h][int(belief.progress[h]) :]
        return act_towards(self.oracle, env, rest)
