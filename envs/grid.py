"""CompoGrid: ordered compositions of coloured-object sub-tasks in one MiniGrid room.

## Description
One room with six coloured objects (two balls, two keys, two boxes) and a door in the room's
right-hand wall leading to a one-cell corridor. A *task* is a composition of 2-3 primitives
(``pickup(red ball) > open(door)``; 1-4 are accepted: split kind ``length`` holds out
length 4) plus a layout seed. Only the next sub-task in order is
checked after each step; completing it pays ``1/L`` and moves on.

## Mission Space
``mission`` is the composition text; the agent sees it only with ``task_info="instruction"``
(as one-hot tokens in the observation). With ``task_info="reward"`` (the meta-RL default) the
composition must be inferred from reward.

## Action Space
``Discrete(6)``: 0 left, 1 right, 2 forward, 3 pickup, 4 drop, 5 toggle (MiniGrid's ``done``
is removed: it does nothing here).

## Observation Space
A flat ``float32`` vector (``obs_dim`` = 166), fully observable and object-centric: per
entity (7) ``[on_grid, carried, x, y, ego_forward, ego_right, is_open, sign(ego_forward),
sign(ego_right), in_front]``; the agent's
position, direction one-hot and front-cell one-hot; the number of completed sub-tasks
(one-hot, it can be read off the summed reward anyway so it leaks nothing in ``reward`` mode);
and, in ``instruction`` mode only, one one-hot primitive token per position (``MAX_LEN`` = 4
positions, so the layout is the same for every composition length and split kind; positions
beyond the composition's length are zeros). With
``cell_onehot=True`` (default False) the agent's x and y are appended as two one-hots of
``size`` entries each (``obs_dim`` + 2 * size): an MLP policy reads "which cell am I in" off
them far faster than off the scaled coordinates (skill discovery over cells needs it).

## Rewards
``1/L`` each time the next sub-task in order completes; 0 otherwise.

## Termination
``terminated`` when every sub-task is complete (``info["success"]`` is then True);
``truncated`` after ``max_steps`` (default ``5 * size * L``).

## Registered Configurations
``CompoGrid-v0`` with keyword arguments ``composition``, ``task_info``, ``size``,
``max_steps``, ``layout_seed``, ``cell_onehot``.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence
from typing import Any

import gymnasium as gym
import numpy as np
from minigrid.core.grid import Grid
from minigrid.core.mission import MissionSpace
from minigrid.core.world_object import Ball, Door, Key, Wall
from minigrid.core.world_object import Box as _MiniGridBox
from minigrid.minigrid_env import MiniGridEnv

from envs.core import (
    Composition,
    LayoutSplit,
    Primitive,
    Split,
    Task,
    check_split_kind,
    length_split,
    multiset_key,
    order_split,
    pair_split,
    split_compositions,
)

# --- vocabulary ---------------------------------------------------------------------------------

#: Entities in a fixed order (observation layout depends on it).
ENTITIES: tuple[str, ...] = (
    "red ball",
    "blue ball",
    "green key",
    "yellow key",
    "purple box",
    "grey box",
    "door",
)
PORTABLE = ENTITIES[:4]
BOXES = ENTITIES[4:6]
DOOR = "door"
DOOR_COLOR = "blue"
VERBS = ("goto", "pickup", "drop", "open", "toggle")


def _all_primitives() -> tuple[Primitive, ...]:
    prims = [Primitive("goto", e) for e in ENTITIES]
    prims += [Primitive("pickup", e) for e in PORTABLE]
    prims += [Primitive("drop", e) for e in PORTABLE]
    prims += [Primitive("open", e) for e in (*BOXES, DOOR)]
    prims.append(Primitive("toggle", DOOR))
    return tuple(prims)


PRIMITIVES: tuple[Primitive, ...] = _all_primitives()
PRIMITIVE_INDEX: dict[Primitive, int] = {p: i for i, p in enumerate(PRIMITIVES)}
MAX_LEN = 4
#: features per entity in the observation (see ``CompoGridEnv.gen_obs``)
PER_ENTITY = 10
MIN_SIZE = 7
ACTIONS = ("left", "right", "forward", "pickup", "drop", "toggle")


class Box(_MiniGridBox):
    """A box that cannot be carried (so ``open(box)`` is the only thing to do with it)."""

    def can_pickup(self) -> bool:
        return False


# --- feasibility ----------------------------------------------------------------------------------


def check_primitive(p: Primitive) -> None:
    """Raise ``ValueError`` naming ``p`` if it is not a CompoGrid primitive."""
    if p in PRIMITIVE_INDEX:
        return
    if p.verb not in VERBS:
        raise ValueError(
            f"unknown verb {p.verb!r} in {str(p)!r}; allowed verbs: {', '.join(VERBS)}"
        )
    if p.obj not in ENTITIES:
        raise ValueError(
            f"unknown object {p.obj!r} in {str(p)!r}; allowed objects: {', '.join(ENTITIES)}"
        )
    allowed = ", ".join(str(q) for q in PRIMITIVES if q.verb == p.verb)
    raise ValueError(f"primitive {str(p)!r} does not exist; allowed with {p.verb!r}: {allowed}")


def infeasibility(c: Composition) -> str | None:
    """Why ``c`` cannot be solved from a fresh layout, or ``None`` if it can.

    The abstract state is (carried object, opened boxes, door open); the oracle drops a carried
    object before picking up another one, so ``pickup`` always succeeds.
    """
    carrying: str | None = None
    opened: set[str] = set()
    door_open = False
    prev: Primitive | None = None
    for i, p in enumerate(c):
        if p == prev:
            return f"sub-task {i} repeats {str(p)!r}, which is then already complete"
        if p.obj in BOXES and p.obj in opened:
            return f"sub-task {i} {str(p)!r} refers to {p.obj!r}, opened (removed) earlier"
        if p.verb == "goto" and p.obj == carrying:
            return f"sub-task {i} {str(p)!r}: {p.obj!r} is being carried, so it is not on the grid"
        if p.verb == "pickup":
            if carrying == p.obj:
                return f"sub-task {i} {str(p)!r}: {p.obj!r} is already carried"
            carrying = p.obj
        elif p.verb == "drop":
            if carrying != p.obj:
                return f"sub-task {i} {str(p)!r}: {p.obj!r} is not carried at that point"
            carrying = None
        elif p.verb == "open":
            if p.obj == DOOR:
                if door_open:
                    return f"sub-task {i} {str(p)!r}: the door is already open"
                door_open = True
            else:
                opened.add(p.obj)
        elif p.verb == "toggle":
            door_open = not door_open
        prev = p
    return None


def validate_composition(c: Composition | str) -> Composition:
    """Parse and check a CompoGrid composition; one clear ``ValueError`` otherwise."""
    c = Composition.parse(c)
    if not 1 <= len(c) <= MAX_LEN:
        raise ValueError(
            f"composition {str(c)!r} has length {len(c)}; allowed lengths: 1..{MAX_LEN}"
        )
    for p in c:
        check_primitive(p)
    why = infeasibility(c)
    if why is not None:
        raise ValueError(f"infeasible composition {str(c)!r}: {why}")
    return c


def all_compositions(lengths: tuple[int, ...] = (2, 3)) -> list[Composition]:
    """Every feasible composition of the given lengths, in a fixed order (207 of length 2,
    2,743 of length 3, 35,158 of length 4)."""
    return [c for n in lengths for c in _feasible_of_length(int(n))]


@functools.cache
def _feasible_of_length(n: int) -> tuple[Composition, ...]:
    # cached: length 4 enumerates 19^4 candidates (~0.2 s), and splits and the ideal observer
    # ask for it again and again
    combos = (Composition(tuple(combo)) for combo in itertools.product(PRIMITIVES, repeat=n))
    return tuple(c for c in combos if infeasibility(c) is None)


def make_grid_split(
    seed: int = 0,
    *,
    pool_size: int = 200,
    lengths: tuple[int, ...] = (2, 3),
    train_fraction: float = 0.5,
    split_kind: str = "default",
    heldout_length: int | None = None,
) -> Split:
    """Seeded CompoGrid split: a pool of ``pool_size`` feasible compositions (equal share per
    length), split ``train_fraction`` / rest with every primitive-in-position covered by train.

    ``split_kind`` (see ``envs.core``): ``"default"`` (a random partition of a random pool),
    ``"order"`` (held-out compositions are new orders of primitive multisets train holds in
    another order; the pool is drawn as several orders of each multiset, see
    ``_order_pool``), ``"pair"`` (held-out compositions contain a primitive pair no train
    composition has; the same pool as ``"default"``, partitioned by ``pair_split``) or
    ``"length"`` (train: ``round(train_fraction * pool_size)`` compositions of ``lengths``,
    equal share per length; held-out: the rest of the pool, all of ``heldout_length``,
    default ``max(lengths) + 1`` = 4, at most ``MAX_LEN``; see ``length_split``).
    """
    check_split_kind(split_kind)
    lengths = tuple(sorted(set(int(n) for n in lengths)))
    if not lengths or lengths[0] < 1 or lengths[-1] > MAX_LEN:
        raise ValueError(f"lengths={lengths}; allowed: a subset of 1..{MAX_LEN}")
    if pool_size < 2:
        raise ValueError(f"pool_size={pool_size}; need at least 2 compositions")
    if split_kind == "length":
        return _length_kind(seed, pool_size, lengths, train_fraction, heldout_length)
    if heldout_length is not None:
        raise ValueError(
            f"heldout_length={heldout_length} with split_kind={split_kind!r}; allowed: only"
            " with split_kind='length'"
        )
    meta: dict = {"lengths": list(lengths), "split_kind": split_kind}
    if split_kind == "order":
        pool = _order_pool(seed, pool_size, lengths, train_fraction)
        train, heldout = order_split(pool, seed=seed, train_fraction=train_fraction)
        return Split("grid", train, heldout, PRIMITIVES, seed=seed, meta=meta)
    rng = np.random.default_rng(seed)
    pool: list[Composition] = []
    for j, n in enumerate(lengths):
        cands = all_compositions((n,))
        share = min(_share(pool_size, lengths, j), len(cands))
        pool += [cands[i] for i in rng.choice(len(cands), size=share, replace=False)]
    if split_kind == "pair":
        train, heldout, pairs = pair_split(pool, seed=seed, train_fraction=train_fraction)
        meta["heldout_pairs"] = [" + ".join(str(p) for p in sorted(pr)) for pr in pairs]
        return Split("grid", train, heldout, PRIMITIVES, seed=seed, meta=meta)
    train, heldout = split_compositions(pool, seed=seed, train_fraction=train_fraction)
    return Split("grid", train, heldout, PRIMITIVES, seed=seed, meta=meta)


def _length_kind(
    seed: int,
    pool_size: int,
    lengths: tuple[int, ...],
    train_fraction: float,
    heldout_length: int | None,
) -> Split:
    """Split kind ``length`` (see ``make_grid_split``): checks, then ``length_split``."""
    longest = lengths[-1]
    if longest >= MAX_LEN:
        raise ValueError(
            f"split_kind='length' with lengths={list(lengths)} holds out longer compositions"
            f" than {longest}, which the env cannot build (lengths 1..{MAX_LEN}); allowed:"
            f" train lengths below {MAX_LEN}"
        )
    held = longest + 1 if heldout_length is None else heldout_length
    if isinstance(held, bool) or not isinstance(held, int | np.integer) or held > MAX_LEN:
        raise ValueError(
            f"heldout_length={held!r}: the env builds compositions of length 1..{MAX_LEN};"
            f" allowed: an integer {longest + 1}..{MAX_LEN} (longer than lengths={list(lengths)})"
        )
    if held <= longest:
        raise ValueError(
            f"heldout_length={held} is not longer than the train lengths {list(lengths)};"
            f" allowed: an integer {longest + 1}..{MAX_LEN}"
        )
    if not 0.0 < train_fraction < 1.0:
        raise ValueError(f"train_fraction={train_fraction} must lie strictly between 0 and 1")
    n_train = int(round(train_fraction * pool_size))
    train, heldout = length_split(
        [all_compositions((n,)) for n in lengths],
        all_compositions((int(held),)),
        seed=seed,
        n_train=n_train,
        n_heldout=pool_size - n_train,
    )
    meta = {
        "lengths": [*lengths, int(held)],  # every length of the split (the ideal observer's)
        "train_lengths": list(lengths),
        "heldout_length": int(held),
        "split_kind": "length",
    }
    return Split("grid", train, heldout, PRIMITIVES, seed=seed, meta=meta)


def _share(pool_size: int, lengths: tuple[int, ...], j: int) -> int:
    """The pool's share of the ``j``-th length (equal shares, the remainder to the first)."""
    return pool_size // len(lengths) + (1 if j < pool_size % len(lengths) else 0)


