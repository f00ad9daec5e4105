"""The skill-transition graph as a feasibility model: which skill can run successfully after
which.

Edge (i, j) estimates P(skill j reaches its outcome | it starts right after skill i), from
*every* segment observed — skill discovery's chains and the controller's own choices — with a
Beta(1, 1) prior: ``(successes + 1) / (tries + 2)``. Row K is "no previous skill" (episode
start). It is a model of what the skills can do, not of the order statistics of the train
compositions, which would penalise exactly the held-out orders. The controller adds
``log P[prev, :]`` to its skill logits (mode ``learned``); mode ``none`` adds nothing and so
ignores the previous skill.

Mode ``state`` conditions the model on the state a skill starts from instead of the previous
skill: a small network f(s) gives P(skill k reaches its outcome | it starts at s) for every k,
trained by binary cross-entropy on every finished segment (its start observation with the
task part zeroed, its skill, whether it reached its outcome). Only segments that ended as
their skill ends count — its termination (an event skill: its primitive completed or became
infeasible) or ``t_max``; one cut by the episode's end or by ``interrupt`` says nothing about
the skill. The controller adds ``log max(P, FLOOR)`` to its logits: a skill that cannot run
where the agent stands (open a box while carrying, pick up while carrying) is down-weighted
there and nowhere else, which the K x K counts cannot express; the floor keeps every skill
tried now and then, so a wrong estimate is corrected. The counts are kept in every mode (the
picture ``compo graph`` draws; in ``state`` mode it also draws the network's predictions per
situation, ``write_state_graph``).
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

GRAPH_MODES = ("learned", "state", "none")
#: ``state`` mode: the least probability the prior gives a skill (log 0.05 = -3.0)
FLOOR = 0.05
#: ``state`` mode: hidden width of f(s) and full-batch Adam steps per batch of segments
STATE_HIDDEN, STATE_STEPS = 64, 8


def check_graph_mode(mode: str) -> str:
    if mode not in GRAPH_MODES:
        raise ValueError(f"graph={mode!r}; allowed: {', '.join(GRAPH_MODES)}")
    return mode


class SkillGraph(nn.Module):
    """Counts of segment outcomes per (previous skill, skill).

    Examples:
        >>> g = SkillGraph(3)
        >>> g.update(torch.tensor([-1, 0, 0]), torch.tensor([0, 1, 2]), torch.tensor([1, 1, 0]))
        >>> [round(float(x), 3) for x in g.feasibility()[0]]
        [0.5, 0.667, 0.333]
        >>> round(float(g.transition()[0].sum()), 6)
        1.0
    """

    def __init__(self, num_skills: int, mode: str = "learned", obs_dim: int | None = None) -> None:
        super().__init__()
        self.num_skills = int(num_skills)
        self.mode = check_graph_mode(mode)
        k = self.num_skills
        self.register_buffer("successes", torch.zeros(k + 1, k, dtype=torch.float64))
        self.register_buffer("tries", torch.zeros(k + 1, k, dtype=torch.float64))
        self.net: nn.Module | None = None
        if self.mode == "state":  # f(s): built only in this mode (the others' weights unchanged)
            if obs_dim is None:
                raise ValueError("graph='state' needs the observation size (obs_dim)")
            self.net = nn.Sequential(
                nn.Linear(int(obs_dim), STATE_HIDDEN), nn.Tanh(), nn.Linear(STATE_HIDDEN, k)
            )
            nn.init.zeros_(self.net[2].weight)  # P = 0.5 everywhere: no preference at the start
            nn.init.zeros_(self.net[2].bias)

    @torch.no_grad()
    def update(self, prev: torch.Tensor, skill: torch.Tensor, success: torch.Tensor) -> None:
        """Count segments: ``prev`` (-1 = none), ``skill`` and whether it reached its outcome."""
        row = torch.where(prev < 0, torch.full_like(prev, self.num_skills), prev).long()
        idx = row * self.num_skills + skill.long()
        flat_t = self.tries.view(-1)
        flat_s = self.successes.view(-1)
        flat_t.index_add_(0, idx, torch.ones_like(idx, dtype=torch.float64))
        flat_s.index_add_(0, idx, success.to(torch.float64))

    def feasibility(self) -> torch.Tensor:
        """(K + 1, K) estimated probability that each skill reaches its outcome after each
        previous skill (row K: at an episode start)."""
        return ((self.successes + 1) / (self.tries + 2)).float()

    def transition(self) -> torch.Tensor:
        """(K + 1, K) the prior over the next skill: each row of ``feasibility`` normalised
        (``none``: uniform rows)."""
        if self.mode == "none":
            return torch.full((self.num_skills + 1, self.num_skills), 1.0 / self.num_skills)
        f = self.feasibility()
        return f / f.sum(-1, keepdim=True)

    def log_prior(self, prev: torch.Tensor, state: torch.Tensor | None = None) -> torch.Tensor:
        """(B, K) added to the controller's logits: log transition[prev] (``learned``), zeros
        (``none``: the previous skill is ignored), or ``state`` mode's log max(f(state), FLOOR)
        (``state``: (B, obs_dim) observations with the task part zeroed)."""
        if self.mode == "none":
            return torch.zeros(prev.shape[0], self.num_skills)
        if self.mode == "state":
            with torch.no_grad():
                return self.state_feasibility(state).clamp_min(FLOOR).log()
        row = torch.where(prev < 0, torch.full_like(prev, self.num_skills), prev).long()
        return self.transition()[row].log()

    def state_feasibility(self, state: torch.Tensor) -> torch.Tensor:
        """(B, K) ``state`` mode: P(each skill reaches its outcome | it starts at ``state``)."""
        return torch.sigmoid(self.net(state))

    def fit_states(
        self,
        state: torch.Tensor,
        skill: torch.Tensor,
        success: torch.Tensor,
        optimizer,
        backward=None,
    ) -> dict[str, float]:
        """``state`` mode: ``STATE_STEPS`` full-batch steps of binary cross-entropy between
        f(state)[skill] and ``success`` over a batch of segments; returns the loss before
        and the accuracy of the thresholded prediction (both before the steps: a held-out
        score for this batch)."""
        y = success.float()
        with torch.no_grad():
            p0 = self.state_feasibility(state).gather(1, skill[:, None]).squeeze(1)
            stats = {
                "graph/state_bce": float(nn.functional.binary_cross_entropy(p0, y)),
                "graph/state_accuracy": float(((p0 > 0.5).float() == y).float().mean()),
                "graph/state_success_rate": float(y.mean()),
                "graph/state_segments": float(len(y)),
            }
        for _ in range(STATE_STEPS):
            logit = self.net(state).gather(1, skill[:, None]).squeeze(1)
            loss = nn.functional.binary_cross_entropy_with_logits(logit, y)
            optimizer.zero_grad(set_to_none=True)
            (backward or torch.Tensor.backward)(loss)
            optimizer.step()
        return stats

    def to_networkx(self, names: list[str] | None = None):
        """Weighted ``networkx.DiGraph``: node k has ``label`` and ``start`` (feasibility at an
        episode start); edge (i, j) has ``weight`` = feasibility[i, j], ``prior`` =
        transition[i, j] and ``tries``."""
        import networkx as nx

        P, Q = self.feasibility(), self.transition()
        g = nx.DiGraph(mode=self.mode)
        names = names or [f"skill {k}" for k in range(self.num_skills)]
        for k in range(self.num_skills):
            g.add_node(k, label=names[k], start=float(P[self.num_skills, k]))
        for i in range(self.num_skills):
            for j in range(self.num_skills):
                g.add_edge(
                    i, j, weight=float(P[i, j]), prior=float(Q[i, j]), tries=int(self.tries[i, j])
                )
        return g


def write_graph(agent, out_dir: str | os.PathLike, min_weight: float = 0.5) -> dict:
    """Write ``graph.png`` (matrix and graph, one shared colour scale) and ``graph.graphml`` of
    ``agent.graph``; return their paths (``{"png": ..., "graphml": ...}``).

    Left: every entry of the feasibility matrix, with the episode start as its last row and
    unobserved entries blank. Right: the edges with P[i, j] >= ``min_weight`` observed at least
    5 times, coloured by P on the same scale; each node coloured by its feasibility at an
    episode start.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import networkx as nx

    from rl.io import atomic_write_bytes

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    graph: SkillGraph = agent.graph
    names = agent.skill_names() if hasattr(agent, "skill_names") else None
    names = [n or f"skill {k}" for k, n in enumerate(names or [None] * graph.num_skills)]
    g = graph.to_networkx(names=names)
    k = graph.num_skills
    P = graph.feasibility().numpy()  # (K + 1, K): row K = episode start
    seen = graph.tries.numpy() > 0
    cmap, norm = plt.get_cmap("viridis"), matplotlib.colors.Normalize(0, 1)
    fig, (hax, ax) = plt.subplots(1, 2, figsize=(15, 7), gridspec_kw={"width_ratios": [1, 1.15]})
    hax.imshow(np.where(seen, P, np.nan), cmap=cmap, norm=norm)
    hax.axhline(k - 0.5, color="k", lw=1)
    hax.set(xlabel="next skill", ylabel="previous skill", xticks=range(k), yticks=range(k + 1))
    hax.set_xticklabels([str(i) for i in range(k)], fontsize=6)
    hax.set_yticklabels([f"{i} {n}" for i, n in enumerate(names)] + ["episode start"], fontsize=6)
    hax.set_title(
        "P(next skill reaches its outcome | previous skill)\n"
        "(successes + 1) / (tries + 2); blank = never tried",
        fontsize=9,
    )
    pos = nx.circular_layout(g)
    start = [g.nodes[n]["start"] for n in g.nodes]
    nx.draw_networkx_nodes(
        g, pos, ax=ax, node_color=start, cmap=cmap, vmin=0, vmax=1, node_size=520,
        edgecolors="k", linewidths=0.5,
    )  # fmt: skip
    for n, (x, y) in pos.items():  # labels outside the circle, so they never cover an edge
        ax.text(1.13 * x, 1.13 * y, f"{n} {names[n]}", fontsize=6, ha="left" if x > 0.01 else
                "right" if x < -0.01 else "center", va="center")  # fmt: skip
    edges = [
        (i, j) for i, j, d in g.edges(data=True) if d["weight"] >= min_weight and d["tries"] >= 5
    ]
    nx.draw_networkx_edges(
        g, pos, edgelist=edges, width=[2.5 * g[i][j]["weight"] for i, j in edges], ax=ax,
        arrows=True, connectionstyle="arc3,rad=0.1", node_size=520,
        edge_color=[cmap(norm(g[i][j]["weight"])) for i, j in edges],
    )  # fmt: skip
    ax.set_title(
        f"skill graph ({graph.mode}): {len(edges)} edges with P >= {min_weight} (>= 5 tries); "
        f"{int(graph.tries.sum())} segments counted\nnode colour: P at an episode start",
        fontsize=9,
    )
    ax.set_xlim(-1.75, 1.75)
    ax.set_ylim(-1.3, 1.3)
    ax.set_aspect("equal")
    ax.axis("off")
    fig.colorbar(
        plt.cm.ScalarMappable(norm=norm, cmap=cmap), ax=[hax, ax], fraction=0.025, pad=0.02,
        label="P(skill reaches its outcome) — both panels",
    )  # fmt: skip
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(out / "graph.png", buf.getvalue())
    text = "\n".join(nx.generate_graphml(g)) + "\n"
    atomic_write_bytes(out / "graph.graphml", text.encode("utf-8"))
    return {"png": str(out / "graph.png"), "graphml": str(out / "graph.graphml")}


