"""What a skill library does to objects: the skills x outcomes table of issue 13's must-show.

``skill_outcome_table(lib)``: for each primitive p, ``n_states`` start states in which p is
feasible, and for each skill k the fraction of runs in which k, started there, completes p
(by the env's rules, ``envs.grid_events.completed``) on some step before its termination
fires or it has run ``t_max`` steps.

Start states: a fresh layout of the room (``primitives.outcome.ROOM``), then a chain of 0-2
random feasible primitives executed by the scripted oracle (``envs.grid.Oracle().act_for``)
on the reference env (``CompoGridEnv``), then, if p is still infeasible, the primitive that
makes it feasible (pickup X before drop X, drop X before goto/pickup X, close the door before
open(door)); a state where p stays infeasible is redrawn. Why the oracle and not a learned
draw: the states then do not depend on any library, so the supervised and the discovered
libraries are measured on the same states. Each state is the (reset seed, action list) pair,
replayed into the batched env (``reset(options={"replay": ...})``), where the skills run.

Also here: ``outcome_label`` (the primitive a terminating step's events stand for),
``skill_names`` (each skill named by the outcome its terminated runs mostly produce),
``discriminator_accuracy`` (on fresh chain segments the discriminator never trained on) and
``markdown_table``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from envs.core import Task
from envs.grid import PRIMITIVE_INDEX, PRIMITIVES, CompoGridEnv, Oracle, Primitive
from envs.grid_events import NUM_PRIMITIVES, completed, events, feasible
from primitives.option_training import ChainPolicy
from primitives.options import OptionLibrary
from primitives.outcome import ROOM, OutcomeDiscriminator, outcome_label, terminated_segments
from primitives.outcome_training import make_room, uniform_draw
from rl.collect import Collector, make_vector_env

PRIM_NAMES = [str(p) for p in PRIMITIVES]
Actor = Callable[[torch.Tensor, torch.Tensor, object], torch.Tensor]


def _enabler(p: Primitive, obs: np.ndarray) -> Primitive | None:
    """The primitive that makes ``p`` feasible from ``obs`` (None if there is none)."""
    carried = feasible(obs)  # drop(X) feasible <=> X carried
    if p.verb == "drop":
        return Primitive("pickup", p.obj)
    if p.verb == "open" and p.obj == "door":
        return Primitive("toggle", "door")
    drop = Primitive("drop", p.obj)
    if drop in PRIMITIVE_INDEX and carried[PRIMITIVE_INDEX[drop]]:
        return drop
    return None


def _run_oracle(env: CompoGridEnv, q: Primitive, actions: list[int], limit: int = 60) -> bool:
    obs = env.gen_obs()
    oracle = Oracle()
    for _ in range(limit):
        a = oracle.act_for(env, [q])
        obs1, *_ = env.step(a)
        actions.append(int(a))
        if completed(obs, obs1)[PRIMITIVE_INDEX[q]]:
            return True
        obs = obs1
    return False


def start_states(
    primitives: list[int], n_states: int, seed: int, size: int = 8, max_prefix: int = 2
) -> dict[int, list[tuple[int, list[int]]]]:
    """Per primitive index, ``n_states`` (reset seed, actions) pairs in whose end state the
    primitive is feasible (see the module docstring)."""
    rng = np.random.default_rng(seed)
    env = CompoGridEnv(composition=ROOM, size=size, max_steps=100_000)
    out: dict[int, list] = {p: [] for p in primitives}
    for p in primitives:
        tries = 0
        while len(out[p]) < n_states:
            tries += 1
            if tries > 50 * n_states:
                raise RuntimeError(f"no start states for {PRIM_NAMES[p]} after {tries} tries")
            s = int(rng.integers(2**31))
            obs, _ = env.reset(seed=s)
            actions: list[int] = []
            try:
                for _ in range(int(rng.integers(0, max_prefix + 1))):
                    ok = np.flatnonzero(feasible(env.gen_obs()))
                    _run_oracle(env, PRIMITIVES[int(rng.choice(ok))], actions)
                if not feasible(env.gen_obs())[p]:
                    q = _enabler(PRIMITIVES[p], env.gen_obs())
                    if q is not None:
                        _run_oracle(env, q, actions)
            except RuntimeError:  # the oracle found no path in this layout: redraw
                continue
            if feasible(env.gen_obs())[p]:
                out[p].append((s, actions))
    return out


def run_from(
    lib: OptionLibrary,
    starts: dict[int, list[tuple[int, list[int]]]],
    skills: list[int],
    t_max: int,
    seed: int,
    size: int = 8,
    actor: Actor | None = None,
) -> dict[str, np.ndarray]:
    """Run every skill from every start state, all at once on one batched env.

    Returns (S, K) arrays over S = start states (primitive-major) and K = ``skills``:
    ``success`` (the state's primitive completed before termination / ``t_max``),
    ``ends_with`` (completed on the terminating step), ``label`` (``outcome_label`` of the
    terminating step: -1 if it had no object event, -2 if cut by ``t_max`` or the episode's
    end) and ``prim`` (S,) the state's primitive.
    """
    rows = [(p, s, a) for p, lst in starts.items() for s, a in lst]
    S, K = len(rows), len(skills)
    venv = make_vector_env("CompoGrid-v0", S * K, {"size": size, "composition": ROOM,
                                                   "max_steps": 100_000})  # fmt: skip
    task = Task(ROOM, None)
    replay = {i * K + j: (task, s, a) for i, (_, s, a) in enumerate(rows) for j in range(K)}
    obs_np, _ = venv.reset(options={"replay": replay})
    obs = torch.as_tensor(obs_np, dtype=torch.float32)
    prim = torch.as_tensor([p for p, _, _ in rows]).repeat_interleave(K)
    skill = torch.as_tensor(skills).repeat(S)
    n = S * K
    idx = torch.arange(n)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    active = torch.ones(n, dtype=torch.bool)
    success = torch.zeros(n, dtype=torch.bool)
    ends = torch.zeros(n, dtype=torch.bool)
    label = torch.full((n,), -2, dtype=torch.long)
    with torch.no_grad():
        for _ in range(t_max):
            act = actor(obs, skill, venv) if actor else lib.dist(obs, skill).sample()
            obs1_np, _, term, trunc, _ = venv.step(act.numpy())
            obs1 = torch.as_tensor(obs1_np, dtype=torch.float32)
            comp = completed(obs, obs1)[idx, prim]
            success |= active & comp
            fire = active & (torch.rand(n, generator=gen) < lib.beta(obs, obs1, skill))
            ends |= fire & comp
            label = torch.where(fire, outcome_label(events(obs, obs1)), label)
            active &= ~fire & ~torch.as_tensor(term | trunc)
            obs = obs1
            if not active.any():
                break
    shape = (S, K)
    return {
        "success": success.reshape(shape).numpy(),
        "ends_with": ends.reshape(shape).numpy(),
        "label": label.reshape(shape).numpy(),
        "prim": np.array([p for p, _, _ in rows]),
    }


def skill_outcome_table(
    lib: OptionLibrary,
    n_states: int = 16,
    primitives: list[int] | None = None,
    t_max: int = 32,
    seed: int = 0,
    size: int = 8,
    actor: Actor | None = None,
) -> dict:
    """The (K x P) table of how often skill k, started where primitive p is feasible,
    completes p before it terminates or has run ``t_max`` steps (see the module docstring).

    Returns a dict: ``success`` and ``ends_with`` (K, P) rates, ``primitives`` (P indices),
    ``best_skill`` / ``best_success`` per primitive, ``outcome_counts`` (K, 20): how often each
    skill's runs ended on each primitive's outcome (column 19: terminated without an object
    event, 20: cut by t_max).
    """
    prims = list(range(NUM_PRIMITIVES)) if primitives is None else [int(p) for p in primitives]
    skills = list(range(lib.num_skills))
    starts = start_states(prims, n_states, seed, size)
    r = run_from(lib, starts, skills, t_max, seed, size, actor)
    P = len(prims)
    success = np.zeros((lib.num_skills, P))
    ends = np.zeros((lib.num_skills, P))
    for j, p in enumerate(prims):
        sel = r["prim"] == p
        success[:, j] = r["success"][sel].mean(0)
        ends[:, j] = r["ends_with"][sel].mean(0)
    counts = np.zeros((lib.num_skills, NUM_PRIMITIVES + 2), dtype=np.int64)
    for k in skills:
        lab = r["label"][:, k]
        np.add.at(counts[k], np.where(lab >= 0, lab, NUM_PRIMITIVES - 1 - lab), 1)
    # ties (a pickup of y completes drop(x) on the way) go to the skill that also ends on p
    best = (success + 1e-3 * ends).argmax(0)
    return {
        "primitives": prims,
        "success": success,
        "ends_with": ends,
        "best_skill": best,
        "best_success": success[best, np.arange(P)],
        "best_ends_with": ends.max(0),
        "outcome_counts": counts,
        "n_states": n_states,
    }


def main_outcomes(table: dict) -> np.ndarray:
    """(K,) the primitive whose outcome each skill's runs most often ended on (-1: none of its
    runs ended on an object event)."""
    ev = table["outcome_counts"][:, :NUM_PRIMITIVES]
    return np.where(ev.sum(1) > 0, ev.argmax(1), -1)


def skill_names(table: dict) -> list[str]:
    """Each skill named by the outcome its runs mostly ended on, with the share of all its
    runs that ended on it (``"pickup(red ball) 0.93"``; ``"(cut)"`` if none ended on an
    object event)."""
    counts = table["outcome_counts"]
    names = []
    for k, j in enumerate(main_outcomes(table)):
        share = counts[k, j] / max(counts[k].sum(), 1)
        names.append("(cut)" if j < 0 else f"{PRIM_NAMES[j]} {share:.2f}")
    return names


def name_skills(lib: OptionLibrary, table: dict) -> None:
    """Store each learned skill's main outcome in ``lib.outcome_of`` (-1: none)."""
    lib.outcome_of.copy_(torch.as_tensor(main_outcomes(table)))


