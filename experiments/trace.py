"""``compo trace`` and ``compo graph``: look inside a trained agent.

The trace runs one trial through the method's own ``trial_policy`` and the shared collector;
whatever the policy reports per step in ``StepOutput.extras`` (for the compositional agent:
the active skill, the composer weights and the termination probability) is recorded, so the
trace needs no second implementation of the policy.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from envs.core import Composition, Task
from envs.grid import PRIMITIVE_INDEX, PRIMITIVES
from experiments.registry import REGISTRY
from experiments.trace_pictures import GIF_TILE, plot_trace, write_gif
from rl.collect import Collector, PolicyWrapper, make_vector_env
from rl.io import atomic_write_json, prepare_run_dir
from rl.protocol import EVAL_LIMITS
from rl.train import load_module


class _Recorder(PolicyWrapper):
    """Wraps a policy: renders the env before each step and keeps the policy's extras."""

    def __init__(self, inner, envs, render: bool) -> None:
        super().__init__(inner)
        self.envs, self.render = envs, render
        self.frames: list[np.ndarray] = []
        self.steps: list[dict] = []
        self.subtasks: list[int] = []
        self.progress: list[int] = []

    def _env(self):
        """Env 0 as a reference env: the batched CompoGrid loads its state into one (it is the
        renderer); a per-env vector env holds it."""
        if hasattr(self.envs, "env_at"):
            self._ref = self.envs.env_at(0, getattr(self, "_ref", None))
            return self._ref
        return self.envs.envs[0].unwrapped

    def step(self, obs, memory, prev):
        env = self._env()
        if self.render:
            # no highlight: the agent sees the whole room (MiniGrid would shade a 7x7 view cone)
            self.frames.append(env.get_frame(highlight=False, tile_size=GIF_TILE))
        out = self.inner.step(obs, memory, prev)
        if hasattr(env, "progress") and hasattr(env, "composition"):
            c = env.composition
            self.subtasks.append(PRIMITIVE_INDEX[c[env.progress]] if env.progress < len(c) else -1)
            self.progress.append(int(env.progress))
        row = {"action": _round(out.action[0].tolist()), "value": round(float(out.value[0]), 4)}
        for k, v in out.extras.items():
            if v[0].numel() > 32:
                continue  # internal state (e.g. recurrent inputs kept for the update), not a trace
            row[k] = _round(v[0].tolist())
        if hasattr(env, "agent_pos"):
            row["agent"] = [int(env.agent_pos[0]), int(env.agent_pos[1])]
        self.steps.append(row)
        return out


def _round(x):
    if isinstance(x, float):
        return round(x, 4)
    if isinstance(x, list):
        return [_round(v) for v in x]
    return x