def situation_states(agent, episodes: int = 4, seed: int = 0) -> tuple[torch.Tensor, list[str]]:
    """CompoGrid observations (task part zeroed) the scripted Oracle passes through while it
    solves each of ``agent``'s train compositions on ``episodes`` layouts, each labelled by
    its situation: what the agent carries ("hands free" or the object) and, hands free,
    whether the door is open. The states a feasibility model is meant to tell apart."""
    import gymnasium as gym

    from envs.grid import ENTITIES
    from envs.grid_oracle import Oracle

    obs, labels = [], []
    oracle = Oracle()
    for c, comp in enumerate(agent.train_set):
        env = gym.make(agent.cfg.env_id, **{**agent.cfg.env_kwargs, "composition": comp})
        for e in range(episodes):
            o, _ = env.reset(seed=seed + 1000 * c + e)
            done = False
            while not done:
                phi = env.unwrapped.phi()
                held = int(phi[2])
                door = "door open" if phi[-1] else "door closed"
                labels.append(f"carrying {ENTITIES[held - 1]}" if held else f"hands free, {door}")
                obs.append(o)
                o, _, term, trunc, _ = env.step(oracle.act(env))
                done = term or trunc
        env.close()
    states = agent.family.task_free(torch.as_tensor(np.stack(obs), dtype=torch.float32))
    return states, labels


