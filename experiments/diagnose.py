"""``compo diagnose``: the seed's ``MetaRLDiagnostics.diagnose_failure`` (Q9) for one task.

For one task (``--composition TEXT``, or ``--task INDEX`` of the checkpoint split's held-out
compositions) of a trained checkpoint:

1. **adaptation**: ``trials`` trials of ``episodes`` episodes on the task, through the method's
   own ``trial_policy`` and the shared collector; mean success and return per episode index and
   their least-squares slope per episode (``rl.diagnostics.slope``);
2. **gradients at adaptation** (methods that adapt by gradient): the inner-loop gradient norm
   of each adaptation step (MAML family: ``rl.diagnostics.inner_grad_norm`` of the parameters
   before and after the step; the compositional agent with ``inner_loop=on``: its per-episode
   REINFORCE step);
3. **entropy** of the acting distributions per episode (the policies' ``entropy`` extras; the
   compositional agent: the controller at its decisions and the active skill per step);
4. **embedding**: the task's embedding (PEARL's z, RL²'s hidden state, the compositional
   controller's state, read by ``experiments.embed.trial_embeddings``) beside ``train_tasks``
   training tasks' embeddings in one PCA map; a method without task memory (MAML, PPO) skips
   this and says so;
5. **similar training tasks**: the ``k`` nearest training compositions by embedding distance
   and by edit distance (Levenshtein over the primitives: insert, delete, substitute);

with a one-line verdict per check. Writes ``diagnose.json`` and ``diagnose.png`` into ``--out``
(nothing before every check has run); a composition outside the checkpoint's task family is one
line and exit 2.
"""

from __future__ import annotations

import io
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from envs.core import Composition, Task
from experiments.embed import pca, trial_embeddings
from experiments.registry import REGISTRY
from rl.collect import Collector, PolicyWrapper, make_vector_env
from rl.config import DiagnosticsConfig
from rl.diagnostics import inner_grad_norm, slope
from rl.io import atomic_write_bytes, atomic_write_json, prepare_run_dir
from rl.protocol import EvalConfig, heldout_tasks
from rl.train import load_module

#: entropy shares of the maximum (log of the number of choices) read as near-deterministic /
#: near-uniform in the verdict
LOW_ENTROPY, HIGH_ENTROPY = 0.1, 0.9
#: the task's nearest training embedding this many times farther than training tasks are from
#: their own nearest neighbours (median) reads as outside the training distribution
OUTSIDE = 2.0