def run_trace(
    checkpoint: str | Path,
    composition: str,
    out: str | Path,
    *,
    seed: int = 0,
    episodes: int = 2,
    layout_seed: int = 0,
    overwrite: bool = False,
    nmi_episodes: int = 200,
    log=print,
) -> list[Path]:
    """Write ``trace.json``, ``trace.png`` and ``trace.gif`` (CompoGrid only) for one trial on
    ``composition`` (pictures: ``experiments.trace_pictures``); for an agent with skills, also
    the normalised mutual information between the active skill and the current sub-task over
    ``nmi_episodes`` held-out episodes (``skill_subtask_nmi``). Returns the paths written."""
    if not 0 <= nmi_episodes <= EVAL_LIMITS["num_tasks"]:
        raise ValueError(
            f"--nmi-episodes {nmi_episodes}; allowed: an integer in [0, {EVAL_LIMITS['num_tasks']}]"
        )
    if not 1 <= episodes <= EVAL_LIMITS["episodes"]:
        raise ValueError(
            f"--episodes {episodes}; allowed: an integer in [1, {EVAL_LIMITS['episodes']}]"
        )
    if layout_seed < 0 or seed < 0:
        raise ValueError(f"--layout-seed {layout_seed}, --seed {seed}; allowed: integers >= 0")
    module = load_module(checkpoint, REGISTRY)
    cfg = module.cfg
    comp = Composition.parse(composition)
    grid = cfg.env_id == "CompoGrid-v0"
    kwargs = {**cfg.env_kwargs, "composition": comp}
    if grid:
        kwargs["render_mode"] = "rgb_array"
    envs = make_vector_env(cfg.env_id, 1, kwargs)  # validates the composition
    out = prepare_run_dir(out, overwrite=overwrite)
    torch.manual_seed(seed)
    policy, hook = module.trial_policy(envs)
    rec = _Recorder(policy, envs, render=grid)
    col = Collector(envs, rec, episodes_per_trial=episodes, seed=seed, on_episode_end=hook)
    ro = col.collect_trials([Task(comp, layout_seed)])
    envs.close()
    n = int(ro.valid.sum())
    rewards = ro.rewards[:n, 0].tolist()
    ep_index = ro.episode_index[:n, 0].tolist()
    steps = rec.steps[:n]
    for i, s in enumerate(steps):
        s["reward"] = rewards[i]
        s["episode"] = ep_index[i]
        if i < len(rec.subtasks):
            s["subtask"] = rec.subtasks[i]
            s["progress"] = rec.progress[i]  # sub-tasks completed before this step
    doc = {
        "checkpoint": str(checkpoint),
        "method": module.method,
        "composition": str(comp),
        "layout_seed": layout_seed,
        "episodes": [
            {"index": e.episode_index, "return": e.ret, "success": e.success, "length": e.length}
            for e in ro.episodes
        ],
        "steps": steps,
        # what each skill is (supervised library: its primitive), else None
        "skill_names": module.skill_names() if hasattr(module, "skill_names") else None,
    }
    if steps and "alpha" in steps[0]:  # the composer's mean weight at the trial's decisions
        dec = [s["alpha"] for s in steps if s.get("decision", True)]
        doc["alpha_mean"] = _round(np.mean(dec, axis=0).tolist())
    if steps and "skill" in steps[0] and grid and nmi_episodes > 0:
        doc["skill_subtask_nmi"] = skill_subtask_nmi(module, nmi_episodes, seed)
        nmi = doc["skill_subtask_nmi"]
        log(
            f"normalised mutual information between active skill and current sub-task: "
            f"{nmi['nmi']:.3f} over {nmi['episodes']} held-out episodes ({nmi['steps']} steps)"
        )
        if "nmi_at_decisions" in nmi:
            log(
                f"at the {nmi['decisions']} decisions: NMI between chosen skill and sub-task "
                f"{nmi['nmi_at_decisions']:.3f}; composer entropy {nmi['pointer_entropy_nats']:.3f} "
                f"nats, top choice's probability {nmi['pointer_top_probability']:.3f}"
            )
    paths = [out / "trace.json", out / "trace.png"]
    atomic_write_json(paths[0], doc)
    plot_trace(doc, paths[1])
    if rec.frames:
        paths.append(out / "trace.gif")
        write_gif(rec.frames[:n], doc, paths[2])
    return paths


def nmi(x: np.ndarray, y: np.ndarray) -> float:
    """Normalised mutual information I(X; Y) / ((H(X) + H(Y)) / 2) of two discrete sequences
    (the arithmetic normalisation, scikit-learn's default); 0 if either is constant."""
    x, y = np.asarray(x), np.asarray(y)
    _, xi = np.unique(x, return_inverse=True)
    _, yi = np.unique(y, return_inverse=True)
    joint = np.zeros((xi.max() + 1, yi.max() + 1))
    np.add.at(joint, (xi, yi), 1.0)
    p = joint / joint.sum()
    px, py = p.sum(1), p.sum(0)

    def h(q):
        q = q[q > 0]
        return float(-(q * np.log(q)).sum())

    hx, hy = h(px), h(py)
    if hx == 0 or hy == 0:
        return 0.0
    nz = p > 0
    mi = float((p[nz] * np.log(p[nz] / np.outer(px, py)[nz])).sum())
    return mi / ((hx + hy) / 2)


