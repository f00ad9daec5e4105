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
import warnings
from pathlib import Path
from typing import Any

import yaml

#: temporary files of ``atomic_write_bytes`` are ``.<name>.<random>.tmp`` beside the target
TEMP_GLOB = ".*.tmp"


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
    import torch  # here, not at the top: the CLI's bad-input path never loads torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def safe_torch_load(path: str | os.PathLike) -> Any:
    """Load a checkpoint without unpickling arbitrary objects.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not a readable torch checkpoint (empty, truncated, random
            bytes, or holding objects ``weights_only`` refuses).
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    # warnings torch gives while reading (e.g. random bytes that start like a pickle of an
    # unknown protocol) are held back: a file that fails to load gets our one line only
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            out = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001  untrusted bytes: torch raises many kinds
            # (IndexError for text files, UnpicklingError, RuntimeError, EOFError, BadZipFile...)
            # torch's own message suggests ``weights_only=False``, i.e. trusting the file: never
            raise ValueError(
                f"checkpoint {str(path)!r} is not a readable checkpoint ({type(e).__name__})"
            ) from None
    for w in caught:  # a checkpoint that loaded: its warnings, as torch gave them
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return out


def append_jsonl(path: str | os.PathLike, row: dict) -> None:
    """Append one JSON line with a single ``write`` on an ``O_APPEND`` descriptor.

    A killed process leaves either the whole line or none of it (one small ``write`` to a
    local file is not interrupted half-way by a signal); ``read_jsonl`` still skips a torn
    last line, which only a crash of the machine can leave.
    """
    data = (json.dumps(row) + "\n").encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The rows of a JSON-lines log; a torn last line (a crash mid-write) is skipped.

    Raises:
        ValueError: a line other than the last is not JSON (the file is damaged, not torn).
    """
    lines = Path(path).read_text(encoding="utf-8", errors="replace").splitlines()
    rows = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise ValueError(f"{str(path)!r} line {i + 1} is not JSON") from None
    return rows


def remove_temp_files(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files that killed ``atomic_write_bytes`` calls left under
    ``folder`` (recursively); return them."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [p for p in folder.rglob(TEMP_GLOB) if p.is_file()]
    for p in found:
        p.unlink(missing_ok=True)
    return found


def load_yaml(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {str(path)!r} does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        where = getattr(e, "problem_mark", None)
        at = f" (line {where.line + 1})" if where is not None else ""
        raise ValueError(f"config file {str(path)!r} is not valid YAML{at}") from None
    if not isinstance(data, dict):
        raise ValueError(
            f"config file {str(path)!r} must hold a mapping, got {type(data).__name__}"
        )
    return data


def dump_yaml(path: str | os.PathLike, data: dict) -> None:
    atomic_write_text(path, yaml.safe_dump(data, sort_keys=False))


def check_out(out: str | os.PathLike) -> None:
    """Refuse an ``--out`` that cannot become a run folder, before anything is written: a
    file, a path below a file, or below a folder this process may not write into.

    Raises:
        ValueError: naming ``out`` and what is wrong.
    """
    out = Path(out)
    if out.exists():
        if not out.is_dir():
            raise ValueError(f"--out {str(out)!r} exists and is not a folder")
        if not os.access(out, os.W_OK | os.X_OK):
            raise ValueError(f"--out {str(out)!r} is not writable")
        return
    parent = out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"--out {str(out)!r}: {str(parent)!r} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"--out {str(out)!r}: {str(parent)!r} is not writable")


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
    check_out(out)
    if out.is_dir() and any(out.iterdir()) and not (overwrite or resume):
        raise FileExistsError(
            f"--out {str(out)!r} already holds a run; pass --overwrite, --resume or another --out"
        )
    out.mkdir(parents=True, exist_ok=True)
    return out