def situation_table(
    graph: SkillGraph, states: torch.Tensor, labels: list[str]
) -> tuple[list[str], list[int], np.ndarray]:
    """The situations (hands free first), how many states each holds, and the (K, situations)
    mean of the network's P(skill reaches its outcome | state) over each one's states."""
    with torch.no_grad():
        p = graph.state_feasibility(states).numpy()
    cols = sorted(set(labels), key=lambda s: (not s.startswith("hands"), s))
    lab = np.array(labels)
    mean = np.stack([p[lab == c].mean(0) for c in cols], axis=1)
    return cols, [int((lab == c).sum()) for c in cols], mean


def write_state_graph(agent, out_dir: str | os.PathLike) -> str:
    """``state`` mode on CompoGrid: write ``state_graph.png``, the network's P(skill k reaches
    its outcome | it starts here) averaged over the states of each situation
    (``situation_states``), one row per skill and one column per situation; return its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from rl.io import atomic_write_bytes

    graph: SkillGraph = agent.graph
    cols, count, mean = situation_table(graph, *situation_states(agent))
    names = agent.skill_names() if hasattr(agent, "skill_names") else None
    names = [n or f"skill {k}" for k, n in enumerate(names or [None] * graph.num_skills)]
    fig, ax = plt.subplots(figsize=(1.1 * len(cols) + 4, 0.32 * graph.num_skills + 2))
    im = ax.imshow(mean, cmap="viridis", vmin=0, vmax=1, aspect="auto")
    for (k, j), v in np.ndenumerate(mean):
        ax.text(j, k, f"{v:.2f}", ha="center", va="center", fontsize=6,
                color="w" if v < 0.5 else "k")  # fmt: skip
    ax.set_xticks(range(len(cols)))
    ax.set_xticklabels([f"{c}\n({n} states)" for c, n in zip(cols, count)], fontsize=7,
                       rotation=30, ha="right")  # fmt: skip
    ax.set_yticks(range(graph.num_skills))
    ax.set_yticklabels([f"{k} {n}" for k, n in enumerate(names)], fontsize=7)
    ax.set_title(
        "state-conditioned skill graph: P(skill reaches its outcome | it starts here),\n"
        "mean over the states the scripted Oracle passes through on the train compositions",
        fontsize=9,
    )
    fig.colorbar(im, ax=ax, fraction=0.03, pad=0.02)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    path = Path(out_dir) / "state_graph.png"
    atomic_write_bytes(path, buf.getvalue())
    return str(path)