def _order_pool(
    seed: int, pool_size: int, lengths: tuple[int, ...], train_fraction: float
) -> list[Composition]:
    """The pool of split kind ``order``: per length, seeded multisets of primitives that have
    at least two feasible orders, and from each up to ``k = max(2, round(1/train_fraction))``
    of its orders (so one can be trained and the others held out), until the length's share;
    multisets with a primitive not yet in the pool are taken first.
    """
    if not 0.0 < train_fraction < 1.0:
        raise ValueError(f"train_fraction={train_fraction} must lie strictly between 0 and 1")
    rng = np.random.default_rng(seed)
    per_class = max(2, int(round(1 / train_fraction)))
    pool: list[Composition] = []
    for j, n in enumerate(lengths):
        classes: dict[tuple, list[Composition]] = {}
        for c in all_compositions((n,)):
            classes.setdefault(multiset_key(c), []).append(c)
        multi = [members for members in classes.values() if len(members) >= 2]
        if not multi:
            raise ValueError(
                f"split_kind='order' with lengths={list(lengths)}: length {n} has no"
                " composition with another feasible order; allowed: lengths >= 2"
            )
        left = _share(pool_size, lengths, j)
        perm = [int(i) for i in rng.permutation(len(multi))]
        # multisets bringing a primitive the pool lacks come first, so the pool (and with it
        # train) has every primitive that the length can hold (drop(x) needs pickup(x) before
        # it, so it only occurs in multisets of length 3 with another order)
        have = {p for c in pool for p in c}
        first = []
        for i in perm:
            if set(multi[i][0]) - have:
                first.append(i)
                have |= set(multi[i][0])
        taken = set(first)
        rest = [i for i in perm if i not in taken]
        for i in first + rest:
            if left < 2:
                break
            members = multi[i]
            k = min(per_class, len(members), left)
            pool += [members[m] for m in sorted(rng.choice(len(members), size=k, replace=False))]
            left -= k
    return pool


