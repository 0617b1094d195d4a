"""The web app's HTTP side (FastAPI): the page and its three files, a session per page, uploads checked and stored
in the session's folder, jobs queued on the worker, their progress streamed as server-sent events, results served
and zipped. Loopback only unless the app was started with --public; a request naming another host is refused
(a web page elsewhere cannot reach the app through DNS rebinding)."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import time
import zipfile
from collections.abc import AsyncIterator
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from faceveil import __version__, api
from faceveil.app.jobs import AppSettings, ProtectRequest, Worker
from faceveil.app.sessions import FORMAT_EXTENSIONS, Photo, Session, Sessions, display_name
from faceveil.app.uploads import Limits, RejectedUpload, check_photo, check_video, is_video_name
from faceveil.errors import FaceveilError
from faceveil.runtime.net import is_loopback

DEFAULT_PORT = 8766
STATIC = {"index.html": "text/html; charset=utf-8", "app.js": "text/javascript; charset=utf-8",
          "app.css": "text/css; charset=utf-8"}
ROLES = ("protect", "enroll", "apply", "check")
MEDIA = {".jpg": "image/jpeg", ".png": "image/png", ".webp": "image/webp", ".mp4": "video/mp4", ".m4v": "video/mp4",
         ".mov": "video/quicktime", ".webm": "video/webm", ".mkv": "video/x-matroska", ".avi": "video/x-msvideo"}
# Everything the page loads comes from this server: no CDN, no remote font, no third-party script.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; media-src 'self'; style-src 'self'; "
                               "script-src 'self'; connect-src 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def check_host(host: str, public: bool) -> None:
    """The app listens on loopback only, unless the person starting it says --public."""
    if not public and not is_loopback(host):
        raise FaceveilError(f"host: {host} is not a loopback address; the app shows your photos to whoever can "
                            "reach it: pass `public` to listen there anyway")


def create_app(root: Path, *, settings: AppSettings | None = None, limits: Limits | None = None,
               public: bool = False) -> FastAPI:
    """The app, with its sessions under `root`; their folders are removed when the app stops."""
    limits = limits or Limits()
    sessions = Sessions(root)
    worker = Worker(settings or AppSettings())

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        try:
            yield
        finally:
            worker.shutdown()
            sessions.end_all()

    app = FastAPI(title="faceveil", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.sessions, app.state.worker, app.state.limits = sessions, worker, limits

    @app.middleware("http")
    async def guard(request: Request, call_next):
        host = (request.headers.get("host") or "").rsplit(":", 1)[0]
        if not public and not is_loopback(host):
            return JSONResponse({"error": "this app answers on localhost only"}, status_code=421)
        length = request.headers.get("content-length")
        upload = request.url.path.endswith("/photos") and request.method == "POST"
        most = max(limits.max_upload_bytes, limits.max_video_bytes) if upload else limits.max_json_bytes
        if length is not None and (not length.isdigit() or int(length) > most):
            return JSONResponse({"error": f"request too large: the most is {most // 1024 ** 2 or 1} MB"
                                 if upload else "request too large"}, status_code=413)
        response = await call_next(request)
        response.headers.update(SECURITY_HEADERS)
        return response

    @app.exception_handler(HTTPException)
    async def one_line(_: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code)

    _page_routes(app)
    _session_routes(app, sessions, limits)
    _job_routes(app, sessions, worker)
    _result_routes(app, sessions)
    return app


# ----------------------------------------------------------------------------------------------- the page


def _page_routes(app: FastAPI) -> None:
    @app.get("/")
    def index() -> Response:
        return _static("index.html")

    @app.get("/static/{name}")
    def static(name: str) -> Response:
        if name not in STATIC:
            raise HTTPException(404, "no such file")
        return _static(name)

    @app.get("/api/info")
    def info() -> dict[str, Any]:
        worker: Worker = app.state.worker
        judges = api.judge_names() if worker.settings.judges == "all" else worker.settings.judges.split(",")
        return {"version": __version__, "strengths": api.strengths(), "judges": judges,
                "limits": app.state.limits.to_dict()}

    @app.get("/api/health")
    def health() -> dict[str, Any]:
        return {"ok": True, "sessions": len(app.state.sessions)}


def _static(name: str) -> Response:
    body = resources.files("faceveil.app").joinpath("static", name).read_bytes()
    return Response(body, media_type=STATIC[name])


# ----------------------------------------------------------------------------------------------- sessions


def _session(sessions: Sessions, sid: str) -> Session:
    session = sessions.get(sid)
    if session is None:
        raise HTTPException(404, "this page's session has ended: reload the page")
    return session


def _photo(session: Session, pid: int, role: str | None = None) -> Photo:
    photo = session.photos.get(pid)
    if photo is None or (role is not None and photo.role != role):
        raise HTTPException(404, f"no photo {pid} in this session")
    return photo


def _session_routes(app: FastAPI, sessions: Sessions, limits: Limits) -> None:
    @app.post("/api/session")
    def open_session() -> dict[str, str]:
        try:
            return {"session": sessions.create().id}
        except OverflowError as exc:
            raise HTTPException(503, str(exc)) from None

    @app.post("/api/session/{sid}/end")
    def end_session(sid: str) -> dict[str, bool]:
        return {"ended": sessions.end(sid)}

    @app.post("/api/session/{sid}/photos")
    async def upload(sid: str, request: Request, role: str = "protect") -> dict[str, Any]:
        session = _session(sessions, sid)
        name = unquote(request.headers.get("x-file-name", "photo"))[:300]
        if role not in ROLES:
            raise HTTPException(400, f"role must be one of {', '.join(ROLES)}")
        if len(session.photos) >= limits.max_photos:
            raise HTTPException(413, f"{name} was not added: this page holds at most {limits.max_photos} photos; "
                                     "download what is done and reload")
        video = role == "apply" and is_video_name(name)  # the person-mask tab also takes a short video
        pid = session.new_photo_id()
        incoming = session.folder_for("uploads") / f".incoming-{pid}"
        try:
            await _receive(request, incoming, limits.max_video_bytes if video else limits.max_upload_bytes, name)
            if video:
                ext, width, height, info = await asyncio.to_thread(check_video, incoming, name, limits)
            else:
                fmt, width, height = check_photo(incoming, name, limits)
                ext, info = FORMAT_EXTENSIONS[fmt], {}
        except RejectedUpload as exc:
            incoming.unlink(missing_ok=True)
            raise HTTPException(400, str(exc)) from None
        path = incoming.with_name(f"{pid:04d}{ext}")
        incoming.rename(path)
        photo = Photo(pid, display_name(name, ext if video else fmt), path, width, height, role,
                      kind="video" if video else "photo")
        session.photos[pid] = photo
        return {"id": pid, "name": photo.name, "width": width, "height": height, "kind": photo.kind, **info}

    @app.get("/api/session/{sid}/photos/{pid}/faces")
    def faces(sid: str, pid: int) -> dict[str, Any]:
        """The photo's faces before protecting (outlined on the page, each with a tick box): numbered largest
        first, as the protect request's `faces` selection names them."""
        photo = _photo(_session(sessions, sid), pid)
        if photo.kind != "photo":
            raise HTTPException(400, f"{photo.name} is not a photo")
        if photo.faces is None:
            try:
                photo.faces = [face.to_dict() for face in api.detect_faces(photo.path)]
            except FaceveilError as exc:
                raise HTTPException(400, f"{photo.name}: {exc}") from None
        return {"id": pid, "faces": photo.faces}

    @app.post("/api/session/{sid}/photos/{pid}/remove")
    def remove(sid: str, pid: int) -> dict[str, bool]:
        session = _session(sessions, sid)
        photo = session.photos.pop(pid, None)
        if photo is not None and not session.busy:
            photo.path.unlink(missing_ok=True)
            if photo.result is not None:
                photo.result.unlink(missing_ok=True)
        return {"removed": photo is not None}

    @app.get("/api/session/{sid}/events")
    async def events(sid: str, request: Request) -> StreamingResponse:
        session = _session(sessions, sid)
        first = request.headers.get("last-event-id", "")
        start = int(first) + 1 if first.isdigit() else 0
        return StreamingResponse(_event_stream(session, request, start), media_type="text/event-stream")


