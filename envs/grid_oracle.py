"""CompoGrid's scripted oracle: breadth-first planning over the reference env's grid.

``Oracle`` is told the composition and solves it (the reference row ``oracle`` and the skills
the tests script); ``approach_states`` is the set of cells facing an entity, which the batched
env's feasibility check mirrors. Split out of ``envs/grid.py``; ``envs.grid`` re-exports both.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

import gymnasium as gym

from envs.core import Primitive
from envs.grid import _DIRS, BOXES, ENTITIES, PORTABLE, CompoGridEnv


def _passable(env: CompoGridEnv, x: int, y: int, blocked: tuple[int, int] | None = None) -> bool:
    if (x, y) == blocked:
        return False
    cell = env.grid.get(x, y)
    return cell is None or cell.can_overlap()


def _shortest(start, successors, goal) -> list | None:
    """Breadth-first search: the shortest action list from ``start`` to a state where
    ``goal(state)`` holds ([] if ``start`` does), or None; ``successors(state)`` lists
    ``(next_state, action)`` pairs."""
    if goal(start):
        return []
    prev = {start: None}
    queue = deque([start])
    while queue:
        s = queue.popleft()
        for t, a in successors(s):
            if t in prev:
                continue
            prev[t] = (s, a)
            if goal(t):
                path = []
                while prev[t] is not None:
                    t, a = prev[t]
                    path.append(a)
                return path[::-1]
            queue.append(t)
    return None


def _bfs(env: CompoGridEnv, goal, blocked=None, start=None):
    """Shortest action sequence over (x, y, dir) until ``goal(x, y, dir)`` holds, or None."""
    start = start or (int(env.agent_pos[0]), int(env.agent_pos[1]), int(env.agent_dir))

    def successors(s):
        x, y, d = s
        dx, dy = _DIRS[d]
        nxt = [((x, y, (d - 1) % 4), 0), ((x, y, (d + 1) % 4), 1)]
        if _passable(env, x + dx, y + dy, blocked):
            nxt.append(((x + dx, y + dy, d), 2))
        return nxt

    return _shortest(start, successors, lambda s: goal(*s))


def approach_states(env: CompoGridEnv, name: str, blocked=None) -> list | None:
    """A path to face entity ``name`` (None if unreachable; [] if already facing it)."""
    cell = env.entity_cell(name)
    if cell is None:
        return None

    def facing(x, y, d):
        return (x + _DIRS[d][0], y + _DIRS[d][1]) == cell

    return _bfs(env, facing, blocked=blocked)


def _clearing_path(env: CompoGridEnv, name: str, removable: dict) -> list | None:
    """Shortest path to face entity ``name`` when objects in the way may be removed.

    ``removable`` maps a cell to the action that takes its object off the grid: 3 (pickup, at
    most one, and only with empty hands) or 5 (toggle: opening a box replaces it by nothing).
    BFS over (x, y, dir, removed cells); None if ``name`` is not on the grid or unreachable.
    """
    cell = env.entity_cell(name)
    if cell is None:
        return None
    x, y = int(env.agent_pos[0]), int(env.agent_pos[1])
    start = (x, y, int(env.agent_dir), frozenset())
    hands_free = env.carrying is None

    def facing(s):
        return (s[0] + _DIRS[s[2]][0], s[1] + _DIRS[s[2]][1]) == cell

    def successors(s):
        x, y, d, gone = s
        front = (x + _DIRS[d][0], y + _DIRS[d][1])
        nxt = [((x, y, (d - 1) % 4, gone), 0), ((x, y, (d + 1) % 4, gone), 1)]
        if front in gone or _passable(env, *front):
            nxt.append(((*front, d, gone), 2))
        act = removable.get(front)
        if act is not None and front not in gone:
            held = any(removable[c] == 3 for c in gone)
            if act == 5 or (hands_free and not held):
                nxt.append(((x, y, d, gone | {front}), act))
        return nxt

    return _shortest(start, successors, facing)


class Oracle:
    """Scripted BFS planner that solves any feasible CompoGrid composition.

    It reads the unwrapped env's state, plans the shortest path to face the target of the next
    sub-task, and drops a carried object only where every remaining object stays reachable.
    The path may clear the way by picking up or opening an object in it when that cannot spoil
    the rest of the composition (see ``_removable``): the env allows it, so a planner that
    treats every object as a wall is not the shortest.

    Examples:
        >>> import gymnasium as gym, envs
        >>> env = gym.make("CompoGrid-v0", composition="pickup(red ball) > open(door)")
        >>> obs, info = env.reset(seed=0)
        >>> oracle = Oracle()
        >>> done = False
        >>> while not done:
        ...     obs, r, term, trunc, info = env.step(oracle.act(env))
        ...     done = term or trunc
        >>> info["success"]
        True
    """

    def act(self, env: gym.Env) -> int:
        e: CompoGridEnv = env.unwrapped
        return self.act_for(e, e.composition[e.progress :])

    def act_for(self, env: gym.Env, rest: Sequence[Primitive]) -> int:
        """The next action towards completing the sub-tasks ``rest`` in order (for planners that
        hold their own belief about the composition, e.g. an ideal observer)."""
        e: CompoGridEnv = env.unwrapped
        if not rest:
            return 0
        p = rest[0]
        carried = e.carried_name()
        if p.verb == "drop" or (p.verb == "pickup" and carried is not None):
            return self._drop(e)
        if p.verb == "toggle" or p.verb == "open":
            return self._face_then(e, p.obj, 5, rest)
        if p.verb == "pickup":
            return self._face_then(e, p.obj, 3, rest)
        return self._face_then(e, p.obj, None, rest)

    @staticmethod
    def _removable(e: CompoGridEnv, rest: Sequence[Primitive]) -> dict:
        """Cells whose object the oracle may take off the grid on its way: no remaining sub-task
        names it; a box is opened (5); a portable object is picked up (3) only with empty hands
        and no pickup/drop left (a carried object must never be in the way of those)."""
        named = {q.obj for q in rest}
        may_carry = e.carrying is None and all(q.verb not in ("pickup", "drop") for q in rest)
        out = {}
        for n in (*PORTABLE, *BOXES):
            cell = e.entity_cell(n)
            if cell is None or n in named:
                continue
            if n in BOXES:
                out[cell] = 5
            elif may_carry:
                out[cell] = 3
        return out

    @staticmethod
    def _face_then(
        e: CompoGridEnv, name: str, action: int | None, rest: Sequence[Primitive]
    ) -> int:
        path = approach_states(e, name)
        removable = Oracle._removable(e, rest)
        if removable:
            short = _clearing_path(e, name, removable)
            if short is not None and (path is None or len(short) < len(path)):
                path = short
        if path is None:
            raise RuntimeError(f"oracle: {name!r} unreachable in layout\n{e.pprint_grid()}")
        if path:
            return path[0]
        # already facing the target: ``goto`` is checked only after a step, so take one that
        # keeps facing it (drop does nothing while the front cell is occupied)
        return action if action is not None else 4

    @staticmethod
    def _safe_drop_cell(e: CompoGridEnv, cell: tuple[int, int]) -> bool:
        x, y = cell
        if e.grid.get(x, y) is not None or x >= e.width - 3:  # keep the corridor free
            return False
        return all(
            approach_states(e, n, blocked=cell) is not None
            for n in ENTITIES
            if e.entity_cell(n) is not None
        )

    def _drop(self, e: CompoGridEnv) -> int:
        def good(x, y, d):
            fx, fy = x + _DIRS[d][0], y + _DIRS[d][1]
            return self._safe_drop_cell(e, (fx, fy))

        path = _bfs(e, good)
        if path is None:
            raise RuntimeError(f"oracle: nowhere safe to drop\n{e.pprint_grid()}")
        return path[0] if path else 4
