"""``compo embed``: what a method's task memory encodes about held-out tasks.

Each held-out task gets one trial (``episodes`` episodes, through the method's own
``trial_policy`` and the shared collector). The task embedding is the policy's memory at the
last step of the trial — RL²'s hidden state, PEARL's posterior sample z, the compositional
controller's state — so nothing about the policy is reimplemented here. We draw PCA and t-SNE
maps coloured by the first primitive's verb and report how embedding distances correlate with
task distances (Pearson and Spearman over task pairs).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch

from envs.core import Composition
from experiments.registry import REGISTRY
from rl.collect import Collector, PolicyWrapper, make_vector_env
from rl.io import atomic_write_bytes, atomic_write_json, prepare_run_dir
from rl.protocol import heldout_tasks
from rl.train import load_module


def flatten_memory(memory, n: int) -> torch.Tensor:
    """(n, d) view of a policy memory: a (n, d) tensor, an RNN state (layers, n, h), or a tuple."""
    if memory is None:
        raise ValueError(
            "this method keeps no task memory; compo embed needs rl2, pearl or compositional"
        )
    if isinstance(memory, (tuple, list)):
        return torch.cat([flatten_memory(m, n) for m in memory], dim=-1)
    m = memory.detach().float()
    if m.dim() == 1 and m.shape[0] == n:
        return m.reshape(n, 1)
    if m.dim() >= 2 and m.shape[0] == n:
        return m.reshape(n, -1)
    if m.dim() == 3 and m.shape[1] == n:
        return m.permute(1, 0, 2).reshape(n, -1)
    raise ValueError(f"cannot read a per-env embedding from a memory of shape {tuple(m.shape)}")


class _MemoryRecorder(PolicyWrapper):
    """Keeps the policy's memory after every step."""

    def __init__(self, inner, select=None) -> None:
        super().__init__(inner)
        self.select = select
        self.memory: list[torch.Tensor] = []

    def step(self, obs, memory, prev):
        out = self.inner.step(obs, memory, prev)
        mem = out.memory
        if self.select is not None:
            mem = self.select(mem)
        self.memory.append(flatten_memory(mem, obs.shape[0]))
        return out


def task_distance(a: Composition, b: Composition) -> float:
    """Share of positions (padded to the longer length) where the primitives differ."""
    n = max(len(a), len(b))
    return sum(1 for i in range(n) if i >= len(a) or i >= len(b) or a[i] != b[i]) / n


def _rank(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="stable")
    r = np.empty(len(x))
    r[order] = np.arange(len(x))
    # average ranks of ties
    for v in np.unique(x):
        idx = x == v
        r[idx] = r[idx].mean()
    return r


def correlations(emb: np.ndarray, comps: list[Composition]) -> dict:
    """Pearson and Spearman correlation of pairwise embedding vs task distances."""
    n = len(comps)
    iu = np.triu_indices(n, 1)
    d_emb = np.linalg.norm(emb[:, None] - emb[None], axis=-1)[iu]
    d_task = np.array([[task_distance(comps[i], comps[j]) for j in range(n)] for i in range(n)])[iu]
    if d_emb.std() == 0 or d_task.std() == 0:
        return {"pearson": None, "spearman": None, "pairs": int(len(iu[0]))}
    pearson = float(np.corrcoef(d_emb, d_task)[0, 1])
    spearman = float(np.corrcoef(_rank(d_emb), _rank(d_task))[0, 1])
    return {"pearson": pearson, "spearman": spearman, "pairs": int(len(iu[0]))}


def pca_2d(x: np.ndarray) -> np.ndarray:
    x = x - x.mean(0)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    return (
        x @ vt[:2].T
        if vt.shape[0] >= 2
        else np.concatenate([x @ vt[:1].T, np.zeros((len(x), 1))], 1)
    )


