"""``compo``: the one command-line entry point.

Every subcommand takes ``--config FILE.yaml`` (keys of its config dataclass), ``--out DIR`` and
``--seed``; ``--set key=value`` overrides single keys (dotted for nested ones, YAML values);
``--quiet`` turns progress output off. Every subcommand ends by listing what it wrote.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import yaml

from rl.config import config_from_dict, merge
from rl.io import check_out, load_yaml


def _overrides(pairs: list[str]) -> dict:
    out: dict = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise ValueError(f"--set {pair!r}; expected key=value")
        key, value = pair.split("=", 1)
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"--set {pair!r}: {p!r} is set to a value above; set one of them")
        try:
            node[parts[-1]] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise ValueError(f"--set {pair!r}: the value {value!r} is not YAML") from None
    return out


def _seed(text: str) -> int:
    """``--seed``: an integer >= 0 (numpy's generators refuse negative seeds)."""
    try:
        seed = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}; allowed: an integer >= 0") from None
    if seed < 0:
        raise argparse.ArgumentTypeError(f"{seed}; allowed: an integer >= 0")
    return seed


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line (``compo SUB: error: ...``), exit code 2, like every other
    bad input; ``--help`` shows the usage."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}; see {self.prog} --help\n")


def _no_config(args, why: str) -> None:
    """Refuse ``--config``/``--set`` (and ``--seed`` unless ``why`` allows it) for a command
    without config keys: silently ignoring them would run something else than asked."""
    given = [f for f, v in (("--config", args.config), ("--set", args.set)) if v]
    if args.seed is not None and "--seed" not in why:
        given.append("--seed")
    if given:
        raise ValueError(f"{given[0]} given; compo {args.command} {why}")


def _common(p: argparse.ArgumentParser, out_default: str | None = None) -> None:
    p.add_argument("--config", type=Path, help="YAML file with config keys")
    p.add_argument("--out", type=Path, default=out_default, help="run folder")
    p.add_argument("--seed", type=_seed, help="seed of torch, numpy and the envs")
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override one config key"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar or progress lines")


def _log(args):
    """The progress printer of a command: ``print``, or nothing under ``--quiet``."""
    return (lambda *a, **k: None) if args.quiet else print


def _written(out: Path, since: float) -> list[str]:
    """The entries of ``out`` (files, and folders as ``name/``) holding a file written since
    ``since`` (``time.time()``), temporary files left aside."""
    from rl.io import TEMP_GLOB

    def fresh(p: Path) -> bool:
        files = [q for q in p.rglob("*") if q.is_file()] if p.is_dir() else [p]
        # 1 s of slack for file systems with coarse timestamps
        return any(q.stat().st_mtime >= since - 1.0 and not q.match(TEMP_GLOB) for q in files)

    if not out.is_dir():
        return []
    return [f"{p}/" if p.is_dir() else str(p) for p in sorted(out.iterdir()) if fresh(p)]


def _config(args) -> dict:
    cfg = load_yaml(args.config) if args.config else {}
    cfg = merge(cfg, _overrides(args.set))
    if args.seed is not None:
        cfg["seed"] = args.seed
    return cfg


def _train_method(args, raw: dict) -> str:
    """The method of ``compo train``: ``--method``, or the ``method`` key of a run's saved
    config.yaml (``--config runs/X/config.yaml`` replays that run); both: they must agree."""
    from experiments.registry import METHODS

    saved = raw.pop("method", None)
    if saved is not None and args.method is not None and saved != args.method:
        raise ValueError(
            f"--method {args.method} and config key method={saved!r} conflict; set one of them"
        )
    method = args.method or saved
    if method is None:
        raise ValueError(f"--method is required; allowed: {', '.join(METHODS)}")
    return method