def make_grid_layout_split(
    compositions: Sequence[str | Composition], seed: int = 0, *, n_layouts: int = 1000
) -> LayoutSplit:
    """CompoGrid family ``grid-layouts:<c1>;<c2>;...``: the listed compositions on both sides,
    ``n_layouts`` train and ``n_layouts`` disjoint held-out layout seeds (a seeded permutation
    of ``0 .. 2 n_layouts - 1``). With ``task_info="reward"`` which composition pays is hidden:
    the family for checking that a meta-learner uses a trial's reward at all.
    """
    comps = tuple(dict.fromkeys(Composition.parse(str(c)) for c in compositions))
    if not comps:
        raise ValueError(
            "grid-layouts family with no compositions; allowed: 'grid-layouts:<c1>;<c2>'"
        )
    for c in comps:
        validate_composition(str(c))
    if n_layouts < 1:
        raise ValueError(f"n_layouts={n_layouts}; allowed: an integer >= 1")
    perm = np.random.default_rng(seed).permutation(2 * n_layouts)
    meta = {
        "train_layout_seeds": sorted(int(i) for i in perm[:n_layouts]),
        "heldout_layout_seeds": sorted(int(i) for i in perm[n_layouts:]),
    }
    prims = tuple(sorted({p for c in comps for p in c}))
    family = "grid-layouts:" + ";".join(str(c) for c in comps)
    return LayoutSplit(family, comps, comps, prims, seed=seed, meta=meta)