def run_embed(
    checkpoint: str | Path,
    out: str | Path,
    *,
    seed: int = 0,
    overwrite: bool = False,
    raw: dict | None = None,
) -> dict:
    """Write ``embed.json`` (embeddings, correlations) and ``embed.png`` (PCA, t-SNE)."""
    raw = dict(raw or {})
    raw.pop("seed", None)
    num_tasks = int(raw.pop("num_tasks", 40))
    episodes = int(raw.pop("episodes", 2))
    num_envs = int(raw.pop("num_envs", 10))
    if raw:
        raise ValueError(
            f"unknown embed option {sorted(raw)[0]!r}; allowed: num_tasks, episodes, num_envs"
        )
    if num_tasks < 3 or episodes < 1:
        raise ValueError(
            f"num_tasks={num_tasks}, episodes={episodes}; need num_tasks >= 3, episodes >= 1"
        )
    module = load_module(checkpoint, REGISTRY)
    cfg = module.cfg
    import envs as _envs

    split = _envs.make_split(cfg.split_family, seed=cfg.split_seed)
    tasks = heldout_tasks(split.heldout, num_tasks, seed, split.meta.get("heldout_layout_seeds"))
    k = min(num_envs, num_tasks)
    env = make_vector_env(cfg.env_id, k, {**cfg.env_kwargs, "composition": tasks[0].composition})
    rows = []
    try:
        for b, start in enumerate(range(0, num_tasks, k)):
            batch = list(tasks[start : start + k])
            pad = k - len(batch)
            batch += [batch[-1]] * pad
            policy, hook = module.trial_policy(env)
            # a method may say which part of its memory is the task embedding
            rec = _MemoryRecorder(policy, getattr(module, "embedding_of_memory", None))
            col = Collector(
                env, rec, episodes_per_trial=episodes, seed=seed + b, on_episode_end=hook
            )
            ro = col.collect_trials(batch)
            if not rec.memory:
                raise ValueError("the policy reported no memory")
            mem = torch.stack(rec.memory)  # (T, k, d)
            last = ro.valid.long().cumsum(0).argmax(0)  # last valid step per env
            for i in range(k - pad):
                rows.append(mem[last[i], i].numpy())
    finally:
        env.close()
    # nothing is written before the embeddings exist: bad checkpoints fail above
    out = prepare_run_dir(out, overwrite=overwrite)
    emb = np.stack(rows)
    comps = [t.composition for t in tasks]
    corr = correlations(emb, comps)
    pca = pca_2d(emb)
    tsne = None
    if len(emb) >= 5:
        from sklearn.manifold import TSNE

        tsne = TSNE(
            n_components=2, perplexity=min(30.0, (len(emb) - 1) / 3), random_state=seed, init="pca"
        ).fit_transform(emb)
    doc = {
        "checkpoint": str(checkpoint),
        "method": module.method,
        "tasks": [str(t) for t in tasks],
        "episodes": episodes,
        "embedding_dim": int(emb.shape[1]),
        "correlation": corr,
        "task_distance": "share of positions whose primitives differ",
        "embeddings": emb.round(5).tolist(),
        "pca": pca.round(5).tolist(),
        "tsne": None if tsne is None else tsne.round(5).tolist(),
    }
    atomic_write_json(Path(out) / "embed.json", doc)
    _plot(doc, comps, Path(out) / "embed.png")
    return doc


def _plot(doc: dict, comps: list[Composition], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    verbs = sorted({c[0].verb for c in comps})
    colors = {v: plt.cm.tab10(i % 10) for i, v in enumerate(verbs)}
    maps = [("PCA", doc["pca"])] + ([("t-SNE", doc["tsne"])] if doc["tsne"] else [])
    fig, axes = plt.subplots(1, len(maps), figsize=(5.5 * len(maps), 4.5), squeeze=False)
    for ax, (name, xy) in zip(axes[0], maps):
        xy = np.asarray(xy)
        for v in verbs:
            idx = [i for i, c in enumerate(comps) if c[0].verb == v]
            ax.scatter(xy[idx, 0], xy[idx, 1], color=colors[v], label=f"first: {v}", s=28)
        ax.set_title(f"{doc['method']} task embeddings — {name}")
        ax.grid(alpha=0.3)
    corr = doc["correlation"]
    if corr["pearson"] is not None:
        fig.suptitle(
            f"distance correlation with task distance: Pearson {corr['pearson']:.2f}, Spearman {corr['spearman']:.2f}",
            fontsize=9,
        )
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