def cmd_train(args) -> None:
    from experiments.registry import method_class
    from rl.config_keys import print_config, resolve_user_keys
    from rl.distributed import check_distributed, launch_rank
    from rl.progress import show_progress
    from rl.train import check_accelerator, fit, latest_checkpoint, prepare_train_dir

    raw = _config(args)
    args.method = _train_method(args, raw)
    cls = method_class(args.method)
    if args.composition:
        if "compositions" in _overrides(args.set):
            raise ValueError("--composition and --set compositions=... conflict; use one of them")
        raw["compositions"] = list(args.composition)
    raw = resolve_user_keys(cls.config_cls, raw)
    if args.print_config:
        print(print_config(cls.config_cls, raw, args.method), end="")
        args.out = None  # nothing written
        return
    if args.checkpoint_every is None:
        from rl.train import CHECKPOINT_EVERY

        args.checkpoint_every = CHECKPOINT_EVERY
    if args.checkpoint_every < 1:
        raise ValueError(f"--checkpoint-every {args.checkpoint_every}; allowed: an integer >= 1")
    if args.threads < 1:
        raise ValueError(f"--threads {args.threads}; allowed: an integer >= 1")
    check_accelerator(args.accelerator)
    module = cls(raw)  # validates the config before anything is written
    check_distributed(module.shard_sizes(), args.devices, args.num_nodes, args.strategy)
    out = args.out = Path(args.out or Path("runs") / args.method)
    rank = launch_rank(args.devices)
    if rank == 0:
        # validates the folder (another run's config, foreign files, unreadable checkpoint)
        # before its first write; clears the old run under --overwrite
        resume = prepare_train_dir(
            out,
            {"method": args.method, **module.hparams["config"]},
            resume=args.resume,
            overwrite=args.overwrite,
        )
    else:  # another DDP rank: rank 0 has prepared the folder (or prepares it: it only reads)
        resume = args.resume and latest_checkpoint(out) is not None
    t0 = time.perf_counter()
    fit(
        module, out, resume=resume, checkpoint_every=args.checkpoint_every, logger=args.logger,
        accelerator=args.accelerator, threads=args.threads, progress=show_progress(args.quiet),
        devices=args.devices, num_nodes=args.num_nodes, strategy=args.strategy,
    )  # fmt: skip
    if rank != 0:
        args.out = None  # rank 0 reports
        return
    wall = time.perf_counter() - t0
    msg = f"{args.method}: {module.env_steps:,} env steps, {module.iteration} iterations"
    sr = module.recent_success()
    if sr == sr:
        msg += f", recent training success {sr:.2f}"
    print(msg)
    hit = first_reaching(module.history, 0.9)
    if hit is not None:
        print(f"training success (mean of 5 iterations) first >= 0.9 at {hit:,} env steps")
    import torch

    print(f"wall time {wall:.0f} s, {torch.get_num_threads()} torch threads, {args.accelerator}")
    print(f"checkpoint: {out / 'checkpoints' / 'final.ckpt'}")


def first_reaching(history: list[dict], level: float, window: int = 5) -> int | None:
    """Env steps at which the rolling mean of ``charts/success`` first reaches ``level``."""
    vals = [(h["env_steps"], h["charts/success"]) for h in history if "charts/success" in h]
    for i in range(window - 1, len(vals)):
        if sum(v for _, v in vals[i - window + 1 : i + 1]) / window >= level:
            return vals[i][0]
    return None


def cmd_heldout(args) -> None:
    from experiments.heldout import HeldoutConfig, run_heldout

    raw = _config(args)
    seed = raw.pop("seed", None)
    if seed is not None:
        raw["seeds"] = [seed]
    cfg = config_from_dict(HeldoutConfig, raw)
    out = args.out or Path("runs") / "heldout"
    run_heldout(cfg, out, overwrite=args.overwrite, resume=args.resume, log=_log(args))
    print((Path(args.out or "runs/heldout") / "table.md").read_text())


def cmd_trace(args) -> None:
    _no_config(args, "takes its options as flags (--seed: the action sampling seed)")
    from experiments.trace import run_trace

    run_trace(
        args.checkpoint,
        args.composition,
        args.out or Path("runs") / "trace",
        seed=args.seed or 0,
        episodes=args.episodes,
        overwrite=args.overwrite,
        layout_seed=args.layout_seed,
        nmi_episodes=args.nmi_episodes,
    )


