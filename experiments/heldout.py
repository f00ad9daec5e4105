"""The held-out composition experiment: methods x seeds, one budget, one protocol.

Every method is meta-trained on the split's train compositions with the same env-step budget
and seeds, then evaluated by ``rl.protocol.run_trials`` on the same held-out tasks; reference
rows (random, oracle, PPO from scratch with the same episode budget) use the same tasks.
"""

from __future__ import annotations

import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

import envs
from experiments.registry import METHODS, method_class
from rl.config import config_from_dict, merge
from rl.io import atomic_write_text, dump_yaml, prepare_run_dir
from rl.protocol import (
    EvalConfig,
    OracleAgent,
    RandomAgent,
    ScratchPPOAgent,
    heldout_tasks,
    plot_curves,
    results_document,
    results_json_text,
    run_trials,
    summarize,
    table_markdown,
)
from rl.train import fit

REFERENCES = ("random", "oracle", "ppo_scratch")


@dataclass
class HeldoutConfig:
    """A held-out composition experiment."""

    family: str = "grid"
    """task family of the split (envs.make_split)"""
    split_seed: int = 0
    """seed of the split"""
    split_kwargs: dict = field(default_factory=dict)
    """extra arguments of envs.make_split (e.g. pool_size, lengths)"""
    env_id: str = "CompoGrid-v0"
    """registered env id"""
    env_kwargs: dict = field(default_factory=lambda: {"task_info": "reward", "size": 8})
    """env keyword arguments shared by every method"""
    methods: list = field(default_factory=lambda: ["ppo"])
    """trained methods: names, or {name, method, config} mappings for variants (ablations)"""
    references: list = field(default_factory=lambda: list(REFERENCES))
    """reference rows: random, oracle (CompoGrid only), ppo_scratch"""
    seeds: list = field(default_factory=lambda: [0, 1, 2])
    """training seeds (>= 3 for intervals; 5 for reported tables)"""
    total_env_steps: int = 100_000
    """meta-training env-step budget, identical for every method"""
    num_envs: int = 8
    """parallel envs during training"""
    method_config: dict = field(default_factory=dict)
    """per-method config overrides, keyed by method name"""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """evaluation protocol"""

    def __post_init__(self) -> None:
        if isinstance(self.eval, dict):
            self.eval = config_from_dict(EvalConfig, self.eval, "eval.")
        if not self.seeds:
            raise ValueError("seeds=[]; give at least one training seed")
        for r in self.references:
            if r not in REFERENCES:
                raise ValueError(f"unknown reference {r!r}; allowed: {', '.join(REFERENCES)}")
        if "oracle" in self.references and self.env_id != "CompoGrid-v0":
            raise ValueError("reference 'oracle' exists only for CompoGrid-v0")
        for m in self.method_specs():
            if m["method"] not in METHODS:
                raise ValueError(f"unknown method {m['method']!r}; allowed: {', '.join(METHODS)}")
        if self.total_env_steps < 1:
            raise ValueError(f"total_env_steps={self.total_env_steps}; allowed: >= 1")

    def method_specs(self) -> list[dict]:
        """Each trained row as {name, method, config}."""
        out = []
        for m in self.methods:
            if isinstance(m, str):
                out.append({"name": m, "method": m, "config": {}})
            elif isinstance(m, dict) and "method" in m:
                out.append(
                    {
                        "name": m.get("name", m["method"]),
                        "method": m["method"],
                        "config": m.get("config", {}),
                    }
                )
            else:
                raise ValueError(
                    f"methods entry {m!r}; allowed: a method name or {{name, method, config}}"
                )
        names = [m["name"] for m in out]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate method names in {names}")
        return out


