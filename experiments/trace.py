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
) -> dict:
    """Write ``trace.json``, ``trace.png`` and ``trace.gif`` for one trial on ``composition``."""
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
    if steps and "alpha" in steps[0]:  # the composer's mean weight per skill over the trial
        doc["alpha_mean"] = _round(np.mean([s["alpha"] for s in steps], axis=0).tolist())
    atomic_write_json(out / "trace.json", doc)
    _plot_trace(doc, out / "trace.png")
    if rec.frames:
        _write_gif(rec.frames[:n], steps, out / "trace.gif")
    return doc


def _plot_trace(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = doc["steps"]
    t = np.arange(len(steps))
    has_alpha = steps and "alpha" in steps[0]
    rows = 3 if has_alpha else 2
    fig, axes = plt.subplots(rows, 1, figsize=(11, 2.2 * rows + 0.5), sharex=True)
    ax = axes[0]
    if has_alpha:
        alpha = np.array([s["alpha"] for s in steps]).T
        # colour range up to the largest weight (at least 2/K) so that structure near uniform shows
        vmax = max(float(alpha.max()), 2.0 / alpha.shape[0])
        im = ax.imshow(
            alpha, aspect="auto", cmap="viridis", vmin=0, vmax=vmax, interpolation="nearest"
        )
        ax.set_ylabel("skill")
        ax.set_yticks(range(alpha.shape[0]))
        if doc.get("skill_names"):
            ax.set_yticklabels([f"{n} {name}" for n, name in enumerate(doc["skill_names"])])
        ax.tick_params(axis="y", labelsize=6)
        ax.set_title(f"{doc['method']}: composer weights over skills — {doc['composition']}")
        fig.colorbar(im, ax=list(axes), pad=0.01, fraction=0.03, label="alpha")
        if "skill" in steps[0]:
            ax.plot(t, [s["skill"] for s in steps], "w.", ms=3, label="active skill")
            ax.legend(loc="upper right", fontsize=7)
        ax = axes[1]
        if "termination" in steps[0]:
            ax.plot(t, [s["termination"] for s in steps], color="tab:red", lw=1)
            ax.set_ylabel("termination p")
            ax.set_ylim(-0.02, 1.02)
        ax = axes[2]
    else:
        acts = [
            s["action"] if np.isscalar(s["action"]) else np.linalg.norm(s["action"]) for s in steps
        ]
        ax.plot(t, acts, ".", ms=3)
        ax.set_ylabel("action")
        ax.set_title(f"{doc['method']}: actions — {doc['composition']}")
        ax = axes[1]
    ax.bar(t, [s["reward"] for s in steps], color="tab:green", width=1.0)
    ax.set_ylabel("reward")
    ax.set_xlabel("step in trial")
    for a in axes:
        for i in range(1, len(steps)):
            if steps[i]["episode"] != steps[i - 1]["episode"]:
                a.axvline(i - 0.5, color="k", ls="--", lw=0.8)
    if not has_alpha:
        fig.tight_layout()
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
