"""Durable atomic file writes (a crash or power cut leaves the old file or none, never half a file) and the lock that
keeps two runs out of one directory.

``atomic_save`` writes a temporary file beside the target, fsyncs it, renames it over the target and fsyncs the
directory, so the rename itself survives a power cut. A write that fails midway (disk full, file-size limit, an I/O
error) removes the temporary file and raises one ``CastError`` line saying the previous file is intact.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import stat
import sys
import tempfile
from collections.abc import Callable, Iterator
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
    """Call ``write(tmp_path)`` on a temporary file beside ``path``; fsync it, rename it over ``path`` and fsync the
    directory. If any of that fails with an OSError, the temporary file is removed, ``path`` keeps its previous
    content (or stays absent), and a one-line ``CastError`` says so."""
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
    except BaseException as error:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(error, OSError):
            raise CastError(_failed_write_line(path, error)) from error
        raise
    fsync_directory(path.parent)
    return path


def fsync_directory(directory: str | os.PathLike) -> None:
    """Make a rename (or a new file) in ``directory`` durable. File systems that cannot fsync a directory (some
    network and FUSE mounts answer EINVAL) keep their own guarantees; any other failure is raised."""
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError as error:
        if error.errno in (errno.EACCES, errno.EPERM):  # a directory we may write into but not open for reading
            return
        raise
    try:
        os.fsync(fd)
    except OSError as error:
        if error.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def _failed_write_line(path: Path, error: OSError) -> str:
    reason = error.strerror or " ".join(str(error).split()) or type(error).__name__
    kept = f"the previous {path} is intact" if path.exists() else f"nothing was written to {path}"
    return f"cannot write {path}: {reason} (the write failed midway); {kept}: free disk space or raise the file-size limit, then rerun"


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


@contextlib.contextmanager
def exclusive(lock_path: str | os.PathLike, what: str, wait: bool = True, no_wait_option: str = "--no_wait") -> Iterator[None]:
    """Hold the file lock ``lock_path`` (the ``filelock`` package) while the block runs: another cast run holding it
    makes this one wait, with one line on stderr saying so, or (``wait=False``) fail at once with a ``CastError``.
    Re-entrant within one process (the same lock path may be taken again inside the block). The operating system
    releases the lock of a process that dies, even by SIGKILL, so a crashed run never leaves a stale lock."""
    from filelock import FileLock, Timeout

    lock_path = Path(lock_path)
    try:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise CastError(f"cannot create {lock_path.parent}: {error.strerror or error}; choose a writable directory") from error
    lock = FileLock(str(lock_path), is_singleton=True)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        if not wait:
            raise CastError(
                f"{what} is in use by another cast run (lock {lock_path}): wait until it finishes, "
                f"or rerun without {no_wait_option} to wait for it"
            ) from None
        print(f"[cast] waiting for another cast run to finish with {what} (lock {lock_path})", file=sys.stderr, flush=True)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def shown_path(path: str | os.PathLike) -> str:
    """A path as output files record it: relative to the working directory when it lies inside it (a study runs in
    its own directory, so its files name each other relatively), else absolute. Links are not followed: a study's
    ``base_model`` link stays ``base_model``."""
    absolute = Path(os.path.abspath(path))
    try:
        return str(absolute.relative_to(os.path.abspath(os.getcwd())))
    except ValueError:
        return str(absolute)