def method_run_config(cfg: HeldoutConfig, spec: dict, seed: int) -> dict:
    """The config a method is trained with: shared conditions first, overrides on top."""
    shared = {
        "env_id": cfg.env_id,
        "env_kwargs": dict(cfg.env_kwargs),
        "compositions": None,
        "split_family": cfg.family,
        "split_seed": cfg.split_seed,
        "num_envs": cfg.num_envs,
        "total_env_steps": cfg.total_env_steps,
        "seed": int(seed),
    }
    over = merge(cfg.method_config.get(spec["method"], {}), spec["config"])
    for k in ("total_env_steps", "seed", "env_id", "split_family", "split_seed"):
        if k in over:
            raise ValueError(
                f"{spec['name']}: {k!r} is shared by all methods; set it at the top level"
            )
    return merge(shared, over)


def eval_tasks(cfg: HeldoutConfig) -> tuple:
    """The split and the held-out tasks (composition + layout seed) every row is evaluated on."""
    split = envs.make_split(cfg.family, seed=cfg.split_seed, **cfg.split_kwargs)
    tasks = heldout_tasks(
        split.heldout, cfg.eval.num_tasks, cfg.eval.seed, split.meta.get("heldout_layout_seeds")
    )
    return split, tasks


def run_heldout(cfg: HeldoutConfig, out: str | Path, *, overwrite: bool = False, log=print) -> dict:
    """Train and evaluate every method and reference; write the run folder; return results."""
    # validate every method config before anything is written
    for spec in cfg.method_specs():
        cls = method_class(spec["method"])
        config_from_dict(cls.config_cls, method_run_config(cfg, spec, cfg.seeds[0]))
    out = prepare_run_dir(out, overwrite=overwrite)
    command = " ".join(shlex.quote(a) for a in ["compo", *sys.argv[1:]]) if sys.argv else ""
    dump_yaml(out / "config.yaml", asdict(cfg))
    split, tasks = eval_tasks(cfg)
    ev = cfg.eval
    methods: dict[str, dict] = {}

    def evaluate(agent) -> dict[str, np.ndarray]:
        return run_trials(
            agent, tasks, env_id=cfg.env_id, env_kwargs=cfg.env_kwargs,
            episodes=ev.episodes, num_envs=ev.num_envs, seed=ev.seed,
        )  # fmt: skip

    for spec in cfg.method_specs():
        succ, ret, steps, wall = {}, {}, 0, 0.0
        for seed in cfg.seeds:
            t0 = time.perf_counter()
            module = method_class(spec["method"])(method_run_config(cfg, spec, seed))
            fit(module, out / spec["name"] / f"seed{seed}")
            r = evaluate(module)
            wall += time.perf_counter() - t0
            succ[seed], ret[seed] = r["success"], r["return"]
            steps = module.env_steps
            log(
                f"[{spec['name']} seed {seed}] meta-train steps {steps:,}; success by episode {np.round(r['success'].mean(0), 2).tolist()}"
            )
        methods[spec["name"]] = summarize(
            succ, ret, n_boot=ev.bootstrap, meta_train_env_steps=steps,
            wall_s=wall / len(cfg.seeds), trained=True,
        )  # fmt: skip
    for ref in cfg.references:
        succ, ret = {}, {}
        t0 = time.perf_counter()
        for seed in cfg.seeds:
            if ref == "oracle":
                agent = OracleAgent()
            elif ref == "random":
                agent = RandomAgent(seed=seed)
            else:
                import torch

                torch.manual_seed(seed)
                agent = ScratchPPOAgent()
            r = evaluate(agent)
            succ[seed], ret[seed] = r["success"], r["return"]
        methods[ref] = summarize(
            succ, ret, n_boot=ev.bootstrap, wall_s=(time.perf_counter() - t0) / len(cfg.seeds)
        )
        log(f"[{ref}] success by episode {np.round(methods[ref]['success_at'], 2).tolist()}")
    doc = results_document(
        asdict(cfg), split.to_dict(), methods, resamples=ev.bootstrap, tasks=tasks, command=command
    )
    atomic_write_text(out / "results.json", results_json_text(doc))
    atomic_write_text(out / "table.md", table_markdown(doc))
    plot_curves(doc["methods"], out / "curves.png", title=f"Held-out compositions ({cfg.family})")
    return doc
