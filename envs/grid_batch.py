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
# primitive index -> (verb code, entity index)
_VERB_CODE = {"goto": 0, "pickup": 1, "drop": 2, "open": 3, "toggle": 4}
PRIM_VERB = np.array([_VERB_CODE[p.verb] for p in PRIMITIVES] + [0])  # last: padding
PRIM_OBJ = np.array([ENTITIES.index(p.obj) for p in PRIMITIVES] + [0])
PAD = len(PRIMITIVES)
_DXL, _DYL = DX.tolist(), DY.tolist()


def _check_seed(seed: Any, what: str = "layout_seed") -> int | None:
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ValueError(f"{what}={seed!r}; allowed: a non-negative integer or None")
    return int(seed)


class _Layouts:
    """``CompoGridEnv._gen_grid``'s draws, as plain numbers: (door_y, cells, dir), ``cells``
    a list of seven (x, y).

    ``cells`` are the six objects' cells in ``ENTITIES`` order then the agent's. The
    reachability test ("every entity can be approached, and the agent does not start facing
    one", which is what ``all(approach_states(...))`` checks) is a flood fill over bitmasks.
    """

    def __init__(self, size: int, cache: int = 4096) -> None:
        S = self.size = size
        self.wall_x = size - 3
        room = [(x, y) for x in range(1, self.wall_x) for y in range(1, size - 1)]
        # the cells objects and agent are drawn from, per door row (never in front of the door)
        self.free = {dy: [c for c in room if c != (self.wall_x - 1, dy)] for dy in range(1, S - 1)}
        self.bit = [[1 << (y * S + x) for y in range(S)] for x in range(S)]
        self.room_mask = sum(self.bit[x][y] for x, y in room)
        # cells from which a cell can be faced: its four neighbours
        self.near = [
            [
                sum(self.bit[x + dx][y + dy] for dx, dy in ((1, 0), (-1, 0), (0, 1), (0, -1)))
                if 0 < x < S - 1 and 0 < y < S - 1
                else 0
                for y in range(S)
            ]
            for x in range(S)
        ]
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
            cells = [free[i] for i in rng.choice(len(free), size=N_ENT, replace=False).tolist()]
            d = int(rng.integers(0, 4))
            if self._ok(cells, door_y, d):
                return door_y, cells, d
        raise RuntimeError(f"no layout with every object reachable for size={S}")

    def _ok(self, cells: list, door_y: int, d: int) -> bool:
        S, bit = self.size, self.bit
        ent = [*cells[:-1], (self.wall_x, door_y)]
        ax, ay = cells[-1]
        if (ax + _DXL[d], ay + _DYL[d]) in ent:
            return False  # already facing an entity: approach_states gives [] (falsy)
        passable = self.room_mask  # the room's empty cells (the corridor is behind the door)
        for x, y in cells[:-1]:
            passable &= ~bit[x][y]
        reach = bit[ax][ay]
        while True:  # flood fill; walls frame the room, so shifts never wrap into it
            grown = ((reach << 1 | reach >> 1 | reach << S | reach >> S) & passable) | reach
            if grown == reach:
                break
            reach = grown
        return all(reach & self.near[x][y] for x, y in ent)


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
        # (n, N_ENT, 2): the six objects' cells, then the agent's
        cells = np.array(cells, dtype=np.int64)
        objs = cells[:, :-1]
        self.grid[i] = self._walls[door_ys]
        self.grid[i[:, None], objs[:, :, 0], objs[:, :, 1]] = self._obj_codes
        self.ent_pos[i, :-1] = objs
        self.ent_pos[i, DOOR_I, 0] = self.size - 3
        self.ent_pos[i, DOOR_I, 1] = door_ys
        self.on_grid[i] = True
        self.carried[i] = -1
        self.door_open[i] = False
        self.agent_pos[i] = cells[:, -1]
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
    def _front_cell(self) -> np.ndarray:
        """Flat index (into ``grid.reshape(-1)``) of the cell each agent faces."""
        d, S = self.agent_dir, self.size
        return self._cell0 + (self.agent_pos[:, 0] + DX[d]) * S + self.agent_pos[:, 1] + DY[d]

    def _advance(self, a: np.ndarray, live: np.ndarray) -> np.ndarray:
        """MiniGrid's step and CompoGrid's sub-task checks for every env with ``live`` set
        (actions ``a``; others must hold -1 and are left unchanged); returns the rewards."""
        S, gf = self.size, self.grid.reshape(-1)  # a view: writes land in self.grid
        d = self.agent_dir
        fx, fy = self.agent_pos[:, 0] + DX[d], self.agent_pos[:, 1] + DY[d]
        cell = self._cell0 + fx * S + fy
        fcode = gf[cell].astype(np.int64)
        before_carried = self.carried.copy()
        before_door = self.door_open.copy()
        # turn
        np.remainder(d + (a == 1) - (a == 0), 4, out=d)
        # forward: into an empty cell or the open door
        m = (a == 2) & ((fcode == EMPTY) | ((fcode == DOOR_CODE) & self.door_open))
        if m.any():
            k = np.flatnonzero(m)
            self.agent_pos[k, 0] = fx[k]
            self.agent_pos[k, 1] = fy[k]
        # pickup: a portable entity in front, hands empty
        e = fcode - 2
        m = (a == 3) & (e >= 0) & (e < N_PORTABLE) & (before_carried < 0)
        if m.any():
            k = np.flatnonzero(m)
            self.carried[k] = e[k]
            gf[cell[k]] = EMPTY
            self.on_grid[k, e[k]] = False
        # drop: an empty cell in front, something carried
        m = (a == 4) & (fcode == EMPTY) & (before_carried >= 0)
        if m.any():
            k = np.flatnonzero(m)
            c = before_carried[k]
            gf[cell[k]] = c + 2
            self.ent_pos[k, c, 0] = fx[k]
            self.ent_pos[k, c, 1] = fy[k]
            self.on_grid[k, c] = True
            self.carried[k] = -1
        # toggle: the door opens/closes; a box is replaced by its (empty) contents
        toggle = a == 5
        if toggle.any():
            self.door_open ^= toggle & (fcode == DOOR_CODE)
            m = toggle & ((e == BOX_I[0]) | (e == BOX_I[1]))
            if m.any():
                k = np.flatnonzero(m)
                gf[cell[k]] = EMPTY
                self.on_grid[k, e[k]] = False
        self.step_count += live

        # sub-tasks: only the next one in order is checked; several can complete in one step
        front = gf[self._front_cell()].astype(np.int64) - 2
        L = self.comp_len
        door_changed = self.door_open != before_door
        reward = np.zeros(self.num_envs, dtype=np.float64)
        progress = self.progress
        for _ in range(MAX_LEN):
            p = self.comp[self._b, np.minimum(progress, MAX_LEN - 1)]
            verb, obj = PRIM_VERB[p], PRIM_OBJ[p]
            on = self.on_grid[self._b, obj]
            done = (
                ((verb == 0) & (front == obj))
                | ((verb == 1) & (self.carried == obj))
                | ((verb == 2) & (before_carried == obj) & on)
                | ((verb == 3) & np.where(obj == DOOR_I, self.door_open, ~on))
                | ((verb == 4) & door_changed)
            )
            done &= (progress < L) & live
            if not done.any():
                break
            progress = progress + done
            reward = np.where(done, reward + 1.0 / np.maximum(L, 1), reward)
        self.progress[:] = progress
        return reward

    def step(self, actions):
        B = self.num_envs
        a = np.asarray(actions).astype(np.int64).reshape(-1)
        if a.shape != (B,):
            raise ValueError(f"step got {a.size} actions for num_envs={B}")
        if ((a < 0) | (a >= len(ACTIONS))).any():
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
    def _obs(self) -> np.ndarray:
        """``CompoGridEnv.gen_obs`` for every env: (B, obs_dim) float32."""
        B, S = self.num_envs, self.size
        W = float(S - 1)
        out = np.zeros((B, self.obs_dim), dtype=np.float32)
        flat = out.reshape(-1)  # a view; env i's row starts at flat[row[i]]
        row = self._b * self.obs_dim
        ax, ay = self.agent_pos[:, 0], self.agent_pos[:, 1]
        d = self.agent_dir
        fx, fy = DX[d], DY[d]
        ex, ey = self.ent_pos[:, :, 0], self.ent_pos[:, :, 1]
        dx, dy = ex - ax[:, None], ey - ay[:, None]
        f = dx * fx[:, None] + dy * fy[:, None]  # ahead of the agent
        r = dy * fx[:, None] - dx * fy[:, None]  # to its right
        on = self.on_grid
        # the per-entity block, written in place: (B, N_ENT, PER_ENTITY), a view of ``out``
        pe = out[:, : N_ENT * PER_ENTITY].reshape(B, N_ENT, PER_ENTITY)
        pe[:, :, 0] = on
        pe[:, :, 1] = ~on & (self.carried[:, None] == np.arange(N_ENT))
        pe[:, :, 2] = ex * on / W  # an entity that is not on the grid reads 0
        pe[:, :, 3] = ey * on / W
        pe[:, :, 4] = f * on / W
        pe[:, :, 5] = r * on / W
        pe[:, DOOR_I, 6] = self.door_open  # the door is always on the grid
        pe[:, :, 7] = np.sign(f) * on
        pe[:, :, 8] = np.sign(r) * on
        pe[:, :, 9] = on & (f == 1) & (r == 0)
        i = self._agent_at
        out[:, i] = ax / W
        out[:, i + 1] = ay / W
        flat[row + i + 2 + d] = 1.0
        code = self.grid.reshape(-1)[self._cell0 + (ax + fx) * S + ay + fy]
        front = np.where(code >= 2, code - 2, np.where(code == WALL, N_ENT, N_ENT + 1))
        flat[row + self._front_at + front] = 1.0
        flat[row + self._prog_at + np.minimum(self.progress, MAX_LEN)] = 1.0
        if self.task_info == "instruction":
            k = np.arange(MAX_LEN)
            tokens = k * len(PRIMITIVES) + np.minimum(self.comp, PAD - 1)
            cols = row[:, None] + self._instr_at + tokens
            flat[cols[k[None, :] < self.comp_len[:, None]]] = 1.0
        if self.cell_onehot:
            flat[row + self._cell_at + ax] = 1.0
            flat[row + self._cell_at + S + ay] = 1.0
        return out

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
