"""The pictures of ``compo trace``, drawn from ``trace.json`` alone.

``trace.png``: what ran when — one coloured bar per segment of the skill that ran alone (the
compositional agent) or the action taken, by name (PPO, RL², ...); below it the current
sub-task, then the reward per step with the episode's return so far. Episode boundaries are
dashed lines; each episode is tinted green (success) or red (failure) and labelled above the
plot with its return and length.

``trace.gif``: the room as the agent saw it before each step (``GIF_TILE`` px per cell, 320 px
for the default 8 x 8 room), with a panel beside it: the step, the skill (and its action) or
the action, the reward this step earned and the return so far, and the composition with
done / current / pending marks on its sub-tasks.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from envs.core import Composition
from envs.grid import ACTIONS, PRIMITIVES
from rl.io import atomic_write_bytes

#: pixels per grid cell in the GIF (MiniGrid renders at 32; 40 makes an 8x8 room 320 px)
GIF_TILE = 40
#: width of the text panel beside each GIF frame, and its font size in px
PANEL_PX, FONT_PX = 330, 16
#: how long a GIF frame shows (ms), and the last frame of an episode
FRAME_MS, EPISODE_END_MS = 160, 900

GREEN, RED, GREY, BLACK, BLUE = (0, 130, 0), (200, 0, 0), (120, 120, 120), (0, 0, 0), (0, 70, 200)
#: sub-task spans in trace.png: neither green nor red, which mark episode outcomes
SUBTASK_COLOURS = ("#c6dbef", "#fdd0a2", "#dadaeb", "#fff2ae")


# --- what each step says -------------------------------------------------------------------------


def skill_label(doc: dict, k: int) -> str:
    """``"skill 3: goto(red ball)"``, or ``"skill 3"`` when the library has not named it."""
    names = doc.get("skill_names") or []
    name = names[k] if k < len(names) else None
    return f"skill {k}: {name}" if name else f"skill {k}"


def action_label(action) -> str:
    """A CompoGrid action by name; a continuous action by its norm."""
    if np.isscalar(action) and 0 <= int(action) < len(ACTIONS):
        return ACTIONS[int(action)]
    return f"|a| = {float(np.linalg.norm(action)):.2f}"


def frame_lines(doc: dict, i: int) -> list[tuple[str, tuple[int, int, int]]]:
    """The text written beside frame ``i`` of the GIF: (line, RGB colour) pairs."""
    steps = doc["steps"]
    s = steps[i]
    ep = s["episode"]
    first = next(j for j in range(i, -1, -1) if j == 0 or steps[j - 1]["episode"] != ep)
    ret = sum(x["reward"] for x in steps[first : i + 1])
    lines = [
        (f"{doc['method']}, trial step {i}", BLACK),
        (f"episode {ep}, step {i - first}", BLACK),
        ("", BLACK),
    ]
    if "skill" in s:
        mark = "  (new decision)" if s.get("decision") else ""
        lines.append((skill_label(doc, int(s["skill"])) + mark, BLUE))
    paid = GREEN if s["reward"] else BLACK
    lines.append((f"action: {action_label(s['action'])}  ->  reward {s['reward']:+.2f}", paid))
    lines.append((f"return so far: {ret:.2f}", BLACK))
    lines.append(("", BLACK))
    comp = Composition.parse(doc["composition"])
    done = s.get("progress")
    lines.append(("sub-tasks (in order):", BLACK))
    for j, p in enumerate(comp):
        if done is None:
            lines.append((f"      {p}", BLACK))
        elif j < done:
            lines.append((f"[x]  {p}", GREY))
        elif j == done:
            lines.append((f"-->  {p}", RED))
        else:
            lines.append((f"[  ]  {p}", BLACK))
    last = i + 1 == len(steps) or steps[i + 1]["episode"] != ep
    outcome = next((e for e in doc["episodes"] if e["index"] == ep), None)
    if last and outcome is not None:
        ok = outcome["success"]
        lines += [("", BLACK), (f"episode {ep} ends: {'success' if ok else 'fail'}", GREEN if ok else RED)]  # fmt: skip
    return lines


# --- the GIF -------------------------------------------------------------------------------------


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1 with FreeType
    except (TypeError, OSError):
        return ImageFont.load_default()


def annotate_frame(frame: np.ndarray, lines: list[tuple[str, tuple[int, int, int]]]) -> np.ndarray:
    """``frame`` (H, W, 3) with a white panel of ``PANEL_PX`` on its right holding ``lines``;
    the frame's own pixels are unchanged. The height is at least 256 px."""
    from PIL import Image, ImageDraw

    h, w = frame.shape[:2]
    font = _font(FONT_PX)
    step = int(FONT_PX * 1.35)
    height = max(h, 256, 10 + step * len(lines))
    img = Image.new("RGB", (w + PANEL_PX, height), "white")
    img.paste(Image.fromarray(np.ascontiguousarray(frame[..., :3]).astype(np.uint8)), (0, 0))
    draw = ImageDraw.Draw(img)
    for j, (text, colour) in enumerate(lines):
        draw.text((w + 12, 8 + j * step), text, fill=colour, font=font)
    return np.asarray(img)


