"""CompoGrid for B environments at once, as array operations (``gym.make_vec`` of CompoGrid-v0).

``CompoGridEnv`` (``envs/grid.py``) stays the reference implementation and the renderer; this
module re-implements its dynamics, rewards, termination/truncation, layout generation and
observation vector over a batch axis, and is tested step for step against it
(``tests/test_grid_batch.py``). A state of the batch can be loaded into a ``CompoGridEnv``
(``CompoGridVectorEnv.env_at``), so any batched rollout can be rendered.

## State
A handful of arrays with a batch axis: the grid of cell codes (0 empty, 1 wall, 2 + entity
index for the seven entities of ``envs.grid.ENTITIES``), entity cells and on-grid flags, the
carried entity (-1 for none), the door state, the agent's cell and direction, step counters,
and the composition as primitive indices with its progress. ``step`` is a fixed number of
vectorised operations with no Python loop over envs.

## Layouts
Drawn exactly as ``CompoGridEnv._gen_grid`` draws them (the same calls on the same numpy
generator), per env: from ``np.random.default_rng(layout_seed)`` when the env's task fixes a
layout, otherwise from the env's own generator, seeded by ``reset(seed=...)``. Layouts of fixed
seeds are cached (a trial reuses one layout for all its episodes). This is the one part that
runs in Python per env, once per episode.

## Tasks
As with the per-env path (``rl.collect.TrialEnv``): ``reset(options={"tasks": {i: Task}})``
sets env ``i``'s composition and layout seed; ``options={"reset_mask": mask}`` resets only
the masked envs; ``options={"replay": {i: (Task, seed, actions)}}`` resets env ``i`` and
replays the actions (the collector's exact checkpoint restore). A batch may mix compositions
of every length the env builds (1..``MAX_LEN`` = 4).

## Autoreset
``autoreset_mode`` is gymnasium's ``AutoresetMode``: ``NEXT_STEP`` (gymnasium's default: the
step after an episode ends resets that env and ignores its action), ``SAME_STEP`` (the env is
reset within the step that ended it; the final observation and info are in
``info["final_obs"]`` / ``info["final_info"]``) or ``DISABLED`` (the caller resets ended envs
with ``reset_mask``; this is what the shared collector uses). An env reset automatically keeps
its task and draws its next layout from its own generator when the task has no layout seed.

## Info
``success`` (bool), ``progress`` (int) and ``phi`` (int64, shape (B, 11)) per env, each with
gymnasium's ``_key`` mask, as ``SyncVectorEnv`` over ``CompoGridEnv`` returns them.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium.vector import AutoresetMode

from envs.core import Composition, Task
from envs.grid import (
    ACTIONS,
    DOOR,
    ENTITIES,
    MAX_LEN,
    MIN_SIZE,
    PER_ENTITY,
    PORTABLE,
    PRIMITIVE_INDEX,
    PRIMITIVES,
    CompoGridEnv,
    validate_composition,
)

#: upper bound on ``num_envs`` (the state of 65,536 envs of size 8 takes ~100 MB)
MAX_ENVS = 65_536
#: upper bound on ``size`` (grid codes are one byte per cell per env)
MAX_SIZE = 64

EMPTY, WALL = 0, 1
N_ENT = len(ENTITIES)
DOOR_I = ENTITIES.index(DOOR)
DOOR_CODE = 2 + DOOR_I
BOX_I = (ENTITIES.index("purple box"), ENTITIES.index("grey box"))
N_PORTABLE = len(PORTABLE)  # entities 0..3 can be picked up
DX = np.array([1, 0, -1, 0])
DY = np.array([0, 1, 0, -1])
PAD = len(PRIMITIVES)  # composition padding: a primitive index whose sub-task never completes

# What an action does, by (action, front cell's code, hands full, door open); the last action
# row is for envs not stepped (action -1). One lookup replaces a chain of masks in ``_advance``.
_NONE, _MOVE, _PICKUP, _DROP, _TOGGLE, _OPEN_BOX = range(6)
_OUTCOME = np.zeros((len(ACTIONS) + 1, 2 + N_ENT, 2, 2), dtype=np.int8)
for _a, _code, _full, _door in np.ndindex(len(ACTIONS), 2 + N_ENT, 2, 2):
    _e = _code - 2
    _OUTCOME[_a, _code, _full, _door] = (
        _MOVE if _a == 2 and (_code == EMPTY or (_code == DOOR_CODE and _door))
        else _PICKUP if _a == 3 and 0 <= _e < N_PORTABLE and not _full
        else _DROP if _a == 4 and _code == EMPTY and _full
        else _TOGGLE if _a == 5 and _code == DOOR_CODE
        else _OPEN_BOX if _a == 5 and _e in BOX_I
        else _NONE
    )  # fmt: skip
_A_STRIDE = _OUTCOME[0].size
_OUTCOME = _OUTCOME.reshape(-1)
_TURN = np.array([-1, 1, 0, 0, 0, 0, 0])  # by action, last: not stepped

# Which sub-tasks hold after a step, as bitmasks over primitive indices (bit PAD never set):
# goto by the front cell's code; pickup/drop by (carried before + 1, carried after + 1) (a
# carried entity is off the grid, so "carried before, hands empty now" is exactly a drop);
# open/toggle by door open + 2 door toggled + 4 first box on grid + 8 second box on grid.
_BIT = {(p.verb, ENTITIES.index(p.obj)): 1 << i for i, p in enumerate(PRIMITIVES)}
_GOTO_BITS = np.array([0, 0] + [_BIT["goto", e] for e in range(N_ENT)])
_CARRY_BITS = np.array([
    _BIT.get(("pickup", now), 0) | (_BIT.get(("drop", before), 0) if now < 0 else 0)
    for before in range(-1, N_PORTABLE) for now in range(-1, N_PORTABLE)
])  # fmt: skip
_FLAG_BITS = np.array([
    _BIT["open", DOOR_I] * (f & 1) | _BIT["toggle", DOOR_I] * (f >> 1 & 1)
    | _BIT["open", BOX_I[0]] * (1 - (f >> 2 & 1)) | _BIT["open", BOX_I[1]] * (1 - (f >> 3 & 1))
    for f in range(16)
])  # fmt: skip


def _check_seed(seed: Any, what: str = "layout_seed") -> int | None:
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ValueError(f"{what}={seed!r}; allowed: a non-negative integer or None")
    return int(seed)


class _Layouts:
    """``CompoGridEnv._gen_grid``'s draws, as plain numbers: (door_y, cells, dir), ``cells``
    the seven entities' cells in ``ENTITIES`` order then the agent's, as ``x * size + y``.

    The reachability test ("every entity can be approached, and the agent does not start
    facing one", which is what ``all(approach_states(...))`` checks) is a flood fill over
    bitmasks (bit ``x * size + y``).
    """

    def __init__(self, size: int, cache: int = 4096) -> None:
        S = self.size = size
        self.door_x = size - 3
        room = [x * S + y for x in range(1, self.door_x) for y in range(1, S - 1)]
        # the cells objects and agent are drawn from, per door row (never in front of the door)
        self.free = {dy: [c for c in room if c != (S - 4) * S + dy] for dy in range(1, S - 1)}
        self.room_mask = sum(1 << c for c in room)
        self.step = (S, 1, -S, -1)  # flat offset of the faced cell, per direction
        self._cache: OrderedDict[int, tuple] = OrderedDict()
        self._cache_size = cache

    def for_seed(self, seed: int) -> tuple:
        hit = self._cache.get(seed)
        if hit is not None:
            self._cache.move_to_end(seed)
            return hit
        out = self.draw(np.random.default_rng(seed))
        self._cache[seed] = out
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return out

    def draw(self, rng: np.random.Generator) -> tuple:
        S = self.size
        for _attempt in range(1000):
            door_y = int(rng.integers(1, S - 1))
            free = self.free[door_y]
            picks = rng.choice(len(free), size=N_ENT, replace=False).tolist()
            d = int(rng.integers(0, 4))
            cells = [free[i] for i in picks]
            cells.insert(DOOR_I, self.door_x * S + door_y)
            if self._ok(cells, d):
                return door_y, cells, d
        raise RuntimeError(f"no layout with every object reachable for size={S}")

    def _ok(self, cells: list, d: int) -> bool:
        S = self.size
        ent = sum(map((1).__lshift__, cells[:-1]))  # the entities' bits
        agent = cells[-1]
        if ent >> (agent + self.step[d]) & 1:
            return False  # already facing an entity: approach_states gives [] (falsy)
        passable = self.room_mask & ~ent  # the room's empty cells (the corridor is behind the door)
        reach = 1 << agent
        while True:  # flood fill; walls frame the room, so shifts never wrap into it
            near = reach << 1 | reach >> 1 | reach << S | reach >> S
            if near & ent == ent:
                return True  # every entity is next to a reached cell (reach only grows)
            grown = near & passable | reach
            if grown == reach:
                return False
            reach = grown


class CompoGridVectorEnv(gym.vector.VectorEnv):
    """B CompoGrid environments as arrays; ``gym.make_vec("CompoGrid-v0", num_envs=B,
    vectorization_mode="vector_entry_point", **kwargs)`` builds one (see the module docstring).

    Args:
        num_envs: B, 1..``MAX_ENVS``.
        composition: one composition for every env, or a sequence of B.
        task_info, size, max_steps, cell_onehot: as ``CompoGridEnv``.
        layout_seed: None, one seed for every env, or a sequence of B.
        autoreset_mode: ``AutoresetMode`` (or its value); default ``NEXT_STEP``.

    Examples:
        >>> import gymnasium as gym, envs
        >>> v = gym.make_vec("CompoGrid-v0", num_envs=4, vectorization_mode="vector_entry_point")
        >>> obs, info = v.reset(seed=0)
        >>> obs.shape
        (4, 166)
    """

    metadata = {"render_modes": ["rgb_array"], "autoreset_mode": AutoresetMode.NEXT_STEP}

    def __init__(
        self,
        num_envs: int = 1,
        composition: Composition | str | Sequence = "pickup(red ball) > open(door)",
        task_info: str = "reward",
        size: int = 8,
        max_steps: int | None = None,
        layout_seed: int | Sequence[int | None] | None = None,
        render_mode: str | None = None,
        cell_onehot: bool = False,
        autoreset_mode: AutoresetMode | str = AutoresetMode.NEXT_STEP,
    ) -> None:
        if isinstance(num_envs, bool) or not isinstance(num_envs, int | np.integer):
            raise ValueError(f"num_envs={num_envs!r}; allowed: an integer 1..{MAX_ENVS}")
        if not 1 <= num_envs <= MAX_ENVS:
            raise ValueError(f"num_envs={num_envs}; allowed: 1..{MAX_ENVS}")
        if task_info not in ("reward", "instruction"):
            raise ValueError(f"task_info={task_info!r}; allowed: 'reward', 'instruction'")
        if isinstance(size, bool) or not isinstance(size, int | np.integer):
            raise ValueError(f"size={size!r}; allowed: an integer {MIN_SIZE}..{MAX_SIZE}")
        if not MIN_SIZE <= size <= MAX_SIZE:
            raise ValueError(f"size={size}; allowed: an integer {MIN_SIZE}..{MAX_SIZE}")
        if max_steps is not None and (
            isinstance(max_steps, bool)
            or not isinstance(max_steps, int | np.integer)
            or max_steps < 1
        ):
            raise ValueError(f"max_steps={max_steps!r}; allowed: a positive integer or None")
        if not isinstance(cell_onehot, bool):
            raise ValueError(f"cell_onehot={cell_onehot!r}; allowed: true or false")
        if render_mode not in (None, "rgb_array"):
            raise ValueError(f"render_mode={render_mode!r}; allowed: None, 'rgb_array'")
        try:
            self.autoreset_mode = AutoresetMode(autoreset_mode)
        except ValueError:
            allowed = ", ".join(m.value for m in AutoresetMode)
            raise ValueError(f"autoreset_mode={autoreset_mode!r}; allowed: {allowed}") from None
        self.metadata = {**self.metadata, "autoreset_mode": self.autoreset_mode}
        B = self.num_envs = int(num_envs)
        self.size = S = int(size)
        self.task_info = task_info
        self.cell_onehot = cell_onehot
        self.render_mode = render_mode
        self._max_steps_arg = None if max_steps is None else int(max_steps)
        comps = self._per_env(composition, "composition", (str, Composition))
        seeds = self._per_env(layout_seed, "layout_seed", (int, np.integer, type(None)))
        self.compositions = [validate_composition(c) for c in comps]
        self.layout_seeds = [_check_seed(s) for s in seeds]
        self._layouts = _Layouts(S)
        self._rngs: list[np.random.Generator | None] = [None] * B

        # observation layout (as CompoGridEnv.gen_obs)
        self._agent_at = N_ENT * PER_ENTITY
        self._front_at = self._agent_at + 6
        self._prog_at = self._front_at + N_ENT + 2
        self._instr_at = self._prog_at + MAX_LEN + 1
        self._cell_at = self._instr_at + MAX_LEN * len(PRIMITIVES)
        self.obs_dim = self._cell_at + (2 * S if cell_onehot else 0)
        self.single_observation_space = gym.spaces.Box(-1.0, 1.0, (self.obs_dim,), np.float32)
        self.single_action_space = gym.spaces.Discrete(len(ACTIONS))
        self.observation_space = gym.vector.utils.batch_space(self.single_observation_space, B)
        self.action_space = gym.vector.utils.batch_space(self.single_action_space, B)

        # state
        self.grid = np.zeros((B, S, S), dtype=np.int8)
        self.ent_pos = np.zeros((B, N_ENT, 2), dtype=np.int64)
        self.on_grid = np.zeros((B, N_ENT), dtype=bool)
        self.carried = np.full(B, -1, dtype=np.int64)
        self.door_open = np.zeros(B, dtype=bool)
        self.agent_pos = np.zeros((B, 2), dtype=np.int64)
        self.agent_dir = np.zeros(B, dtype=np.int64)
        self.step_count = np.zeros(B, dtype=np.int64)
        self.max_steps = np.zeros(B, dtype=np.int64)
        self.progress = np.zeros(B, dtype=np.int64)
        self.comp = np.full((B, MAX_LEN), PAD, dtype=np.int64)
        self.comp_len = np.zeros(B, dtype=np.int64)
        self._needs_reset = np.ones(B, dtype=bool)  # NEXT_STEP autoreset
        self._walls = self._wall_templates()
        self._b = np.arange(B)
        self._all = np.ones(B, dtype=bool)
        self._cell0 = self._b * S * S  # env i's first cell in grid.reshape(-1)
        self._obj_codes = np.arange(2, 2 + N_ENT - 1, dtype=np.int8)
        self._xy = np.stack(np.divmod(np.arange(S * S), S), axis=1)  # flat cell -> (x, y)
        self._step = DX * S + DY  # flat offset of the faced cell, per direction
        self._dxy = np.stack([DX, DY], axis=1)
        # per env: the composition padded with PAD (so progress indexes it up to MAX_LEN),
        # 1 / length, and the observation's instruction tokens (zeros with task_info="reward")
        self._comp_pad = np.full((B, MAX_LEN + 1), PAD, dtype=np.int64)
        self._row5 = self._b * (MAX_LEN + 1)
        self._inv_len = np.zeros(B)
        self._instr = np.zeros((B, MAX_LEN * len(PRIMITIVES)), dtype=np.float32)
        self._obs_tables()
        for i in range(B):
            self._set_task(i, Task(self.compositions[i], self.layout_seeds[i]))

    # -- construction helpers -------------------------------------------------------------------------
    def _per_env(self, value: Any, name: str, scalar: tuple) -> list:
        if isinstance(value, scalar):
            return [value] * self.num_envs
        if isinstance(value, Sequence) and not isinstance(value, str):
            if len(value) != self.num_envs:
                raise ValueError(
                    f"{name} has {len(value)} entries for num_envs={self.num_envs}; "
                    "allowed: one value, or one per env"
                )
            return list(value)
        if name == "layout_seed":
            _check_seed(value)
        raise ValueError(f"{name}={value!r}; allowed: one value, or a list of one per env")

    def _wall_templates(self) -> np.ndarray:
        """(S, S, S) grids of walls, one per door row, door cell holding the door's code."""
        S = self.size
        out = np.zeros((S, S, S), dtype=np.int8)
        for door_y in range(1, S - 1):
            g = out[door_y]
            g[0, :] = g[-1, :] = g[:, 0] = g[:, -1] = WALL
            g[S - 3, 1 : S - 1] = WALL
            g[S - 3, door_y] = DOOR_CODE
        return out

    def _set_task(self, i: int, task: Task) -> None:
        c = validate_composition(task.composition)
        self.compositions[i] = c
        self.layout_seeds[i] = _check_seed(task.layout_seed)
        self.comp[i] = PAD
        self.comp[i, : len(c)] = [PRIMITIVE_INDEX[p] for p in c]
        self.comp_len[i] = len(c)
        self._comp_pad[i, :MAX_LEN] = self.comp[i]
        self._inv_len[i] = 1.0 / len(c)
        self._instr[i] = 0.0
        if self.task_info == "instruction":
            self._instr[i, np.arange(len(c)) * len(PRIMITIVES) + self.comp[i, : len(c)]] = 1.0
        self.max_steps[i] = self._max_steps_arg or 5 * self.size * len(c)

    # -- reset ------------------------------------------------------------------------------------------
    def reset(self, *, seed: int | Sequence[int | None] | None = None, options: dict | None = None):
        options = dict(options or {})
        B = self.num_envs
        mask = options.pop("reset_mask", None)
        mask = np.ones(B, dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
        if mask.shape != (B,):
            raise ValueError(f"reset_mask has shape {mask.shape}; allowed: ({B},)")
        if seed is None:
            seeds = [None] * B
        elif isinstance(seed, int | np.integer):
            seeds = [int(seed) + i for i in range(B)]  # as SyncVectorEnv does
        else:
            seeds = list(seed)
            if len(seeds) != B:
                raise ValueError(f"reset got {len(seeds)} seeds for num_envs={B}")
        tasks = options.pop("tasks", None) or {}
        replay = options.pop("replay", None) or {}
        if "task" in options:  # one task for every reset env
            task = options.pop("task")
            tasks = {i: task for i in range(B)}
        if options:
            raise ValueError(
                f"unknown reset options {sorted(options)}; allowed: reset_mask, tasks, task, replay"
            )
        idx, idx_seeds = [], []
        for i in np.flatnonzero(mask).tolist():
            if i in replay:
                task, s, _actions = replay[i]
                self._set_task(i, task)
                idx_seeds.append(s)
            else:
                if i in tasks:
                    self._set_task(i, tasks[i])
                idx_seeds.append(seeds[i])
            idx.append(i)
        self._reset_many(idx, idx_seeds)
        if replay:
            self._replay({i: r[2] for i, r in replay.items() if mask[i]})
        self._needs_reset[idx] = False
        obs = self._obs()
        return obs, self._info(mask)

    def _reset_many(self, idx: Sequence[int], seeds: Sequence[int | None]) -> None:
        """Reset envs ``idx`` (seeding env ``idx[j]``'s generator with ``seeds[j]`` when given):
        layouts drawn per env in Python, state written for all of them at once."""
        door_ys, cells, dirs = [], [], []
        for i, seed in zip(idx, seeds, strict=True):
            seed = _check_seed(seed, "seed")
            if seed is not None:
                self._rngs[i] = np.random.default_rng(seed)
            elif self._rngs[i] is None:
                self._rngs[i] = np.random.default_rng()
            ls = self.layout_seeds[i]
            door_y, c, d = (
                self._layouts.for_seed(ls) if ls is not None else self._layouts.draw(self._rngs[i])
            )
            door_ys.append(door_y)
            cells.append(c)
            dirs.append(d)
        if not door_ys:
            return
        i = np.asarray(idx, dtype=np.int64)
        # (n, N_ENT + 1): the seven entities' flat cells, then the agent's
        cells = np.array(cells, dtype=np.int64)
        xy = self._xy.take(cells, axis=0)
        self.grid[i] = self._walls[door_ys]
        objs = cells[:, : N_ENT - 1] + (i * self.size**2)[:, None]
        self.grid.reshape(-1)[objs] = self._obj_codes
        self.ent_pos[i] = xy[:, :-1]
        self.on_grid[i] = True
        self.carried[i] = -1
        self.door_open[i] = False
        self.agent_pos[i] = xy[:, -1]
        self.agent_dir[i] = dirs
        self.step_count[i] = 0
        self.progress[i] = 0

    def _replay(self, actions: dict[int, Sequence[int]]) -> None:
        B = self.num_envs
        longest = max((len(a) for a in actions.values()), default=0)
        for t in range(longest):
            act = np.full(B, -1, dtype=np.int64)  # -1: not stepped
            for i, a in actions.items():
                if t < len(a):
                    act[i] = int(a[t])
            self._advance(act, act >= 0)

    # -- dynamics ---------------------------------------------------------------------------------------
    def _advance(self, a: np.ndarray, live: np.ndarray) -> np.ndarray:
        """MiniGrid's step and CompoGrid's sub-task checks for every env with ``live`` set
        (actions ``a``; others must hold -1 and are left unchanged); returns the rewards."""
        S, gf = self.size, self.grid.reshape(-1)  # a view: writes land in self.grid
        d, pos, carried = self.agent_dir, self.agent_pos, self.carried
        here = self._cell0 + pos[:, 0] * S + pos[:, 1]
        cell = here + self._step.take(d)
        fcode = gf.take(cell)
        fxy = pos + self._dxy.take(d, axis=0)
        before_carried = carried.copy()
        # -1 (not stepped) indexes the table's last action row
        o = _OUTCOME.take(a * _A_STRIDE + fcode * 4 + (before_carried >= 0) * 2 + self.door_open)
        # turn
        d += _TURN.take(a)
        d &= 3
        # forward: into an empty cell or the open door
        k = (o == _MOVE).nonzero()[0]
        if k.size:
            pos[k] = fxy[k]
            here[k] = cell[k]
        # pickup: a portable entity in front, hands empty
        k = (o == _PICKUP).nonzero()[0]
        if k.size:
            e = fcode[k] - 2
            carried[k] = e
            gf[cell[k]] = EMPTY
            self.on_grid[k, e] = False
        # drop: an empty cell in front, something carried
        k = (o == _DROP).nonzero()[0]
        if k.size:
            c = before_carried[k]
            gf[cell[k]] = c + 2
            self.ent_pos[k, c] = fxy[k]
            self.on_grid[k, c] = True
            carried[k] = -1
        # toggle: the door opens/closes; a box is replaced by its (empty) contents
        toggled = o == _TOGGLE
        self.door_open ^= toggled
        k = (o == _OPEN_BOX).nonzero()[0]
        if k.size:
            gf[cell[k]] = EMPTY
            self.on_grid[k, fcode[k] - 2] = False
        self.step_count += live

        # sub-tasks: only the next one in order is checked; several can complete in one step
        on = self.on_grid
        flags = self.door_open + toggled * 2 + on[:, BOX_I[0]] * 4 + on[:, BOX_I[1]] * 8
        holds = (
            _GOTO_BITS.take(gf.take(here + self._step.take(d)))
            | _CARRY_BITS.take(before_carried * (N_PORTABLE + 1) + carried + (N_PORTABLE + 2))
            | _FLAG_BITS.take(flags)
        ) * live
        progress = self.progress
        reward = np.zeros(self.num_envs)
        for _ in range(MAX_LEN):  # PAD past the composition's end: done stays 0 there
            done = holds >> self._comp_pad.take(self._row5 + progress) & 1
            if not done.any():
                break
            progress = progress + done
            reward += done * self._inv_len
        self.progress[:] = progress
        return reward

    def step(self, actions):
        B = self.num_envs
        a = np.asarray(actions).astype(np.int64).reshape(-1)
        if a.shape != (B,):
            raise ValueError(f"step got {a.size} actions for num_envs={B}")
        if (a.view(np.uint64) >= len(ACTIONS)).any():  # negatives read as huge
            bad = int(a[(a < 0) | (a >= len(ACTIONS))][0])
            raise ValueError(f"action={bad}; allowed: 0..{len(ACTIONS) - 1}")
        auto = self.autoreset_mode == AutoresetMode.NEXT_STEP and self._needs_reset.any()
        if auto:
            ended = np.flatnonzero(self._needs_reset)
            self._reset_many(ended.tolist(), [None] * len(ended))
            live = ~self._needs_reset
            a = np.where(live, a, -1)
        else:
            live = self._all
        reward = self._advance(a, live)
        term = live & (self.progress == self.comp_len)
        trunc = live & (self.step_count >= self.max_steps) & ~term
        if auto:
            self._needs_reset[:] = False
        obs = self._obs()
        info = self._info(self._all)
        done = term | trunc
        if self.autoreset_mode == AutoresetMode.NEXT_STEP:
            self._needs_reset = done
        elif self.autoreset_mode == AutoresetMode.SAME_STEP and done.any():
            info["final_obs"] = np.where(done[:, None], obs, 0.0).astype(np.float32)
            info["_final_obs"] = done
            info["final_info"] = {k: v.copy() for k, v in info.items() if not k.startswith("final")}
            info["_final_info"] = done
            ended = np.flatnonzero(done)
            self._reset_many(ended.tolist(), [None] * len(ended))
            obs = self._obs()
            fresh = self._info(done)
            for k in ("success", "progress", "phi"):
                info[k] = np.where(done.reshape(-1, *[1] * (info[k].ndim - 1)), fresh[k], info[k])
        return obs, reward, term, trunc, info

    # -- observations -----------------------------------------------------------------------------------
    def _obs_tables(self) -> None:
        """Lookup tables for ``_obs``: every feature is a function of a few small integers."""
        S, W, M = self.size, float(self.size - 1), 2 * self.size - 1
        # an entity's features relative to the agent, by 4 * ((dx + S - 1) * M + dy + S - 1) +
        # dir, with dx, dy its offset from the agent; the last row (index -1): off the grid
        dx, dy, d = (v.reshape(-1) for v in np.mgrid[1 - S : S, 1 - S : S, 0:4])
        f, r = dx * DX[d] + dy * DY[d], dy * DX[d] - dx * DY[d]  # ahead, to the right
        rel = np.zeros((dx.size + 1, PER_ENTITY))
        rel[:-1, 0] = 1.0
        rel[:-1, 4], rel[:-1, 5] = f / W, r / W
        rel[:-1, 7], rel[:-1, 8], rel[:-1, 9] = np.sign(f), np.sign(r), (f == 1) & (r == 0)
        self._rel = rel.astype(np.float32)
        # its absolute features, by its key 4 * (x * M + y); -1: removed, -2: carried
        x, y = np.divmod(np.arange(S * M), M)
        absolute = np.zeros((4 * S * M + 2, PER_ENTITY))
        absolute[: 4 * S * M : 4, 2], absolute[: 4 * S * M : 4, 3] = x / W, y / W
        absolute[-2, 1] = 1.0
        self._abs = absolute.astype(np.float32)
        self._off = -1 - np.eye(N_ENT + 1, N_ENT, dtype=np.int64)  # by carried (-1: last row)
        self._key = np.array([4 * M, 4])  # entity (x, y) -> its key
        # by the agent's 4 * (x * S + y) + dir: what the entity key is offset by in ``_rel``,
        # its position and direction features, and the cell it faces
        ax, ay, d = (v.reshape(-1) for v in np.mgrid[0:S, 0:S, 0:4])
        self._rel_at = 4 * ((S - 1) * M + S - 1 - ax * M - ay) + d
        self._agent = np.zeros((ax.size, 6), dtype=np.float32)
        self._agent[:, 0], self._agent[:, 1] = ax / W, ay / W
        self._agent[np.arange(ax.size), 2 + d] = 1.0
        self._faced = ax * S + ay + self._step[d]
        # by the faced cell's code: the front one-hot (an entity, then wall, then empty)
        self._front = np.eye(N_ENT + 2, dtype=np.float32)[[N_ENT + 1, N_ENT, *range(N_ENT)]]
        self._prog = np.eye(MAX_LEN + 1, dtype=np.float32)
        self._cell = np.zeros((S * S, 2 * S), dtype=np.float32)  # the agent's cell one-hots
        self._cell[np.arange(S * S), ax[::4]] = self._cell[np.arange(S * S), S + ay[::4]] = 1.0

    def _obs(self) -> np.ndarray:
        """``CompoGridEnv.gen_obs`` for every env: (B, obs_dim) float32, from lookups."""
        B, S = self.num_envs, self.size
        on, pos = self.on_grid, self.agent_pos
        at = (pos[:, 0] * S + pos[:, 1]) * 4 + self.agent_dir
        key = self.ent_pos @ self._key
        pe = self._rel.take(np.where(on, key + self._rel_at.take(at)[:, None], -1), axis=0)
        pe += self._abs.take(np.where(on, key, self._off.take(self.carried, axis=0)), axis=0)
        pe[:, DOOR_I, 6] = self.door_open  # the door is always on the grid
        code = self.grid.reshape(-1).take(self._cell0 + self._faced.take(at))
        parts = [
            pe.reshape(B, -1),
            self._agent.take(at, axis=0),
            self._front.take(code, axis=0),
            self._prog.take(self.progress, axis=0),
            self._instr,
        ]
        if self.cell_onehot:
            parts.append(self._cell.take(at >> 2, axis=0))
        return np.concatenate(parts, axis=1)

    def phi(self) -> np.ndarray:
        """``CompoGridEnv.phi`` for every env: (B, 11) int64."""
        return np.concatenate(
            [
                self.agent_pos,
                (self.carried + 1)[:, None],
                self.on_grid.astype(np.int64),
                self.door_open.astype(np.int64)[:, None],
            ],
            axis=1,
        )

    def _info(self, mask: np.ndarray) -> dict:
        m = np.asarray(mask, dtype=bool)
        if m.all():
            return {
                "success": self.progress == self.comp_len,
                "_success": m.copy(),
                "progress": self.progress.copy(),
                "_progress": m.copy(),
                "phi": self.phi(),
                "_phi": m.copy(),
            }
        return {
            "success": np.where(m, self.progress == self.comp_len, False),
            "_success": m.copy(),
            "progress": np.where(m, self.progress, 0),
            "_progress": m.copy(),
            "phi": np.where(m[:, None], self.phi(), 0),
            "_phi": m.copy(),
        }

    # -- the reference env, for rendering and checks ------------------------------------------------
    def env_at(self, i: int, env: CompoGridEnv | None = None) -> CompoGridEnv:
        """A ``CompoGridEnv`` holding env ``i``'s current state (into ``env`` if given)."""
        from minigrid.core.grid import Grid
        from minigrid.core.world_object import Ball, Door, Key, Wall

        from envs.grid import DOOR_COLOR, Box

        S = self.size
        if env is None:
            env = CompoGridEnv(
                composition=self.compositions[i], task_info=self.task_info, size=S,
                max_steps=self._max_steps_arg, layout_seed=self.layout_seeds[i],
                render_mode="rgb_array", cell_onehot=self.cell_onehot,
            )  # fmt: skip
            env.reset(seed=0)
        env.set_task(Task(self.compositions[i], self.layout_seeds[i]))
        env.mission = str(self.compositions[i])
        grid = Grid(S, S)
        objects: dict[str, Any] = {}
        for x in range(S):
            for y in range(S):
                if self.grid[i, x, y] == WALL:
                    grid.set(x, y, Wall())
        for e, name in enumerate(ENTITIES):
            if name == DOOR:
                obj = Door(DOOR_COLOR, is_open=bool(self.door_open[i]), is_locked=False)
            else:
                color, kind = name.split()
                obj = {"ball": Ball, "key": Key, "box": Box}[kind](color)
            objects[name] = obj
            if self.on_grid[i, e]:
                x, y = (int(v) for v in self.ent_pos[i, e])
                grid.set(x, y, obj)
                obj.cur_pos = np.array([x, y])
            elif e == self.carried[i]:
                obj.cur_pos = np.array([-1, -1])
        env.grid = grid
        env.objects = objects
        env.carrying = objects[ENTITIES[self.carried[i]]] if self.carried[i] >= 0 else None
        env.agent_pos = (int(self.agent_pos[i, 0]), int(self.agent_pos[i, 1]))
        env.agent_dir = int(self.agent_dir[i])
        env.step_count = int(self.step_count[i])
        env.max_steps = int(self.max_steps[i])
        env.progress = int(self.progress[i])
        return env

    def render(self) -> tuple[np.ndarray, ...] | None:
        if self.render_mode != "rgb_array":
            return None
        return tuple(self.env_at(i).render() for i in range(self.num_envs))