def discriminator_accuracy(
    lib: OptionLibrary,
    disc: OutcomeDiscriminator,
    t_max: int = 32,
    env_steps: int = 65_536,
    num_envs: int = 64,
    seed: int = 12345,
) -> dict[str, float]:
    """Accuracy of argmax_k q(k | outcome) on fresh chain segments (uniform draws, a seed
    never used in training); also the share of segments that terminated (the rest were cut
    by t_max and have no outcome)."""
    venv, sampler = make_room(num_envs)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    pol = ChainPolicy(lib, t_max, uniform_draw([lib.num_skills], gen), gen)
    col = Collector(venv, pol, task_sampler=sampler, seed=seed)
    right = total = cut = 0
    while col.env_steps < env_steps:
        ro = col.collect(128)
        seg = terminated_segments(ro)
        with torch.no_grad():
            right += int((disc(seg.feats).argmax(-1) == seg.skill).sum())
        total += int(seg.env.numel())
        cut += int(((ro.extras["seg_len"] >= t_max) & ~(ro.terminated | ro.truncated)).sum())
    return {
        "accuracy": right / max(total, 1),
        "segments": total,
        "terminated_share": total / max(total + cut, 1),
    }


def markdown_table(
    table: dict, names: list[str], disc_stats: dict | None = None, fresh: dict | None = None
) -> str:
    """Summary lines, then the skills x primitives success table (rates in %). ``fresh``: the
    table on other start states, where the best skills chosen on ``table`` are measured again
    (the maximum over K skills on the same states is biased upwards)."""
    prims = table["primitives"]
    good = int((table["best_success"] >= 0.9).sum())
    strict = int((table["best_ends_with"] >= 0.9).sum())
    lines = [
        f"Primitives with a skill at >= 0.9 success: **{good} / {len(prims)}** "
        f"({table['n_states']} start states each); with a skill that also *ends* on the "
        f"primitive's completion in >= 0.9 of the runs: **{strict} / {len(prims)}**.",
    ]
    cols = np.arange(len(prims))
    again = None if fresh is None else fresh["success"][table["best_skill"], cols]
    if again is not None:
        lines.append(
            f"The same best skills on {fresh['n_states']} fresh start states per primitive: "
            f"**{int((again >= 0.9).sum())} / {len(prims)}** at >= 0.9."
        )
    if disc_stats is not None:
        lines.append(
            f"Discriminator accuracy on held-out segments: **{disc_stats['accuracy']:.3f}** "
            f"({disc_stats['segments']} segments; {disc_stats['terminated_share']:.2f} of all "
            "segments terminated, the rest were cut by t_max)."
        )
    lines += ["", "| primitive | best skill | success | ends on it | fresh states |"]
    lines.append("|---|---|---|---|---|")
    for j, p in enumerate(prims):
        k = int(table["best_skill"][j])
        lines.append(
            f"| {PRIM_NAMES[p]} | {k}: {names[k]} | {table['best_success'][j]:.2f} "
            f"| {table['ends_with'][k, j]:.2f} | {'-' if again is None else f'{again[j]:.2f}'} |"
        )
    head = "| skill | " + " | ".join(PRIM_NAMES[p] for p in prims) + " |"
    lines += ["", head, "|---" * (len(prims) + 1) + "|"]
    for k, name in enumerate(names):
        cells = " | ".join(f"{100 * v:.0f}" for v in table["success"][k])
        lines.append(f"| {k}: {name} | {cells} |")
    return "\n".join(lines) + "\n"


