"""Training entry: Lightning ``Trainer`` with TensorBoard logs and atomic, safely loaded
checkpoints; exact resume from ``checkpoints/last.ckpt``."""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger

from rl.io import atomic_torch_save, safe_torch_load
from rl.module import RLModule

# Lightning's start-up banners (accelerator, tips) drown the run's own output
logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
warnings.filterwarnings("ignore", message=".*LeafSpec.*")


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


def fit(
    module: RLModule,
    out: str | os.PathLike,
    *,
    resume: bool = False,
    checkpoint_every: int = 10,
    logger: bool = True,
) -> RLModule:
    """Train ``module`` for ``module.iterations()`` iterations, writing into ``out``:
    ``tb/`` (TensorBoard), ``train_log.jsonl``, ``checkpoints/last.ckpt`` and
    ``checkpoints/final.ckpt``. With ``resume``, continue from ``checkpoints/last.ckpt``."""
    out = Path(out)
    ckpt_dir = out / "checkpoints"
    last = ckpt_dir / "last.ckpt"
    if resume and not last.is_file():
        raise FileNotFoundError(f"--resume: no checkpoint at {str(last)!r}")
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    callback = ModelCheckpoint(
        dirpath=ckpt_dir, filename="last", save_top_k=0, save_last=True,
        every_n_epochs=max(1, checkpoint_every), save_on_train_epoch_end=True,
    )  # fmt: skip
    callback.CHECKPOINT_NAME_LAST = "last"
    trainer = L.Trainer(
        max_epochs=module.iterations(),
        accelerator="cpu",
        devices=1,
        logger=TensorBoardLogger(str(out), name="tb", version="") if logger else False,
        callbacks=[callback],
        plugins=[AtomicCheckpointIO()],
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        default_root_dir=str(out),
        log_every_n_steps=1,
    )
    trainer.fit(module, ckpt_path=str(last) if resume else None)
    trainer.save_checkpoint(str(ckpt_dir / "final.ckpt"))
    return module


def load_module(
    path: str | os.PathLike, registry: dict[str, type], expected: str | None = None
) -> RLModule:
    """Rebuild a trained module from a checkpoint (``weights_only``), checking its method."""
    ckpt = safe_torch_load(path)
    hp = ckpt.get("hyper_parameters") or {}
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
    module.load_state_dict(ckpt["state_dict"])
    module.on_load_checkpoint(ckpt)
    module._resume_state = None
    return module
