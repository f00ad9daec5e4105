"""``compo trace`` and ``compo graph``: look inside a trained agent.

The trace runs one trial through the method's own ``trial_policy`` and the shared collector;
whatever the policy reports per step in ``StepOutput.extras`` (for the compositional agent:
the active skill, the composer weights and the termination probability) is recorded, so the
trace needs no second implementation of the policy.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch

from envs.core import Composition, Task
from envs.grid import PRIMITIVE_INDEX, PRIMITIVES
from experiments.registry import REGISTRY
from rl.collect import Collector, PolicyWrapper, make_vector_env
from rl.io import atomic_write_bytes, atomic_write_json, prepare_run_dir
from rl.train import load_module


class _Recorder(PolicyWrapper):
    """Wraps a policy: renders the env before each step and keeps the policy's extras."""

    def __init__(self, inner, envs, render: bool) -> None:
        super().__init__(inner)
        self.envs, self.render = envs, render
        self.frames: list[np.ndarray] = []
        self.steps: list[dict] = []
        self.subtasks: list[int] = []

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
            self.frames.append(env.render())
        out = self.inner.step(obs, memory, prev)
        if hasattr(env, "progress") and hasattr(env, "composition"):
            c = env.composition
            self.subtasks.append(PRIMITIVE_INDEX[c[env.progress]] if env.progress < len(c) else -1)
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
) -> dict:
    """Write ``trace.json``, ``trace.png`` and ``trace.gif`` for one trial on ``composition``;
    for an agent with skills, also the normalised mutual information between the active skill
    and the current sub-task over ``nmi_episodes`` held-out episodes (``skill_subtask_nmi``)."""
    if nmi_episodes < 0:
        raise ValueError(f"nmi_episodes={nmi_episodes}; allowed: an integer >= 0")
    module = load_module(checkpoint, REGISTRY)
    cfg = module.cfg
    comp = Composition.parse(composition)
    if episodes < 1:
        raise ValueError(f"episodes={episodes}; allowed: >= 1")
    grid = cfg.env_id == "CompoGrid-v0"
    kwargs = {**cfg.env_kwargs, "composition": comp}
    if grid:
        kwargs["render_mode"] = "rgb_array"
    envs = make_vector_env(cfg.env_id, 1, kwargs)  # validates the composition
    out = prepare_run_dir(out, overwrite=overwrite)
    torch.manual_seed(seed)
    policy, hook = module.trial_policy(envs)
    rec = _Recorder(policy, envs, render=grid)
    rewards: list[float] = []
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
    atomic_write_json(out / "trace.json", doc)
    _plot_trace(doc, out / "trace.png")
    if rec.frames:
        _write_gif(rec.frames[:n], steps, out / "trace.gif")
    return doc


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
        self.rows.append((out.extras["skill"].numpy().copy(), sub))
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
    return {
        "nmi": round(nmi(skills, subs), 4),
        "episodes": n * E,
        "steps": int(valid.sum()),
        "normalisation": "arithmetic mean of the entropies",
    }


