"""The one rollout collector every method uses.

Rollouts run over gymnasium vector envs (sync or async) with autoreset disabled: the collector
resets an env itself when its episode ends, so it can (a) give the next episode the env's task
for the current *trial*, (b) start a new trial with a new task after ``episodes_per_trial``
episodes, resetting the policy's memory only then, and (c) keep ``terminated`` and
``truncated`` apart, bootstrapping a truncated episode from the value of its final observation.

Each episode is reset with an explicit seed drawn from the collector's own generator, and the
actions taken since the last reset are kept, so the complete collector state (envs included)
fits in a checkpoint as plain data and is rebuilt exactly by replaying those actions.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import gymnasium as gym
import numpy as np
import torch

from envs.core import Composition, Task
from rl.distributed import derived_seed
from rl.seeding import generator_state, set_generator_state

# --- env construction -----------------------------------------------------------------------------


class TrialEnv(gym.Wrapper):
    """Lets the collector set tasks and replay episodes through ``reset`` options.

    ``options={"tasks": {i: Task}}`` sets this env's task if its index ``i`` is present;
    ``options={"replay": {i: (Task, seed, actions)}}`` resets with that task and seed and
    replays the actions (used to restore a checkpointed collector exactly).
    """

    def __init__(self, env: gym.Env, index: int) -> None:
        super().__init__(env)
        self.index = index

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        options = dict(options or {})
        tasks = options.pop("tasks", None) or {}
        replay = options.pop("replay", None) or {}
        if self.index in replay:
            task, seed, actions = replay[self.index]
            obs, info = self.env.reset(seed=seed, options={"task": task})
            for a in actions:
                obs, _, _, _, info = self.env.step(a)
            return obs, info
        if self.index in tasks:
            options["task"] = tasks[self.index]
        return self.env.reset(seed=seed, options=options or None)


#: ``vectorization`` settings: ``auto`` is ``batched`` for CompoGrid and ``sync`` otherwise
VECTORIZATIONS = ("auto", "batched", "sync", "async")
#: env ids with an array-programmed batched implementation (``vector_entry_point``)
BATCHED_ENVS = ("CompoGrid-v0",)


def resolve_vectorization(env_id: str, vectorization: str) -> str:
    """``batched``, ``sync`` or ``async`` for ``env_id``; one clear error for a bad setting."""
    if vectorization not in VECTORIZATIONS:
        raise ValueError(f"vectorization={vectorization!r}; allowed: {', '.join(VECTORIZATIONS)}")
    if vectorization == "auto":
        return "batched" if env_id in BATCHED_ENVS else "sync"
    if vectorization == "batched" and env_id not in BATCHED_ENVS:
        raise ValueError(
            f"vectorization='batched' for env {env_id!r}; allowed only for {', '.join(BATCHED_ENVS)}"
            " (use 'sync' or 'async')"
        )
    return vectorization


def make_vector_env(
    env_id: str,
    num_envs: int,
    env_kwargs: dict | None = None,
    *,
    vectorization: str = "auto",
) -> gym.vector.VectorEnv:
    """``num_envs`` envs of ``env_id``, autoreset disabled: the batched array implementation
    (``envs.grid_batch``, CompoGrid) or per-env ``gym.make`` copies in a sync/async vector env.
    Both take tasks and replays through ``reset`` options (see ``TrialEnv``)."""
    import envs  # noqa: F401  (registers the task families)

    if num_envs < 1:
        raise ValueError(f"num_envs={num_envs}; allowed: an integer >= 1")
    vectorization = resolve_vectorization(env_id, vectorization)
    kwargs = dict(env_kwargs or {})
    if vectorization == "batched":
        return gym.make_vec(
            env_id, num_envs=num_envs, vectorization_mode="vector_entry_point",
            autoreset_mode=gym.vector.AutoresetMode.DISABLED, **kwargs,
        )  # fmt: skip

    def factory(i: int) -> Callable[[], gym.Env]:
        return lambda: TrialEnv(gym.make(env_id, disable_env_checker=True, **kwargs), i)

    fns = [factory(i) for i in range(num_envs)]
    mode = gym.vector.AutoresetMode.DISABLED
    if vectorization == "async":
        return gym.vector.AsyncVectorEnv(fns, autoreset_mode=mode, context="fork")
    return gym.vector.SyncVectorEnv(fns, autoreset_mode=mode)


# --- policy protocol --------------------------------------------------------------------------------


@dataclass
class Prev:
    """What happened on the previous step of each env (zeros at a trial start)."""

    action: torch.Tensor
    reward: torch.Tensor
    done: torch.Tensor


@dataclass
class StepOutput:
    action: torch.Tensor
    logp: torch.Tensor
    value: torch.Tensor
    memory: Any = None
    extras: dict[str, torch.Tensor] = field(default_factory=dict)


class RolloutPolicy(Protocol):
    """What the collector needs from a method's acting policy."""

    def initial_memory(self, n: int) -> Any: ...

    def reset_memory(self, memory: Any, mask: torch.Tensor) -> Any: ...

    def step(self, obs: torch.Tensor, memory: Any, prev: Prev) -> StepOutput: ...

    def bootstrap_value(self, obs: torch.Tensor, memory: Any, prev: Prev) -> torch.Tensor: ...