def evaluate_library(
    lib: OptionLibrary,
    disc: OutcomeDiscriminator | None = None,
    n_states: int = 16,
    seed: int = 1,
    t_max: int = 32,
) -> dict:
    """Table, names (stored in a learned library's ``outcome_of``), discriminator accuracy,
    and the best skills measured again on fresh start states (seed + 1000); returns
    ``{"json": ..., "markdown": ...}``."""
    table = skill_outcome_table(lib, n_states=n_states, seed=seed, t_max=t_max)
    fresh = skill_outcome_table(lib, n_states=n_states, seed=seed + 1000, t_max=t_max)
    names = skill_names(table)
    if lib.termination == "learned":
        name_skills(lib, table)
    disc_stats = discriminator_accuracy(lib, disc, t_max) if disc is not None else None
    cols = np.arange(len(table["primitives"]))
    js = {
        "primitives": [PRIM_NAMES[p] for p in table["primitives"]],
        "skill_names": names,
        "success": table["success"].round(4).tolist(),
        "ends_with": table["ends_with"].round(4).tolist(),
        "best_skill": table["best_skill"].tolist(),
        "best_success": table["best_success"].round(4).tolist(),
        "primitives_at_0.9": int((table["best_success"] >= 0.9).sum()),
        "best_ends_with": table["best_ends_with"].round(4).tolist(),
        "primitives_ending_at_0.9": int((table["best_ends_with"] >= 0.9).sum()),
        "outcome_counts": table["outcome_counts"].tolist(),
        "n_states": n_states,
        "fresh_best_success": fresh["success"][table["best_skill"], cols].round(4).tolist(),
        "fresh_best_ends_with": fresh["ends_with"][table["best_skill"], cols].round(4).tolist(),
        "discriminator": disc_stats,
    }
    return {"json": js, "markdown": markdown_table(table, names, disc_stats, fresh)}


