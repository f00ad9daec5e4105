"""Atomic writes, safe loading and run folders.

Every result and checkpoint goes to a temporary file in the same folder, then ``os.replace``
(atomic on POSIX), so a killed run never leaves a half-written file. Loading never unpickles
arbitrary objects: ``torch.load(..., weights_only=True)`` and ``yaml.safe_load`` only.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
import yaml


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp creates 0600 files; give the result the usual umask-based permissions
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def safe_torch_load(path: str | os.PathLike) -> Any:
    """Load a checkpoint without unpickling arbitrary objects."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    return torch.load(path, map_location="cpu", weights_only=True)


def load_yaml(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {str(path)!r} does not exist")
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ValueError(
            f"config file {str(path)!r} must hold a mapping, got {type(data).__name__}"
        )
    return data


def dump_yaml(path: str | os.PathLike, data: dict) -> None:
    atomic_write_text(path, yaml.safe_dump(data, sort_keys=False))


def prepare_run_dir(
    out: str | os.PathLike, *, overwrite: bool = False, resume: bool = False
) -> Path:
    """Return the run folder, refusing to silently reuse one that already holds results.

    Args:
        out: the folder.
        overwrite: allow writing into a folder that already has results (files are replaced
            one by one, atomically; nothing is deleted).
        resume: continuing a killed run in the same folder is allowed.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {str(out)!r} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not (overwrite or resume):
        raise FileExistsError(
            f"--out {str(out)!r} already holds a run; pass --overwrite, --resume or another --out"
        )
    out.mkdir(parents=True, exist_ok=True)
    return out
