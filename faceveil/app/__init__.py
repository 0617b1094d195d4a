"""`faceveil app`: a local web application for people who never open a terminal. It calls the public Python API
(faceveil.api) only; the page (static/) is plain HTML, CSS and JavaScript served by the package, with nothing
loaded from anywhere else.

    server.py    the HTTP side: page, sessions, uploads, jobs, progress events, results and zips
    jobs.py      protect, enroll / apply a person mask, check two photos: one job at a time, models kept loaded
    sessions.py  a temporary folder per page under the user's cache, removed when the page or the app ends
    uploads.py   what is accepted as a photo, checked before its pixels are read
"""

from __future__ import annotations

import socket
import threading
import webbrowser
from pathlib import Path

from faceveil.app.jobs import AppSettings
from faceveil.app.sessions import cache_root
from faceveil.app.uploads import Limits

__all__ = ["AppSettings", "Limits", "RunningApp", "run", "url_of"]


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://{'[' + host + ']' if ':' in host else host}:{port}/"


def bind(host: str, port: int) -> socket.socket:
    """The listening socket (port 0: any free port), bound before the server starts so its address can be printed
    and opened at once."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(64)
    return sock


def run(host: str = "127.0.0.1", port: int = 8766, *, public: bool = False, open_browser: bool = True,
        settings: AppSettings | None = None, root: Path | None = None, on_ready=None) -> None:
    """Serves the app until Ctrl-C; every session folder is removed when it stops. on_ready(url) is called once
    the socket listens (the CLI prints the address there)."""
    import uvicorn

    from faceveil.app.server import check_host, create_app

    check_host(host, public)
    sock = bind(host, port)
    url = url_of(sock)
    app = create_app(root or cache_root(), settings=settings, public=public)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=2))
    if on_ready is not None:
        on_ready(url)
    if open_browser:
        threading.Timer(0.5, webbrowser.open, args=(url,)).start()
    server.run(sockets=[sock])


class RunningApp:
    """The app served on a thread (tests, timings, embedding): `.url`, `.stop()` (removes its session folders)."""

    def __init__(self, root: Path, settings: AppSettings | None = None, host: str = "127.0.0.1", port: int = 0,
                 limits: Limits | None = None):
        import uvicorn

        from faceveil.app.server import check_host, create_app

        check_host(host, False)
        sock = bind(host, port)
        self.url = url_of(sock)
        self.app = create_app(root, settings=settings, limits=limits)
        self._server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning", lifespan="on",
                                                     timeout_graceful_shutdown=2))
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]}, daemon=True)
        self._thread.start()
        while not self._server.started and self._thread.is_alive():
            threading.Event().wait(0.02)

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=15)