def plot_library(js: dict, path) -> None:
    """``table.png`` of a library's measurement (``evaluate_library(...)["json"]``, also
    read back from ``table.json``): three skills x outcomes heatmaps on one shared 0..1 colour
    scale — how often skill k completes primitive p from a state where p is feasible (the best
    skill per primitive boxed), how often it also *ends* on p's completion, and where each
    skill's runs ended (share of its runs per outcome; the last two columns: terminated with
    no object event, cut by t_max)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    from rl.io import atomic_write_bytes

    success, ends = np.asarray(js["success"]), np.asarray(js["ends_with"])
    counts = np.asarray(js["outcome_counts"], dtype=float)
    share = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    prims, names = js["primitives"], js["skill_names"]
    K = len(names)
    # rows in the order of the outcome each skill is named by (``main_outcomes``): a library
    # that covers every primitive once shows a diagonal in the last panel
    main = main_outcomes({"outcome_counts": counts})
    order = np.argsort(np.where(main >= 0, main, NUM_PRIMITIVES), kind="stable")
    success, ends, share = success[order], ends[order], share[order]
    row_of = {int(k): i for i, k in enumerate(order)}
    panels = [
        (success, prims, f"completes p (start: p feasible; {js['n_states']} states per p)"),
        (ends, prims, "completes p on the step its termination fires"),
        (share, [*PRIM_NAMES, "no object event", "cut by t_max"], "where its runs ended"),
    ]
    fig, axes = plt.subplots(
        1, 3, figsize=(7 + 0.9 * K, 2.5 + 0.3 * K), sharey=True,
        gridspec_kw={"width_ratios": [len(p[1]) for p in panels]},
    )  # fmt: skip
    for ax, (data, cols, title) in zip(axes, panels):
        im = ax.imshow(data, cmap="viridis", vmin=0, vmax=1, aspect="equal")
        ax.set_xticks(range(len(cols)))
        ax.set_xticklabels(cols, rotation=90, fontsize=6)
        ax.set_xlabel("primitive p (its outcome)" if cols is prims else "outcome")
        ax.set_title(title, fontsize=9)
    for j, k in enumerate(js["best_skill"]):
        i = row_of[int(k)]
        axes[0].add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, ec="red", lw=1.2))
    axes[0].set_yticks(range(K))
    axes[0].set_yticklabels([f"{k}: {names[k]}" for k in order], fontsize=6)
    axes[0].set_ylabel("skill (named by its most frequent outcome, with its share)")
    fig.colorbar(im, ax=list(axes), fraction=0.02, pad=0.01, label="rate (all three panels)")
    head = (
        f"skills x outcomes: {js['primitives_at_0.9']} / {len(prims)} primitives with a skill at "
        f">= 0.9 success (red boxes: the best skill per primitive), "
        f"{js['primitives_ending_at_0.9']} / {len(prims)} also ending on it"
    )
    disc = js.get("discriminator")
    if disc:
        head += f"; discriminator accuracy on held-out segments {disc['accuracy']:.2f}"
    fig.suptitle(head, fontsize=10, y=0.9)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