def _plot_trace(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = doc["steps"]
    if steps and "skill" in steps[0] and "decision" in steps[0]:
        return _plot_skill_trace(doc, path, plt)
    t = np.arange(len(steps))
    fig, axes = plt.subplots(2, 1, figsize=(11, 4.9), sharex=True)
    ax = axes[0]
    names = ACTION_NAMES
    acts = [s["action"] if np.isscalar(s["action"]) else np.linalg.norm(s["action"]) for s in steps]
    ax.plot(t, acts, ".", ms=4)
    if all(np.isscalar(s["action"]) for s in steps):
        ax.set_yticks(range(len(names)))
        ax.set_yticklabels(names, fontsize=7)
    ax.set_ylabel("action")
    ax.set_title(f"{doc['method']}: actions — {doc['composition']}")
    _reward_row(axes[1], doc, t)
    _episode_lines(axes, steps, doc)
    fig.tight_layout()
    _save(fig, path, plt)


ACTION_NAMES = ["left", "right", "forward", "pickup", "drop", "toggle"]


def _plot_skill_trace(doc: dict, path: Path, plt) -> None:
    """One coloured bar per segment (the skill that ran alone), the current sub-task under it,
    decisions, episode boundaries and successes, and the reward."""
    steps = doc["steps"]
    t = np.arange(len(steps))
    K = len(steps[0]["alpha"])
    names = [n or f"skill {k}" for k, n in enumerate(doc.get("skill_names") or [None] * K)]
    sk = np.array([s["skill"] for s in steps])
    # the current sub-task is drawn on the row of the skill named after its primitive (the
    # supervised library: skill k = primitive k; discovered: the skill whose outcome it is)
    by_name = {}
    for k, n in enumerate(names):
        by_name.setdefault(n, k)
    sub = np.array(
        [by_name.get(str(PRIMITIVES[v]), -1) if v >= 0 else -1 for v in
         (s.get("subtask", -1) for s in steps)]
    )  # fmt: skip
    used = sorted(set(sk.tolist()) | {v for v in sub.tolist() if v >= 0})
    row = {k: i for i, k in enumerate(used)}
    fig, axes = plt.subplots(
        2, 1, figsize=(12, 1.2 + 0.32 * len(used) + 2.2), sharex=True,
        gridspec_kw={"height_ratios": [max(2, 0.32 * len(used)), 1.3]},
    )  # fmt: skip
    ax = axes[0]
    cmap = plt.get_cmap("tab20")
    start = 0
    for i in range(1, len(steps) + 1):
        if i == len(steps) or steps[i]["decision"]:
            k = int(sk[start])
            ax.barh(row[k], i - start, left=start - 0.5, height=0.7, color=cmap(k % 20))
            start = i
    ok = sub >= 0
    ax.plot(
        t[ok], [row.get(int(v), np.nan) for v in sub[ok]], "k_", ms=6, mew=1.5,
        label="current sub-task (on the row of the skill named after it)",
    )  # fmt: skip
    dec = [i for i, s in enumerate(steps) if s["decision"]]
    ax.plot(dec, [row[int(sk[i])] + 0.45 for i in dec], "kv", ms=3, label="decision")
    ax.set_yticks(range(len(used)))
    ax.set_yticklabels([f"{k} {names[k]}" for k in used], fontsize=7)
    ax.invert_yaxis()
    ax.legend(loc="upper right", fontsize=7)
    title = f"{doc['method']}: one skill per segment — {doc['composition']}"
    if doc.get("skill_subtask_nmi"):
        title += f"  (skill/sub-task NMI {doc['skill_subtask_nmi']['nmi']:.2f} held-out)"
    ax.set_title(title, fontsize=9)
    _reward_row(axes[1], doc, t)
    _episode_lines(axes, steps, doc)
    fig.tight_layout()
    _save(fig, path, plt)


def _reward_row(ax, doc, t) -> None:
    ax.bar(t, [s["reward"] for s in doc["steps"]], color="tab:green", width=1.0)
    ax.set_ylabel("reward")
    ax.set_xlabel("env step in trial")


def _episode_lines(axes, steps, doc) -> None:
    """Episode boundaries, and each episode's outcome written above the first row."""
    bounds = [0] + [
        i for i in range(1, len(steps)) if steps[i]["episode"] != steps[i - 1]["episode"]
    ]
    for a in axes:
        for i in bounds[1:]:
            a.axvline(i - 0.5, color="k", ls="--", lw=0.8)
    ends = bounds[1:] + [len(steps)]
    for ep, (b0, b1) in zip(doc["episodes"], zip(bounds, ends)):
        mark = "success" if ep["success"] else "fail"
        axes[-1].text((b0 + b1) / 2, 0.97, f"ep {ep['index']}: {mark}", fontsize=7, ha="center",
                     va="top", transform=axes[-1].get_xaxis_transform(),
                     color="tab:green" if ep["success"] else "tab:red")  # fmt: skip


def _save(fig, path: Path, plt) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def _write_gif(frames: list[np.ndarray], steps: list[dict], path: Path) -> None:
    import imageio.v3 as iio

    small = [f[::4, ::4] for f in frames]  # 640 px -> 160 px keeps the GIF small
    buf = io.BytesIO()
    iio.imwrite(buf, np.stack(small), extension=".gif", duration=120, loop=0)
    atomic_write_bytes(path, buf.getvalue())


def run_graph(checkpoint: str | Path, out: str | Path, *, overwrite: bool = False) -> None:
    """``graph.png`` and ``graph.graphml`` of a compositional agent's skill-transition graph."""
    module = load_module(checkpoint, REGISTRY)
    if module.method != "compositional":
        raise ValueError(
            f"checkpoint holds method {module.method!r}; the skill graph needs 'compositional'"
        )
    from compositional.graph import write_graph

    out = prepare_run_dir(out, overwrite=overwrite)
    write_graph(module, out)
