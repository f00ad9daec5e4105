"""The skill-transition graph: which skill follows which, and when a skill ends.

A learned K x K matrix of adjacency logits ``A`` plus the skills' termination functions
beta_k(s) (``SkillLibrary.beta``, as in the option-critic, Bacon et al. 2017). At every step the
active skill k terminates with probability beta_k(s); when it does, the next skill is drawn from
``softmax(A[k] + controller_logits)`` (graph prior and controller combined as a sum of logits).
At an episode start there is no active skill, so only the controller's logits are used.

Mode ``none`` (the ablation): no graph prior and fixed-length skills: the controller re-selects
every ``skill_len`` steps, whatever the termination heads say.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

GRAPH_MODES = ("learned", "none")


def check_graph_mode(mode: str) -> str:
    if mode not in GRAPH_MODES:
        raise ValueError(f"graph={mode!r}; allowed: {', '.join(GRAPH_MODES)}")
    return mode


class SkillGraph(nn.Module):
    """Learned adjacency logits over skills and the switching rule.

    Args:
        num_skills: K.
        mode: 'learned' or 'none'.
        skill_len: re-selection period of mode ``none``.

    Examples:
        >>> g = SkillGraph(3)
        >>> torch.allclose(g.transition().sum(-1), torch.ones(3))
        True
    """

    def __init__(self, num_skills: int, mode: str = "learned", skill_len: int = 8) -> None:
        super().__init__()
        self.mode = check_graph_mode(mode)
        if skill_len < 1:
            raise ValueError(f"skill_len={skill_len}; allowed: an integer >= 1")
        self.num_skills, self.skill_len = num_skills, skill_len
        # zeros: a uniform prior until meta-training shapes it
        self.adjacency_logits = nn.Parameter(
            torch.zeros(num_skills, num_skills), requires_grad=mode == "learned"
        )

    def transition(self) -> torch.Tensor:
        """Row-stochastic K x K matrix P[i, j] = p(next = j | current = i) of the graph prior."""
        if self.mode == "none":
            return torch.full((self.num_skills, self.num_skills), 1.0 / self.num_skills)
        return torch.softmax(self.adjacency_logits, -1)

    def prior_logits(self, prev_skill: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
        """Graph prior logits (B, K) for the next skill given the active one (zeros at episode
        starts and in mode ``none``)."""
        b = prev_skill.shape[0]
        if self.mode == "none":
            return torch.zeros(b, self.num_skills)
        rows = self.adjacency_logits[prev_skill.clamp_min(0)]
        return rows * (~start).float().unsqueeze(-1)

    def next_skill_logits(
        self, ctrl_logits: torch.Tensor, prev_skill: torch.Tensor, start: torch.Tensor
    ) -> torch.Tensor:
        """Logits of the next-skill distribution: controller + graph row (sum of logits)."""
        return ctrl_logits + self.prior_logits(prev_skill, start)

    def switch_prob(
        self, beta: torch.Tensor, prev_skill: torch.Tensor, steps: torch.Tensor, start: torch.Tensor
    ) -> torch.Tensor:
        """p(the active skill ends now) (B,): beta_k(s) of the active skill k (mode ``learned``)
        or 1 every ``skill_len`` steps (mode ``none``); always 1 at an episode start."""
        if self.mode == "none":
            p = (steps >= self.skill_len).float()
        else:
            p = beta.gather(1, prev_skill.clamp_min(0).view(-1, 1)).squeeze(1)
        return torch.where(start, torch.ones_like(p), p)

    def to_networkx(self, names: list[str] | None = None, termination: torch.Tensor | None = None):
        """Weighted ``networkx.DiGraph``: nodes are skills (attribute ``termination``: mean
        beta_k if given), edge (i, j) has ``weight`` = P[i, j] of the graph prior."""
        import networkx as nx

        P = self.transition().detach()
        g = nx.DiGraph(mode=self.mode)
        names = names or [f"skill {k}" for k in range(self.num_skills)]
        for k in range(self.num_skills):
            attrs = {"label": names[k]}
            if termination is not None:
                attrs["termination"] = float(termination[k])
            g.add_node(k, **attrs)
        for i in range(self.num_skills):
            for j in range(self.num_skills):
                g.add_edge(i, j, weight=float(P[i, j]))
        return g


def write_graph(agent, out_dir: str | os.PathLike, min_weight: float | None = None) -> dict:
    """Write ``graph.png`` and ``graph.graphml`` of ``agent``'s skill graph into ``out_dir``.

    Args:
        agent: a ``CompositionalAgent`` (anything with ``.graph`` and optionally
            ``.mean_termination()``).
        out_dir: the folder (created if missing).
        min_weight: edges below this probability are not drawn (default 1.5/K: edges the graph
            clearly prefers over the uniform 1/K; none while the prior is still uniform); every
            edge is in the GraphML file.

    Returns:
        ``{"png": path, "graphml": path}``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import networkx as nx

    from rl.io import atomic_write_bytes

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    graph: SkillGraph = agent.graph
    beta = agent.mean_termination() if hasattr(agent, "mean_termination") else None
    names = agent.skill_names() if hasattr(agent, "skill_names") else None
    g = graph.to_networkx(names=names, termination=beta)
    k = graph.num_skills
    thr = 1.5 / k if min_weight is None else min_weight
    P = np.array([[g[i][j]["weight"] for j in range(k)] for i in range(k)])
    fig, (hax, ax) = plt.subplots(1, 2, figsize=(12, 5.6), gridspec_kw={"width_ratios": [1, 1.1]})
    # left: the whole transition matrix, coloured relative to uniform 1/K, so a prior that has
    # barely moved still shows where it is heading
    im = hax.imshow(P * k, cmap="RdBu_r", vmin=0, vmax=2, interpolation="nearest")
    hax.set(xlabel="next skill", ylabel="current skill", xticks=range(k), yticks=range(k))
    if names:
        hax.set_yticklabels([f"{n} {name}" for n, name in enumerate(names)], fontsize=6)
    hax.set_title(f"p(next | current) × K  (1 = uniform; max {P.max() * k:.2f})", fontsize=9)
    fig.colorbar(im, ax=hax, fraction=0.046, pad=0.04)
    # right: the graph; edges clearly above uniform are drawn, and if none is, each skill's
    # most likely successor (thin, dashed) so the layout is never empty
    pos = nx.circular_layout(g)
    nx.draw_networkx_nodes(g, pos, ax=ax, node_color="#9ecae1", node_size=600)
    labels = {n: str(n) if not names else f"{n}\n{names[n]}" for n in g.nodes}
    if beta is not None:
        labels = {n: f"{labels[n]}\nβ={float(beta[n]):.2f}" for n in g.nodes}
    nx.draw_networkx_labels(g, pos, labels=labels, ax=ax, font_size=7)
    edges = [(i, j) for i, j, w in g.edges(data="weight") if w > thr + 1e-9]
    if edges:
        widths = [min(6.0, k * g[i][j]["weight"]) for i, j in edges]  # 1 = uniform
        nx.draw_networkx_edges(
            g, pos, edgelist=edges, width=widths, ax=ax, arrows=True, connectionstyle="arc3,rad=0.1"
        )
        title = f"skill graph ({graph.mode}): {len(edges)} edges with p > {thr:.2f}"
    else:
        top = [(i, int(P[i].argmax())) for i in range(k)]
        nx.draw_networkx_edges(
            g, pos, edgelist=top, width=1.0, style="dashed", ax=ax, arrows=True,
            connectionstyle="arc3,rad=0.1", edge_color="grey",
        )  # fmt: skip
        title = f"skill graph ({graph.mode}): no edge above {thr:.2f}; dashed = argmax successor"
    ax.set_title(title, fontsize=9)
    ax.axis("off")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(out / "graph.png", buf.getvalue())
    text = "\n".join(nx.generate_graphml(g)) + "\n"
    atomic_write_bytes(out / "graph.graphml", text.encode("utf-8"))
    return {"png": str(out / "graph.png"), "graphml": str(out / "graph.graphml")}
