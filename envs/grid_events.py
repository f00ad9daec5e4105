"""CompoGrid's object-centric outcome features, read off the observation vector.

CompoGrid is fully observable and its observation (``CompoGridEnv.gen_obs``) carries every
object's on-grid and carried flags, the door state and the entity the agent faces, so what a
step or a skill *did to objects* is a function of two observations. These functions work on
numpy arrays and torch tensors alike, on any leading batch shape, and are what skills
terminate on, what skill discovery discriminates and what the controller reads as a skill's
outcome.

- ``object_state(obs)``: (..., 22) = on-grid x7, carried x7, door open, faced entity x7: a
  compact, discrete description of the objects (no agent position).
- ``completed(obs0, obs1)``: (..., 19) bool, which primitives of ``envs.grid.PRIMITIVES`` the
  step (or segment) obs0 -> obs1 completes, by the env's own completion rules
  (``CompoGridEnv._completed``).
- ``events(obs0, obs1)``: the completions that are *changes* (a goto that starts facing a new
  entity, a pickup of a new object, ...): a skill's outcome.
- ``feasible(obs)``: (..., 19) bool, primitives that can still complete from this state.
"""

from __future__ import annotations

import numpy as np
import torch

from envs.grid import BOXES, DOOR, ENTITIES, MAX_LEN, PER_ENTITY, PORTABLE, PRIMITIVES

N_ENT = len(ENTITIES)
FRONT_AT = N_ENT * PER_ENTITY + 6  # front-cell one-hot: 7 entities, wall, other
DOOR_I = ENTITIES.index(DOOR)
_V = {v: i for i, v in enumerate(("goto", "pickup", "drop", "open", "toggle"))}
PRIM_VERB = np.array([_V[p.verb] for p in PRIMITIVES])
PRIM_OBJ = np.array([ENTITIES.index(p.obj) for p in PRIMITIVES])
NUM_PRIMITIVES = len(PRIMITIVES)
_VERB_T, _OBJ_T = torch.as_tensor(PRIM_VERB), torch.as_tensor(PRIM_OBJ)


#: where the observation's task part starts (progress one-hot, then the instruction tokens)
TASK_AT = FRONT_AT + N_ENT + 2
TASK_END = TASK_AT + (MAX_LEN + 1) + MAX_LEN * NUM_PRIMITIVES


def task_free(obs):
    """``obs`` with its task part (sub-task progress and instruction tokens) zeroed: what a
    skill sees, so the same library serves reward and instruction mode and no skill can key on
    the task."""
    out = obs.clone() if isinstance(obs, torch.Tensor) else obs.copy()
    out[..., TASK_AT:TASK_END] = 0
    return out


def _lib(x):
    return torch if isinstance(x, torch.Tensor) else np


def _parts(obs):
    """on-grid (..., 7), carried (..., 7), door open (...), faced entity one-hot (..., 7)."""
    ent = obs[..., : N_ENT * PER_ENTITY].reshape(*obs.shape[:-1], N_ENT, PER_ENTITY)
    on = ent[..., 0] > 0.5
    carried = ent[..., 1] > 0.5
    door = ent[..., DOOR_I, 6] > 0.5
    front = obs[..., FRONT_AT : FRONT_AT + N_ENT] > 0.5
    return on, carried, door, front


def object_state(obs):
    """(..., 22) float: on-grid x7, carried x7, door open, faced entity x7 (one-hot or zeros)."""
    on, carried, door, front = _parts(obs)
    xp = _lib(obs)
    cat = xp.cat if xp is torch else np.concatenate
    return cat([on, carried, door[..., None], front], -1) * 1.0


def completed(obs0, obs1):
    """(..., 19) bool: the primitives the transition obs0 -> obs1 completes (env rules)."""
    return _completed(_parts(obs0), _parts(obs1), _lib(obs0))


def outcomes(obs0, obs1):
    """``(completed(obs0, obs1), events(obs0, obs1), feasible(obs1))`` with each observation
    read once (the acting policies' hot path)."""
    xp = _lib(obs0)
    p0, p1 = _parts(obs0), _parts(obs1)
    comp = _completed(p0, p1, xp)
    return comp, comp & ~_completed(p0, p0, xp), _feasible(p1, xp)


def _cat(xp, parts):
    return torch.cat(parts, -1) if xp is torch else np.concatenate(parts, -1)


def _completed(p0, p1, xp):
    # PRIMITIVES order (asserted below): goto x7, pickup x4, drop x4, open box x2, open door,
    # toggle door; slices instead of per-primitive selects keep this a handful of ops
    _, car0, door0, _ = p0
    on1, car1, door1, front1 = p1
    P = len(PORTABLE)
    return _cat(
        xp,
        [
            front1,
            car1[..., :P],
            car0[..., :P] & on1[..., :P],
            ~on1[..., P : N_ENT - 1],
            door1[..., None],
            (door0 != door1)[..., None],
        ],
    )


def events(obs0, obs1):
    """(..., 19) bool: completions that are changes of the object state (a skill's outcome)."""
    return completed(obs0, obs1) & ~completed(obs0, obs0)


def feasible(obs):
    """(..., 19) bool: primitives that can complete from this state (a goto needs its entity on
    the grid, a pickup its object on the grid, a drop that object carried, an open its box on
    the grid or the door closed; toggling the door is always possible)."""
    return _feasible(_parts(obs), _lib(obs))


def _feasible(p, xp):
    on, carried, door, _ = p
    P = len(PORTABLE)
    ones = (door | ~door)[..., None]
    return _cat(
        xp,
        [on, on[..., :P], carried[..., :P], on[..., P : N_ENT - 1], ~door[..., None], ones],
    )


# the observation layout this module reads (portable objects first, boxes after them)
assert tuple(ENTITIES[: len(PORTABLE)]) == tuple(PORTABLE) and set(BOXES) < set(ENTITIES)
assert ENTITIES[-1] == DOOR and tuple(ENTITIES[len(PORTABLE) : -1]) == tuple(BOXES)
assert [(p.verb, p.obj) for p in PRIMITIVES] == (
    [("goto", e) for e in ENTITIES]
    + [("pickup", e) for e in PORTABLE]
    + [("drop", e) for e in PORTABLE]
    + [("open", e) for e in (*BOXES, DOOR)]
    + [("toggle", DOOR)]
)