async def _receive(request: Request, path: Path, most: int, name: str) -> None:
    """The request body into `path`, refused once it passes `most` bytes (whatever Content-Length said)."""
    received = 0
    with open(path, "wb") as out:
        async for chunk in request.stream():
            received += len(chunk)
            if received > most:
                raise RejectedUpload(f"{name} is too large: more than {most // 1024 ** 2} MB")
            out.write(chunk)


async def _event_stream(session: Session, request: Request, index: int) -> AsyncIterator[str]:
    """The session's events from `index` on, each as it is logged; a comment every 15 s keeps proxies open."""
    yield "retry: 1000\n\n"
    quiet = 0.0
    while not session.ended and not await request.is_disconnected():
        session.last_seen = time.monotonic()  # an open page keeps its session
        fresh = session.events_from(index)
        for event in fresh:
            yield f"id: {index}\ndata: {json.dumps(event)}\n\n"
            index += 1
        if fresh:
            quiet = 0.0
            continue
        await asyncio.sleep(0.2)
        quiet += 0.2
        if quiet >= 15:
            yield ": still here\n\n"
            quiet = 0.0


# ----------------------------------------------------------------------------------------------- jobs


async def _json(request: Request) -> dict[str, Any]:
    raw = b""
    async for chunk in request.stream():  # bounded whatever Content-Length said (or did not say)
        raw += chunk
        if len(raw) > request.app.state.limits.max_json_bytes:
            raise HTTPException(413, "request too large")
    try:
        body = json.loads(raw)
    except ValueError:
        raise HTTPException(400, "expected a JSON body") from None
    if not isinstance(body, dict):
        raise HTTPException(400, "expected a JSON object")
    return body


