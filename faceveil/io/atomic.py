"""Atomic file output: write to a hidden temp file beside the target, fsync, then os.replace.

A reader never sees a half-written file: until the rename, the target is either absent or still the old file.
On any exception (KeyboardInterrupt included) the temp file is removed. Live temp files are also tracked in a
process-wide set so that a batch runner can sweep them after an interrupt (`remove_live_temp_files`).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

from faceveil.errors import FaceveilError

TEMP_SUFFIX = ".part"

_live: set[Path] = set()
_live_lock = threading.Lock()


def _read_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def temp_path_for(target: Path) -> Path:
    """Create (empty) and register a hidden temp file in the target's directory; return its path."""
    target = Path(target)
    try:
        fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=TEMP_SUFFIX, dir=target.parent)
    except FileNotFoundError as exc:
        raise FaceveilError(f"output folder {target.parent} does not exist") from exc
    except PermissionError as exc:
        raise FaceveilError(f"cannot write to {target.parent}: permission denied") from exc
    os.close(fd)
    path = Path(name)
    with _live_lock:
        _live.add(path)
    return path


def discard(temp: Path) -> None:
    """Remove a temp file (if present) and forget it."""
    with _live_lock:
        _live.discard(temp)
    with contextlib.suppress(FileNotFoundError):
        temp.unlink()


def commit(temp: Path, target: Path) -> None:
    """fsync the temp file, give it normal permissions, and rename it over the target."""
    with open(temp, "rb+") as handle:
        os.fsync(handle.fileno())
    os.chmod(temp, 0o666 & ~_UMASK)
    os.replace(temp, target)
    with _live_lock:
        _live.discard(temp)
    _fsync_dir(Path(target).parent)


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(target: Path | str) -> Iterator[Path]:
    """Yield a temp path to write; on success it replaces `target`, on any exception it is removed."""
    target = Path(target)
    temp = temp_path_for(target)
    try:
        yield temp
        commit(temp, target)
    except BaseException:
        discard(temp)
        raise


def live_temp_files() -> list[Path]:
    """Temp files created by this process and not yet committed or discarded."""
    with _live_lock:
        return sorted(_live)


def remove_live_temp_files() -> int:
    """Remove every live temp file (after an interrupt); return how many were removed."""
    paths = live_temp_files()
    for path in paths:
        discard(path)
    return len(paths)
