"""The held-out composition experiment: methods x seeds, one budget, one protocol.

Every method is meta-trained on the split's train compositions with the same env-step budget
and seeds, then evaluated by ``rl.protocol.run_trials`` on the same held-out tasks. Reference
rows use the same tasks:

- ``random``: uniform actions;
- ``oracle`` (CompoGrid): the BFS oracle, told the composition;
- ``ideal_observer`` (CompoGrid, reward mode): scripted skills plus exact Bayesian elimination
  of composition hypotheses, prior from the run's train split (``rl.ideal_observer``): the
  ceiling of adaptation;
- ``ppo_scratch``: PPO from scratch on each held-out task with the trial's episodes;
- ``ppo_finetune``: the transfer-learning comparison (issue 16) — the multi-task PPO policy
  trained on the train compositions (the run's own ``ppo`` row's checkpoint per seed, or one
  trained here with the same budget when ``ppo`` is not among the methods), fine-tuned by PPO
  on each held-out task with the trial's episodes only, a fresh copy per trial.

Left unset, ``references`` is every row that applies to the run (see ``default_references``).
"""

from __future__ import annotations

import json
import shlex
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from lightning.pytorch.loggers import Logger, TensorBoardLogger

import envs
from experiments.registry import METHODS, REGISTRY, method_class
from rl.config import LIMITS, config_from_dict, config_to_dict, merge
from rl.ideal_observer import IdealObserverAgent
from rl.io import (
    TEMP_GLOB,
    atomic_write_text,
    dump_yaml,
    load_yaml,
    prepare_run_dir,
    remove_temp_files,
)
from rl.protocol import (
    EvalConfig,
    FinetunePPOAgent,
    OracleAgent,
    RandomAgent,
    ScratchPPOAgent,
    heldout_tasks,
    plot_curves,
    provenance,
    results_document,
    results_json_text,
    run_trials,
    summarize,
    table_markdown,
)
from rl.train import (
    RUN_ENTRIES,
    check_same_run,
    fit,
    latest_checkpoint,
    load_module,
    prepare_train_dir,
)

REFERENCES = ("random", "oracle", "ideal_observer", "ppo_scratch", "ppo_finetune")


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
    references: list | None = None
    """reference rows: random, oracle (CompoGrid), ideal_observer (CompoGrid, reward mode),
    ppo_scratch, ppo_finetune; None: every one that applies (``default_references``)"""
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
        ok = all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in self.seeds)
        if not ok or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds={self.seeds!r}; allowed: distinct integers >= 0")
        for k in ("num_envs", "total_env_steps"):
            if not 1 <= getattr(self, k) <= LIMITS[k]:
                raise ValueError(f"{k}={getattr(self, k)}; allowed: an integer in [1, {LIMITS[k]}]")
        unknown = sorted(set(self.method_config) - set(METHODS))
        if unknown:
            raise ValueError(
                f"method_config.{unknown[0]}: not a method; allowed: {', '.join(METHODS)}"
            )
        for m in self.method_specs():
            if m["method"] not in METHODS:
                raise ValueError(f"unknown method {m['method']!r}; allowed: {', '.join(METHODS)}")
        if self.references is None:
            self.references = default_references(self)
        for r in self.references:
            if r not in REFERENCES:
                raise ValueError(f"unknown reference {r!r}; allowed: {', '.join(REFERENCES)}")
            if r in {m["name"] for m in self.method_specs()}:
                raise ValueError(f"method name {r!r} is also a reference row; rename the method")
        if "oracle" in self.references and self.env_id != "CompoGrid-v0":
            raise ValueError("reference 'oracle' exists only for CompoGrid-v0")
        if "ideal_observer" in self.references and not observer_applies(self):
            raise ValueError(
                "reference 'ideal_observer' exists only for CompoGrid-v0 in reward mode (family "
                f"'grid' or 'grid-layouts:...', task_info 'reward'); got env_id={self.env_id!r}, "
                f"family={self.family!r}, task_info={self.env_kwargs.get('task_info', 'reward')!r}"
            )

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
        for n in names:  # each row's runs live in the folder <out>/<name>
            if not isinstance(n, str) or n in ("pairs", "tb") or "/" in n or n.startswith("."):
                raise ValueError(
                    f"method name {n!r}; allowed: a folder name other than 'pairs' and 'tb'"
                )
        return out


