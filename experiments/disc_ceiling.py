"""How well can *any* K skills be told apart on CompoGrid? A ceiling for DIAYN's accuracy.

``python -m experiments.disc_ceiling [--num-skills 12] [--steps N] [--num-envs 8] [--epochs E]
[--family cells|objects] [--seed S] [--out FILE.json] [--set KEY=VALUE ...]``

Issue #4 asks DIAYN (method ``discovery``) for discriminator accuracy >= 0.9 with K = 12; the
learned skills reach 0.18-0.26 and ``experiments.disc_probe`` shows the skills overlap. This
script replaces the learned skills by *hand-scripted, maximally distinct* ones and measures the
accuracy a discriminator reaches on them under the same protocol:

* the envs are the ``discovery`` method's own: a ``DiscoveryModule`` is built from the
  ``DiscoveryConfig`` (defaults, ``--set`` overrides) and its ``make_collector`` gives the
  collector: same env id and kwargs, train compositions (hence episode lengths 80-120 steps,
  and early termination if a composition happens to complete), a new random layout and start
  cell every episode, ``num_envs`` envs. Only the acting policy is swapped;
* a skill k ~ uniform is drawn at every episode start and held, as ``SkillPolicy`` does;
* the discriminator input is ``PhiEncoder.for_env`` of ``info["phi"]`` of every step's next
  state, the classifier a fresh ``primitives.discovery.Discriminator`` trained to convergence.

Scripted families (``--family``):

* ``cells``: the room's interior cells are cut into K contiguous *zones* (a serpentine over the
  columns cut into equal runs: for K = 12 in the 4 x 6 room of ``size=8``, vertical dominoes).
  Skill k walks (BFS over (x, y, direction) on the unwrapped env's grid, ``envs.grid._bfs``) to
  its zone's *target* cell and parks there with a no-op action (``drop`` with empty hands). If
  the target is occupied by an object or unreachable, it parks on the free reachable cell of its
  own zone nearest to the target, else on the nearest free reachable cell of the room.
* ``objects``: skill k first picks up portable object ``k mod 4`` (the oracle's approach path),
  then parks as above in zone ``k // 4`` of ``ceil(K / 4)`` zones (``pickup`` is then the
  no-op), so phi's ``carried`` entry separates four groups of skills.

The report (held-out = episodes of the last ``--test-envs`` envs, fitted on the others, as in
``disc_probe``, because states of one episode share layout and start):

* ``heldout_accuracy``, ``train_accuracy`` of the fresh discriminator;
* ``heldout_accuracy_by_step``: the same by step index within the episode (0-4, 5-9, 10-19,
  20+), with each bin's share of held-out steps: transit steps are where skills overlap;
* ``counting_*``: the Bayes-optimal-by-counting classifier, a lookup table of the most frequent
  skill per distinct phi seen in training (``counting_train_accuracy`` is the best accuracy any
  classifier of phi can reach on those states); on held-out states with a phi never seen in
  training it falls back to the discriminator (``counting_heldout_coverage`` says how often not);
* ``reached_target`` / ``reached_goal``: share of finished episodes whose final state is the
  skill's target (``objects``: also carrying its object) / its chosen (possibly fallback) cell.

If even these skills stay below 0.9, the target is unreachable under this protocol; if they
pass it, the shortfall is DIAYN's optimisation.
"""

from __future__ import annotations

import argparse
import math
from collections import Counter, defaultdict

import numpy as np
import torch
from torch import nn

from rl.collect import Prev, StepOutput

FAMILIES = ("cells", "objects")
#: step-index bins (within the episode) of the accuracy breakdown: [lo, hi) pairs
STEP_BINS = ((0, 5), (5, 10), (10, 20), (20, None))
# action indices of CompoGrid (envs.grid.ACTIONS)
_FORWARD, _PICKUP, _DROP = 2, 3, 4


# --- scripted skills -------------------------------------------------------------------------------