def gif_frames(frames: list[np.ndarray], doc: dict) -> list[np.ndarray]:
    """Every recorded frame with its step's panel (``frame_lines``)."""
    return [annotate_frame(f, frame_lines(doc, i)) for i, f in enumerate(frames)]


def write_gif(frames: list[np.ndarray], doc: dict, path: str | Path) -> None:
    """``trace.gif``: annotated frames; the last frame of each episode stays longer."""
    import imageio.v3 as iio

    steps = doc["steps"]
    n = len(frames)
    ends = [i + 1 == n or steps[i + 1]["episode"] != steps[i]["episode"] for i in range(n)]
    buf = io.BytesIO()
    iio.imwrite(
        buf, np.stack(gif_frames(frames, doc)), extension=".gif", loop=0,
        duration=[EPISODE_END_MS if e else FRAME_MS for e in ends],
    )  # fmt: skip
    atomic_write_bytes(path, buf.getvalue())


# --- trace.png -----------------------------------------------------------------------------------


def plot_trace(doc: dict, path: str | Path) -> None:
    """``trace.png``: skills (or actions), current sub-task, reward; episodes marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = doc["steps"]
    skills = bool(steps) and "skill" in steps[0] and "decision" in steps[0]
    has_sub = bool(steps) and "progress" in steps[0]
    top_rows = _skill_rows(doc) if skills else list(range(len(ACTIONS)))
    top_h = max(2.0, 0.32 * len(top_rows))
    heights = [top_h] + ([0.7] if has_sub else []) + [1.4]
    fig, axes = plt.subplots(
        len(heights), 1, figsize=(12, 1.4 + sum(heights)), sharex=True,
        gridspec_kw={"height_ratios": heights},
    )  # fmt: skip
    t = np.arange(len(steps))
    if skills:
        _skill_panel(axes[0], doc, top_rows, plt)
        what = "the skill that ran alone in each segment"
    else:
        _action_panel(axes[0], steps)
        what = "the action taken at each step"
    if has_sub:
        _subtask_panel(axes[1], doc)
    _reward_panel(axes[-1], steps, t)
    _episodes(axes, doc)
    title = f"{doc['method']} on {doc['composition']} (layout seed {doc['layout_seed']}): {what}"
    if doc.get("skill_subtask_nmi"):
        nmi = doc["skill_subtask_nmi"]
        title += f"\nskill / sub-task NMI {nmi['nmi']:.2f} over {nmi['episodes']} held-out episodes"
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def _named_row(doc: dict) -> dict[str, int]:
    """Skill index by name: the current sub-task is drawn on the row of the skill named after
    its primitive (supervised library: skill k = primitive k; discovered: the skill whose
    measured outcome it is)."""
    names = doc.get("skill_names") or []
    by_name: dict[str, int] = {}
    for k, n in enumerate(names):
        if n:
            by_name.setdefault(n, k)
    return by_name


def _subtask_skill(doc: dict, s: dict) -> int:
    v = s.get("subtask", -1)
    return _named_row(doc).get(str(PRIMITIVES[v]), -1) if v is not None and v >= 0 else -1


def _skill_rows(doc: dict) -> list[int]:
    used = {int(s["skill"]) for s in doc["steps"]}
    used |= {k for k in (_subtask_skill(doc, s) for s in doc["steps"]) if k >= 0}
    return sorted(used)


def _skill_panel(ax, doc: dict, used: list[int], plt) -> None:
    steps = doc["steps"]
    sk = np.array([s["skill"] for s in steps])
    row = {k: i for i, k in enumerate(used)}
    cmap = plt.get_cmap("tab20")
    start = 0
    for i in range(1, len(steps) + 1):
        if (
            i == len(steps)
            or steps[i]["decision"]
            or steps[i]["episode"] != steps[start]["episode"]
        ):
            k = int(sk[start])
            ax.barh(row[k], i - start, left=start - 0.5, height=0.7, color=cmap(k % 20))
            start = i
    sub = np.array([_subtask_skill(doc, s) for s in steps])
    ok = sub >= 0
    ax.plot(np.flatnonzero(ok), [row[int(v)] for v in sub[ok]], "k_", ms=6, mew=1.5,
            label="current sub-task, on the row of the skill named after it")  # fmt: skip
    dec = [i for i, s in enumerate(steps) if s["decision"]]
    ax.plot(dec, [row[int(sk[i])] + 0.45 for i in dec], "kv", ms=3, label="decision")
    ax.set_yticks(range(len(used)))
    ax.set_yticklabels([skill_label(doc, k) for k in used], fontsize=7)
    ax.set_ylim(len(used) - 0.5, -0.9)
    ax.set_ylabel("active skill")
    ax.legend(loc="lower left", bbox_to_anchor=(1.0, 0.0), fontsize=7, frameon=False)


def _action_panel(ax, steps: list[dict]) -> None:
    discrete = all(np.isscalar(s["action"]) for s in steps)
    acts = [s["action"] if discrete else np.linalg.norm(s["action"]) for s in steps]
    ax.plot(np.arange(len(steps)), acts, "o", ms=3, color="tab:blue")
    if discrete:
        ax.set_yticks(range(len(ACTIONS)))
        ax.set_yticklabels(ACTIONS, fontsize=8)
        ax.set_ylim(len(ACTIONS) - 0.5, -0.5)
        ax.set_ylabel("action")
    else:
        ax.set_ylabel("|action|")


def _subtask_panel(ax, doc: dict) -> None:
    """One labelled span per stretch of steps with the same current sub-task (grey: all done)."""
    steps = doc["steps"]
    comp = Composition.parse(doc["composition"])
    start = 0
    for i in range(1, len(steps) + 1):
        if (
            i == len(steps)
            or steps[i]["progress"] != steps[start]["progress"]
            or steps[i]["episode"] != steps[start]["episode"]
        ):
            j = steps[start]["progress"]
            text = str(comp[j]) if j < len(comp) else "all done"
            colour = SUBTASK_COLOURS[j % len(SUBTASK_COLOURS)] if j < len(comp) else "lightgrey"
            ax.axvspan(start - 0.5, i - 0.5, color=colour, lw=0)
            label = f"{j + 1}. {text}" if j < len(comp) else text
            if (i - start) < 0.08 * len(steps):  # too narrow for the name: the number only
                label = f"{j + 1}." if j < len(comp) else ""
            ax.text((start + i - 1) / 2, 0.5, label, ha="center", va="center", fontsize=7,
                    clip_on=True)  # fmt: skip
            start = i
    ax.set_yticks([])
    ax.set_ylabel("current\nsub-task", fontsize=8)


def _reward_panel(ax, steps: list[dict], t: np.ndarray) -> None:
    r = np.array([s["reward"] for s in steps], dtype=float)
    ret = np.zeros_like(r)
    for i in range(len(r)):
        same = i > 0 and steps[i]["episode"] == steps[i - 1]["episode"]
        ret[i] = r[i] + (ret[i - 1] if same else 0.0)
    ax.bar(t, r, color="tab:green", width=1.0, label="reward of the step")
    ax.step(t, ret, where="post", color="k", lw=1, label="return so far in the episode")
    hi = max(float(r.max(initial=0.0)), float(ret.max(initial=0.0))) or 1.0  # all zero: 0..1
    ax.set_ylim(min(0.0, float(r.min(initial=0.0)), float(ret.min(initial=0.0))), 1.08 * hi)
    ax.set_ylabel("reward")
    ax.set_xlabel("env step in the trial")
    ax.legend(loc="lower left", bbox_to_anchor=(1.0, 0.0), fontsize=7, frameon=False)


def _episodes(axes, doc: dict) -> None:
    """Dashed boundaries; each episode tinted by its outcome and labelled above the top row."""
    steps = doc["steps"]
    bounds = [0] + [
        i for i in range(1, len(steps)) if steps[i]["episode"] != steps[i - 1]["episode"]
    ]
    ends = bounds[1:] + [len(steps)]
    for ep, b0, b1 in zip(doc["episodes"], bounds, ends):
        colour = "tab:green" if ep["success"] else "tab:red"
        for a in axes:
            a.axvspan(b0 - 0.5, b1 - 0.5, color=colour, alpha=0.06, lw=0, zorder=0)
            if b0 > 0:
                a.axvline(b0 - 0.5, color="k", ls="--", lw=0.8)
        mark = "success" if ep["success"] else "fail"
        axes[0].text(
            (b0 + b1 - 1) / 2, 1.01, f"episode {ep['index']}: {mark} (return {ep['return']:.2f}, "
            f"{ep['length']} steps)", transform=axes[0].get_xaxis_transform(), ha="center",
            va="bottom", fontsize=8, color=colour,
        )  # fmt: skip
    axes[0].set_xlim(-0.5, len(steps) - 0.5)