def cmd_graph(args) -> None:
    _no_config(args, "has no config keys and draws nothing at random")
    from experiments.trace import run_graph

    run_graph(args.checkpoint, args.out or Path("runs") / "graph", overwrite=args.overwrite)


def cmd_ablate(args) -> None:
    from experiments.ablate import run_ablate

    raw = _config(args)
    run_ablate(
        raw,
        args.out or Path("runs") / "ablate",
        overwrite=args.overwrite,
        resume=args.resume,
        log=_log(args),
    )
    print((Path(args.out or "runs/ablate") / "table.md").read_text())


def cmd_embed(args) -> None:
    from experiments.embed import run_embed

    run_embed(
        args.checkpoint,
        args.out or Path("runs") / "embed",
        seed=args.seed or 0,
        overwrite=args.overwrite,
        raw=_config(args),
    )


def cmd_diagnose(args) -> None:
    from experiments.diagnose import DiagnoseConfig, run_diagnose

    raw = _config(args)  # --seed: the layout draw and episode seeds
    cfg = config_from_dict(DiagnoseConfig, raw)
    run_diagnose(
        args.checkpoint, args.out, composition=args.composition,
        task=args.task, cfg=cfg, overwrite=args.overwrite,
    )  # fmt: skip


def cmd_eval(args) -> None:
    from experiments.evaluate import run_eval
    from rl.config import config_from_dict
    from rl.protocol import EvalConfig

    ev = config_from_dict(EvalConfig, _config(args), "eval.")  # --seed: the task-draw seed
    out = args.out or Path("runs") / "eval"
    run_eval(args.checkpoint, out, eval_cfg=ev, overwrite=args.overwrite)
    print((Path(out) / "table.md").read_text())


def cmd_metaworld_eval(args) -> None:
    from experiments.metaworld_eval import MetaWorldEvalConfig, run_metaworld_eval
    from rl.config import config_from_dict

    cfg = config_from_dict(MetaWorldEvalConfig, _config(args))  # --seed: the action-sampling seed
    run_metaworld_eval(args.checkpoint, cfg, args.out, overwrite=args.overwrite, say_wrote=False)


