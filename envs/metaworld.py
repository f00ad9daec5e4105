"""Compositional Meta-World: every metaworld v3 task as a ``verb(object)`` primitive.

## Description
Each of Meta-World's 50 v3 tasks is one primitive ``verb(object)`` (``door-open-v3`` is
``open(door)``), and a Meta-World *composition* is a length-1 ``Composition`` holding that
primitive. Held-out tasks of the ``"metaworld"`` split are verb x object combinations whose verb
and object each occur in some training task (``close(drawer)`` may be held out when
``close(door)`` and ``open(drawer)`` are trained). The standard ``ML10`` / ``ML45`` / ``ML1``
splits are offered too, so numbers can be set beside published ones.

## The verb/object table (``TASKS``)
One literal entry per v3 task, chosen by these rules:

* verb = the action word of the task name; a *manner* modifier of the motion stays on the
  verb, joined by ``-`` (``press-topdown``, ``press-side``, ``slide-back-side``,
  ``insert-side``), because it changes the motion, not the thing moved.
* a ``-wall`` variant keeps the verb and names the object ``"<object> behind wall"``: the wall
  is part of the scene, so ``press(button behind wall)`` shares its verb with ``press(button)``.
* the object is the thing the gripper moves, named as in the Meta-World paper's task
  descriptions: the small cylinder of the pick/push/sweep/shelf/bin/hole tasks is a ``puck``
  everywhere; tool tasks (``stick-push``) name the tool (``push(stick)``); coffee tasks name the
  mug or the ``coffee button``; ``reach`` moves the hand to a ``goal``.
* names without a separate object word keep their own verb (``dunk(basketball)``,
  ``kick(soccer ball)``, ``hammer(nail)``, ``assemble(nut)``).

The table is injective, so ``metaworld_env_name`` inverts it.

## Goals (layouts)
Goals vary through Meta-World's own ``Task`` sampling: for an env name the *goal pool* is
``ML1(env_name, seed=GOAL_SEED)``'s 50 train tasks followed by its 50 test tasks (built once per
process and env name, because building them takes about 1.5 s). A task's ``layout_seed`` picks
pool index ``layout_seed % 100``: seeds 0-49 are Meta-World's ML1 *train* goals, 50-99 its
*test* goals. ``layout_seed=None`` draws a train goal from the env's ``np_random`` at every
reset. Every split records ``train_layout_seeds`` (0-49) and ``heldout_layout_seeds`` (50-99)
in ``Split.meta``; ``split_tasks`` turns a split side into ``Task`` objects.

## ML1
``ML1:<name>`` trains and tests on the *same* task with different goals, which the plain
``Split`` rejects (train and held-out must be disjoint). It returns an ``ML1Split``, a ``Split``
subclass with the same attributes whose check instead requires train == held-out == that one
composition and disjoint goal seeds (``meta["ml1"]`` holds the env name). So the API stays the
same; code that relies on disjoint *compositions* must look at ``split.meta.get("ml1")``.

## Action and observation spaces
``Box(-1, 1, (4,), float32)`` (xyz hand displacement, gripper effort; clipped to the box).
Observations are Meta-World's 39-dim vector as ``float32`` with the goal hidden
(``partially_observable=True`` as in the ML benchmarks, so the last 3 entries are 0).

## Rewards, termination
Meta-World's dense v3 reward (0-10). ``terminated`` is always False (Meta-World convention);
``truncated`` after ``max_steps`` (default 500, Meta-World's ``max_path_length``).
``info["success"]`` becomes True at the first step Meta-World reports success and stays True
for the rest of the episode; ``info["phi"]`` is ``[hand xyz, object xyz]`` (float32) for skill
discovery.

## Registered Configurations
``CompoMetaWorld-v0`` with keyword arguments ``composition``, ``task_info``, ``layout_seed``,
``max_steps``, ``render_mode``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import numpy as np

from envs.core import Composition, LayoutSplit, Primitive, Split, Task

# --- vocabulary ---------------------------------------------------------------------------------

#: Every metaworld v3 task name -> its (verb, object) primitive (rules in the module docstring).
TASKS: dict[str, Primitive] = {
    "assembly-v3": Primitive("assemble", "nut"),
    "basketball-v3": Primitive("dunk", "basketball"),
    "bin-picking-v3": Primitive("bin-pick", "puck"),
    "box-close-v3": Primitive("close", "box"),
    "button-press-topdown-v3": Primitive("press-topdown", "button"),
    "button-press-topdown-wall-v3": Primitive("press-topdown", "button behind wall"),
    "button-press-v3": Primitive("press", "button"),
    "button-press-wall-v3": Primitive("press", "button behind wall"),
    "coffee-button-v3": Primitive("press", "coffee button"),
    "coffee-pull-v3": Primitive("pull", "mug"),
    "coffee-push-v3": Primitive("push", "mug"),
    "dial-turn-v3": Primitive("turn", "dial"),
    "disassemble-v3": Primitive("disassemble", "nut"),
    "door-close-v3": Primitive("close", "door"),
    "door-lock-v3": Primitive("lock", "door"),
    "door-open-v3": Primitive("open", "door"),
    "door-unlock-v3": Primitive("unlock", "door"),
    "hand-insert-v3": Primitive("insert", "puck"),
    "drawer-close-v3": Primitive("close", "drawer"),
    "drawer-open-v3": Primitive("open", "drawer"),
    "faucet-open-v3": Primitive("open", "faucet"),
    "faucet-close-v3": Primitive("close", "faucet"),
    "hammer-v3": Primitive("hammer", "nail"),
    "handle-press-side-v3": Primitive("press-side", "handle"),
    "handle-press-v3": Primitive("press", "handle"),
    "handle-pull-side-v3": Primitive("pull-side", "handle"),
    "handle-pull-v3": Primitive("pull", "handle"),
    "lever-pull-v3": Primitive("pull", "lever"),
    "pick-place-wall-v3": Primitive("pick-place", "puck behind wall"),
    "pick-out-of-hole-v3": Primitive("pick-out-of-hole", "puck"),
    "pick-place-v3": Primitive("pick-place", "puck"),
    "plate-slide-v3": Primitive("slide", "plate"),
    "plate-slide-side-v3": Primitive("slide-side", "plate"),
    "plate-slide-back-v3": Primitive("slide-back", "plate"),
    "plate-slide-back-side-v3": Primitive("slide-back-side", "plate"),
    "peg-insert-side-v3": Primitive("insert-side", "peg"),
    "peg-unplug-side-v3": Primitive("unplug-side", "peg"),
    "soccer-v3": Primitive("kick", "soccer ball"),
    "stick-push-v3": Primitive("push", "stick"),
    "stick-pull-v3": Primitive("pull", "stick"),
    "push-v3": Primitive("push", "puck"),
    "push-wall-v3": Primitive("push", "puck behind wall"),
    "push-back-v3": Primitive("push-back", "puck"),
    "reach-v3": Primitive("reach", "goal"),
    "reach-wall-v3": Primitive("reach", "goal behind wall"),
    "shelf-place-v3": Primitive("shelf-place", "puck"),
    "sweep-into-v3": Primitive("sweep-into", "puck"),
    "sweep-v3": Primitive("sweep", "puck"),
    "window-open-v3": Primitive("open", "window"),
    "window-close-v3": Primitive("close", "window"),
}

#: Inverse of ``TASKS`` (the table is injective; a test checks it).
ENV_NAMES: dict[Primitive, str] = {p: name for name, p in TASKS.items()}

#: Every primitive of the family, sorted.
PRIMITIVES: tuple[Primitive, ...] = tuple(sorted(TASKS.values()))

#: Seed of the ``ML1`` benchmark whose train/test tasks form each env name's goal pool.
GOAL_SEED = 0
#: Goals per side of the pool (Meta-World's ``_N_GOALS``): indices 0-49 train, 50-99 test.
GOALS_PER_SIDE = 50
TRAIN_LAYOUT_SEEDS: tuple[int, ...] = tuple(range(GOALS_PER_SIDE))
HELDOUT_LAYOUT_SEEDS: tuple[int, ...] = tuple(range(GOALS_PER_SIDE, 2 * GOALS_PER_SIDE))

#: Split families this module serves.
FAMILIES = ("metaworld", "ML10", "ML45", "ML1:<v3 task name>")

DEFAULT_N_HELDOUT = 10
MIN_HELDOUT = 8


def _allowed_names() -> str:
    return ", ".join(TASKS)


def metaworld_env_name(task: Primitive | Composition | str) -> str:
    """The metaworld v3 env name of a primitive or length-1 composition.

    Args:
        task: a ``Primitive``, a length-1 ``Composition``, composition text such as
            ``"open(door)"``, or a v3 env name (returned unchanged).

    Returns:
        The v3 env name, e.g. ``"door-open-v3"``.

    Raises:
        ValueError: naming the input and listing what is allowed, if it maps to no v3 task.

    Examples:
        >>> metaworld_env_name("open(door)")
        'door-open-v3'
    """
    if isinstance(task, str) and task.strip() in TASKS:
        return task.strip()
    if isinstance(task, Primitive):
        prim = task
    else:
        try:
            comp = Composition.parse(task)
        except ValueError as e:
            raise ValueError(
                f"unknown Meta-World task {task!r}: {e}; allowed: a v3 env name or its "
                f"primitive, i.e. one of {_allowed_names()}"
            ) from None
        if len(comp) != 1:
            raise ValueError(
                f"Meta-World composition {str(comp)!r} has {len(comp)} primitives; "
                "a Meta-World task is exactly one primitive, e.g. 'open(door)'"
            )
        prim = comp[0]
    if prim not in ENV_NAMES:
        allowed = ", ".join(f"{p} ({ENV_NAMES[p]})" for p in PRIMITIVES)
        raise ValueError(f"unknown Meta-World primitive {str(prim)!r}; allowed: {allowed}")
    return ENV_NAMES[prim]


def composition_for(env_name: str) -> Composition:
    """The length-1 composition of a v3 env name (``"door-open-v3"`` -> ``open(door)``).

    Raises:
        ValueError: naming the value and listing the allowed names.
    """
    if env_name not in TASKS:
        raise ValueError(f"unknown Meta-World v3 task {env_name!r}; allowed: {_allowed_names()}")
    return Composition((TASKS[env_name],))


# --- splits -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ML1Split(LayoutSplit):
    """``Split`` of Meta-World ML1: one composition, train and held-out differ only in goals.

    ``train == heldout == (composition,)``; ``meta["train_layout_seeds"]`` and
    ``meta["heldout_layout_seeds"]`` (disjoint) select Meta-World's ML1 train and test goals,
    and ``meta["ml1"]`` is the env name.
    """

    def __post_init__(self) -> None:
        if len(self.train) != 1:
            raise ValueError(
                "an ML1 split needs train == heldout == one composition, got "
                f"train={[str(c) for c in self.train]}, heldout={[str(c) for c in self.heldout]}"
            )
        super().__post_init__()

    def to_dict(self) -> dict:
        """``LayoutSplit.to_dict`` plus the ML1 env name."""
        return {**super().to_dict(), "ml1": self.meta.get("ml1")}


def _compositional_heldout(seed: int, n_heldout: int) -> tuple[list[Primitive], list[Primitive]]:
    """Seeded greedy choice of ``n_heldout`` primitives whose verb and object stay trained."""
    rng = np.random.default_rng(seed)
    order = [PRIMITIVES[i] for i in rng.permutation(len(PRIMITIVES))]
    train = set(PRIMITIVES)
    heldout: list[Primitive] = []
    for p in order:
        if len(heldout) == n_heldout:
            break
        rest = train - {p}
        verbs = {q.verb for q in rest}
        objs = {q.obj for q in rest}
        # Removing p must not strand an earlier held-out primitive either, so check them all.
        if all(h.verb in verbs and h.obj in objs for h in (*heldout, p)):
            train = rest
            heldout.append(p)
    if len(heldout) < n_heldout:
        raise ValueError(
            f"could only hold out {len(heldout)} Meta-World tasks (seed={seed}) while keeping "
            f"every held-out verb and object in training; asked for n_heldout={n_heldout}"
        )
    return sorted(train), sorted(heldout)


def make_metaworld_split(family: str, seed: int = 0, *, n_heldout: int | None = None) -> Split:
    """Train/held-out split of Meta-World tasks (called by ``envs.core.make_split``).

    Args:
        family: ``"metaworld"`` (compositional verb x object split), ``"ML10"``, ``"ML45"``
            (Meta-World's own train/test classes) or ``"ML1:<v3 name>"`` (one task, Meta-World's
            train vs test goals; returns an ``ML1Split``).
        seed: seed of the ``"metaworld"`` partition (recorded, but without effect, for the fixed
            benchmarks).
        n_heldout: number of held-out tasks of the ``"metaworld"`` split (default 10, at least
            8); not accepted for the fixed benchmarks.

    Returns:
        A ``Split`` with ``meta`` holding ``benchmark``, ``train_layout_seeds`` and
        ``heldout_layout_seeds`` (and ``ml1`` for ML1).

    Raises:
        ValueError: for an unknown family or task name (naming it and listing what is allowed),
            or when ``n_heldout`` tasks cannot be held out with verb and object coverage.
    """
    meta: dict[str, Any] = {
        "benchmark": family,
        "goal_seed": GOAL_SEED,
        "train_layout_seeds": list(TRAIN_LAYOUT_SEEDS),
        "heldout_layout_seeds": list(HELDOUT_LAYOUT_SEEDS),
    }
    if family != "metaworld" and n_heldout is not None:
        raise ValueError(f"n_heldout applies only to family 'metaworld', not {family!r}")
    if family == "metaworld":
        n = DEFAULT_N_HELDOUT if n_heldout is None else int(n_heldout)
        if n < MIN_HELDOUT:
            raise ValueError(f"n_heldout={n_heldout}; allowed: an integer >= {MIN_HELDOUT}")
        train, heldout = _compositional_heldout(seed, n)
        return Split(
            "metaworld",
            tuple(Composition((p,)) for p in train),
            tuple(Composition((p,)) for p in heldout),
            PRIMITIVES,
            seed=seed,
            meta=meta,
        )
    if family in ("ML10", "ML45"):
        from metaworld import env_dict as _env_dict

        classes = _env_dict.ML10_V3 if family == "ML10" else _env_dict.ML45_V3
        # Keep Meta-World's class order so the split reads like the benchmark's own listing.
        train = tuple(composition_for(n) for n in classes["train"])
        heldout = tuple(composition_for(n) for n in classes["test"])
        prims = tuple(sorted({c[0] for c in (*train, *heldout)}))
        return Split(family, train, heldout, prims, seed=seed, meta=meta)
    if family.startswith("ML1:"):
        name = family[len("ML1:") :].strip()
        if name not in TASKS:
            raise ValueError(
                f"unknown Meta-World ML1 task {name!r} (family {family!r}); allowed: "
                f"'ML1:<name>' with <name> one of {_allowed_names()}"
            )
        comp = composition_for(name)
        meta["benchmark"] = "ML1"
        meta["ml1"] = name
        return ML1Split(family, (comp,), (comp,), (comp[0],), seed=seed, meta=meta)
    raise ValueError(f"unknown Meta-World family {family!r}; allowed: {', '.join(FAMILIES)}")


def split_tasks(split: Split, which: str = "train") -> tuple[Task, ...]:
    """Every (composition, goal seed) ``Task`` of one side of a Meta-World split.

    Args:
        split: a split from ``make_metaworld_split``.
        which: ``"train"`` or ``"heldout"``.
    """
    if which not in ("train", "heldout"):
        raise ValueError(f"which={which!r}; allowed: 'train', 'heldout'")
    comps = split.train if which == "train" else split.heldout
    seeds = split.meta.get(f"{which}_layout_seeds")
    if seeds is None:
        raise ValueError(f"split of family {split.family!r} records no {which}_layout_seeds")
    return tuple(Task(c, int(s)) for c in comps for s in seeds)


# --- goal pools ---------------------------------------------------------------------------------

#: Per-process cache: env name -> ML1 train tasks + ML1 test tasks (building them is slow).
_GOAL_POOLS: dict[str, tuple[Any, ...]] = {}


def goal_pool(env_name: str) -> tuple[Any, ...]:
    """Meta-World ``Task`` objects of ``env_name``: ML1 train goals (0-49) then test goals (50-99).

    Built with ``metaworld.ML1(env_name, seed=GOAL_SEED)`` (goal hidden from observations, as in
    the ML benchmarks) once per process and env name.
    """
    if env_name not in _GOAL_POOLS:
        import metaworld

        if env_name not in TASKS:
            raise ValueError(
                f"unknown Meta-World v3 task {env_name!r}; allowed: {_allowed_names()}"
            )
        bench = metaworld.ML1(env_name, seed=GOAL_SEED)
        pool = (*bench.train_tasks, *bench.test_tasks)
        # The layout-seed convention (0-49 train, 50-99 test) depends on these sizes.
        assert len(bench.train_tasks) == len(bench.test_tasks) == GOALS_PER_SIDE, len(pool)
        _GOAL_POOLS[env_name] = pool
    return _GOAL_POOLS[env_name]


# --- what a step did to hand and object (the skill-level agent's outcomes) ---------------------

#: ``[hand xyz, gripper, object xyz]``: the first entries of the observation
MOTION_DIM = 7
#: an object displacement (m) that counts as "moved the object"
MOVED = 0.02


def motion(obs):
    """``[hand xyz, gripper, object xyz]`` of observations (..., 39) -> (..., 7) (numpy or
    torch)."""
    return obs[..., :MOTION_DIM]


def moved(displacement):
    """Whether a displacement (..., 7) of ``motion`` moved the object by at least ``MOVED``."""
    return (displacement[..., 4:7] ** 2).sum(-1) ** 0.5 >= MOVED


# --- environment --------------------------------------------------------------------------------


def _observation_space() -> gym.spaces.Box:
    """Meta-World's partially observable 39-dim layout as float32.

    ``[hand xyz, gripper, 14 object dims]`` for the current and the previous frame, then 3 goal
    dims that are always 0 (goal hidden).
    """
    from metaworld.sawyer_xyz_env import SawyerXYZEnv

    hand = SawyerXYZEnv._HAND_SPACE
    frame_low = np.hstack([hand.low, -1.0, np.full(14, -np.inf)])
    frame_high = np.hstack([hand.high, 1.0, np.full(14, np.inf)])
    # The hidden goal dims are always 0, but Meta-World's zero-width bounds make gymnasium warn
    # at every gym.make; the hand box (where a visible goal would lie) stretched to include 0
    # contains it just as well.
    low = np.hstack([frame_low, frame_low, np.minimum(hand.low, 0.0)])
    high = np.hstack([frame_high, frame_high, hand.high])
    return gym.spaces.Box(low.astype(np.float32), high.astype(np.float32), dtype=np.float32)


class CompoMetaWorldEnv(gym.Env):
    """One Meta-World v3 task with goals from Meta-World's own task sampling (module docstring).

    Args:
        composition: composition text (``"open(door)"``), a ``Composition``, or a v3 env name.
        task_info: only ``"reward"``: the task must be inferred from reward (goal hidden).
        layout_seed: goal-pool index modulo 100 (0-49 ML1 train goals, 50-99 test goals);
            ``None`` draws a train goal at every reset.
        max_steps: episode length before truncation.
        render_mode: ``None`` or ``"rgb_array"``.

    Attributes:
        pending_task: set by the rollout collector (``set_attr``); applied and cleared at the
            next reset.
        goal_index: goal-pool index of the current episode.
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 80}

    def __init__(
        self,
        composition: Composition | str = "reach(goal)",
        task_info: str = "reward",
        layout_seed: int | None = None,
        max_steps: int = 500,
        render_mode: str | None = None,
    ) -> None:
        if task_info != "reward":
            raise ValueError(
                f"task_info={task_info!r}; allowed: 'reward' (Meta-World tasks have no instruction)"
            )
        if not isinstance(max_steps, int | np.integer) or max_steps < 1:
            raise ValueError(f"max_steps={max_steps!r}; allowed: a positive integer")
        if render_mode not in (None, "rgb_array"):
            raise ValueError(f"render_mode={render_mode!r}; allowed: None, 'rgb_array'")
        self.task_info = task_info
        self.max_steps = int(max_steps)
        self.render_mode = render_mode
        self.composition = composition_for(metaworld_env_name(composition))
        self.layout_seed = layout_seed
        #: set by the rollout collector; taken at the next reset (see ``set_task``)
        self.pending_task: Task | None = None
        self.goal_index: int | None = None
        self.observation_space = _observation_space()
        self.action_space = gym.spaces.Box(-1.0, 1.0, (4,), np.float32)
        # Underlying envs are built lazily and kept per env name: switching tasks through
        # ``pending_task`` must not rebuild a MuJoCo model at every reset.
        self._mw_envs: dict[str, Any] = {}
        self._mw: Any = None
        self._t = 0
        self._success = False

    # -- task -------------------------------------------------------------------------------------
    @property
    def env_name(self) -> str:
        """v3 env name of the current composition."""
        return metaworld_env_name(self.composition)

    @property
    def mw_env(self) -> Any:
        """The underlying metaworld env of the current episode (None before the first reset)."""
        return self._mw

    def set_task(self, task: Task) -> None:
        """Use ``task`` from the next reset on: its composition and goal (``layout_seed``)."""
        self.composition = composition_for(metaworld_env_name(task.composition))
        self.layout_seed = task.layout_seed

    def _underlying(self, name: str) -> Any:
        if name not in self._mw_envs:
            from metaworld.env_dict import ALL_V3_ENVIRONMENTS

            self._mw_envs[name] = ALL_V3_ENVIRONMENTS[name](render_mode=self.render_mode)
        return self._mw_envs[name]

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        if self.pending_task is not None:
            self.set_task(self.pending_task)
            self.pending_task = None
        if options and "task" in options:
            self.set_task(options["task"])
        name = self.env_name
        pool = goal_pool(name)
        if self.layout_seed is not None:
            self.goal_index = int(self.layout_seed) % len(pool)
        else:
            # Only train goals: a fresh-goal-per-episode run must never see ML1 test goals.
            self.goal_index = int(self.np_random.integers(GOALS_PER_SIDE))
        self._mw = self._underlying(name)
        self._mw.set_task(pool[self.goal_index])
        # Our own truncation decides the horizon; metaworld refuses steps past its own limit.
        self._mw.max_path_length = self.max_steps
        obs, _ = self._mw.reset()
        self._t = 0
        self._success = False
        obs = self._obs(obs)
        return obs, self._info(obs)

    def step(self, action):
        if self._mw is None:
            raise RuntimeError("call reset() before step()")
        a = np.asarray(action, dtype=np.float32)
        if a.shape != (4,):
            raise ValueError(f"action shape {a.shape}; allowed: (4,)")
        # Gaussian policies leave the box; metaworld clips the hand motion but not the gripper.
        a = np.clip(a, -1.0, 1.0)
        obs, reward, _, _, mw_info = self._mw.step(a)
        self._t += 1
        self._success = self._success or bool(mw_info.get("success", 0.0) > 0)
        obs = self._obs(obs)
        truncated = self._t >= self.max_steps
        return obs, float(reward), False, truncated, self._info(obs)

    # -- observations -----------------------------------------------------------------------------
    def _obs(self, obs: np.ndarray) -> np.ndarray:
        # Cast first, then clip in float32 so the result is inside the float32 Box exactly.
        obs = np.asarray(obs, dtype=np.float32)
        return np.clip(obs, self.observation_space.low, self.observation_space.high)

    def _info(self, obs: np.ndarray) -> dict:
        return {
            "success": self._success,
            "phi": np.concatenate([obs[:3], obs[4:7]]).astype(np.float32),
            "goal_index": self.goal_index,
        }

    def render(self):
        if self.render_mode is None or self._mw is None:
            return None
        return self._mw.render()

    def close(self) -> None:
        for env in self._mw_envs.values():
            env.close()
        self._mw_envs.clear()
        self._mw = None
        super().close()
