"""``compo eval --checkpoint CKPT``: the shared protocol on the held-out tasks of one trained
checkpoint's split, written like ``compo heldout`` (results.json, table.md, curves.png).

The checkpoint's own config names its env, env kwargs and split; the held-out tasks are drawn
exactly as ``compo heldout`` draws them (``rl.protocol.heldout_tasks`` with the same eval
seed), so evaluating the checkpoint of a ``heldout`` run reproduces that run's numbers.
"""

from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path

import envs
from experiments.registry import REGISTRY
from rl.io import atomic_write_text, prepare_run_dir
from rl.protocol import (
    EvalConfig,
    heldout_tasks,
    plot_curves,
    results_document,
    results_json_text,
    run_trials,
    summarize,
    table_markdown,
)
from rl.train import load_module


def run_eval(
    checkpoint: str | Path,
    out: str | Path,
    *,
    eval_cfg: EvalConfig | None = None,
    overwrite: bool = False,
    log=print,
) -> dict:
    """Evaluate one checkpoint on its split's held-out tasks; returns the results document."""
    ev = eval_cfg or EvalConfig()
    module = load_module(checkpoint, REGISTRY)  # validates the file before anything is written
    cfg = module.cfg
    split = envs.make_split(cfg.split_family, seed=cfg.split_seed)
    tasks = heldout_tasks(
        split.heldout, ev.num_tasks, ev.seed, split.meta.get("heldout_layout_seeds")
    )
    out = prepare_run_dir(out, overwrite=overwrite)
    t0 = time.perf_counter()
    r = run_trials(
        module, tasks, env_id=cfg.env_id, env_kwargs=cfg.env_kwargs, episodes=ev.episodes,
        num_envs=ev.num_envs, seed=ev.seed,
    )  # fmt: skip
    seed = int(cfg.seed)
    name = module.method
    methods = {
        name: summarize(
            {seed: r["success"]},
            {seed: r["return"]},
            n_boot=ev.bootstrap,
            meta_train_env_steps=module.env_steps,
            wall_s=time.perf_counter() - t0,
            trained=True,
        )  # fmt: skip
    }
    command = " ".join(shlex.quote(a) for a in ["compo", *sys.argv[1:]]) if sys.argv else ""
    config = {"checkpoint": str(checkpoint), "method": name, "eval": vars(ev)}
    doc = results_document(
        config, split.to_dict(), methods, resamples=ev.bootstrap, tasks=tasks, command=command
    )
    atomic_write_text(out / "results.json", results_json_text(doc))
    atomic_write_text(out / "table.md", table_markdown(doc))
    plot_curves(doc["methods"], out / "curves.png", title=f"{name} on held-out compositions")
    log(
        f"[{name} seed {seed}] success by episode {[round(float(x), 2) for x in methods[name]['success_at']]}"
    )
    return doc
