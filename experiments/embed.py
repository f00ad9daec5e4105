"""``compo embed``: what a method's task memory encodes about held-out tasks.

Each held-out task gets one trial (``episodes`` episodes, through the method's own
``trial_policy`` and the shared collector). The task embedding is the policy's memory at the
last step of the trial — RL²'s hidden state, PEARL's posterior sample z, the compositional
controller's state — so nothing about the policy is reimplemented here. We draw PCA and t-SNE
maps coloured by the first primitive's verb and report how embedding distances correlate with
task (composition) distances: Pearson and Spearman over task pairs, each with the p-value of a
Mantel permutation test (``mantel_test``), since the pairs of one set of tasks are not
independent and the usual correlation p-value does not apply to them (Mantel 1967).
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
from rl.protocol import EVAL_LIMITS, heldout_tasks
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


def mantel_test(
    a: np.ndarray, b: np.ndarray, permutations: int = 999, seed: int = 0
) -> tuple[float, float]:
    """Mantel test of two (n, n) symmetric distance matrices: the Pearson correlation ``r`` of
    their upper triangles, and the one-sided p-value of ``r`` against the null that the rows of
    one matrix are unrelated to the other's, estimated by relabelling ``b``'s objects
    (the same permutation of its rows and columns) ``permutations`` times:
    ``p = (1 + #{r_perm >= r}) / (1 + permutations)`` (Mantel 1967; Legendre & Legendre,
    Numerical Ecology, sec. 10.5.1). One-sided because the question is whether similar tasks get
    similar embeddings (a positive correlation). A constant triangle gives ``(nan, nan)``.

    Examples:
        >>> x = np.arange(6.0)
        >>> d = np.abs(x[:, None] - x[None])
        >>> r, p = mantel_test(d, d, permutations=99)
        >>> round(r, 6), p <= 0.05
        (1.0, True)
    """
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    n = a.shape[0]
    if a.shape != (n, n) or b.shape != (n, n):
        raise ValueError(f"mantel_test needs two (n, n) matrices; got {a.shape} and {b.shape}")
    if permutations < 1:
        raise ValueError(f"permutations={permutations}; allowed: an integer >= 1")
    iu = np.triu_indices(n, 1)
    x = a[iu] - a[iu].mean()
    if x.std() == 0 or b[iu].std() == 0:
        return float("nan"), float("nan")
    x /= np.linalg.norm(x)

    def r_of(tri: np.ndarray) -> np.ndarray:  # (..., pairs) -> (...,) Pearson with x
        y = tri - tri.mean(-1, keepdims=True)
        return (y @ x) / np.linalg.norm(y, axis=-1)

    r = float(r_of(b[iu]))
    rng = np.random.default_rng(seed)
    perms = np.stack([rng.permutation(n) for _ in range(permutations)])  # (P, n)
    # b relabelled: b[perm][:, perm], read on the upper triangle, for every permutation at once
    tri = b[perms[:, iu[0]], perms[:, iu[1]]]  # (P, pairs)
    hits = int((r_of(tri) >= r - 1e-12).sum())
    return r, (1 + hits) / (1 + permutations)


def distance_matrices(emb: np.ndarray, comps: list[Composition]) -> tuple[np.ndarray, np.ndarray]:
    """(n, n) Euclidean embedding distances and (n, n) task distances (``task_distance``)."""
    n = len(comps)
    d_emb = np.linalg.norm(emb[:, None] - emb[None], axis=-1)
    d_task = np.array([[task_distance(comps[i], comps[j]) for j in range(n)] for i in range(n)])
    return d_emb, d_task


def _rank_matrix(d: np.ndarray) -> np.ndarray:
    """The symmetric matrix of the average ranks of ``d``'s upper triangle (Spearman's Mantel)."""
    n = d.shape[0]
    iu = np.triu_indices(n, 1)
    out = np.zeros_like(d, dtype=float)
    out[iu] = _rank(d[iu])
    return out + out.T


def correlations(
    emb: np.ndarray, comps: list[Composition], permutations: int = 999, seed: int = 0
) -> dict:
    """Pearson and Spearman correlation of pairwise embedding vs task distances, each with its
    Mantel permutation p-value (``pearson_p``, ``spearman_p``; see ``mantel_test``)."""
    n = len(comps)
    pairs = n * (n - 1) // 2
    d_emb, d_task = distance_matrices(emb, comps)
    iu = np.triu_indices(n, 1)
    if d_emb[iu].std() == 0 or d_task[iu].std() == 0:
        return {"pearson": None, "spearman": None, "pearson_p": None, "spearman_p": None,
                "pairs": pairs, "permutations": permutations}  # fmt: skip
    pearson, pearson_p = mantel_test(d_emb, d_task, permutations, seed)
    spearman, spearman_p = mantel_test(
        _rank_matrix(d_emb), _rank_matrix(d_task), permutations, seed
    )
    return {
        "pearson": pearson,
        "pearson_p": pearson_p,
        "spearman": spearman,
        "spearman_p": spearman_p,
        "pairs": pairs,
        "permutations": permutations,
        "test": "Mantel, one-sided (r_perm >= r), rows and columns of the task-distance "
        "matrix permuted together",
    }


def describe_correlation(corr: dict) -> str:
    """One line: the two correlations with their Mantel p-values."""
    if corr["pearson"] is None:
        return f"correlation undefined: a distance is constant over the {corr['pairs']} pairs"
    return (
        f"embedding distance vs composition distance over {corr['pairs']} task pairs: "
        f"Pearson r = {corr['pearson']:.2f} (Mantel p = {corr['pearson_p']:.3g}), "
        f"Spearman rho = {corr['spearman']:.2f} (p = {corr['spearman_p']:.3g}); "
        f"{corr['permutations']} permutations"
    )


def pca(x: np.ndarray, k: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """(n, k) principal-component coordinates of ``x`` and the (k,) share of its variance each
    component explains (zero columns where ``x`` has fewer than ``k`` dimensions)."""
    x = x - x.mean(0)
    _, s, vt = np.linalg.svd(x, full_matrices=False)
    total = float((s**2).sum())
    m = min(k, vt.shape[0])
    coords = np.zeros((len(x), k))
    coords[:, :m] = x @ vt[:m].T
    ratio = np.zeros(k)
    if total > 0:
        ratio[:m] = s[:m] ** 2 / total
    return coords, ratio


def pca_2d(x: np.ndarray) -> np.ndarray:
    """(n, 2) PCA coordinates of ``x`` (see ``pca``)."""
    return pca(x, 2)[0]


def trial_embeddings(
    module, tasks: list[Task], *, episodes: int, num_envs: int = 10, seed: int = 0
) -> np.ndarray:
    """(len(tasks), d) task embeddings of a trained ``module``: its policy's memory at the last
    step of one trial of ``episodes`` episodes on each task (``module.embedding_of_memory``
    selects the part that is the embedding, if the method says), in batches of ``num_envs``
    trials whose episode seeds come from ``seed``. ``ValueError`` for a method without memory."""
    cfg = module.cfg
    k = min(num_envs, len(tasks))
    env = make_vector_env(cfg.env_id, k, {**cfg.env_kwargs, "composition": tasks[0].composition})
    rows = []
    try:
        for b, start in enumerate(range(0, len(tasks), k)):
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
    return np.stack(rows)


def _count(raw: dict, key: str, default: int, low: int, high: int) -> int:
    """Pop option ``key`` of ``raw``: an integer in [low, high] (one-line error otherwise)."""
    value = raw.pop(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{key}={value!r}; allowed: an integer in [{low}, {high}]")
    return value


def run_embed(
    checkpoint: str | Path,
    out: str | Path,
    *,
    seed: int = 0,
    overwrite: bool = False,
    raw: dict | None = None,
    log=print,
) -> list[Path]:
    """Write ``embed.json`` (embeddings, correlations with Mantel p-values) and ``embed.png``
    (PCA and t-SNE maps); ``log`` the correlation line; return the paths written.

    Options in ``raw``: ``num_tasks`` (40), ``episodes`` (2), ``num_envs`` (10),
    ``permutations`` (999, of the Mantel test)."""
    raw = dict(raw or {})
    raw.pop("seed", None)
    num_tasks = _count(raw, "num_tasks", 40, 3, EVAL_LIMITS["num_tasks"])
    episodes = _count(raw, "episodes", 2, 1, EVAL_LIMITS["episodes"])
    num_envs = _count(raw, "num_envs", 10, 1, EVAL_LIMITS["num_envs"])
    permutations = _count(raw, "permutations", 999, 1, 1_000_000)
    if raw:
        raise ValueError(
            f"unknown embed option {sorted(raw)[0]!r}; allowed: num_tasks, episodes, num_envs, "
            "permutations"
        )
    if num_tasks < 3 or episodes < 1:
        raise ValueError(
            f"num_tasks={num_tasks}, episodes={episodes}; need num_tasks >= 3, episodes >= 1"
        )
    if permutations < 1:
        raise ValueError(f"permutations={permutations}; allowed: an integer >= 1")
    module = load_module(checkpoint, REGISTRY)
    cfg = module.cfg
    import envs as _envs

    split = _envs.make_split(cfg.split_family, seed=cfg.split_seed)
    tasks = heldout_tasks(split.heldout, num_tasks, seed, split.meta.get("heldout_layout_seeds"))
    emb = trial_embeddings(module, tasks, episodes=episodes, num_envs=num_envs, seed=seed)
    # nothing is written before the embeddings exist: bad checkpoints fail above
    out = prepare_run_dir(out, overwrite=overwrite)
    comps = [t.composition for t in tasks]
    corr = correlations(emb, comps, permutations, seed)
    coords, explained = pca(emb, 2)
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
        "pca": coords.round(5).tolist(),
        "pca_explained_variance": explained.round(4).tolist(),
        "tsne": None if tsne is None else tsne.round(5).tolist(),
    }
    paths = [Path(out) / "embed.json", Path(out) / "embed.png"]
    atomic_write_json(paths[0], doc)
    _plot(doc, comps, paths[1])
    log(f"{module.method}: {describe_correlation(corr)}")
    return paths


def _plot(doc: dict, comps: list[Composition], path: Path) -> None:
    """PCA (axes: components with their share of the variance) and t-SNE maps side by side,
    coloured by the first primitive's verb; the title gives the correlations with their Mantel
    p-values."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    verbs = sorted({c[0].verb for c in comps})
    colors = {v: plt.cm.tab10(i % 10) for i, v in enumerate(verbs)}
    ev = doc.get("pca_explained_variance") or [float("nan")] * 2
    maps = [
        ("PCA", doc["pca"], [f"PC{i + 1} ({100 * v:.0f}% of variance)" for i, v in enumerate(ev)])
    ]
    if doc["tsne"]:
        maps.append(("t-SNE", doc["tsne"], ["t-SNE 1 (no units)", "t-SNE 2 (no units)"]))
    fig, axes = plt.subplots(1, len(maps), figsize=(5.5 * len(maps), 5.0), squeeze=False)
    for ax, (name, xy, labels) in zip(axes[0], maps):
        xy = np.asarray(xy)
        for v in verbs:
            idx = [i for i, c in enumerate(comps) if c[0].verb == v]
            ax.scatter(xy[idx, 0], xy[idx, 1], color=colors[v], label=f"first sub-task: {v}", s=28)
        ax.set(xlabel=labels[0], ylabel=labels[1], title=name)
        ax.grid(alpha=0.3)
    corr = doc["correlation"]
    head = (
        f"{doc['method']}: task memory after {doc['episodes']} episode(s) of "
        f"{len(comps)} held-out tasks ({doc['embedding_dim']}-d)"
    )
    if corr["pearson"] is None:
        line = "correlation undefined (a distance is constant over the task pairs)"
    else:
        line = (
            f"embedding vs composition distance: Pearson r = {corr['pearson']:.2f} "
            f"(Mantel p = {corr['pearson_p']:.3g}), Spearman rho = {corr['spearman']:.2f} "
            f"(p = {corr['spearman_p']:.3g}); {corr['pairs']} pairs, "
            f"{corr['permutations']} permutations"
        )
    what = f"composition distance: {doc['task_distance']}; embedding distance: Euclidean"
    fig.suptitle(f"{head}\n{line}\n{what}", fontsize=9)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
