"""Training entry: Lightning ``Trainer`` with TensorBoard logs and atomic, safely loaded
checkpoints; exact resume after a kill at any moment.

A run folder (``compo train --out DIR``) holds one run:

- ``config.yaml``: the method and its resolved config;
- ``train_log.jsonl``: one row per iteration (env steps, losses, success);
- ``tb/``: TensorBoard events (``--logger tensorboard``, the default), or ``csv/metrics.csv``
  (``--logger csv``): the same scalars, x = env steps;
- ``checkpoints/last.ckpt``: the whole training state, rewritten atomically every
  ``checkpoint_every`` iterations and when training ends (one name, so ``--resume`` always
  finds it);
- ``checkpoints/final.ckpt``: written when the run has finished; a hard link to that
  ``last.ckpt`` (the same bytes on disk once, not a copy), kept as the name that says
  "finished" for ``compo trace``/``graph``/``embed``/``eval``.

On Lightning DDP (``fit(devices=N, num_nodes=M)``, ``rl.distributed``) only rank 0 writes into
the folder; the checkpoint holds every rank's collector and RNG states.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger
from lightning.pytorch.strategies import DDPStrategy

from rl.diagnostics import diagnostics_callbacks
from rl.distributed import PARTIAL_BACKWARD_METHODS, check_distributed
from rl.io import (
    TEMP_GLOB,
    atomic_torch_save,
    atomic_write_bytes,
    atomic_write_text,
    dump_yaml,
    load_yaml,
    read_jsonl,
    remove_temp_files,
    safe_torch_load,
)
from rl.module import RLModule

# Lightning's start-up banners (accelerator, tips) drown the run's own output
logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
warnings.filterwarnings("ignore", message=".*LeafSpec.*")

#: iterations between checkpoints by default, so a kill loses at most one iteration: one
#: checkpoint costs PPO (default config) 4.1% of an iteration, and the wall time of a run
#: checkpointing every iteration is 1.03x that of one checkpointing once (median of 3 paired
#: runs on 2 shared cores; ``make bench``, benchmarks/bench_checkpoint.py)
CHECKPOINT_EVERY = 1
LAST = "last.ckpt"
FINAL = "final.ckpt"
LOG = "train_log.jsonl"
#: everything ``fit`` writes into a run folder; ``--overwrite`` removes exactly these
RUN_ENTRIES = ("checkpoints", LOG, "tb", "csv", "heatmaps.png", "config.yaml")
#: ``compo train --logger`` choices: the folder each writes in a run folder
LOGGERS = {"tensorboard": "tb", "csv": "csv"}
#: ``compo train --accelerator`` choices (Lightning's names); CPU is the default and tested one
ACCELERATORS = ("cpu", "gpu", "cuda", "mps", "auto")


class AtomicCheckpointIO(CheckpointIO):
    """Checkpoints written to a temporary file then ``os.replace``d; loaded ``weights_only``."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        atomic_torch_save(_plain(checkpoint), path)

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict[str, Any]:
        return safe_torch_load(path)

    def remove_checkpoint(self, path) -> None:
        if os.path.exists(path):
            os.remove(path)