# --- environment --------------------------------------------------------------------------------


class CompoGridEnv(MiniGridEnv):
    """CompoGrid environment (see the module docstring)."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": 10}

    def __init__(
        self,
        composition: Composition | str = "pickup(red ball) > open(door)",
        task_info: str = "reward",
        size: int = 8,
        max_steps: int | None = None,
        layout_seed: int | None = None,
        render_mode: str | None = None,
        cell_onehot: bool = False,
    ) -> None:
        if not isinstance(cell_onehot, bool):
            raise ValueError(f"cell_onehot={cell_onehot!r}; allowed: true or false")
        if task_info not in ("reward", "instruction"):
            raise ValueError(f"task_info={task_info!r}; allowed: 'reward', 'instruction'")
        if not isinstance(size, int | np.integer) or size < MIN_SIZE:
            raise ValueError(
                f"size={size!r} is too small for {len(ENTITIES)} objects; allowed: an integer >= {MIN_SIZE}"
            )
        if max_steps is not None and max_steps < 1:
            raise ValueError(f"max_steps={max_steps}; allowed: a positive integer or None")
        self.task_info = task_info
        self.size = int(size)
        self._max_steps_arg = max_steps
        self.composition = validate_composition(composition)
        self.layout_seed = layout_seed
        #: set by the rollout collector; taken at the next reset (see ``set_task``)
        self.pending_task: Task | None = None
        super().__init__(
            mission_space=MissionSpace(mission_func=lambda: "composition"),
            grid_size=self.size,
            max_steps=self._steps_for(self.composition),
            see_through_walls=True,
            render_mode=render_mode,
        )
        self.action_space = gym.spaces.Discrete(len(ACTIONS))
        self.obs_dim = len(ENTITIES) * PER_ENTITY + 2 + 4 + (len(ENTITIES) + 2) + (MAX_LEN + 1)
        self.obs_dim += MAX_LEN * len(PRIMITIVES)
        self.cell_onehot = cell_onehot
        self._cell_at = self.obs_dim  # where the optional one-hot agent cell starts
        self.obs_dim += 2 * self.size if cell_onehot else 0
        self.observation_space = gym.spaces.Box(-1.0, 1.0, (self.obs_dim,), np.float32)
        self.progress = 0
        self.objects: dict[str, Any] = {}
        self._in_base_step = False

    # -- task -------------------------------------------------------------------------------------
    def _steps_for(self, c: Composition) -> int:
        return self._max_steps_arg or 5 * self.size * len(c)

    def set_task(self, task: Task) -> None:
        """Use ``task`` from the next reset on: its composition and (if not None) its layout."""
        self.composition = validate_composition(task.composition)
        self.layout_seed = task.layout_seed
        self.max_steps = self._steps_for(self.composition)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        if self.pending_task is not None:
            self.set_task(self.pending_task)
            self.pending_task = None
        if options and "task" in options:
            self.set_task(options["task"])
        # A fixed layout seed pins the layout for every episode of a trial; otherwise the layout
        # is drawn from the env's own generator (seeded once by ``reset(seed=...)``).
        if seed is not None:
            super(MiniGridEnv, self).reset(seed=seed)
        self._layout_rng = (
            np.random.default_rng(self.layout_seed)
            if self.layout_seed is not None
            else self.np_random
        )
        self.progress = 0
        obs, _ = super().reset(seed=None)
        return obs, self._info()

    # -- layout -----------------------------------------------------------------------------------
    def _gen_grid(self, width: int, height: int) -> None:
        rng = self._layout_rng
        self.mission = str(self.composition)
        wall_x = width - 3  # inner wall; the corridor behind it is x = width - 2
        room = [(x, y) for x in range(1, wall_x) for y in range(1, height - 1)]
        for _attempt in range(1000):
            # 1. walls: outer rectangle and the inner wall with the door at a random height
            self.grid = Grid(width, height)
            self.grid.wall_rect(0, 0, width, height)
            door_y = int(rng.integers(1, height - 1))
            for y in range(1, height - 1):
                self.grid.set(wall_x, y, Wall())
            door = Door(DOOR_COLOR, is_open=False, is_locked=False)
            self.grid.set(wall_x, door_y, door)
            door.cur_pos = np.array([wall_x, door_y])
            # 2. objects on distinct room cells, never in front of the door
            free = [c for c in room if c != (wall_x - 1, door_y)]
            idx = rng.choice(len(free), size=len(ENTITIES), replace=False)
            cells = [free[i] for i in idx]
            self.objects = {DOOR: door}
            for name, cell in zip(ENTITIES[:-1], cells[:-1]):
                color, kind = name.split()
                obj = {"ball": Ball, "key": Key, "box": Box}[kind](color)
                self.grid.set(*cell, obj)
                obj.cur_pos = np.array(cell)
                self.objects[name] = obj
            # 3. agent on the remaining drawn cell, random direction
            self.agent_pos = cells[-1]
            self.agent_dir = int(rng.integers(0, 4))
            if all(approach_states(self, name) for name in ENTITIES):
                return
        raise RuntimeError(f"no layout with every object reachable for size={width}")

    # -- dynamics ---------------------------------------------------------------------------------
    def entity_cell(self, name: str) -> tuple[int, int] | None:
        """Grid cell of entity ``name``, or None if carried or removed."""
        obj = self.objects.get(name)
        if obj is None or obj is self.carrying or obj.cur_pos is None:
            return None
        x, y = int(obj.cur_pos[0]), int(obj.cur_pos[1])
        if x < 0 or self.grid.get(x, y) is not obj:
            return None
        return x, y

    def carried_name(self) -> str | None:
        for name, obj in self.objects.items():
            if obj is self.carrying and obj is not None:
                return name
        return None

    def front_entity(self) -> str | None:
        fx, fy = self.front_pos
        cell = self.grid.get(int(fx), int(fy))
        for name, obj in self.objects.items():
            if cell is obj:
                return name
        return None

    def _completed(self, p: Primitive, before: dict) -> bool:
        if p.verb == "goto":
            return self.front_entity() == p.obj
        if p.verb == "pickup":
            return self.carried_name() == p.obj
        if p.verb == "drop":
            return before["carrying"] == p.obj and self.entity_cell(p.obj) is not None
        if p.verb == "open":
            if p.obj == DOOR:
                return bool(self.objects[DOOR].is_open)
            return self.entity_cell(p.obj) is None and self.carried_name() != p.obj
        if p.verb == "toggle":
            return bool(self.objects[DOOR].is_open) != before["door_open"]
        raise AssertionError(p)

    def step(self, action):
        action = int(action)
        if not 0 <= action < len(ACTIONS):
            raise ValueError(f"action={action}; allowed: 0..{len(ACTIONS) - 1}")
        before = {"carrying": self.carried_name(), "door_open": bool(self.objects[DOOR].is_open)}
        self._in_base_step = True
        try:
            _, _, _, truncated, _ = super().step(action)
        finally:
            self._in_base_step = False
        reward = 0.0
        L = len(self.composition)
        # only the next sub-task in order is checked; several can complete in one step
        while self.progress < L and self._completed(self.composition[self.progress], before):
            self.progress += 1
            reward += 1.0 / L
        terminated = self.progress == L
        obs = self.gen_obs()
        return obs, reward, terminated, bool(truncated and not terminated), self._info()

    def _info(self) -> dict:
        return {
            "success": self.progress == len(self.composition),
            "progress": self.progress,
            "phi": self.phi(),
        }

    # -- observations -----------------------------------------------------------------------------
    def phi(self) -> np.ndarray:
        """Discovery features: agent cell, carried entity and object states (ints).

        Layout: ``[agent_x, agent_y, carried (0 = none, 1..7 = entity), on_grid x7, door_open]``.
        """
        carried = self.carried_name()
        on_grid = [int(self.entity_cell(n) is not None) for n in ENTITIES]
        return np.array(
            [
                int(self.agent_pos[0]),
                int(self.agent_pos[1]),
                0 if carried is None else ENTITIES.index(carried) + 1,
                *on_grid,
                int(self.objects[DOOR].is_open),
            ],
            dtype=np.int64,
        )

    def gen_obs(self):
        if self._in_base_step:
            return None  # MiniGridEnv.step builds an obs we would discard: skip the work
        W, H = self.width - 1, self.height - 1
        ax, ay = int(self.agent_pos[0]), int(self.agent_pos[1])
        fx, fy = _DIRS[self.agent_dir]
        rx, ry = -fy, fx  # right-hand direction
        carried = self.carried_name()
        out = np.zeros(self.obs_dim, dtype=np.float32)
        front_cell = (ax + fx, ay + fy)
        front_name = None
        for e, name in enumerate(ENTITIES):
            base = e * PER_ENTITY
            cell = self.entity_cell(name)
            if cell is None:
                out[base + 1] = float(name == carried)
                continue
            dx, dy = cell[0] - ax, cell[1] - ay
            f, r = dx * fx + dy * fy, dx * rx + dy * ry
            out[base : base + PER_ENTITY] = (
                1.0,
                0.0,
                cell[0] / W,
                cell[1] / H,
                f / W,
                r / W,
                float(name == DOOR and self.objects[DOOR].is_open),
                # crisp egocentric cues: MLPs pick these up far faster than small offsets
                (f > 0) - (f < 0),
                (r > 0) - (r < 0),
                float(f == 1 and r == 0),
            )
            if cell == front_cell:
                front_name = name
        i = len(ENTITIES) * PER_ENTITY
        out[i], out[i + 1] = ax / W, ay / H
        out[i + 2 + self.agent_dir] = 1.0
        i += 6
        if front_name is not None:
            out[i + ENTITIES.index(front_name)] = 1.0
        else:
            fcell = self.grid.get(*front_cell)
            wall = fcell is not None and fcell.type == "wall"
            out[i + len(ENTITIES) + (0 if wall else 1)] = 1.0
        i += len(ENTITIES) + 2
        out[i + min(self.progress, MAX_LEN)] = 1.0
        i += MAX_LEN + 1
        if self.task_info == "instruction":
            for k, p in enumerate(self.composition):
                out[i + k * len(PRIMITIVES) + PRIMITIVE_INDEX[p]] = 1.0
        if self.cell_onehot:
            out[self._cell_at + ax] = 1.0
            out[self._cell_at + self.size + ay] = 1.0
        return out


_DIRS = ((1, 0), (0, 1), (-1, 0), (0, -1))  # facing directions 0..3 (MiniGrid's)

# the scripted oracle lives in envs/grid_oracle.py; these names stay importable from here
from envs.grid_oracle import Oracle, approach_states  # noqa: E402, F401