@dataclass
class DiagnoseConfig:
    """``compo diagnose`` options (``--set KEY=VALUE`` or ``--config``)."""

    trials: int = 10
    """trials of the diagnosed task; its curves are their means"""
    episodes: int = EvalConfig.episodes
    """E: episodes per trial (the evaluation protocol's)"""
    k: int = 5
    """most similar training compositions listed, by embedding and by edit distance"""
    train_tasks: int = 40
    """training tasks embedded (one trial each) for the map and the embedding neighbours"""
    num_envs: int = 10
    """trials run in parallel"""
    layout_seed: int | None = None
    """layout/goal seed of the task; None: drawn from ``seed`` (the split's if it has them)"""
    seed: int = 0
    """seed of the layout draw, the episode seeds and the training tasks drawn"""

    def __post_init__(self) -> None:
        for key in ("trials", "episodes", "k", "train_tasks", "num_envs"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{key}={v!r}; allowed: an integer >= 1")


def edit_distance(a: Composition, b: Composition) -> int:
    """Levenshtein distance between two compositions' primitive sequences.

    Examples:
        >>> p = Composition.parse
        >>> edit_distance(p("goto(red ball) > open(door)"), p("open(door)"))
        1
    """
    prev = list(range(len(b) + 1))
    for i in range(1, len(a) + 1):
        cur = [i] + [0] * len(b)
        for j in range(1, len(b) + 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (a[i - 1] != b[j - 1]))
        prev = cur
    return prev[-1]


# -- the task ------------------------------------------------------------------------------------
def resolve_task(module, composition: str | None, task: int | None, cfg: DiagnoseConfig):
    """(Task, split) of ``--composition`` or ``--task``; one-line ``ValueError`` otherwise."""
    import envs

    if (composition is None) == (task is None):
        raise ValueError("give one of --composition TEXT or --task INDEX")
    mcfg = module.cfg
    kind = getattr(mcfg, "split_kind", None)
    split = envs.make_split(
        mcfg.split_family, seed=mcfg.split_seed, **({"split_kind": kind} if kind else {})
    )
    if task is not None:
        if not 0 <= task < len(split.heldout):
            raise ValueError(
                f"--task {task}; allowed: 0..{len(split.heldout) - 1} (the held-out compositions "
                f"of split {mcfg.split_family!r} seed {mcfg.split_seed})"
            )
        comp = split.heldout[task]
    else:
        comp = Composition.parse(composition)
        known = set(split.primitives)
        for p in comp:
            if p not in known:
                raise ValueError(
                    f"composition {composition!r} is not in the checkpoint's task family "
                    f"{mcfg.split_family!r}: {p} is not one of its {len(known)} primitives "
                    f"(e.g. {', '.join(str(q) for q in list(split.primitives)[:3])})"
                )
    layout = cfg.layout_seed
    if layout is None:
        layout = heldout_tasks([comp], 1, cfg.seed, split.meta.get("heldout_layout_seeds"))[0]
        layout = layout.layout_seed
    return Task(comp, layout), split


# -- one task's trials -------------------------------------------------------------------------------
class _StepRecorder(PolicyWrapper):
    """Keeps each step's entropies (and the compositional inner loop's step norms)."""

    KEYS = ("entropy", "skill_entropy", "inner_grad_norm")

    def __init__(self, inner) -> None:
        super().__init__(inner)
        self.steps: list[dict[str, torch.Tensor]] = []

    def step(self, obs, memory, prev):
        out = self.inner.step(obs, memory, prev)
        ex = out.extras
        rec = {k: ex[k].detach().float() for k in self.KEYS if k in ex}
        if "alpha" in ex and "decision" in ex:  # the composer's categorical at decisions
            a = ex["alpha"].clamp_min(1e-12)
            h = -(a * a.log()).sum(-1)
            rec["controller_entropy"] = torch.where(ex["decision"], h, torch.nan)
        if "entropy" not in ex and "alpha" not in ex:
            rec["entropy"] = -out.logp.detach().float()  # unbiased estimate
        self.steps.append(rec)
        return out


def _gradient_hook(module, policy, hook, norms: list[tuple[int, int, float]]):
    """Wrap a MAML-style episode hook: record (env, episode, inner-gradient norm) of each
    adaptation step, from the env's parameters before and after it."""
    params = getattr(policy, "params", None)
    lr = getattr(module.cfg, "inner_lr", None)
    if hook is None or not isinstance(params, dict) or lr is None:
        return hook

    # MAML's meta-test adapts after every ``per_step`` episodes (baselines.maml.trial_policy)
    per_step = getattr(module.cfg, "eval_adapt_episodes", 0) or module.cfg.episodes_per_trial
    steps = int(getattr(module.cfg, "inner_steps", 1))

    def wrapped(i, ep):
        before = {k: v[i].clone() for k, v in policy.params.items()}
        hook(i, ep)
        j = ep.stats.episode_index
        if (j + 1) % per_step == 0:
            after = {k: v[i : i + 1] for k, v in policy.params.items()}
            norms.append((i, j, float(inner_grad_norm(before, after, lr, steps)[0])))

    return wrapped


def _per_episode(values: np.ndarray, ep_index: np.ndarray, valid: np.ndarray, E: int):
    """(E,) mean over trials of each episode's mean of ``values`` (T, N), NaNs ignored."""
    out = np.full(E, np.nan)
    for e in range(E):
        per_trial = []
        for i in range(values.shape[1]):
            v = values[(ep_index[:, i] == e) & valid[:, i], i]
            v = v[~np.isnan(v)]
            if len(v):
                per_trial.append(v.mean())
        if per_trial:
            out[e] = float(np.mean(per_trial))
    return out


def run_task_trials(module, task: Task, cfg: DiagnoseConfig) -> dict:
    """The adaptation curve, entropies and inner-gradient norms of ``cfg.trials`` trials."""
    mcfg = module.cfg
    E, n = cfg.episodes, cfg.trials
    env = make_vector_env(mcfg.env_id, n, {**mcfg.env_kwargs, "composition": task.composition})
    norms: list[tuple[int, int, float]] = []
    try:
        policy, hook = module.trial_policy(env)
        rec = _StepRecorder(policy)
        hook = _gradient_hook(module, policy, hook, norms)
        col = Collector(env, rec, episodes_per_trial=E, seed=cfg.seed, on_episode_end=hook)
        ro = col.collect_trials([task] * n)
    finally:
        env.close()
    succ = np.zeros((n, E))
    ret = np.zeros((n, E))
    for e in ro.episodes:
        succ[e.env_index, e.episode_index] = float(e.success)
        ret[e.env_index, e.episode_index] = e.ret
    T = len(rec.steps)
    valid, idx = ro.valid[:T].numpy(), ro.episode_index[:T].numpy()
    out = {
        "success_at": succ.mean(0).tolist(),
        "return_at": ret.mean(0).tolist(),
        "slope_success": slope(np.tile(np.arange(E), n), succ.reshape(-1)),
        "slope_return": slope(np.tile(np.arange(E), n), ret.reshape(-1)),
        "entropy_at": {},
    }
    for key in ("entropy", "controller_entropy", "skill_entropy"):
        if key in rec.steps[0]:
            vals = torch.stack([s[key] for s in rec.steps]).numpy()
            name = {"entropy": "policy", "controller_entropy": "controller"}.get(key, "skills")
            out["entropy_at"][name] = _per_episode(vals, idx, valid, E).tolist()
    grads: dict[int, list[float]] = {}
    for _, after_ep, g in norms:
        grads.setdefault(after_ep, []).append(g)
    if "inner_grad_norm" in rec.steps[0]:  # the step after episode j happens in episode j+1
        vals = torch.stack([s["inner_grad_norm"] for s in rec.steps]).numpy()
        for t, i in zip(*np.nonzero(~np.isnan(vals) & valid)):
            grads.setdefault(int(idx[t, i]) - 1, []).append(float(vals[t, i]))
    out["inner_grad_norm_after"] = {str(k): float(np.mean(v)) for k, v in sorted(grads.items())}
    return out


def adapts_by_gradient(mcfg) -> bool:
    """MAML family (an inner learning rate), or the compositional agent's inner loop on."""
    if hasattr(mcfg, "inner_loop"):
        return mcfg.inner_loop == "on"
    return hasattr(mcfg, "inner_lr")


# -- embedding and neighbours --------------------------------------------------------------------------
def embedding_check(module, task: Task, split, cfg: DiagnoseConfig) -> dict:
    """The task's embedding beside ``train_tasks`` training tasks' (PCA), its ``k`` nearest
    training tasks by embedding distance, and how far out it lies; ``{"skipped": why}`` for a
    method without task memory."""
    mcfg = module.cfg
    train = [Composition.parse(c) for c in mcfg.train_compositions()]
    n = min(cfg.train_tasks, len(train))
    tasks = heldout_tasks(train, n, cfg.seed, split.meta.get("train_layout_seeds"))
    try:
        emb = trial_embeddings(
            module, [*tasks, task], episodes=cfg.episodes, num_envs=cfg.num_envs, seed=cfg.seed
        )
    except ValueError as e:
        return {"skipped": str(e)}
    mine, others = emb[-1], emb[:-1]
    dist = np.linalg.norm(others - mine, axis=1)
    order = np.argsort(dist, kind="stable")[: cfg.k]
    nn_train = np.linalg.norm(others[:, None] - others[None], axis=-1)
    np.fill_diagonal(nn_train, np.inf)
    typical = float(np.median(nn_train.min(1))) if len(others) > 1 else float("nan")
    coords, ratio = pca(emb, 2)
    return {
        "embedding_dim": int(emb.shape[1]),
        "embedding": mine.round(5).tolist(),
        "train_tasks": [str(t.composition) for t in tasks],
        "nearest_by_embedding": [
            {"composition": str(tasks[i].composition), "distance": float(dist[i])} for i in order
        ],
        "nearest_distance": float(dist[order[0]]),
        "train_nearest_neighbour_median": typical,
        "pca": coords.round(5).tolist(),  # training tasks, then the task (last row)
        "pca_variance": ratio.round(5).tolist(),
    }


def nearest_by_edit_distance(comp: Composition, train: list[Composition], k: int) -> list[dict]:
    """The ``k`` training compositions nearest to ``comp`` in edit distance (ties: text order)."""
    scored = sorted((edit_distance(comp, c), str(c)) for c in train)
    return [{"composition": c, "edit_distance": d} for d, c in scored[:k]]


# -- verdicts ------------------------------------------------------------------------------------------
def verdicts(doc: dict, thresholds: DiagnosticsConfig, choices: dict[str, int]) -> dict[str, str]:
    """One line per check, as the seed's warnings."""
    from rl.diagnostics import SATURATED

    a = doc["adaptation"]
    s, s0, s1 = a["slope_return"], a["success_at"][0], a["success_at"][-1]
    if len(a["success_at"]) < 2:
        ad = "one episode per trial: no adaptation curve (set episodes >= 2)"
    elif s0 >= SATURATED:
        ad = f"solved from episode 0 (success {s0:.2f}): nothing left to adapt"
    elif s < thresholds.slope_threshold:
        ad = (
            f"adaptation not improving: return slope {s:+.4f} per episode < "
            f"{thresholds.slope_threshold:g} (success {s0:.2f} -> {s1:.2f})"
        )
    else:
        ad = f"improving: return slope {s:+.4f} per episode (success {s0:.2f} -> {s1:.2f})"
    g = doc["gradients"]
    if "skipped" in g:
        gr = f"skipped: {g['skipped']}"
    elif not g["inner_grad_norm_after"]:
        gr = "no adaptation step happened within the trial"
    else:
        lo, hi = min(g["inner_grad_norm_after"].values()), max(g["inner_grad_norm_after"].values())
        if lo < thresholds.meta_grad_threshold:
            gr = f"vanishing inner gradient (smallest {lo:.2e}): an adaptation step barely moves"
        else:
            gr = f"inner-gradient norms {lo:.3g}..{hi:.3g}: the adaptation steps move the policy"
    parts = []
    for name, curve in doc["entropy"].items():
        h = float(np.nanmean(curve)) if np.isfinite(curve).any() else float("nan")
        if name not in choices or not math.isfinite(h):
            parts.append(f"{name} {h:.2f} nats")
            continue
        share = h / math.log(choices[name])
        state = (
            "near-deterministic: little exploration" if share < LOW_ENTROPY
            else "near-uniform: barely shaped by training" if share > HIGH_ENTROPY
            else "between deterministic and uniform"
        )  # fmt: skip
        parts.append(f"{name} {h:.2f} nats ({share:.0%} of uniform; {state})")
    e = doc["embedding"]
    if "skipped" in e:
        em = f"skipped: {e['skipped']}"
    else:
        r = e["nearest_distance"] / max(e["train_nearest_neighbour_median"], 1e-12)
        where = "outside" if r > OUTSIDE else "among"
        em = (
            f"{where} the training tasks' embeddings: nearest at {r:.2f}x the training tasks' "
            "median nearest-neighbour distance"
        )
    by_edit = [d["composition"] for d in doc["similar"]["by_edit_distance"]]
    si = f"by edit distance: {'; '.join(by_edit[:3])}"
    if "nearest_by_embedding" in e:
        by_emb = [d["composition"] for d in e["nearest_by_embedding"]]
        both = len(set(by_emb) & set(by_edit))
        si = f"by embedding: {'; '.join(by_emb[:3])}; {si}; {both} of {len(by_emb)} in both lists"
    return {
        "adaptation": ad,
        "gradients": gr,
        "entropy": "; ".join(parts) or "no entropy recorded",
        "embedding": em,
        "similar": si,
    }


# -- the command -------------------------------------------------------------------------------------
def run_diagnose(
    checkpoint: str | Path,
    out: str | Path,
    *,
    composition: str | None = None,
    task: int | None = None,
    cfg: DiagnoseConfig | None = None,
    overwrite: bool = False,
    log=print,
) -> list[Path]:
    """Write ``diagnose.json`` and ``diagnose.png`` for one task; return their paths."""
    cfg = cfg or DiagnoseConfig()
    module = load_module(checkpoint, REGISTRY)
    mcfg = module.cfg
    the_task, split = resolve_task(module, composition, task, cfg)
    torch.manual_seed(cfg.seed)
    trials = run_task_trials(module, the_task, cfg)
    probe = make_vector_env(
        mcfg.env_id, 1, {**mcfg.env_kwargs, "composition": the_task.composition}
    )
    space = probe.single_action_space
    probe.close()
    choices = {"policy": int(space.n), "skills": int(space.n)} if hasattr(space, "n") else {}
    if hasattr(module, "library"):
        choices["controller"] = int(module.library.num_skills)
    if adapts_by_gradient(mcfg):
        gradients = {"inner_grad_norm_after": trials.pop("inner_grad_norm_after")}
    else:
        trials.pop("inner_grad_norm_after")
        gradients = {"skipped": f"{module.method} adapts without gradient steps (its memory)"}
    train = [Composition.parse(c) for c in mcfg.train_compositions()]
    doc = {
        "checkpoint": str(checkpoint),
        "method": module.method,
        "composition": str(the_task.composition),
        "layout_seed": the_task.layout_seed,
        "heldout": the_task.composition in set(split.heldout),
        "config": asdict(cfg),
        "adaptation": {k: trials[k] for k in trials if k != "entropy_at"},
        "gradients": gradients,
        "entropy": trials["entropy_at"],
        "embedding": embedding_check(module, the_task, split, cfg),
        "similar": {
            "by_edit_distance": nearest_by_edit_distance(the_task.composition, train, cfg.k)
        },
    }
    thresholds = getattr(mcfg, "diagnostics", None) or DiagnosticsConfig()
    doc["verdicts"] = verdicts(doc, thresholds, choices)
    # every check has run: only now is anything written
    out = prepare_run_dir(out, overwrite=overwrite)
    paths = [Path(out) / "diagnose.json", Path(out) / "diagnose.png"]
    atomic_write_json(paths[0], doc)
    _plot(doc, paths[1])
    for k, v in doc["verdicts"].items():
        log(f"{k}: {v}")
    return paths  # compo lists the files it wrote


def _plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 8.6))
    a = doc["adaptation"]
    E = len(a["success_at"])
    x = np.arange(E)
    ax = axes[0][0]
    for key, name, sl in (
        ("success_at", "success", "slope_success"),
        ("return_at", "return", "slope_return"),
    ):
        y = np.asarray(a[key])
        (line,) = ax.plot(x, y, "o-", label=f"{name} (slope {a[sl]:+.3f}/episode)")
        if math.isfinite(a[sl]):  # the least-squares line through the trials' points
            ax.plot(x, y.mean() + a[sl] * (x - x.mean()), "--", color=line.get_color(), alpha=0.6)
    ax.set(
        title=f"adaptation over a trial ({doc['config']['trials']} trials)",
        xlabel="episode index in the trial",
        ylabel="mean over trials",
        ylim=(-0.05, 1.05),
    )
    ax.set_xticks(x)
    ax.legend(fontsize=8)
    ax = axes[0][1]
    for name, curve in doc["entropy"].items():
        ax.plot(x, curve, "o-", label=name)
    ax.set(
        title="entropy of the acting distributions",
        xlabel="episode index in the trial",
        ylabel="nats (mean over steps)",
    )
    ax.set_xticks(x)
    if doc["entropy"]:
        ax.legend(fontsize=8)
    ax = axes[1][0]
    g = doc["gradients"]
    if "skipped" in g or not g["inner_grad_norm_after"]:
        _note(ax, g.get("skipped", "no adaptation step within the trial"))
    else:
        ks = [int(k) for k in g["inner_grad_norm_after"]]
        ax.bar(ks, list(g["inner_grad_norm_after"].values()), color="tab:purple")
        ax.set_xticks(ks)
        ax.set(xlabel="adaptation step after episode index", ylabel="inner-gradient norm")
    ax.set_title("gradient norms at adaptation")
    ax = axes[1][1]
    e = doc["embedding"]
    if "skipped" in e:
        _note(ax, e["skipped"])
        ax.set_title("task embedding")
    else:
        xy = np.asarray(e["pca"])
        near = {d["composition"] for d in e["nearest_by_embedding"]}
        is_near = np.array([c in near for c in e["train_tasks"]])
        ax.scatter(*xy[:-1][~is_near].T, s=18, color="0.6", label="training tasks")
        ax.scatter(*xy[:-1][is_near].T, s=30, color="tab:blue", label=f"{len(near)} nearest")
        ax.scatter(*xy[-1], s=180, marker="*", color="tab:red", label="this task", zorder=3)
        var = e["pca_variance"]
        ax.set(
            xlabel=f"PC1 ({var[0]:.0%} of variance)",
            ylabel=f"PC2 ({var[1]:.0%})",
            title=f"task embedding (dim {e['embedding_dim']}) among training tasks, PCA",
        )
        ax.legend(fontsize=8)
    where = "held-out" if doc["heldout"] else "not held-out"
    fig.suptitle(
        f"compo diagnose: {doc['method']} on {doc['composition']} ({where}, layout {doc['layout_seed']})",
        fontsize=11,
    )
    text = "\n".join(f"{k}: {v}" for k, v in doc["verdicts"].items())
    fig.text(0.01, 0.005, text, fontsize=7.5, va="bottom", wrap=True)
    fig.tight_layout(rect=(0, 0.13, 1, 0.96))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def _note(ax, text: str) -> None:
    import textwrap

    ax.text(
        0.5,
        0.5,
        "\n".join(textwrap.wrap(text, 48)),
        ha="center",
        va="center",
        fontsize=9,
        transform=ax.transAxes,
    )
    ax.set_xticks([])
    ax.set_yticks([])