def _ids(body: dict[str, Any], session: Session, role: str) -> list[Photo]:
    ids = body.get("photos")
    if not isinstance(ids, list) or not ids or not all(isinstance(i, int) for i in ids):
        raise HTTPException(400, "add photos first")
    return [_photo(session, i, role) for i in ids]


def _whole(value: Any, name: str, lowest: int, highest: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not lowest <= value <= highest:
        raise HTTPException(400, f"{name} must be a whole number from {lowest} to {highest}")
    return value


def _face_choices(value: Any, photos: list[Photo]) -> dict[int, list[int]]:
    """{photo id: the indices of the faces to protect} from the page's {"<id>": [indices]}; a photo not named keeps
    every face."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise HTTPException(400, "faces must map a photo to the faces to protect")
    ids, chosen = {p.id for p in photos}, {}
    for key, indices in value.items():
        if not str(key).isdigit() or int(key) not in ids:
            raise HTTPException(400, f"faces names photo {key!r}, which is not being protected")
        if not isinstance(indices, list) or not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < 1000
                                                    for i in indices):
            raise HTTPException(400, "faces: each photo's faces are a list of face numbers")
        chosen[int(key)] = sorted(set(indices))
    return chosen


def _job_routes(app: FastAPI, sessions: Sessions, worker: Worker) -> None:
    def start(session: Session) -> None:
        if session.busy:
            raise HTTPException(409, "this page is already working: wait for it to finish")

    @app.post("/api/session/{sid}/protect")
    async def protect(sid: str, request: Request) -> dict[str, Any]:
        session = _session(sessions, sid)
        body = await _json(request)
        photos = _ids(body, session, "protect")
        strength = body.get("strength", "mid")
        if strength not in [s["name"] for s in api.strengths()]:
            raise HTTPException(400, f"unknown strength {strength!r}")
        iters = body.get("iters")
        chosen = _face_choices(body.get("faces"), photos)
        request_ = ProtectRequest(strength=strength, seed=_whole(body.get("seed", 0), "seed", 0, 2 ** 31 - 1),
                                  iters=None if iters in (None, "") else _whole(iters, "iterations", 1, 1000))
        start(session)
        worker.submit(session, "protect", worker.protect, photos, request_, chosen)
        return {"queued": len(photos)}

    @app.post("/api/session/{sid}/enroll")
    async def enroll(sid: str, request: Request) -> dict[str, Any]:
        session = _session(sessions, sid)
        body = await _json(request)
        photos = _ids(body, session, "enroll")
        name = str(body.get("name") or "me").strip()[:60] or "me"
        start(session)
        worker.submit(session, "enroll", worker.enroll, photos, name, _whole(body.get("seed", 0), "seed", 0, 2 ** 31))
        return {"queued": len(photos)}

    @app.post("/api/session/{sid}/apply")
    async def apply(sid: str, request: Request) -> dict[str, Any]:
        session = _session(sessions, sid)
        photos = _ids(await _json(request), session, "apply")
        if session.mask is None:
            raise HTTPException(400, "enroll a person first (step 1)")
        start(session)
        worker.submit(session, "apply", worker.apply, photos)
        return {"queued": len(photos)}

    @app.post("/api/session/{sid}/verify")
    async def verify(sid: str, request: Request) -> dict[str, Any]:
        session = _session(sessions, sid)
        photos = _ids(await _json(request), session, "check")
        if len(photos) != 2:
            raise HTTPException(400, "choose two photos: the original and the one to check")
        start(session)
        worker.submit(session, "verify", worker.verify, photos[0], photos[1])
        return {"queued": 2}


# ----------------------------------------------------------------------------------------------- results


def _file(path: Path, download: str | None = None) -> Response:
    headers = {"Content-Disposition": _disposition(download)} if download else None
    return Response(path.read_bytes(), media_type=MEDIA.get(path.suffix, "application/octet-stream"),
                    headers=headers)


def _disposition(name: str) -> str:
    ascii_name = name.encode("ascii", "replace").decode().replace('"', "_")
    return f"attachment; filename=\"{ascii_name}\"; filename*=UTF-8''{quote(name)}"


def _result_routes(app: FastAPI, sessions: Sessions) -> None:
    @app.get("/api/session/{sid}/photos/{pid}/original")
    def original(sid: str, pid: int) -> Response:
        return _file(_photo(_session(sessions, sid), pid).path)

    @app.get("/api/session/{sid}/photos/{pid}/result")
    def result(sid: str, pid: int, download: int = 0) -> Response:
        photo = _photo(_session(sessions, sid), pid)
        if photo.result is None or not photo.result.exists():
            raise HTTPException(404, f"{photo.name} has no result yet")
        return _file(photo.result, _result_name(photo) if download else None)

    @app.get("/api/session/{sid}/results.zip")
    def results_zip(sid: str, role: str = "protect") -> Response:
        session = _session(sessions, sid)
        done = [p for p in session.photos.values() if p.role == role and p.result is not None and p.result.exists()]
        if not done:
            raise HTTPException(404, "nothing is done yet")
        buffer, used = io.BytesIO(), set()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:  # photos are compressed already
            for photo in sorted(done, key=lambda p: p.id):
                archive.writestr(_unique(_result_name(photo), used), photo.result.read_bytes())
        name = "faceveil-protected.zip" if role == "protect" else "faceveil-masked.zip"
        return Response(buffer.getvalue(), media_type="application/zip",
                        headers={"Content-Disposition": _disposition(name)})

    @app.get("/api/session/{sid}/mask")
    def mask(sid: str) -> Response:
        session = _session(sessions, sid)
        if session.mask is None:
            raise HTTPException(404, "no person mask yet")
        return Response(session.mask.read_bytes(), media_type="application/octet-stream",
                        headers={"Content-Disposition": _disposition(f"{session.mask_name}.fvmask")})


def _result_name(photo: Photo) -> str:
    """The user's own file name, with the extension of the file written (the format is kept, as in the CLI)."""
    assert photo.result is not None
    stem = photo.name.rsplit(".", 1)[0]
    ext = photo.result.suffix
    return photo.name if photo.name.lower().endswith(ext) or (ext == ".jpg" and photo.name.lower().endswith(
        (".jpeg", ".jpe"))) else stem + ext


def _unique(name: str, used: set[str]) -> str:
    stem, dot, ext = name.rpartition(".")
    candidate, n = name, 2
    while candidate.lower() in used:
        candidate, n = f"{stem} ({n}){dot}{ext}", n + 1
    used.add(candidate.lower())
    return candidate