class PolicyWrapper:
    """Delegates the ``RolloutPolicy`` protocol to ``inner``; subclasses override ``step`` to
    observe what the policy does (traces, embeddings) without reimplementing it."""

    def __init__(self, inner: RolloutPolicy) -> None:
        self.inner = inner

    def initial_memory(self, n: int) -> Any:
        return self.inner.initial_memory(n)

    def reset_memory(self, memory: Any, mask: torch.Tensor) -> Any:
        return self.inner.reset_memory(memory, mask)

    def step(self, obs: torch.Tensor, memory: Any, prev: Prev) -> StepOutput:
        return self.inner.step(obs, memory, prev)

    def bootstrap_value(self, obs: torch.Tensor, memory: Any, prev: Prev) -> torch.Tensor:
        return self.inner.bootstrap_value(obs, memory, prev)


class FeedForwardPolicy:
    """Adapter for a memory-less ``ActorCritic``-like module (``dist(obs)``, ``value(obs)``)."""

    def __init__(self, net: torch.nn.Module, greedy: bool = False) -> None:
        self.net = net
        self.greedy = greedy

    def initial_memory(self, n: int) -> None:
        return None

    def reset_memory(self, memory: Any, mask: torch.Tensor) -> None:
        return None

    def step(self, obs: torch.Tensor, memory: Any, prev: Prev) -> StepOutput:
        dist = self.net.dist(obs)
        if self.greedy:
            action = dist.probs.argmax(-1) if hasattr(dist, "probs") else dist.mean
        else:
            action = dist.sample()
        return StepOutput(action, dist.log_prob(action), self.net.value(obs))

    def bootstrap_value(self, obs: torch.Tensor, memory: Any, prev: Prev) -> torch.Tensor:
        return self.net.value(obs)


# --- storage ----------------------------------------------------------------------------------------


