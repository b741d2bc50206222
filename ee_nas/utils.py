"""Small shared helpers: atomic file writes and JSON encoding of numpy values."""
from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

import numpy as np


def _file_mode() -> int:
    """Permissions a plain open() would give (mkstemp's 0600 would hide results from a shared group)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


_FILE_MODE = _file_mode()


def atomic_write(path: str | Path, write: Callable[[IO], None], binary: bool = False) -> Path:
    """Write `path` via a temp file in the same folder + fsync + rename: a killed run never leaves half a file.

    `write(f)` fills the open temp file. A crash leaves at most a ``.<name>.<random>.tmp`` file,
    which `remove_stale_temp_files` deletes when the run restarts.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda f: f.write(text))


def remove_stale_temp_files(*folders: str | Path) -> list[Path]:
    """Delete the temp files a killed `atomic_write` left in `folders` (not recursive)."""
    stale = [p for folder in folders for p in Path(folder).glob(".*.tmp") if p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def mix_seed(*values: int) -> int:
    """One 32-bit seed from several integers (seed, epoch, step...), the same on every machine."""
    return int(np.random.SeedSequence([int(v) & 0xFFFFFFFFFFFFFFFF for v in values]).generate_state(1)[0])


def _to_builtin(obj):
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


def to_json(obj) -> str:
    """JSON text with NaN written as null and numpy values as plain numbers."""
    return json.dumps(_nan_to_none(obj), indent=2, default=_to_builtin)


def _nan_to_none(obj):
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_nan_to_none(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _nan_to_none(obj.tolist())
    if isinstance(obj, np.generic):
        return _nan_to_none(obj.item())
    return obj


def atomic_write_json(path: str | Path, obj) -> Path:
    return atomic_write_text(path, to_json(obj) + "\n")