def room_cells(size: int) -> list[tuple[int, int]]:
    """Interior cells of CompoGrid's room (left of the inner wall), in a column serpentine:
    consecutive cells are neighbours, so equal runs of it are contiguous zones."""
    wall_x = size - 3  # as in CompoGridEnv._gen_grid
    cells = []
    for j, x in enumerate(range(1, wall_x)):
        ys = range(1, size - 1) if j % 2 == 0 else range(size - 2, 0, -1)
        cells += [(x, y) for y in ys]
    return cells


def make_zones(size: int, n: int) -> list[list[tuple[int, int]]]:
    """``n`` contiguous zones of (nearly) equal size covering the room."""
    cells = room_cells(size)
    if not 1 <= n <= len(cells):
        raise ValueError(
            f"{n} zones for a room of {len(cells)} cells (size={size}); "
            f"allowed: 1 .. {len(cells)} zones"
        )
    bounds = np.linspace(0, len(cells), n + 1).round().astype(int)
    return [cells[bounds[i] : bounds[i + 1]] for i in range(n)]


class ScriptedSkills:
    """Hand-scripted skills as a ``RolloutPolicy`` (acts by reading the unwrapped envs).

    Skill memory follows ``primitives.discovery.SkillPolicy``: k ~ uniform at a trial start
    (``reset_memory``) and again when ``prev.done`` (trials of several episodes). Per-step
    extras: ``skill``, ``goal_x``/``goal_y`` (the cell it heads for), ``goal_is_target``.

    Args:
        envs: a *sync* vector env of CompoGrid (``envs.envs[i].unwrapped`` is read).
        num_skills: K.
        family: 'cells' or 'objects' (see the module docstring).
    """

    def __init__(self, envs, num_skills: int, family: str = "cells") -> None:
        from envs.grid import PORTABLE

        if family not in FAMILIES:
            raise ValueError(f"family={family!r}; allowed: {', '.join(FAMILIES)}")
        self.envs = envs
        self.k = int(num_skills)
        self.family = family
        size = int(envs.envs[0].unwrapped.width)
        n_zones = self.k if family == "cells" else math.ceil(self.k / len(PORTABLE))
        self.zones = make_zones(size, n_zones)
        self.room = room_cells(size)
        self.n_objects = len(PORTABLE)
        self.objects = [PORTABLE[s % self.n_objects] for s in range(self.k)]

    # -- what skill k wants --------------------------------------------------------------------------
    def zone_of(self, skill: int) -> list[tuple[int, int]]:
        return self.zones[skill if self.family == "cells" else skill // self.n_objects]

    def target(self, skill: int) -> tuple[int, int]:
        """The cell skill ``skill`` parks on when it is free: the middle of its zone."""
        zone = self.zone_of(skill)
        return zone[len(zone) // 2]

    def goal(self, e, skill: int) -> tuple[int, int]:
        """The cell to park on now: the target, else the nearest free reachable cell of the
        zone, else of the room (by Manhattan distance to the target, then a fixed order)."""
        reach = reachable_cells(e)
        tx, ty = self.target(skill)
        zone = set(self.zone_of(skill))
        cands = [c for c in self.room if c in reach]
        if not cands:  # boxed in: stay
            return int(e.agent_pos[0]), int(e.agent_pos[1])
        return min(
            cands,
            key=lambda c: (c not in zone, abs(c[0] - tx) + abs(c[1] - ty), self.room.index(c)),
        )

    def act(self, e, skill: int) -> tuple[int, tuple[int, int]]:
        """(action, goal cell) of skill ``skill`` in the unwrapped env ``e``."""
        from envs.grid import _bfs, approach_states

        if self.family == "objects":
            name = self.objects[skill]
            carried = e.carried_name()
            if carried is None and e.entity_cell(name) is not None:
                path = approach_states(e, name)
                if path is not None:
                    cell = e.entity_cell(name)
                    return (path[0] if path else _PICKUP), cell
        g = self.goal(e, skill)
        path = _bfs(e, lambda x, y, d: (x, y) == g)
        if path:
            return path[0], g
        # parked: an action that changes nothing (drop with empty hands, pickup when carrying)
        return (_PICKUP if e.carrying is not None else _DROP), g

    # -- RolloutPolicy -------------------------------------------------------------------------------
    def _draw(self, n: int) -> torch.Tensor:
        return torch.randint(self.k, (n,))

    def initial_memory(self, n: int) -> torch.Tensor:
        return self._draw(n)

    def reset_memory(self, memory: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        memory = memory.clone()
        idx = torch.nonzero(mask).squeeze(-1)
        memory[idx] = self._draw(idx.numel())
        return memory

    def step(self, obs: torch.Tensor, memory: torch.Tensor, prev: Prev) -> StepOutput:
        skill = memory.clone()
        new_ep = torch.nonzero(prev.done > 0).squeeze(-1)
        if new_ep.numel():
            skill[new_ep] = self._draw(new_ep.numel())
        n = skill.numel()
        action = torch.zeros(n, dtype=torch.long)
        gx, gy = torch.zeros(n, dtype=torch.long), torch.zeros(n, dtype=torch.long)
        is_target = torch.zeros(n, dtype=torch.bool)
        for i in range(n):
            e = self.envs.envs[i].unwrapped
            k = int(skill[i])
            a, g = self.act(e, k)
            action[i], gx[i], gy[i] = a, g[0], g[1]
            is_target[i] = g == self.target(k)
        zeros = torch.zeros(n)
        extras = {"skill": skill.clone(), "goal_x": gx, "goal_y": gy, "goal_is_target": is_target}
        return StepOutput(action, zeros, zeros, skill, extras)

    def bootstrap_value(self, obs: torch.Tensor, memory: torch.Tensor, prev: Prev) -> torch.Tensor:
        return torch.zeros(obs.shape[0])


def reachable_cells(e) -> set[tuple[int, int]]:
    """Cells the agent can stand on and reach from where it is (flood fill over passable
    cells, ``envs.grid._passable``)."""
    from envs.grid import _passable

    start = (int(e.agent_pos[0]), int(e.agent_pos[1]))
    seen = {start}
    stack = [start]
    while stack:
        x, y = stack.pop()
        for dx, dy in ((1, 0), (-1, 0), (0, 1), (0, -1)):
            c = (x + dx, y + dy)
            if c not in seen and _passable(e, *c):
                seen.add(c)
                stack.append(c)
    return seen


# --- the measurement --------------------------------------------------------------------------------


def _step_index(episode_start: torch.Tensor) -> torch.Tensor:
    """(T, N) step index within the episode (the rollout starts with fresh episodes)."""
    idx = torch.zeros(episode_start.shape, dtype=torch.long)
    for t in range(episode_start.shape[0]):
        idx[t] = torch.where(episode_start[t], 0, idx[t - 1] + 1) if t else 0
    return idx


def _acc(pred: torch.Tensor, k: torch.Tensor) -> float | None:
    return float((pred == k).float().mean()) if k.numel() else None


def ceiling(
    num_skills: int = 12,
    steps: int = 1024,
    num_envs: int | None = None,
    test_envs: int = 2,
    epochs: int = 100,
    hidden: int = 128,
    seed: int = 0,
    family: str = "cells",
    overrides: dict | None = None,
) -> dict:
    """Roll out the scripted skills and fit a fresh discriminator (see the module docstring).

    Args:
        num_skills: K.
        steps: vector steps of the rollout (``steps * num_envs`` states).
        num_envs: envs of the collector (None: the config's).
        test_envs: the last ``test_envs`` envs' episodes are held out.
        epochs: passes of the fresh discriminator over its training states.
        hidden: its width.
        seed: seeds torch, numpy and the collector.
        family: 'cells' or 'objects'.
        overrides: ``DiscoveryConfig`` keys (nested dicts for nested keys).

    Returns:
        The report dict.
    """
    from experiments.disc_probe import fit_discriminator, split_by_env
    from primitives.discovery import DiscoveryModule
    from rl.config import merge

    for name, v in (("steps", steps), ("epochs", epochs), ("hidden", hidden)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}={v!r}; allowed: an integer >= 1")
    if family not in FAMILIES:
        raise ValueError(f"family={family!r}; allowed: {', '.join(FAMILIES)}")
    raw = merge(dict(overrides or {}), {"num_skills": num_skills, "seed": seed})
    if num_envs is not None:
        raw["num_envs"] = num_envs
    raw.setdefault("vectorization", "sync")  # the scripted skills read the env objects
    module = DiscoveryModule(raw)  # validates the config (num_skills >= 1, ...); seeds torch
    cfg = module.cfg
    if not cfg.env_id.startswith("CompoGrid"):
        raise ValueError(f"env_id={cfg.env_id!r}; allowed: a CompoGrid env (scripted skills)")
    if cfg.objective != "diayn":
        raise ValueError(f"objective={cfg.objective!r}; allowed: 'diayn' (the DIAYN protocol)")
    if cfg.vectorization != "sync":
        raise ValueError(
            f"vectorization={cfg.vectorization!r}; allowed: 'sync' (the script reads the envs)"
        )
    n = cfg.num_envs
    if not 1 <= test_envs < n:
        raise ValueError(
            f"test_envs={test_envs}; allowed: 1 .. num_envs - 1 = {n - 1} (num_envs={n})"
        )
    K = cfg.num_skills
    col = module.make_collector()
    try:
        col.policy = ScriptedSkills(col.envs, K, family)
        ro = col.collect(steps)
    finally:
        col.envs.close()
    phi, x, k, tr, te = split_by_env(module.trainer_.phi_encoder, ro, test_envs)
    step_idx = _step_index(ro.episode_start).reshape(-1)

    # a fresh discriminator, trained to convergence (as disc_probe's probe)
    disc = fit_discriminator(x, k, tr, K, hidden, epochs)
    with torch.no_grad():
        pred = disc(x).argmax(-1)
        final_loss = float(nn.functional.cross_entropy(disc(x[tr]), k[tr]))

    # Bayes-optimal by counting: the most frequent skill of each phi seen in training
    keys = [tuple(r) for r in phi.reshape(-1, phi.shape[-1]).tolist()]
    counts: dict[tuple, Counter] = defaultdict(Counter)
    for i in tr.tolist():
        counts[keys[i]][int(k[i])] += 1
    # ties broken towards the smaller skill index, deterministically
    table = {key: min(c, key=lambda s: (-c[s], s)) for key, c in counts.items()}
    count_pred = pred.clone()
    seen = torch.zeros(k.numel(), dtype=torch.bool)
    for i, key in enumerate(keys):
        if key in table:
            count_pred[i] = table[key]
            seen[i] = True

    by_step = []
    for lo, hi in STEP_BINS:
        m = (step_idx[te] >= lo) & (step_idx[te] < (hi if hi is not None else 1 << 62))
        by_step.append(
            {
                "steps": f"{lo}-{hi - 1}" if hi is not None else f"{lo}+",
                "share_of_heldout_steps": float(m.float().mean()),
                "heldout_accuracy": _acc(pred[te][m], k[te][m]),
                "counting_heldout_accuracy": _acc(count_pred[te][m], k[te][m]),
            }
        )

    # final state of every finished episode: on the skill's target / its chosen goal?
    done = (ro.terminated | ro.truncated).reshape(-1)
    fin = torch.nonzero(done).squeeze(-1)
    pol: ScriptedSkills = col.policy
    cell = phi.reshape(-1, phi.shape[-1])[:, :2]
    gx, gy = ro.extras["goal_x"].reshape(-1), ro.extras["goal_y"].reshape(-1)
    at_goal = (cell[fin, 0] == gx[fin]) & (cell[fin, 1] == gy[fin])
    tgt = torch.tensor([pol.target(int(s)) for s in k[fin]], dtype=torch.long).reshape(-1, 2)
    at_target = (cell[fin] == tgt).all(-1)
    if family == "objects":
        from envs.grid import ENTITIES

        want = torch.tensor([ENTITIES.index(pol.objects[int(s)]) + 1 for s in k[fin]])
        holds = phi.reshape(-1, phi.shape[-1])[fin, 2] == want
        at_goal, at_target = at_goal & holds, at_target & holds
    lengths = [ep.length for ep in ro.episodes]

    return {
        "family": family,
        "num_skills": K,
        "chance": 1.0 / K,
        "env_id": cfg.env_id,
        "env_kwargs": dict(cfg.env_kwargs),
        "num_envs": n,
        "steps": steps,
        "states": int(k.numel()),
        "test_envs": test_envs,
        "seed": seed,
        "epochs": epochs,
        "hidden": hidden,
        "episodes_finished": int(fin.numel()),
        "mean_episode_length": float(np.mean(lengths)) if lengths else None,
        "heldout_accuracy": _acc(pred[te], k[te]),
        "train_accuracy": _acc(pred[tr], k[tr]),
        "train_loss": final_loss,
        "heldout_accuracy_by_step": by_step,
        "counting_train_accuracy": _acc(count_pred[tr], k[tr]),
        "counting_heldout_accuracy": _acc(count_pred[te], k[te]),
        "counting_heldout_coverage": float(seen[te].float().mean()),
        "distinct_phi_in_training": len(table),
        "reached_target": float(at_target.float().mean()) if fin.numel() else None,
        "reached_goal": float(at_goal.float().mean()) if fin.numel() else None,
        "steps_heading_for_target": float(ro.extras["goal_is_target"].float().mean()),
        "targets": [list(pol.target(s)) for s in range(K)],
        "objects": pol.objects if family == "objects" else None,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num-skills", type=int, default=12, help="K")
    p.add_argument("--steps", type=int, default=1024, help="vector steps of the rollout")
    p.add_argument("--num-envs", type=int, default=None, help="envs (default: the config's, 8)")
    p.add_argument("--test-envs", type=int, default=2, help="envs whose episodes are held out")
    p.add_argument("--epochs", type=int, default=100, help="passes of the fresh discriminator")
    p.add_argument("--hidden", type=int, default=128, help="width of the fresh discriminator")
    p.add_argument("--family", choices=FAMILIES, default="cells", help="scripted skill family")
    a = parse_common_args(p, argv)
    try:
        rep = ceiling(
            a.num_skills, a.steps, a.num_envs, a.test_envs, a.epochs, a.hidden, a.seed,
            a.family, a.overrides,
        )  # fmt: skip
    except ValueError as e:
        raise SystemExit(f"disc_ceiling: error: {e}") from None
    bins = ", ".join(
        f"{b['steps']}: {b['heldout_accuracy']:.3f}"
        for b in rep["heldout_accuracy_by_step"]
        if b["heldout_accuracy"] is not None
    )
    print(
        f"{rep['family']} skills, K={rep['num_skills']} (chance {rep['chance']:.3f}), "
        f"{rep['states']} states, {rep['episodes_finished']} finished episodes: fresh "
        f"discriminator held-out {rep['heldout_accuracy']:.3f} (its training episodes "
        f"{rep['train_accuracy']:.3f}); counting held-out {rep['counting_heldout_accuracy']:.3f} "
        f"(train {rep['counting_train_accuracy']:.3f}); by step {bins}; reached target "
        f"{rep['reached_target']}, goal {rep['reached_goal']}"
    )
    write_report(a.out, rep)


def parse_common_args(p: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Add the arguments every discovery diagnostic shares (``--seed``, ``--out``, ``--set``),
    parse ``argv``; ``overrides`` holds the ``--set`` values as a nested dict."""
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="also write the report as JSON here")
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="override one DiscoveryConfig key (dotted for nested ones, YAML values)",
    )  # fmt: skip
    a = p.parse_args(argv)
    from experiments.cli import _overrides  # private, reused: the CLI's own --set syntax

    try:
        a.overrides = _overrides(a.set)
    except ValueError as e:
        p.error(str(e))  # one line, exit status 2
    return a


def write_report(out: str | None, rep: dict) -> None:
    """Write the report ``rep`` atomically as JSON to ``out`` (nothing if None)."""
    if out is not None:
        from rl.io import atomic_write_json

        atomic_write_json(out, rep)


if __name__ == "__main__":
    main()