@dataclass
class Rollout:
    """Tensors of shape (T, N, ...) from ``Collector.collect`` / ``collect_trials``.

    ``next_value[t]`` is the bootstrap for step t: 0 if terminated, V(final obs) if truncated,
    V(s_{t+1}) otherwise (the value of the next stored step, or ``last_value`` at t = T-1);
    fill it with ``rl.advantages`` helpers. ``valid`` is False for padding steps.
    """

    obs: torch.Tensor
    actions: torch.Tensor
    logp: torch.Tensor
    values: torch.Tensor
    rewards: torch.Tensor
    terminated: torch.Tensor
    truncated: torch.Tensor
    trunc_value: torch.Tensor
    episode_start: torch.Tensor
    trial_start: torch.Tensor
    episode_index: torch.Tensor
    prev_action: torch.Tensor
    prev_reward: torch.Tensor
    prev_done: torch.Tensor
    valid: torch.Tensor
    last_value: torch.Tensor
    memory_start: Any
    extras: dict[str, torch.Tensor]
    phi: torch.Tensor | None
    next_obs: torch.Tensor
    episodes: list[EpisodeStats]
    next_phi: torch.Tensor | None = None
    """``info["phi"]`` of the state each step reached (before any reset), if recorded"""
    next_trial_start: torch.Tensor | None = None
    """(N,) bool: the step after the rollout starts a new trial (its last step ends a trial)"""

    @property
    def num_steps(self) -> int:
        return int(self.valid.sum().item())

    def next_values(self) -> torch.Tensor:
        """Bootstrap values per step, with terminated/truncated kept apart."""
        nv = torch.zeros_like(self.values)
        nv[:-1] = self.values[1:]
        nv[-1] = self.last_value
        nv = torch.where(self.truncated, self.trunc_value, nv)
        return torch.where(self.terminated, torch.zeros_like(nv), nv)

    def episode_cut(self) -> torch.Tensor:
        """1 where a lambda-trace ends: episode ends and padding."""
        return ((self.terminated | self.truncated) | ~self.valid).float()

    def _trial_end(self) -> torch.Tensor:
        """(T, N) bool: the next step starts a new trial."""
        end = torch.zeros_like(self.valid)
        end[:-1] = self.trial_start[1:]
        if self.next_trial_start is not None:
            end[-1] = self.next_trial_start.bool()
        return end & self.valid

    def trial_cut(self) -> torch.Tensor:
        """1 where a trial ends (including on the rollout's last step) and on padding."""
        return (self._trial_end() | ~self.valid).float()

    def trial_next_values(self) -> torch.Tensor:
        """RL²-style bootstrap: episode boundaries inside a trial continue into the next
        episode's first value; only the trial's end stops (0 if terminated, V(final) if cut)."""
        nv = torch.zeros_like(self.values)
        nv[:-1] = self.values[1:]
        nv[-1] = self.last_value
        ends = self._trial_end()
        nv = torch.where(ends & self.truncated, self.trunc_value, nv)
        return torch.where(ends & self.terminated, torch.zeros_like(nv), nv)


@dataclass
class EpisodeStats:
    env_index: int
    task: Task
    episode_index: int
    ret: float
    success: bool
    length: int
    trial_id: int


@dataclass
class Episode:
    """One finished episode of one env (for adaptation hooks: MAML, PEARL, compositional)."""

    obs: torch.Tensor
    actions: torch.Tensor
    rewards: torch.Tensor
    next_obs: torch.Tensor
    terminated: torch.Tensor
    logp: torch.Tensor
    values: torch.Tensor
    stats: EpisodeStats
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    """the policy's per-step ``StepOutput.extras`` over the episode"""


TaskSampler = Callable[[np.random.Generator], Task]


def uniform_task_sampler(
    compositions: Sequence[Composition | str],
    fixed_layout: bool,
    layout_seeds: Sequence[int] | None = None,
) -> TaskSampler:
    """Tasks drawn uniformly from ``compositions``; with ``fixed_layout`` each trial gets one
    layout/goal seed reused for all its episodes (from ``layout_seeds`` if the split prescribes
    them, e.g. Meta-World's train goals), otherwise every episode draws a new one."""
    comps = [Composition.parse(c) for c in compositions]
    if not comps:
        raise ValueError("task sampler needs at least one composition")
    pool = None if layout_seeds is None else [int(s) for s in layout_seeds]

    def sample(rng: np.random.Generator) -> Task:
        c = comps[int(rng.integers(len(comps)))]
        if not fixed_layout:
            return Task(c, None)
        if pool is not None:
            return Task(c, pool[int(rng.integers(len(pool)))])
        return Task(c, int(rng.integers(2**31)))

    return sample


# --- collector --------------------------------------------------------------------------------------