def observer_applies(cfg: HeldoutConfig) -> bool:
    """Is the ideal observer defined for this run (CompoGrid, reward mode)?"""
    grid = cfg.family == "grid" or cfg.family.startswith("grid-layouts:")
    reward = cfg.env_kwargs.get("task_info", "reward") == "reward"
    return cfg.env_id == "CompoGrid-v0" and grid and reward


def default_references(cfg: HeldoutConfig) -> list[str]:
    """The reference rows of a run that does not list them: every one that applies.

    ``oracle`` and ``ideal_observer`` where they are defined (the observer costs about 6 s per
    seed for 20 tasks x 10 episodes on CompoGrid, 4x the oracle: cheap beside any training);
    ``ppo_finetune`` only when a ``ppo`` row is trained, whose checkpoints it reuses (otherwise
    it would add a whole PPO training per seed: list it to get that).
    """
    refs = ["random"]
    if cfg.env_id == "CompoGrid-v0":
        refs.append("oracle")
    if observer_applies(cfg):
        refs.append("ideal_observer")
    refs.append("ppo_scratch")
    if pretrained_spec(cfg) is not None:
        refs.append("ppo_finetune")
    return refs


def pretrained_spec(cfg: HeldoutConfig) -> dict | None:
    """The trained row whose checkpoints ``ppo_finetune`` starts from: the row named ``ppo``
    if it is plain PPO, else the first PPO row; None when no PPO row is trained."""
    ppo = [m for m in cfg.method_specs() if m["method"] == "ppo"]
    named = [m for m in ppo if m["name"] == "ppo"]
    return (named or ppo or [None])[0]


def run_split(cfg: HeldoutConfig) -> envs.Split:
    """The run's split (``family``, ``split_seed``, ``split_kwargs``)."""
    try:
        return envs.make_split(cfg.family, seed=cfg.split_seed, **cfg.split_kwargs)
    except TypeError as e:
        if "unexpected keyword argument" not in str(e):
            raise  # not the user's keyword: an internal error keeps its traceback
        raise ValueError(f"split_kwargs={cfg.split_kwargs!r}: {e}") from None