def _plain(obj: Any) -> Any:
    """Turn Lightning's AttributeDicts and similar dict/list subclasses into plain containers
    so the file loads under ``weights_only=True``."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
        return tuple(_plain(v) for v in obj)
    if isinstance(obj, list):
        return [_plain(v) for v in obj]
    return obj


class LastCheckpoint(Callback):
    """Write ``checkpoints/last.ckpt`` every ``every`` iterations and when training ends.

    Lightning's ``ModelCheckpoint(save_top_k=0, save_last=True)`` writes ``last`` only when a
    top-k checkpoint is saved (Lightning 2.6), i.e. never before the end, and versions the name
    (``last-v1.ckpt``) when the file exists; this callback has one name and one rule.
    The write happens at the end of an iteration (epoch), where the collector, RNG states and
    counters resume exactly (see ``rl.module``).
    """

    def __init__(self, ckpt_dir: str | os.PathLike, every: int) -> None:
        self.dir = Path(ckpt_dir)
        self.every = every

    def on_train_start(self, trainer: L.Trainer, pl_module: RLModule) -> None:
        # a run resumed with a larger budget is no longer finished; nor is its old final.ckpt
        pl_module.finished = False
        if trainer.is_global_zero:
            (self.dir / FINAL).unlink(missing_ok=True)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: RLModule) -> None:
        last_epoch = trainer.should_stop or trainer.current_epoch + 1 >= (trainer.max_epochs or 0)
        if (trainer.current_epoch + 1) % self.every == 0 and not last_epoch:
            self._save(trainer)  # the last epoch is saved once, by on_train_end

    def on_train_end(self, trainer: L.Trainer, pl_module: RLModule) -> None:
        pl_module.finished = True
        self._save(trainer)
        if trainer.is_global_zero:
            _link_or_copy(self.dir / LAST, self.dir / FINAL)

    def _save(self, trainer: L.Trainer) -> None:
        # every rank takes part (the checkpoint gathers their collector states); rank 0 writes
        log = Path(trainer.default_root_dir) / LOG
        if trainer.is_global_zero and log.is_file():
            # the rows up to this checkpoint reach the disk before it does (a crash of the
            # machine must not leave a checkpoint whose iterations are missing from the log)
            fd = os.open(log, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        trainer.save_checkpoint(str(self.dir / LAST))


def _link_or_copy(src: Path, dst: Path) -> None:
    """Make ``dst`` name the same file as ``src`` (hard link, atomically replaced); copy on a
    file system without hard links."""
    tmp = dst.with_name(f".{dst.name}.link.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        atomic_write_bytes(dst, src.read_bytes())
        return
    os.replace(tmp, dst)


# -- run folders ---------------------------------------------------------------------------------
def latest_checkpoint(out: str | os.PathLike) -> Path | None:
    """The run's checkpoint to resume from: ``checkpoints/last.ckpt``, or for folders written
    by earlier versions (Lightning's ``last-v1.ckpt``...), the newest ``last*.ckpt``."""
    ckpt_dir = Path(out) / "checkpoints"
    found = sorted(ckpt_dir.glob("last*.ckpt"), key=lambda p: p.stat().st_mtime_ns)
    return found[-1] if found else None


def read_checkpoint(path: str | os.PathLike) -> dict:
    """A training checkpoint of ours, loaded ``weights_only``; one-line ``ValueError`` for
    anything else."""
    ckpt = safe_torch_load(path)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("rl_state"), dict):
        raise ValueError(f"checkpoint {str(path)!r} is not a compo training checkpoint")
    hp = ckpt.get("hyper_parameters") or {}
    if "method" not in hp or "config" not in hp:
        raise ValueError(f"checkpoint {str(path)!r} has no method/config; is it one of ours?")
    return ckpt


def _canonical(x: Any) -> Any:
    # YAML and checkpoints hold tuples as lists; compare values, not container types
    return json.loads(json.dumps(x, sort_keys=True, default=str))


def _training_config(x: Any) -> Any:
    """``_canonical`` without the ``diagnostics`` settings, which only watch a run: another
    threshold (or a run written before they existed) is the same run."""
    x = _canonical(x)
    for cfg in (x, x.get("config") if isinstance(x, dict) else None):
        if isinstance(cfg, dict):
            cfg.pop("diagnostics", None)
    return x


