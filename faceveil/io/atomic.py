"""Atomic file output: write to a hidden temp file beside the target, fsync, then rename into place.

A reader never sees a half-written file: until the rename, the target is either absent or still the old file.
On any exception (KeyboardInterrupt included) the temp file is removed. Live temp files are also tracked in a
process-wide set so that a batch runner can sweep them after an interrupt (`remove_live_temp_files`); temp names
carry the writer's process id, so the files of a run that was killed (SIGKILL, power loss) are recognised and
removed by the next run (`remove_stale_temp_files`).

What a target may be: absent or a regular file (replaced atomically; `replace=False` refuses an existing one), a
stream or device such as stdout or a pipe (written through: there is nothing to rename over), never a symbolic
link to a file (renaming over it would replace the link itself) nor a folder.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import stat
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

from faceveil.errors import FaceveilError

TEMP_SUFFIX = ".part"
# .NAME.fv<pid>.<mkstemp's 8 random characters>.part
_TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.fv(?P<pid>\d+)\.[A-Za-z0-9_]{8}\.part$")

_live: set[Path] = set()
_live_lock = threading.Lock()


def _read_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


# ----------------------------------------------------------------------------------------------- targets


def is_stream(target: Path | str) -> bool:
    """True when the target exists and is not a regular file or a folder (stdout, a pipe, a terminal, /dev/null):
    such targets are written through, never renamed over."""
    try:
        mode = os.stat(target).st_mode  # follows links: /dev/stdout is a link to the process's descriptor
    except OSError:
        return False
    return not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))


def check_target(target: Path | str) -> None:
    """FaceveilError for a target that must not be written: a folder, or a symbolic link (unless it leads to a
    stream such as stdout, which is written through)."""
    target = Path(target)
    if target.is_symlink() and not is_stream(target):
        raise FaceveilError(f"refusing to replace the symbolic link {target}: name the file it points to instead")
    if target.is_dir():
        raise FaceveilError(f"{target} is a folder, not a file")


def temp_path_for(target: Path) -> Path:
    """Create (empty) and register a hidden temp file in the target's directory; return its path."""
    target = Path(target)
    try:
        fd, name = tempfile.mkstemp(prefix=f".{target.name}.fv{os.getpid()}.", suffix=TEMP_SUFFIX, dir=target.parent)
    except FileNotFoundError as exc:
        raise FaceveilError(f"output folder {target.parent} does not exist") from exc
    except PermissionError as exc:
        raise FaceveilError(f"cannot write to {target.parent}: permission denied") from exc
    except OSError as exc:
        raise FaceveilError(f"cannot write to {target.parent}: {exc.strerror or exc}") from exc
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


def commit(temp: Path, target: Path, *, replace: bool = True, max_mode: int | None = None) -> None:
    """fsync the temp file, give it normal permissions (never more than max_mode, e.g. the source photo's), and
    rename it over the target. replace=False: an existing target is an error and stays as it is."""
    target = Path(target)
    with open(temp, "rb+") as handle:
        os.fsync(handle.fileno())
    mode = 0o666 & ~_UMASK
    os.chmod(temp, mode & max_mode if max_mode is not None else mode)
    check_target(target)
    if replace:
        os.replace(temp, target)
    else:
        _rename_no_replace(temp, target)
    with _live_lock:
        _live.discard(temp)
    _fsync_dir(target.parent)


def _rename_no_replace(temp: Path, target: Path) -> None:
    """Move temp to target only if the target does not exist (a hard link fails when it does: no race)."""
    try:
        os.link(temp, target)
    except FileExistsError:
        raise FaceveilError(f"{target} exists: not overwritten (--overwrite replaces it)") from None
    except OSError as exc:  # a file system without hard links: check, then rename
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
            raise
        if os.path.lexists(target):
            raise FaceveilError(f"{target} exists: not overwritten (--overwrite replaces it)") from None
        os.replace(temp, target)
        return
    os.unlink(temp)


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(target: Path | str, *, replace: bool = True, max_mode: int | None = None) -> Iterator[Path]:
    """Yield a temp path to write; on success it replaces `target`, on any exception it is removed. A stream target
    (stdout, a pipe) gets the finished bytes written through; a symbolic link to a file or a folder is refused."""
    target = Path(target)
    check_target(target)
    if is_stream(target):
        with _written_through(target) as temp:
            yield temp
        return
    temp = temp_path_for(target)
    try:
        yield temp
        commit(temp, target, replace=replace, max_mode=max_mode)
    except BaseException:
        discard(temp)
        raise


@contextlib.contextmanager
def _written_through(target: Path) -> Iterator[Path]:
    """A private temp file (system temp folder) whose bytes are copied into the stream target when done."""
    fd, name = tempfile.mkstemp(suffix=TEMP_SUFFIX)
    os.close(fd)
    temp = Path(name)
    try:
        yield temp
        with open(temp, "rb") as source, open(target, "wb") as sink:
            shutil.copyfileobj(source, sink)
    except OSError as exc:
        raise FaceveilError(f"cannot write {target}: {exc.strerror or exc}") from exc
    finally:
        with contextlib.suppress(FileNotFoundError):
            temp.unlink()


# ----------------------------------------------------------------------------------------------- sweeping


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


def remove_stale_temp_files(folder: Path | str) -> int:
    """Remove the temp files that a faceveil process which no longer runs left in `folder` (killed while writing);
    return how many were removed. Temp files of live processes (another run into the same folder) are kept."""
    removed = 0
    try:
        names = os.listdir(folder)
    except OSError:
        return 0
    for name in names:
        match = _TEMP_NAME.match(name)
        if match is None or _alive(int(match.group("pid"))):
            continue
        with contextlib.suppress(OSError):
            os.unlink(Path(folder) / name)
            removed += 1
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # someone else's process, or not a pid: keep its file
    return True