def method_run_config(cfg: HeldoutConfig, spec: dict, seed: int) -> dict:
    """The config a method is trained with: shared conditions first, overrides on top.

    Methods find their train compositions from ``split_family`` and ``split_seed``; with
    ``split_kwargs`` (a split kind, a pool size...) that would be another split, so the
    run's train compositions are given explicitly.
    """
    compositions = None
    if cfg.split_kwargs:
        split = run_split(cfg)
        if split.meta.get("train_layout_seeds") is not None:
            # training reads the layout seeds from (family, seed) alone: they would not match
            raise ValueError(
                f"split_kwargs={cfg.split_kwargs!r} with family {cfg.family!r}; allowed: "
                "split_kwargs only for families without train layout seeds (e.g. 'grid')"
            )
        compositions = [str(c) for c in split.train]
    shared = {
        "env_id": cfg.env_id,
        "env_kwargs": dict(cfg.env_kwargs),
        "compositions": compositions,
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


#: what each reference row is (results.json ``note``; ``ppo_finetune`` says where its
#: pre-trained weights came from instead)
REFERENCE_NOTES = {
    "random": "uniform random actions",
    "oracle": "scripted BFS oracle told the composition (CompoGrid's upper bound)",
    "ideal_observer": (
        "scripted skills plus exact Bayesian elimination of every feasible composition of the"
        " split's lengths, prior from the train split's primitive-position frequencies: the"
        " ceiling of reward-mode adaptation"
    ),
    "ppo_scratch": (
        "PPO from a fresh network on each held-out task, one update per finished episode of"
        " the trial (the trial's episodes only)"
    ),
}


def reference_agent(name: str, seed: int, split: envs.Split):
    """The agent of reference row ``name`` for training seed ``seed`` (``ppo_finetune`` is
    built by ``pretrained_ppo``)."""
    if name == "random":
        return RandomAgent(seed=seed)
    if name == "oracle":
        return OracleAgent()
    if name == "ideal_observer":
        return IdealObserverAgent(split)
    if name == "ppo_scratch":
        return ScratchPPOAgent()
    raise ValueError(f"unknown reference {name!r}; allowed: {', '.join(REFERENCES)}")


def pretrained_ppo(
    cfg: HeldoutConfig, out: Path, seed: int, trained: dict[str, dict], train, log=print
) -> tuple[object, str, int]:
    """``ppo_finetune``'s starting point for ``seed``: the PPO network trained on the train
    compositions, its provenance and its training env steps.

    The run's own PPO row's checkpoint when one was trained (``pretrained_spec``), else a PPO
    trained here by ``train(spec, seed)`` under ``<out>/ppo_finetune/seed<k>`` with the run's
    budget and PPO config.
    """
    spec = pretrained_spec(cfg)
    if spec is not None:
        ckpt = pair_folder(out, spec["name"], seed) / "checkpoints" / "final.ckpt"
        module = load_module(ckpt, REGISTRY, expected="ppo")
        steps = int(trained[spec["name"]]["meta_train_env_steps"])
        note = f"the run's '{spec['name']}' row (its checkpoint of the same seed)"
    else:
        module = train({"name": "ppo_finetune", "method": "ppo", "config": {}}, seed)
        steps = module.env_steps
        note = (
            "a PPO trained for this row with the run's budget and PPO config, as no 'ppo' row"
            " is among the methods (checkpoints under ppo_finetune/)"
        )
        log(f"[ppo_finetune seed {seed}] pre-trained PPO for {steps:,} env steps")
    text = (
        "PPO pre-trained on the train compositions, then fine-tuned by PPO on each held-out task"
        " with the trial's episodes only (one update per finished episode, a fresh copy of the"
        f" pre-trained weights per trial); pre-trained weights: {note}"
    )
    return module.net, text, steps


def eval_tasks(cfg: HeldoutConfig) -> tuple:
    """The split and the held-out tasks (composition + layout seed) every row is evaluated on."""
    split = run_split(cfg)
    tasks = heldout_tasks(
        split.heldout, cfg.eval.num_tasks, cfg.eval.seed, split.meta.get("heldout_layout_seeds")
    )
    return split, tasks


#: per-(row, seed) results of the run so far, kept so ``--resume`` skips finished pairs
PAIRS = "pairs"
#: the heldout results as Lightning logger scalars (TensorBoard events by default)
LOGS = "tb"


def pair_folder(out: Path, name: str, seed: int) -> Path:
    """The training run folder of row ``name`` for ``seed`` (``compo train``'s layout)."""
    return out / name / f"seed{seed}"


def _pair_file(out: Path, name: str, seed: int) -> Path:
    return out / PAIRS / name / f"seed{seed}.json"


def _save_pair(out: Path, name: str, seed: int, r: dict, **extra) -> None:
    # JSON floats round-trip exactly, so a resumed run's table equals the uninterrupted one's
    row = {"success": r["success"].tolist(), "return": r["return"].tolist(), **extra}
    atomic_write_text(_pair_file(out, name, seed), json.dumps(row) + "\n")


def _load_pair(out: Path, name: str, seed: int) -> dict | None:
    path = _pair_file(out, name, seed)
    if not path.is_file():
        return None
    try:
        row = json.loads(path.read_text())
        row["success"], row["return"] = np.asarray(row["success"]), np.asarray(row["return"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        raise ValueError(f"--resume: {str(path)!r} is damaged; rerun with --overwrite") from None
    return row


def _train_configs(cfg: HeldoutConfig, specs: list[dict]) -> dict[tuple[str, int], dict]:
    """``compo train``'s view of every pair: ``{"method": ..., **resolved config}``, built (and
    so validated) before anything is written."""
    out = {}
    for spec in specs:
        cls = method_class(spec["method"])
        for seed in cfg.seeds:
            c = config_from_dict(cls.config_cls, method_run_config(cfg, spec, seed))
            out[spec["name"], seed] = {"method": spec["method"], **config_to_dict(c)}
    return out


def _open_run(cfg: HeldoutConfig, out: Path, overwrite: bool, resume: bool) -> Path:
    """Validate ``out`` for this run, then make it ready (config.yaml written, the old run's
    pair results cleared under ``overwrite``)."""
    if resume and overwrite:
        raise ValueError("--resume and --overwrite exclude each other: continue or replace")
    saved = out / "config.yaml"
    if resume:
        if not saved.is_file():
            raise FileNotFoundError(f"--resume: {str(out)!r} holds no run to resume")
        check_same_run(load_yaml(saved), asdict(cfg), repr(str(saved)))
    out = prepare_run_dir(out, overwrite=overwrite, resume=resume)
    remove_temp_files(out)
    if not resume:
        # an --overwrite must not leave the old run's pairs for a later --resume to pick up
        shutil.rmtree(out / PAIRS, ignore_errors=True)
        dump_yaml(saved, asdict(cfg))
    return out


def _check_train_folder(folder: Path) -> None:
    """Refuse an ``--overwrite`` that would clear a pair folder holding files that training
    did not write."""
    if not folder.is_dir():
        return
    for p in sorted(folder.iterdir()):
        if p.name not in RUN_ENTRIES and not p.match(TEMP_GLOB):
            raise ValueError(
                f"--overwrite: {str(folder)!r} holds {p.name!r}, which training did not write; "
                "choose another --out"
            )


def _fit_pair(module, folder: Path, config: dict, resume: bool) -> None:
    """Train one pair in its own ``compo train`` folder, continuing its checkpoint under
    ``resume`` (a pair killed before its first checkpoint starts again)."""
    started = resume and (
        (folder / "config.yaml").is_file() or latest_checkpoint(folder) is not None
    )
    has_files = folder.is_dir() and any(folder.iterdir())
    cont = prepare_train_dir(folder, config, resume=started, overwrite=has_files and not started)
    fit(module, folder, resume=cont)


def log_results(doc: dict, logger: Logger) -> None:
    """Log each row's success per episode index (the step axis) and its AUC through a
    Lightning logger."""
    for name, m in doc["methods"].items():
        for i, v in enumerate(m["success_at"]):
            logger.log_metrics({f"heldout/{name}/success": float(v)}, step=i)
        logger.log_metrics({f"heldout/{name}/auc": float(m["auc"])}, step=0)
    logger.save()
    logger.finalize("success")


def run_heldout(
    cfg: HeldoutConfig,
    out: str | Path,
    *,
    overwrite: bool = False,
    resume: bool = False,
    log=print,
    logger: Logger | None = None,
) -> dict:
    """Train and evaluate every method and reference; write the run folder; return results.

    Each finished (row, seed) pair is stored in ``<out>/pairs/`` as soon as it is evaluated;
    with ``resume`` a killed run keeps those, continues the interrupted pair from its training
    checkpoint (``<out>/<row>/seed<k>``, a ``compo train`` folder) and ends with the table of
    the uninterrupted run. ``logger`` (default: TensorBoard under ``<out>/tb``) receives each
    row's success per episode index and AUC.
    """
    # validate every method config before anything is written
    specs = cfg.method_specs()
    if not specs and not cfg.references:
        raise ValueError("methods=[] and references=[]; allowed: at least one row")
    trained_specs = list(specs)
    if "ppo_finetune" in cfg.references and pretrained_spec(cfg) is None:
        trained_specs.append({"name": "ppo_finetune", "method": "ppo", "config": {}})
    configs = _train_configs(cfg, trained_specs)
    split, tasks = eval_tasks(cfg)  # the split's arguments too, before anything is written
    origin = provenance()  # the commit the run starts from (it may move while it trains)
    if overwrite:
        for name, seed in configs:
            _check_train_folder(pair_folder(Path(out), name, seed))
    out = _open_run(cfg, Path(out), overwrite, resume)
    origin_file = out / PAIRS / "origin.json"
    if resume and origin_file.is_file():
        origin = json.loads(origin_file.read_text())  # the commit the *first* start ran
    else:
        atomic_write_text(origin_file, json.dumps(origin) + "\n")
    if overwrite:  # the old run's training folders go now, not pair by pair (a kill between)
        for (name, seed), config in configs.items():
            folder = pair_folder(out, name, seed)
            if folder.is_dir() and any(folder.iterdir()):
                prepare_train_dir(folder, config, overwrite=True)
    command = " ".join(shlex.quote(a) for a in ["compo", *sys.argv[1:]]) if sys.argv else ""
    ev = cfg.eval
    methods: dict[str, dict] = {}

    def evaluate(agent) -> dict[str, np.ndarray]:
        return run_trials(
            agent, tasks, env_id=cfg.env_id, env_kwargs=cfg.env_kwargs,
            episodes=ev.episodes, num_envs=ev.num_envs, seed=ev.seed,
        )  # fmt: skip

    def train(spec: dict, seed: int):
        module = method_class(spec["method"])(method_run_config(cfg, spec, seed))
        folder = pair_folder(out, spec["name"], seed)
        _fit_pair(module, folder, configs[spec["name"], seed], resume)
        return module

    pairs = len(specs) * len(cfg.seeds)
    done, started = 0, time.perf_counter()
    for spec in specs:
        succ, ret, steps, wall = {}, {}, 0, 0.0
        for seed in cfg.seeds:
            r = _load_pair(out, spec["name"], seed) if resume else None
            if r is None:
                t0 = time.perf_counter()
                module = train(spec, seed)
                r = evaluate(module)
                r["env_steps"], r["wall_s"] = module.env_steps, time.perf_counter() - t0
                _save_pair(out, spec["name"], seed, r, env_steps=r["env_steps"], wall_s=r["wall_s"])
            wall += r["wall_s"]
            succ[seed], ret[seed] = r["success"], r["return"]
            steps = int(r["env_steps"])
            done += 1
            elapsed = time.perf_counter() - started
            eta = elapsed / done * (pairs - done)
            log(
                f"[{spec['name']} seed {seed}] meta-train steps {steps:,}; success by episode "
                f"{np.round(r['success'].mean(0), 2).tolist()} ({done}/{pairs} trained rows, "
                f"{elapsed / 60:.1f} min, ~{eta / 60:.0f} min to go before the reference rows)"
            )
        methods[spec["name"]] = summarize(
            succ, ret, n_boot=ev.bootstrap, meta_train_env_steps=steps,
            wall_s=wall / len(cfg.seeds), trained=True,
        )  # fmt: skip
    for ref in cfg.references:
        succ, ret, steps, wall, notes = {}, {}, 0, 0.0, set()
        for seed in cfg.seeds:
            r = _load_pair(out, ref, seed) if resume else None
            if r is None:
                t0 = time.perf_counter()
                note, steps = REFERENCE_NOTES.get(ref, ""), 0
                if ref == "ppo_finetune":
                    net, note, steps = pretrained_ppo(cfg, out, seed, methods, train, log)
                    agent = FinetunePPOAgent(net)
                else:
                    agent = reference_agent(ref, seed, split)
                r = evaluate(agent)
                r.update(env_steps=steps, wall_s=time.perf_counter() - t0, note=note)
                _save_pair(out, ref, seed, r, env_steps=steps, wall_s=r["wall_s"], note=note)
            wall += r["wall_s"]
            steps = int(r["env_steps"])
            notes.add(r["note"])
            succ[seed], ret[seed] = r["success"], r["return"]
        methods[ref] = summarize(
            succ, ret, n_boot=ev.bootstrap, meta_train_env_steps=steps,
            wall_s=wall / len(cfg.seeds), trained=ref == "ppo_finetune",
        )  # fmt: skip
        methods[ref]["note"] = " ".join(sorted(notes))
        log(f"[{ref}] success by episode {np.round(methods[ref]['success_at'], 2).tolist()}")
    doc = results_document(
        asdict(cfg), split.to_dict(), methods, resamples=ev.bootstrap, tasks=tasks,
        command=command, origin=origin,
    )  # fmt: skip
    doc["fields"]["note"] = "what a reference row is (ppo_finetune: where its weights came from)"
    atomic_write_text(out / "results.json", results_json_text(doc))
    notes = [f"- {n}: {m['note']}" for n, m in doc["methods"].items() if m.get("note")]
    atomic_write_text(
        out / "table.md", table_markdown(doc) + "\nReference rows:\n\n" + "\n".join(notes) + "\n"
    )
    plot_curves(doc["methods"], out / "curves.png", title=f"Held-out compositions ({cfg.family})")
    shutil.rmtree(out / LOGS, ignore_errors=True)  # a resumed run logs the whole table again
    log_results(doc, logger or TensorBoardLogger(str(out), name=LOGS, version=""))
    return doc