class _SkillRecorder(PolicyWrapper):
    """Keeps (active skill, current sub-task) of every step of a batch of trials."""

    def __init__(self, inner, compositions: list[Composition]) -> None:
        super().__init__(inner)
        self.comps = compositions
        self.rows: list[tuple[np.ndarray, np.ndarray]] = []

    def step(self, obs, memory, prev):
        from compositional.controller import progress_of

        out = self.inner.step(obs, memory, prev)
        pos = progress_of(obs).numpy()
        sub = np.array([PRIMITIVE_INDEX[c[min(p, len(c) - 1)]] for c, p in zip(self.comps, pos)])
        ex = out.extras
        dec = ex["decision"].numpy().copy() if "decision" in ex else None
        alpha = ex["alpha"].numpy().copy() if "alpha" in ex else None
        self.rows.append((ex["skill"].numpy().copy(), sub, dec, alpha))
        return out


def skill_subtask_nmi(module, episodes: int, seed: int = 0) -> dict:
    """NMI between the active skill and the current sub-task over ``episodes`` held-out
    episodes (trials of the module's ``episodes_per_trial`` on the held-out compositions of its
    own split, one env per task, the batched env)."""
    import envs as families
    from rl.protocol import heldout_tasks

    cfg = module.cfg
    split = families.make_split(cfg.split_family, seed=cfg.split_seed)
    E = int(getattr(cfg, "episodes_per_trial", 1))
    n = max(1, -(-episodes // E))
    tasks = heldout_tasks(split.heldout, n, seed, split.meta.get("heldout_layout_seeds"))
    venv = make_vector_env(cfg.env_id, n, {**cfg.env_kwargs, "composition": tasks[0].composition})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        policy, hook = module.trial_policy(venv)
        rec = _SkillRecorder(policy, [t.composition for t in tasks])
        ro = Collector(
            venv, rec, episodes_per_trial=E, seed=seed, on_episode_end=hook
        ).collect_trials(tasks)
    venv.close()
    valid = ro.valid.numpy()
    skills = np.stack([r[0] for r in rec.rows])[valid]
    subs = np.stack([r[1] for r in rec.rows])[valid]
    doc = {
        "nmi": round(nmi(skills, subs), 4),
        "episodes": n * E,
        "steps": int(valid.sum()),
        "normalisation": "arithmetic mean of the entropies",
    }
    if rec.rows and rec.rows[0][2] is not None and rec.rows[0][3] is not None:
        # where the step-level NMI is lost: the choices themselves (the sub-task at each
        # decision against the skill chosen) and how spread the composer's choice is
        dec = np.stack([r[2] for r in rec.rows])[valid]
        alpha = np.stack([r[3] for r in rec.rows])[valid][dec]
        ent = -(alpha * np.log(np.clip(alpha, 1e-12, 1.0))).sum(-1)
        doc["nmi_at_decisions"] = round(nmi(skills[dec], subs[dec]), 4)
        doc["decisions"] = int(dec.sum())
        doc["pointer_entropy_nats"] = round(float(ent.mean()), 4)
        doc["pointer_top_probability"] = round(float(alpha.max(-1).mean()), 4)
    names = module.skill_names() if hasattr(module, "skill_names") else None
    per_sub = {}
    for s in np.unique(subs):  # the skills that ran during each sub-task, by share of its steps
        k, cnt = np.unique(skills[subs == s], return_counts=True)
        top = np.argsort(-cnt, kind="stable")[:3]
        per_sub[str(PRIMITIVES[s])] = [
            [int(k[i]), names[k[i]] if names else None, round(float(cnt[i] / cnt.sum()), 3)]
            for i in top
        ]
    doc["skills_per_subtask"] = per_sub
    return doc


def run_graph(checkpoint: str | Path, out: str | Path, *, overwrite: bool = False) -> list[Path]:
    """``graph.png`` and ``graph.graphml`` of a compositional agent's skill-transition graph
    (with ``graph="state"`` on CompoGrid also ``state_graph.png``, what its network predicts
    in each situation); returns the paths written."""
    module = load_module(checkpoint, REGISTRY)
    if module.method != "compositional":
        raise ValueError(
            f"checkpoint holds method {module.method!r}; the skill graph needs 'compositional'"
        )
    from compositional.graph import write_graph, write_state_graph

    out = prepare_run_dir(out, overwrite=overwrite)
    written = write_graph(module, out)
    paths = [Path(written["png"]), Path(written["graphml"])]
    if module.graph.mode == "state" and not module.family.continuous:
        paths.append(Path(write_state_graph(module, out)))  # what the network predicts
    return paths
