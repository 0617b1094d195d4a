"""The app's sessions: one per open page, each with its own temporary folder under the user's cache (uploads,
results, masks), its photos and the log of events its page follows. A folder lives as long as its session: it is
removed when the page says goodbye, after an idle hour, and when the app stops. Every path inside it is made here
from numbers; nothing a browser sends is ever used as a path."""

from __future__ import annotations

import os
import re
import secrets
import shutil
import threading
import time
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

IDLE_SECONDS = 3600  # a session whose page has not called for this long is ended (its folder removed)
STALE_SECONDS = 86400  # folders left by an app that did not stop cleanly are removed at the next start
FORMAT_EXTENSIONS = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp"}  # what the app accepts, by decoded format
VIDEO_EXTENSIONS = (".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi")  # videos, which the person-mask tab takes


def cache_root() -> Path:
    """Where sessions live: $FACEVEIL_APP_HOME, else faceveil-app/ in the user's cache folder."""
    if os.environ.get("FACEVEIL_APP_HOME"):
        return Path(os.environ["FACEVEIL_APP_HOME"])
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "faceveil-app"


def display_name(client_name: str, fmt: str) -> str:
    """A file name to show and to offer for download, from what the browser called the file: the last path
    component, printable letters, digits and ` ._()-` only, at most 100 characters, with an extension of its
    format."""
    base = re.split(r"[\\/]", client_name or "")[-1]
    base = unicodedata.normalize("NFC", base)
    base = "".join(c if (c.isalnum() or c in " ._()-") else "_" for c in base).strip(" .") or "photo"
    stem, dot, ext = base.rpartition(".")
    if not dot or not stem:
        stem, ext = base, ""
    wanted = FORMAT_EXTENSIONS.get(fmt, fmt if fmt in VIDEO_EXTENSIONS else ".jpg")
    same = {".jpg", ".jpeg", ".jpe"} if wanted == ".jpg" else {wanted}
    return stem[:96] + ("." + ext if "." + ext.lower() in same else wanted)  # the user's own spelling kept


@dataclass
class Photo:
    """One uploaded photo: its number in the session, the name the user knows it by, where it is stored, and what
    happened to it."""

    id: int
    name: str
    path: Path
    width: int
    height: int
    role: str  # which tab it was added to: protect | enroll | apply | check
    result: Path | None = None  # the protected (or masked) file
    report: dict[str, Any] | None = None  # what the page is told about it once done
    kind: str = "photo"  # photo | video
    faces: list[dict[str, Any]] | None = None  # its detected faces (faceveil.api.detect_faces), once asked for


@dataclass
class Session:
    id: str
    folder: Path
    photos: dict[int, Photo] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)
    mask: Path | None = None  # the enrolled person mask
    mask_name: str = ""
    busy: bool = False  # a job of this session is queued or running
    last_seen: float = field(default_factory=time.monotonic)
    ended: bool = False
    _next_id: int = 1
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def folder_for(self, what: str) -> Path:
        path = self.folder / what
        path.mkdir(mode=0o700, exist_ok=True)
        return path

    def new_photo_id(self) -> int:
        with self._lock:
            number, self._next_id = self._next_id, self._next_id + 1
        return number

    def emit(self, event: dict[str, Any]) -> None:
        """Appends an event to the log the page streams (server-sent events, numbered by their index)."""
        with self._lock:
            self.events.append(event)

    def events_from(self, index: int) -> list[dict[str, Any]]:
        with self._lock:
            return self.events[index:]


class Sessions:
    """Every open session of the app, and their folders under `root`."""

    def __init__(self, root: Path, max_sessions: int = 64):
        self.root = root
        self.max_sessions = max_sessions
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._remove_stale()

    def _remove_stale(self) -> None:
        """Folders of sessions that an earlier app left behind (it was killed): removed once a day old."""
        now = time.time()
        for folder in self.root.glob("session-*"):
            if folder.is_dir() and now - folder.stat().st_mtime > STALE_SECONDS:
                shutil.rmtree(folder, ignore_errors=True)

    def create(self) -> Session:
        self.expire_idle()
        with self._lock:
            if len(self._sessions) >= self.max_sessions:
                raise OverflowError(f"too many open pages ({self.max_sessions}); close some and reload")
            sid = secrets.token_urlsafe(18)
            folder = self.root / f"session-{secrets.token_hex(8)}"
            folder.mkdir(mode=0o700)
            session = Session(sid, folder)
            self._sessions[sid] = session
        return session

    def get(self, sid: str) -> Session | None:
        with self._lock:
            session = self._sessions.get(sid)
        if session is not None:
            session.last_seen = time.monotonic()
        return session

    def end(self, sid: str) -> bool:
        with self._lock:
            session = self._sessions.pop(sid, None)
        if session is None:
            return False
        session.ended = True
        if not session.busy:  # a running job removes the folder when it finishes
            shutil.rmtree(session.folder, ignore_errors=True)
        return True

    def expire_idle(self) -> None:
        now = time.monotonic()
        with self._lock:
            idle = [s.id for s in self._sessions.values() if now - s.last_seen > IDLE_SECONDS and not s.busy]
        for sid in idle:
            self.end(sid)

    def end_all(self) -> None:
        with self._lock:
            sids = list(self._sessions)
        for sid in sids:
            self.end(sid)
        for folder in self.root.glob("session-*"):  # also those of jobs still running: the app is stopping
            shutil.rmtree(folder, ignore_errors=True)

    def __len__(self) -> int:
        return len(self._sessions)
