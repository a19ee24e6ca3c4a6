"""Atomic file writes: a crash leaves the old file or none, never half a file."""

from __future__ import annotations

import json
import os
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path

from cast_lightning.errors import CastError


def _is_special(path: Path) -> bool:
    """An existing device or pipe (``/dev/null``, ``/dev/stdout``): written in place, never renamed over."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return False
    return not stat.S_ISREG(mode) and not stat.S_ISDIR(mode)


def atomic_save(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, then rename it over ``path``."""
    path = Path(path)
    if _is_special(path):
        # Renaming over /dev/null would replace the device with a file (as root) or fail after all the work.
        write(str(path))
        return path
    tmp = _temp_beside(path, ".tmp", "output path")
    try:
        write(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; results are meant to be shared like any other file
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def ensure_writable(path: str | os.PathLike, option: str = "output path", directory: bool = False) -> Path:
    """Fail fast with a CastError if ``path`` cannot be written where ``atomic_save`` would write it.

    Commands call this before loading models or computing anything, so a typo in an output path costs
    seconds, not a finished diagnosis or evaluation. It creates the parent directory (as the write would)
    and a temporary file in it, which it removes; an existing ``path`` is left untouched. ``directory``:
    ``path`` is a directory to be replaced as a whole (``cast export``), so an existing file there is refused.
    """
    path = Path(path)
    if not directory and _is_special(path):
        if not os.access(path, os.W_OK):
            raise CastError(f"cannot write {path}: permission denied; choose a writable {option}")
        return path
    if directory and path.exists() and not path.is_dir():
        raise CastError(f"cannot write {path}: it is an existing file, not a directory; choose another {option}")
    if not directory and path.is_dir():
        raise CastError(f"cannot write {path}: it is an existing directory; give a file path as {option}")
    os.unlink(_temp_beside(path, ".probe", option))
    return path


def _temp_beside(path: Path, suffix: str, option: str) -> str:
    """An empty temporary file in ``path``'s directory (created if needed), or a CastError naming ``option``."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    except OSError as error:
        raise CastError(f"cannot write {path}: {error.strerror or error}; choose a writable {option}") from error
    os.close(fd)
    return tmp


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as handle:
            handle.write(data)

    return atomic_save(path, write)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")