class Collector:
    """Collects rollouts with trials of ``episodes_per_trial`` episodes.

    Args:
        envs: a vector env from ``make_vector_env``.
        policy: a ``RolloutPolicy``.
        episodes_per_trial: E; memory is reset only between trials.
        task_sampler: draws the task of each new trial (continuous mode).
        seed: seeds the collector's generator (episode seeds, task draws).
        record_phi: store ``info["phi"]`` per step (skill discovery).
        on_episode_end: called as ``f(env_index, Episode)`` when an episode ends; storing the
            per-episode trajectories costs a little, so it is off unless given.
        hook_episodes: if given, ``on_episode_end`` fires only for episodes whose index within
            the trial is in this set (e.g. ``{0}`` for an inner loop that adapts on the first
            episode), and only their steps are kept for it.
    """

    def __init__(
        self,
        envs: gym.vector.VectorEnv,
        policy: RolloutPolicy,
        *,
        episodes_per_trial: int = 1,
        task_sampler: TaskSampler | None = None,
        seed: int = 0,
        record_phi: bool = False,
        on_episode_end: Callable[[int, Episode], None] | None = None,
        hook_episodes: Collection[int] | None = None,
    ) -> None:
        if episodes_per_trial < 1:
            raise ValueError(f"episodes_per_trial={episodes_per_trial}; allowed: >= 1")
        self.envs = envs
        self.policy = policy
        self.E = episodes_per_trial
        self.task_sampler = task_sampler
        self.rng = np.random.default_rng(seed)
        self.seed = seed
        self.rank, self.world = 0, 1
        self.record_phi = record_phi
        self.on_episode_end = on_episode_end
        self.hook_episodes = None if hook_episodes is None else frozenset(hook_episodes)
        self.n = envs.num_envs
        space = envs.single_action_space
        self.discrete = isinstance(space, gym.spaces.Discrete)
        self.act_shape = () if self.discrete else tuple(space.shape)
        self.low = None if self.discrete else space.low
        self.high = None if self.discrete else space.high
        self.env_steps = 0
        self._trial_counter = 0
        self._started = False

    # -- per-env bookkeeping ------------------------------------------------------------------------
    def _zero_prev(self) -> Prev:
        a = torch.zeros(
            (self.n, *self.act_shape), dtype=torch.long if self.discrete else torch.float32
        )
        return Prev(a, torch.zeros(self.n), torch.zeros(self.n))

    def shard(self, rank: int, world: int, seed: int | None = None) -> None:
        """Make this collector rank ``rank``'s shard of a run of ``world`` processes with
        ``n x world`` envs, this one's being envs ``[rank n, (rank+1) n)`` of that run.

        What matches a 1-process collector of all ``n x world`` envs with the same seed: the
        first trial's task and the first episode's seed of every env (each shard draws all of
        them from the shared seed, in the 1-process order, and keeps its own). What cannot:
        every later draw. One generator serves all envs, in the order their episodes end
        across the whole batch, which a shard does not see; so from then on rank 0 continues
        the seed's stream (one draw further) and every other rank draws from its own, seeded by
        ``(seed, rank, that draw)``.
        ``collect_trials`` (MAML's meta-batch) is given this shard's tasks; every shard draws
        the episode seeds of all ``n x world`` envs and keeps its own, so the first trials
        start as the 1-process run's do; then, as above, rank 0 continues the seed's stream
        and every other rank its own.
        ``seed`` (default: the collector's) restarts the generator, for a run resumed under
        another number of processes. Call before the first ``collect``.
        """
        if seed is not None:
            self.seed = seed
            self.rng = np.random.default_rng(seed)
        self.rank, self.world = rank, world

    def _start(self, tasks: Sequence[Task] | None = None) -> None:
        """Begin fresh trials on every env."""
        # a shard draws the first tasks and episode seeds of every shard's envs and keeps its
        # own (see ``shard``); the trials of ``collect_trials`` are given (this shard's tasks)
        total, lo = self.n * self.world, self.rank * self.n
        drawn = list(tasks) if tasks is not None else [self._sample_task() for _ in range(total)]
        self.tasks: list[Task] = drawn if tasks is not None else drawn[lo : lo + self.n]
        self.trial_ids = [self._new_trial_id() for _ in range(self.n)]
        self.ep_in_trial = [0] * self.n
        self.ep_seed = [int(self.rng.integers(2**31)) for _ in range(total)][lo : lo + self.n]
        if self.world > 1:
            # the same draw on every rank (they all drew the same so far), then a stream per rank
            fresh = derived_seed(self.seed, self.rank, int(self.rng.integers(2**31)))
            if self.rank > 0:
                self.rng = np.random.default_rng(fresh)
        self._set_actions([[] for _ in range(self.n)])
        self.ep_return = np.zeros(self.n)
        self.ep_len = np.zeros(self.n, dtype=np.int64)
        self.trial_start_flag = np.ones(self.n, dtype=bool)
        self.episode_start_flag = np.ones(self.n, dtype=bool)
        obs, info = self.envs.reset(
            seed=list(self.ep_seed), options={"tasks": dict(enumerate(self.tasks))}
        )
        self.obs = obs
        self.phi = self._phi(info)
        self.memory = self.policy.initial_memory(self.n)
        self.prev = self._zero_prev()
        self._buffers: list[list[dict]] = [[] for _ in range(self.n)]
        self._started = True

    def _sample_task(self) -> Task:
        if self.task_sampler is None:
            raise ValueError("continuous collection needs a task_sampler")
        return self.task_sampler(self.rng)

    # actions since each env's last reset, kept for the checkpoint's exact replay: one array per
    # vector step (no per-env Python on the step path), trimmed to the oldest running episode
    def _set_actions(self, per_env: list[list]) -> None:
        longest = max((len(a) for a in per_env), default=0)
        shape = (self.n, *self.act_shape)
        dtype = np.int64 if self.discrete else np.float32
        self._hist = [np.zeros(shape, dtype=dtype) for _ in range(longest)]
        for i, acts in enumerate(per_env):
            for k, a in enumerate(acts):
                self._hist[longest - len(acts) + k][i] = a
        self._hist_base = 0  # global step index of self._hist[0]
        self._t = longest  # global step index of the next step
        self._ep_start = np.array([longest - len(a) for a in per_env], dtype=np.int64)

    def _actions_of(self, i: int) -> list:
        rows = self._hist[int(self._ep_start[i]) - self._hist_base :]
        return [int(r[i]) if self.discrete else r[i].tolist() for r in rows]

    def _trim_actions(self) -> None:
        drop = int(self._ep_start.min()) - self._hist_base
        if drop > 0:
            del self._hist[:drop]
            self._hist_base += drop

    def _new_trial_id(self) -> int:
        self._trial_counter += 1
        return self._trial_counter

    def _phi(self, info: dict) -> np.ndarray | None:
        if not self.record_phi:
            return None
        return np.asarray(info["phi"])

    # -- one vector step ----------------------------------------------------------------------------
    @torch.no_grad()
    def _step(self, next_task: Callable[[int], Task | None]) -> dict:
        obs_t = torch.as_tensor(self.obs, dtype=torch.float32)
        trial_mask = torch.as_tensor(self.trial_start_flag)
        if trial_mask.any():
            self.memory = self.policy.reset_memory(self.memory, trial_mask)
        prev = self.prev
        out = self.policy.step(obs_t, self.memory, prev)
        action = out.action
        env_action = action.numpy()
        if not self.discrete:
            env_action = np.clip(env_action, self.low, self.high)
        next_obs, reward, term, trunc, info = self.envs.step(env_action)
        term = np.asarray(term, dtype=bool)
        trunc = np.asarray(trunc, dtype=bool) & ~term
        reward = np.asarray(reward, dtype=np.float32)
        done = term | trunc
        self.env_steps += self.n
        rec = {
            "obs": obs_t,
            "actions": action,
            "logp": out.logp,
            "values": out.value,
            # copies: ``prev`` below is edited in place at trial starts and must not alias these
            "rewards": torch.tensor(reward),
            "terminated": torch.tensor(term),
            "truncated": torch.tensor(trunc),
            "episode_start": torch.as_tensor(self.episode_start_flag.copy()),
            "trial_start": torch.as_tensor(self.trial_start_flag.copy()),
            "episode_index": torch.as_tensor(self.ep_in_trial, dtype=torch.long),
            "prev_action": prev.action,
            "prev_reward": prev.reward,
            "prev_done": prev.done,
            "next_obs": torch.tensor(next_obs, dtype=torch.float32),
            "extras": out.extras,
            "trunc_value": torch.zeros(self.n),
        }
        if self.record_phi:
            rec["phi"] = torch.as_tensor(self.phi)
        if trunc.any():
            bprev = Prev(action, torch.tensor(reward), torch.zeros(self.n))
            rec["trunc_value"] = torch.where(
                torch.as_tensor(trunc),
                self.policy.bootstrap_value(rec["next_obs"], out.memory, bprev),
                torch.zeros(self.n),
            )
        success = np.asarray(info.get("success", np.zeros(self.n, dtype=bool)), dtype=bool)
        finished: list[EpisodeStats] = []
        self._hist.append(np.array(env_action, dtype=np.int64 if self.discrete else np.float32))
        self._t += 1
        self.ep_return += reward
        self.ep_len += 1
        if self.on_episode_end is not None:
            for i in range(self.n):
                if self._hooked(i):
                    # keep a reference to the whole step; env i's slice is cut once per episode
                    self._buffers[i].append(rec)
        self.memory = out.memory
        self.prev = Prev(
            action.clone(), torch.tensor(reward), torch.tensor(done, dtype=torch.float32)
        )
        self.trial_start_flag = np.zeros(self.n, dtype=bool)
        self.episode_start_flag = done.copy()
        self.obs = next_obs
        if self.record_phi:
            self.phi = self._phi(info)
            # phi of the state reached by this step (the final state for done envs)
            rec["next_phi"] = torch.as_tensor(np.array(self.phi))
        if done.any():
            new_tasks: dict[int, Task] = {}
            seeds: list[int | None] = [None] * self.n
            for i in np.flatnonzero(done):
                st = EpisodeStats(
                    i,
                    self.tasks[i],
                    self.ep_in_trial[i],
                    float(self.ep_return[i]),
                    bool(success[i]),
                    int(self.ep_len[i]),
                    self.trial_ids[i],
                )
                finished.append(st)
                if self.on_episode_end is not None and self._hooked(i):
                    self.on_episode_end(int(i), self._episode(i, st))
                self.ep_in_trial[i] += 1
                if self.ep_in_trial[i] >= self.E:
                    task = next_task(int(i))
                    if task is not None:
                        self.tasks[i] = task
                        new_tasks[int(i)] = task
                    self.ep_in_trial[i] = 0
                    self.trial_ids[i] = self._new_trial_id()
                    self.trial_start_flag[i] = True
                else:
                    new_tasks[int(i)] = self.tasks[i]
                self.ep_seed[i] = int(self.rng.integers(2**31))
                seeds[i] = self.ep_seed[i]
                self.ep_return[i] = 0.0
                self.ep_len[i] = 0
            self._ep_start[done] = self._t
            obs, rinfo = self.envs.reset(
                seed=seeds, options={"reset_mask": done, "tasks": new_tasks}
            )
            self.obs = np.where(done[:, None], obs, self.obs)
            if self.record_phi:
                self.phi = np.where(done[:, None], self._phi(rinfo), self.phi)
            # a new trial starts with zeroed previous action/reward/done (RL² convention)
            ts = torch.as_tensor(self.trial_start_flag)
            self.prev.action[ts] = 0
            self.prev.reward[ts] = 0.0
            self.prev.done[ts] = 0.0
        rec["finished"] = finished
        return rec

    def _hooked(self, i: int) -> bool:
        """Does ``on_episode_end`` want env ``i``'s current episode?"""
        return self.hook_episodes is None or int(self.ep_in_trial[i]) in self.hook_episodes

    def _episode(self, i: int, st: EpisodeStats) -> Episode:
        recs = self._buffers[i]
        self._buffers[i] = []
        keys = ("obs", "actions", "rewards", "next_obs", "terminated", "logp", "values")
        cat = {k: torch.stack([r[k] for r in recs])[:, i] for k in keys}
        extras = {k: torch.stack([r["extras"][k] for r in recs])[:, i] for k in recs[0]["extras"]}
        return Episode(**cat, stats=st, extras=extras)

    @staticmethod
    def _clone_memory(memory: Any) -> Any:
        if memory is None:
            return None
        if isinstance(memory, torch.Tensor):
            return memory.clone()
        return type(memory)(Collector._clone_memory(m) for m in memory)

    def _stack(
        self,
        recs: list[dict],
        valid: torch.Tensor,
        memory_start: Any,
        last_value: torch.Tensor,
        next_trial_start: torch.Tensor,
    ) -> Rollout:
        def st(k):
            return torch.stack([r[k] for r in recs])

        extras = {k: torch.stack([r["extras"][k] for r in recs]) for k in recs[0]["extras"]}
        return Rollout(
            obs=st("obs"), actions=st("actions"), logp=st("logp"), values=st("values"),
            rewards=st("rewards"), terminated=st("terminated"), truncated=st("truncated"),
            trunc_value=st("trunc_value"), episode_start=st("episode_start"),
            trial_start=st("trial_start"), episode_index=st("episode_index"),
            prev_action=st("prev_action"), prev_reward=st("prev_reward"), prev_done=st("prev_done"),
            valid=valid, last_value=last_value, memory_start=memory_start, extras=extras,
            phi=st("phi") if self.record_phi else None, next_obs=st("next_obs"),
            next_phi=st("next_phi") if self.record_phi else None,
            episodes=[e for r in recs for e in r["finished"]], next_trial_start=next_trial_start,
        )  # fmt: skip

    # -- public API ---------------------------------------------------------------------------------
    def collect(self, num_steps: int) -> Rollout:
        """Continuous collection: ``num_steps`` vector steps; trials continue across calls."""
        if num_steps < 1:
            raise ValueError(f"num_steps={num_steps}; allowed: >= 1")
        if not self._started:
            self._start()
        # memory as the policy will see it at step 0 (after any pending trial-start reset)
        mask = torch.as_tensor(self.trial_start_flag)
        if mask.any():
            self.memory = self.policy.reset_memory(self.memory, mask)
            self.trial_start_flag = self.trial_start_flag.copy()
        memory_start = self._clone_memory(self.memory)
        self._trim_actions()
        recs = [self._step(lambda i: self._sample_task()) for _ in range(num_steps)]
        with torch.no_grad():
            last_value = self.policy.bootstrap_value(
                torch.as_tensor(self.obs, dtype=torch.float32), self.memory, self.prev
            )
        valid = torch.ones(num_steps, self.n, dtype=torch.bool)
        pending = torch.tensor(self.trial_start_flag)
        return self._stack(recs, valid, memory_start, last_value, pending)

    def collect_trials(self, tasks: Sequence[Task], max_steps: int = 1_000_000) -> Rollout:
        """Exactly one trial of E episodes per env on ``tasks`` (len == num_envs).

        Envs that finish early keep stepping a throw-away trial; their steps are marked invalid.
        Continuous-mode state is discarded (the next ``collect`` starts fresh trials).
        """
        if len(tasks) != self.n:
            raise ValueError(f"collect_trials got {len(tasks)} tasks for {self.n} envs")
        self._start(tasks)
        memory_start = self._clone_memory(
            self.policy.reset_memory(self.memory, torch.ones(self.n, dtype=torch.bool))
        )
        active = np.ones(self.n, dtype=bool)
        recs, valids = [], []
        while active.any():
            if len(recs) >= max_steps:
                raise RuntimeError(f"trials did not finish within {max_steps} steps")
            valids.append(torch.as_tensor(active.copy()))
            hook = self.on_episode_end
            # stop adaptation hooks from firing on throw-away episodes
            self.on_episode_end = (
                (lambda i, ep, _h=hook, _a=active: _h(i, ep) if _a[i] else None) if hook else None
            )
            rec = self._step(lambda i: self.tasks[i])
            self.on_episode_end = hook
            rec["finished"] = [e for e in rec["finished"] if active[e.env_index]]
            for e in rec["finished"]:
                if e.episode_index == self.E - 1:
                    active[e.env_index] = False
            recs.append(rec)
        self._started = False
        valid = torch.stack(valids)
        ends = torch.ones(self.n, dtype=torch.bool)
        return self._stack(recs, valid, memory_start, torch.zeros(self.n), ends)

    # -- checkpointing ------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything needed to continue exactly (plain data: ``weights_only``-safe)."""
        if not self._started:
            return {
                "started": False,
                "rng": generator_state(self.rng),
                "env_steps": self.env_steps,
                "trial_counter": self._trial_counter,
            }

        def mem(m):
            if m is None or isinstance(m, torch.Tensor):
                return m
            return list(mem(x) for x in m)

        return {
            "started": True,
            "rng": generator_state(self.rng),
            "env_steps": self.env_steps,
            "trial_counter": self._trial_counter,
            "tasks": [
                [str(t.composition), -1 if t.layout_seed is None else t.layout_seed]
                for t in self.tasks
            ],
            "trial_ids": list(self.trial_ids),
            "ep_in_trial": list(self.ep_in_trial),
            "ep_seed": list(self.ep_seed),
            "ep_actions": [self._actions_of(i) for i in range(self.n)],
            "ep_return": [float(x) for x in self.ep_return],
            "ep_len": [int(x) for x in self.ep_len],
            "trial_start_flag": self.trial_start_flag.tolist(),
            "episode_start_flag": self.episode_start_flag.tolist(),
            "memory": mem(self.memory),
            "prev": [self.prev.action, self.prev.reward, self.prev.done],
        }

    def load_state_dict(self, state: dict) -> None:
        set_generator_state(self.rng, state["rng"])
        self.env_steps = int(state["env_steps"])
        self._trial_counter = int(state["trial_counter"])
        if not state["started"]:
            self._started = False
            return
        self.tasks = [
            Task(Composition.parse(c), None if s < 0 else int(s)) for c, s in state["tasks"]
        ]
        self.trial_ids = list(state["trial_ids"])
        self.ep_in_trial = list(state["ep_in_trial"])
        self.ep_seed = list(state["ep_seed"])
        ep_actions = [list(a) for a in state["ep_actions"]]
        self._set_actions(ep_actions)
        self.ep_return = np.array(state["ep_return"], dtype=np.float64)
        self.ep_len = np.array(state["ep_len"], dtype=np.int64)
        self.trial_start_flag = np.array(state["trial_start_flag"], dtype=bool)
        self.episode_start_flag = np.array(state["episode_start_flag"], dtype=bool)
        replay = {
            i: (
                self.tasks[i],
                self.ep_seed[i],
                [a if self.discrete else np.asarray(a, dtype=np.float32) for a in ep_actions[i]],
            )
            for i in range(self.n)
        }
        obs, info = self.envs.reset(seed=list(self.ep_seed), options={"replay": replay})
        self.obs = obs
        self.phi = self._phi(info)
        mem = state["memory"]
        self.memory = mem if (mem is None or isinstance(mem, torch.Tensor)) else tuple(mem)
        a, r, d = state["prev"]
        self.prev = Prev(a, r, d)
        self._buffers = [[] for _ in range(self.n)]
        self._started = True