def _first_difference(a: Any, b: Any, prefix: str = "") -> str | None:
    """Dotted key of the first value that differs between two nested configs."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b), key=str):
            d = _first_difference(a.get(k), b.get(k), f"{prefix}{k}.")
            if d is not None:
                return d
        return None
    return None if a == b else prefix.rstrip(".")


def _lookup(cfg: dict, dotted: str) -> Any:
    for k in dotted.split("."):
        cfg = cfg.get(k) if isinstance(cfg, dict) else None
    return cfg


def check_same_run(saved: dict, wanted: dict, where: str) -> None:
    """Raise a one-line ``ValueError`` if ``saved`` (the folder's method + config) is not
    ``wanted`` (the command's)."""
    saved, wanted = _training_config(saved), _training_config(wanted)
    # the method first: another method's config differs in many keys, and says less
    key = _first_difference(saved.get("method"), wanted.get("method"), "method.")
    key = key or _first_difference(saved, wanted)
    if key is not None:
        raise ValueError(
            f"--resume: {where} belongs to another run ({key}={_lookup(saved, key)!r}, this "
            f"command has {key}={_lookup(wanted, key)!r}); repeat that run's command or pass "
            "--overwrite"
        )


def _check_entries(out: Path) -> None:
    """Refuse to clear a folder that holds anything ``fit`` did not write."""
    foreign = sorted(
        p.name for p in out.iterdir() if p.name not in RUN_ENTRIES and not p.match(TEMP_GLOB)
    )
    if foreign:
        raise ValueError(
            f"--out {str(out)!r} holds {foreign[0]!r}, which compo train did not write; "
            "--overwrite only replaces a compo train run: choose another --out"
        )


def _clear_run(out: Path, keep: tuple[str, ...] = ()) -> None:
    # checkpoints first: a kill half-way leaves nothing a --resume could continue from, and
    # config.yaml last, so whatever is left still names its run
    for name in RUN_ENTRIES:
        p = out / name
        if name in keep or not (p.exists() or p.is_symlink()):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


def prepare_train_dir(
    out: str | os.PathLike, config: dict, *, resume: bool = False, overwrite: bool = False
) -> bool:
    """Validate ``out`` for a ``compo train`` run of ``config`` (``{"method": ..., **cfg}``),
    then make it ready; return whether ``fit`` should resume from a checkpoint.

    Everything is checked before the first write: a folder of another run, a non-folder
    ``--out``, foreign files under ``--overwrite``, an unreadable checkpoint. Then leftover
    temporary files are removed; ``overwrite`` clears the old run; a ``resume`` of a run
    killed before its first checkpoint starts it again from scratch.

    Raises:
        ValueError: ``resume`` and ``overwrite`` together, a folder of another run, foreign
            files, an unreadable checkpoint.
        FileExistsError: a folder holding a run without ``resume``/``overwrite``.
        FileNotFoundError: ``resume`` of a folder holding no run.
    """
    out = Path(out)
    if resume and overwrite:
        raise ValueError("--resume and --overwrite exclude each other: continue or replace")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {str(out)!r} exists and is not a folder")
    has_files = out.is_dir() and any(out.iterdir())
    ckpt = latest_checkpoint(out) if resume else None
    if resume:
        saved_yaml = out / "config.yaml"
        if ckpt is None and not saved_yaml.is_file():
            raise FileNotFoundError(f"--resume: {str(out)!r} holds no run to resume")
        if saved_yaml.is_file():
            check_same_run(load_yaml(saved_yaml), config, repr(str(saved_yaml)))
        if ckpt is not None:
            hp = read_checkpoint(ckpt)["hyper_parameters"]
            check_same_run({"method": hp["method"], **hp["config"]}, config, repr(str(ckpt)))
    elif has_files and not overwrite:
        raise FileExistsError(
            f"--out {str(out)!r} already holds a run; pass --overwrite, --resume or another --out"
        )
    elif has_files:
        _check_entries(out)
    # -- writes from here on -------------------------------------------------------------------
    out.mkdir(parents=True, exist_ok=True)
    remove_temp_files(out)
    if resume and ckpt is not None:
        if not (out / "config.yaml").is_file():
            dump_yaml(out / "config.yaml", config)
        return True
    if resume:  # killed before its first checkpoint: the same run again, from the start
        _clear_run(out, keep=("config.yaml",))
    elif overwrite and has_files:
        _clear_run(out)
    dump_yaml(out / "config.yaml", config)
    return False


def _restore(module: RLModule, ckpt: dict) -> None:
    try:
        module.load_state_dict(ckpt["state_dict"])
    except RuntimeError as e:  # another architecture: a user error, in one line
        first = str(e).strip().splitlines()[-1].strip()
        raise ValueError(
            f"the checkpoint does not fit method {module.method!r} as configured in it: {first}"
        ) from None
    module.on_load_checkpoint(ckpt)
    module._resume_state = None


def _trim_log(out: Path, iteration: int, write: bool = True) -> list[dict]:
    """Keep the log rows up to the checkpoint's ``iteration`` (the resumed run logs the later
    ones again), rewritten atomically (unless ``write`` is False: a DDP rank other than 0); a
    torn last line goes too. Returns the kept rows."""
    log = out / LOG
    if not log.is_file():
        return []
    rows = [r for r in read_jsonl(log) if int(r.get("iteration", 0)) <= iteration]
    if write:
        atomic_write_text(log, "".join(json.dumps(r) + "\n" for r in rows))
    return rows


def check_accelerator(name: str) -> str:
    """``name`` if Lightning can run on it here, else a one-line ``ValueError``."""
    if name not in ACCELERATORS:
        raise ValueError(f"--accelerator {name!r}; allowed: {', '.join(ACCELERATORS)}")
    if name in ("cpu", "auto"):
        return name
    from lightning.pytorch.accelerators import AcceleratorRegistry

    key = "cuda" if name == "gpu" else name
    if not AcceleratorRegistry[key]["accelerator"].is_available():
        raise ValueError(f"--accelerator {name!r} is not available here; allowed: cpu, auto")
    return name


def _make_logger(kind: bool | str, out: Path, purge_step: int | None) -> Logger | None:
    """The Lightning logger of a run folder; ``purge_step``: the first env step a resumed run
    logs again (the old run's scalars from there on are dropped)."""
    if kind is False:
        return None
    kind = "tensorboard" if kind is True else kind
    if kind not in LOGGERS:
        raise ValueError(f"--logger {kind!r}; allowed: {', '.join(LOGGERS)}")
    if kind == "tensorboard":
        # no hp_metric placeholder scalar: TensorBoard and CSV get the same scalars
        return TensorBoardLogger(
            str(out), name="tb", version="", purge_step=purge_step, default_hp_metric=False
        )
    old = out / "csv" / "metrics.csv"
    kept = []
    if purge_step is not None and old.is_file():
        with old.open(newline="") as f:
            kept = [r for r in csv.DictReader(f) if int(r["step"]) < purge_step]
    lg = CSVLogger(str(out), name="csv", version="")
    # Lightning's CSV writer removes an existing metrics.csv when it opens: give it back the
    # rows up to the checkpoint
    for r in kept:
        lg.experiment.log_metrics(
            {k: float(v) for k, v in r.items() if k != "step" and v != ""}, int(r["step"])
        )
    if kept:
        lg.save()
    return lg


def fit(
    module: RLModule,
    out: str | os.PathLike,
    *,
    resume: bool = False,
    checkpoint_every: int = CHECKPOINT_EVERY,
    logger: bool | str = True,
    accelerator: str = "cpu",
    threads: int = 1,
    progress: bool = False,
    devices: int = 1,
    num_nodes: int = 1,
    strategy: str = "auto",
) -> RLModule:
    """Train ``module`` for ``module.iterations()`` iterations, writing into ``out``:
    ``tb/`` (TensorBoard; ``logger="csv"``: ``csv/metrics.csv``; ``logger=False``: neither),
    ``train_log.jsonl``, ``checkpoints/last.ckpt`` (every ``checkpoint_every`` iterations and at
    the end) and ``checkpoints/final.ckpt`` (at the end).

    ``threads`` sets ``torch.set_num_threads`` for the run (results of some CPU kernels depend
    on it, so a replay uses the same count); ``progress`` shows ``rl.progress.EnvStepsBar``.

    ``devices`` x ``num_nodes`` > 1 (or ``strategy="ddp"``) trains on Lightning DDP (gloo on
    CPU), each rank stepping ``num_envs / world size`` envs (``rl.distributed``); only rank 0
    writes into ``out``. Lightning's launcher starts the other local ranks by running the
    same command again (``compo train``), or torchrun / SLURM start them all.

    With ``resume``, continue from the run's latest checkpoint: ``train_log.jsonl`` keeps its
    rows up to the checkpoint and ``module.history`` holds them; a finished run resumed with
    the same config trains nothing (it is restored as it ended). ``fit`` itself does not
    compare configs (a shorter run may be extended); ``prepare_train_dir`` does, for the CLI.
    """
    if not isinstance(checkpoint_every, int) or checkpoint_every < 1:
        raise ValueError(f"checkpoint_every={checkpoint_every!r}; allowed: an integer >= 1")
    if not isinstance(threads, int) or threads < 1:
        raise ValueError(f"--threads {threads!r}; allowed: an integer >= 1")
    check_accelerator(accelerator)
    size = check_distributed(module.shard_sizes(), devices, num_nodes, strategy)
    out = Path(out)
    ckpt_dir = out / "checkpoints"
    last = latest_checkpoint(out) if resume else None
    if resume and last is None:
        raise FileNotFoundError(f"--resume: no checkpoint in {str(ckpt_dir)!r}")
    callbacks: list[Callback] = [LastCheckpoint(ckpt_dir, checkpoint_every)]
    callbacks += diagnostics_callbacks(module)  # meta-RL diagnostics (config: diagnostics)
    if size > 1 or strategy == "ddp":
        # gloo on CPU; the LightningModule is wrapped, the methods' manual_backward syncs
        run_on: Any = DDPStrategy(
            process_group_backend="gloo" if accelerator == "cpu" else None,
            # a loss that reaches only some parameters (the agent's skills, then its
            # controller) must not leave DDP's reducer waiting for the others' gradients
            find_unused_parameters=module.method in PARTIAL_BACKWARD_METHODS,
        )
    else:
        run_on = "auto"
    trainer = L.Trainer(
        max_epochs=module.iterations(),
        accelerator=accelerator,
        devices=devices,
        num_nodes=num_nodes,
        strategy=run_on,
        logger=False,  # set below, on rank 0
        callbacks=callbacks,
        enable_checkpointing=False,  # no default ModelCheckpoint: LastCheckpoint is the one
        plugins=[AtomicCheckpointIO()],
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        default_root_dir=str(out),
        log_every_n_steps=1,
    )
    writer = trainer.is_global_zero  # the one process that writes into ``out``
    if writer:
        out.mkdir(parents=True, exist_ok=True)
        remove_temp_files(out)
    torch.set_num_threads(threads)
    purge_step = None
    if last is not None:
        ckpt = read_checkpoint(last)
        st = ckpt["rl_state"]
        module.history = _trim_log(out, int(st["iteration"]), write=writer)
        same = _training_config(ckpt["hyper_parameters"]) == _training_config(module.hparams)
        if st.get("finished") and same:
            _restore(module, ckpt)
            return module
        # TensorBoard hides the events of the iterations after the checkpoint (x = env steps)
        purge_step = int(st.get("env_steps", 0)) + 1
    lg = _make_logger(logger, out, purge_step) if writer else None
    if lg is not None:
        trainer.loggers = [lg]
    if progress and writer:
        from rl.progress import EnvStepsBar

        trainer.callbacks.append(EnvStepsBar())
    trainer.fit(module, ckpt_path=str(last) if last is not None else None)
    return module


def load_module(
    path: str | os.PathLike, registry: dict[str, type], expected: str | None = None
) -> RLModule:
    """Rebuild a trained module from a checkpoint (``weights_only``), checking its method."""
    ckpt = safe_torch_load(path)
    hp = (ckpt.get("hyper_parameters") if isinstance(ckpt, dict) else None) or {}
    method = hp.get("method")
    if method is None:
        raise ValueError(f"checkpoint {str(path)!r} has no method; is it one of ours?")
    if expected is not None and method != expected:
        raise ValueError(f"checkpoint {str(path)!r} holds method {method!r}; expected {expected!r}")
    if method not in registry:
        raise ValueError(
            f"checkpoint method {method!r} unknown; allowed: {', '.join(sorted(registry))}"
        )
    module = registry[method](hp["config"])
    _restore(module, ckpt)
    return module