def build_parser() -> argparse.ArgumentParser:
    from experiments.registry import METHODS

    parser = _Parser(prog="compo", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "train",
        help="train one method",
        epilog="Config keys of a method, with type, default and description: "
        "compo train --method M --print-config (a YAML file --config accepts). "
        "A run's OUT/config.yaml replays it: compo train --config OUT/config.yaml --out NEW.",
    )
    p.add_argument(
        "--method", choices=list(METHODS), help="method to train (or the method key of --config)"
    )
    p.add_argument(
        "--print-config",
        action="store_true",
        help="print every config key of the method (type, default, description) and exit",
    )
    p.add_argument(
        "--logger",
        choices=["tensorboard", "csv"],
        default="tensorboard",
        help="Lightning logger of the training scalars: OUT/tb/ or OUT/csv/metrics.csv",
    )
    p.add_argument(
        "--accelerator", default="cpu", help="Lightning accelerator (default cpu, the tested one)"
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument(
        "--devices",
        type=int,
        default=1,
        help="processes per node (DDP ranks; ppo, rl2 and the maml family when > 1): each steps "
        "num_envs / (devices x num-nodes) envs",
    )
    p.add_argument("--num-nodes", type=int, default=1, help="nodes of a DDP run (default 1)")
    p.add_argument(
        "--strategy",
        choices=["auto", "ddp"],
        default="auto",
        help="Lightning strategy: auto (one process, DDP when devices x num-nodes > 1) or ddp",
    )
    p.add_argument("--composition", action="append", help="train on this composition (repeatable)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in OUT from OUT/checkpoints/last.ckpt (same method, config, seed)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace the compo train run in OUT")
    p.add_argument(
        "--checkpoint-every",
        type=int,
        default=None,
        help="iterations between checkpoints (default: rl.train.CHECKPOINT_EVERY, 1)",
    )
    _common(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("heldout", help="methods x seeds on held-out compositions")
    p.add_argument(
        "--overwrite", action="store_true", help="allow writing into an existing run folder"
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the killed run in OUT: finished (method, seed) pairs are kept",
    )
    _common(p)
    p.set_defaults(func=cmd_heldout)

    p = sub.add_parser("trace", help="primitive activation trace of one trial")
    p.add_argument("--checkpoint", required=True, type=Path, help="a method checkpoint (.ckpt)")
    p.add_argument("--composition", required=True, help="composition text")
    p.add_argument("--episodes", type=int, default=2, help="episodes in the traced trial")
    p.add_argument("--layout-seed", type=int, default=0, help="layout of the traced task")
    p.add_argument(
        "--nmi-episodes",
        type=int,
        default=200,
        help="held-out episodes for the skill/sub-task NMI (agents with skills; 0: skip)",
    )
    p.add_argument(
        "--overwrite", action="store_true", help="allow writing into an existing run folder"
    )
    _common(p)
    p.set_defaults(func=cmd_trace)

    p = sub.add_parser("graph", help="learned skill-transition graph (PNG, GraphML)")
    p.add_argument("--checkpoint", required=True, type=Path, help="a compositional checkpoint")
    p.add_argument(
        "--overwrite", action="store_true", help="allow writing into an existing run folder"
    )
    _common(p)
    p.set_defaults(func=cmd_graph)

    p = sub.add_parser("ablate", help="composer / graph / primitives / inner-loop ablations")
    p.add_argument(
        "--overwrite", action="store_true", help="allow writing into an existing run folder"
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the killed run in OUT: finished (method, seed) pairs are kept",
    )
    _common(p)
    p.set_defaults(func=cmd_ablate)

    p = sub.add_parser("embed", help="task-embedding maps (PCA, t-SNE) and their correlations")
    p.add_argument("--checkpoint", required=True, type=Path, help="a method checkpoint")
    p.add_argument(
        "--overwrite", action="store_true", help="allow writing into an existing run folder"
    )
    _common(p)
    p.set_defaults(func=cmd_embed)

    p = sub.add_parser(
        "eval", help="the shared protocol on the held-out tasks of one trained checkpoint"
    )
    p.add_argument("--checkpoint", required=True, type=Path, help="a method checkpoint")
    p.add_argument(
        "--overwrite", action="store_true", help="allow writing into an existing run folder"
    )
    _common(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser(
        "diagnose",
        help="why a task fails: adaptation curve, gradient norms, entropy, embedding, neighbours",
    )
    p.add_argument("--checkpoint", required=True, type=Path, help="a method checkpoint")
    task = p.add_mutually_exclusive_group(required=True)
    task.add_argument("--composition", help="composition text of the task")
    task.add_argument("--task", type=int, help="index of a held-out composition of the split")
    p.add_argument(
        "--overwrite", action="store_true", help="allow writing into an existing run folder"
    )
    _common(p, out_default="runs/diagnose")
    p.set_defaults(func=cmd_diagnose)

    p = sub.add_parser(
        "metaworld-eval",
        help="metaworld's own ML1 evaluator on one Meta-World checkpoint, beside our protocol",
    )
    p.add_argument("--checkpoint", required=True, type=Path, help="a Meta-World ML1 checkpoint")
    p.add_argument(
        "--overwrite", action="store_true", help="allow writing into an existing run folder"
    )
    _common(p)
    p.set_defaults(func=cmd_metaworld_eval)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.out is None and args.command != "train":  # train's default depends on its method
        args.out = Path("runs") / args.command
    since = time.time()
    try:
        if args.out is not None:
            check_out(args.out)
        args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        # bad input: one clear line, no traceback, non-zero exit
        print(f"compo {args.command}: error: {e}", file=sys.stderr)
        return 2
    for path in _written(Path(args.out), since) if args.out is not None else []:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
