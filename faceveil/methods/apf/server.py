"""The APF cloud (apf-mm2020 §3.2, Fig. 2): an HTTP service that turns the client's image-specific gradient g
into the adversarial noise s = clip_eps(T(g) + E(u)). It never sees a photo: `POST /v1/noise` accepts exactly one
float32 tensor [B,3,S,S] in the faceveil/apf/wire.py format and refuses everything else with a 4xx JSON error
(image content types, multipart forms, PNG/JPEG/... bytes, image-shaped or 8-bit arrays, wrong shapes, NaN, values
beyond eps, oversized bodies). Request bodies are never logged or stored: the only log line per request is
method, path (no query string, no client address), status and milliseconds.

The model runs in a worker thread pool of `workers` slots off the event loop, so /health answers while the
model works; when more than `max_pending` requests are waiting, new ones get 503 at once rather than queueing.

A client cannot hold the service by sending slowly (ClientPolicy): a body must keep up a minimum rate after a grace
period (408 and the connection closed otherwise), one client address may have at most `per_client` requests in
flight (429 beyond), and a stalled body holds a connection, never a model slot. A client that goes away mid-request
is logged as what it is (status 499, "client closed the request"), not as a 500.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import anyio
import anyio.to_thread
import numpy as np
import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from faceveil import __version__
from faceveil.errors import FaceveilError
from faceveil.methods.apf import wire
from faceveil.methods.apf.networks import APF_GRID, ApfServerModel
from faceveil.runtime.net import is_loopback

log = logging.getLogger("faceveil.serve")

DEFAULT_MAX_BATCH = 16
DEFAULT_MAX_PENDING = 64
CLIENT_CLOSED = 499  # nginx's status for "the client closed the request": logged, never sent
STAGES = ("s", "g_hat")  # s: the full APF noise (APF_s); g_hat: the transferred gradient T(g) alone (APF_g_hat)
# |g| may exceed eps by float rounding of eps * sign(...) on the client: a relative and an absolute slack.
EPS_RTOL, EPS_ATOL = 1e-4, 1e-6
_IMAGE_CHANNELS = (1, 3, 4)
_MIN_IMAGE_SIDE = 8


@dataclass(frozen=True)
class Limits:
    """What the service accepts; all of it is published on /health."""

    grid: int
    eps: float
    max_batch: int

    @property
    def max_body_bytes(self) -> int:
        return wire.encoded_size((self.max_batch, 3, self.grid, self.grid))

    @property
    def eps_bound(self) -> float:
        return self.eps * (1 + EPS_RTOL) + EPS_ATOL


@dataclass(frozen=True)
class ClientPolicy:
    """How much of the service one client may hold. A body must arrive at `min_body_rate` bytes/s on average once
    `body_grace_s` has passed (a 150 KB face gradient may take 5 + 9 s at the defaults: a slow mobile uplink), so a
    stalled body is cut after the grace period and one that trickles soon after. Connections beyond
    `max_connections` get uvicorn's 503."""

    body_grace_s: float = 5.0
    min_body_rate: float = 16 * 1024
    per_client: int = 16
    max_connections: int = 512

    def __post_init__(self) -> None:
        if not (self.body_grace_s > 0 and self.min_body_rate > 0 and self.per_client >= 1
                and self.max_connections >= 1):
            raise FaceveilError("body grace and minimum body rate must be above 0, per-client and connection limits "
                                "at least 1")


class ClientGone(Exception):
    """The client closed the connection before its request was answered."""


def _error(status: int, message: str, close: bool = False) -> JSONResponse:
    headers = {"Cache-Control": "no-store", **({"Connection": "close"} if close else {})}
    return JSONResponse({"error": message, "status": status}, status_code=status, headers=headers)


def _looks_like_image(shape: tuple[int, ...]) -> bool:
    """[H,W,C] or [B,H,W,C] with C in 1/3/4: how photos travel as arrays (channels last)."""
    return (len(shape) in (3, 4) and shape[-1] in _IMAGE_CHANNELS
            and shape[-2] >= _MIN_IMAGE_SIDE and shape[-3] >= _MIN_IMAGE_SIDE)


def check_gradient(g: np.ndarray, limits: Limits) -> None:
    """Shape [B,3,S,S] with 1 <= B <= max_batch, finite, |g| <= eps. Raises wire.WireError (413/422)."""
    shape, s = tuple(g.shape), limits.grid
    if _looks_like_image(shape):
        raise wire.WireError(422, f"shape {list(shape)} looks like an image (height, width, channels): images are "
                                  f"never accepted; send the gradient g as [B,3,{s},{s}]")
    if len(shape) != 4 or shape[1:] != (3, s, s):
        raise wire.WireError(422, f"g must have shape [B,3,{s},{s}], got {list(shape)}")
    if shape[0] > limits.max_batch:
        raise wire.WireError(413, f"batch of {shape[0]} faces exceeds this server's limit of {limits.max_batch}")
    if not np.isfinite(g).all():
        raise wire.WireError(422, "g contains NaN or infinite values")
    peak = float(np.abs(g).max())
    if peak > limits.eps_bound:
        raise wire.WireError(422, f"max |g| = {peak:.6g} exceeds the server's eps {limits.eps:.6g}: g must lie in "
                                  "the L-inf eps-ball (Eq. 1)")


async def read_body_limited(request: Request, limit: int, policy: ClientPolicy = ClientPolicy()) -> bytes:
    """The body, refusing (413) a declared or actual size over `limit` before buffering more than that, and (408) one
    that falls behind the policy's minimum rate; ClientGone when the client hangs up."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.strip().isdigit():
            raise wire.WireError(400, "Content-Length is not a number")
        if int(declared) > limit:
            raise wire.WireError(413, f"body of {int(declared)} bytes exceeds the limit of {limit}")
    chunks: list[bytes] = []
    size = 0
    start = time.monotonic()
    stream = request.stream().__aiter__()
    while True:
        # the next bytes are due when the average rate since the grace period would fall below the minimum
        due = start + policy.body_grace_s + size / policy.min_body_rate
        try:
            with anyio.fail_after(max(due - time.monotonic(), 0)):
                chunk = await stream.__anext__()
        except StopAsyncIteration:
            return b"".join(chunks)
        except TimeoutError:
            raise wire.WireError(408, f"request body too slow: {size} bytes in {time.monotonic() - start:.1f} s "
                                      f"(at least {policy.min_body_rate:g} bytes/s after {policy.body_grace_s:g} s)"
                                 ) from None
        except ClientDisconnect:
            raise ClientGone(f"after {size} bytes of the body") from None
        size += len(chunk)
        if size > limit:
            raise wire.WireError(413, f"body exceeds the limit of {limit} bytes")
        chunks.append(chunk)


class PerClient:
    """Requests in flight per client address (event loop thread only): at most `limit` each, 429 beyond."""

    def __init__(self, limit: int):
        self.limit = limit
        self.in_flight: dict[str, int] = {}

    def total(self) -> int:
        return sum(self.in_flight.values())

    @contextlib.contextmanager
    def admit(self, request: Request) -> Iterator[None]:
        key = request.client.host if request.client else ""
        if self.in_flight.get(key, 0) >= self.limit:
            raise wire.WireError(429, f"too many requests from this client at once (limit {self.limit}); retry "
                                      "when one is answered")
        self.in_flight[key] = self.in_flight.get(key, 0) + 1
        try:
            yield
        finally:
            self.in_flight[key] -= 1
            if not self.in_flight[key]:
                del self.in_flight[key]


def check_media_type(request: Request) -> None:
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media.startswith(("image/", "multipart/")):
        raise wire.WireError(415, f"{media} uploads are refused: the photo never leaves the device (APF "
                                  f"non-accessibility); send only the gradient g as {wire.MEDIA_TYPE}")
    if media != wire.MEDIA_TYPE:
        raise wire.WireError(415, f"Content-Type must be {wire.MEDIA_TYPE}, got {media or 'none'!r}")


class ModelRunner:
    """Runs the model off the event loop: at most `workers` forwards at once, at most `max_pending` admitted."""

    def __init__(self, model: ApfServerModel, limits: Limits, workers: int, max_pending: int):
        self.model = model.eval()
        self.limits = limits
        self.slots = threading.BoundedSemaphore(workers)
        self.workers, self.max_pending = workers, max_pending
        self.pending = 0  # touched only on the event loop thread

    async def run(self, g: torch.Tensor, stage: str) -> tuple[torch.Tensor, float]:
        if self.pending >= self.max_pending:
            raise wire.WireError(503, f"server busy ({self.pending} requests waiting); retry shortly")
        self.pending += 1
        try:
            return await anyio.to_thread.run_sync(self._forward, g, stage)
        finally:
            self.pending -= 1

    def _forward(self, g: torch.Tensor, stage: str) -> tuple[torch.Tensor, float]:
        with self.slots, torch.inference_mode():
            start = time.perf_counter()
            out = self.model.transferred(g) if stage == "g_hat" else self.model(g)
            seconds = time.perf_counter() - start
        out = out.detach().float().contiguous()
        # A broken checkpoint must not hand out garbage as "protection".
        if out.shape != g.shape or not torch.isfinite(out).all() or out.abs().max() > self.limits.eps_bound:
            raise wire.WireError(500, "the server model's output broke its contract (same shape, finite, within "
                                      "eps): check the checkpoint")
        return out, seconds


class PathOnlyLog:
    """ASGI middleware: one log line per request with method, path, status and milliseconds; never the query
    string, the headers, the client address or a byte of the body."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), [0]

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            log.info("%s %s %d %.1f ms", scope["method"], scope["path"][:80], status[0],
                     1000 * (time.perf_counter() - start))


def _json_safe(value) -> dict:
    return json.loads(json.dumps(value or {}, default=str))


def create_app(model: ApfServerModel, max_batch: int = DEFAULT_MAX_BATCH, workers: int = 1,
               max_pending: int = DEFAULT_MAX_PENDING, policy: ClientPolicy | None = None) -> FastAPI:
    """The APF noise service around a server model (ApfServerModel: eps, meta, forward(g) -> s, transferred)."""
    policy = policy or ClientPolicy()
    clients = PerClient(policy.per_client)
    if max_batch < 1 or workers < 1 or max_pending < 1:
        raise FaceveilError("max_batch, workers and max_pending must be at least 1")
    limits = Limits(grid=int(model.meta.get("grid", APF_GRID)), eps=float(model.eps), max_batch=max_batch)
    runner = ModelRunner(model, limits, workers, max_pending)
    health = {"status": "ok", "service": "faceveil-apf", "version": __version__, "grid": limits.grid, "channels": 3,
              "eps": limits.eps, "max_batch": max_batch, "max_body_bytes": limits.max_body_bytes, "stages": STAGES,
              "workers": workers, "per_client": policy.per_client, "body_grace_s": policy.body_grace_s,
              "min_body_rate": policy.min_body_rate,
              "wire": {"media_type": wire.MEDIA_TYPE, "magic": wire.MAGIC.decode(), "dtype": wire.DTYPE,
                       "byte_order": "little"},
              "model": _json_safe(model.meta)}
    app = FastAPI(title="faceveil APF noise service", version=__version__, docs_url=None, redoc_url=None,
                  openapi_url=None)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def internal_error(_request: Request, exc: Exception) -> JSONResponse:
        log.error("internal error: %s", type(exc).__name__)
        return _error(500, f"internal error ({type(exc).__name__})")

    @app.get("/health")
    async def get_health() -> JSONResponse:
        return JSONResponse({**health, "pending": runner.pending, "in_flight": clients.total()})

    @app.post("/v1/noise")
    async def post_noise(request: Request) -> Response:
        try:
            with clients.admit(request):
                return await _answer_noise(request, limits, runner, policy)
        except wire.WireError as exc:  # a body left unread (408, 413, 429) cannot share the connection with the next
            return _error(exc.status, str(exc), close=exc.status in (408, 413, 429))
        except ClientGone as exc:  # nobody to answer: the status is for the log line
            log.info("client closed the request %s", exc)
            return _error(CLIENT_CLOSED, "client closed the request")
        except Exception as exc:  # never a crash, never a traceback that could carry request data
            log.error("internal error: %s", type(exc).__name__)
            return _error(500, f"internal error ({type(exc).__name__})")

    app.add_middleware(PathOnlyLog)
    app.state.limits, app.state.max_pending, app.state.policy = limits, max_pending, policy
    return app


async def _answer_noise(request: Request, limits: Limits, runner: ModelRunner, policy: ClientPolicy) -> Response:
    check_media_type(request)
    stage = request.query_params.get("stage", "s")
    if stage not in STAGES:
        raise wire.WireError(400, f"stage must be one of {', '.join(STAGES)}")
    body = await read_body_limited(request, limits.max_body_bytes, policy)
    g = wire.decode(body)
    check_gradient(g, limits)
    noise, seconds = await runner.run(wire.to_tensor(g), stage)
    return Response(wire.encode(noise), media_type=wire.MEDIA_TYPE,
                    headers={"Server-Timing": f"model;dur={1000 * seconds:.3f}", "Cache-Control": "no-store"})


# --- running it --------------------------------------------------------------------------------------------------

def check_host(host: str, public: bool) -> None:
    if not is_loopback(host) and not public:
        raise FaceveilError(f"refusing to listen on {host}: a face's gradient is personal data and this server has "
                            "no TLS and no authentication; serve on 127.0.0.1 behind a TLS reverse proxy, or pass "
                            "`public` if you accept that")


def bind(host: str, port: int) -> socket.socket:
    """A listening socket (port 0 = any free port)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as exc:
        raise FaceveilError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def uvicorn_server(app: FastAPI) -> uvicorn.Server:
    """uvicorn with its access log off (it would print client addresses and query strings), no Server header, and
    the process's logging left alone (log_config=None). Connections beyond the policy's max_connections get
    uvicorn's 503: it counts every open connection, stalled ones too, so it is set far above max_pending (which
    bounds the model's queue on its own) and a slow body is cut by the body rate, not by starving everyone."""
    config = uvicorn.Config(app, access_log=False, log_config=None, log_level="warning", lifespan="off",
                            server_header=False, date_header=False, timeout_keep_alive=5,
                            limit_concurrency=max(app.state.policy.max_connections, app.state.max_pending + 16))
    return uvicorn.Server(config)


@dataclass
class RunningServer:
    url: str
    server: uvicorn.Server
    thread: threading.Thread

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)


@contextlib.contextmanager
def background(app: FastAPI, host: str = "127.0.0.1", port: int = 0, startup_timeout: float = 30.0) -> Iterator[str]:
    """Serve `app` from a daemon thread of this process while the context is open; yields the base URL."""
    sock = bind(host, port)
    server = uvicorn_server(app)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="faceveil-serve", daemon=True)
    thread.start()
    running = RunningServer(url_of(sock), server, thread)
    deadline = time.monotonic() + startup_timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            running.stop()
            raise FaceveilError(f"the APF server did not start within {startup_timeout:g} s")
        time.sleep(0.01)
    try:
        yield running.url
    finally:
        running.stop()
        sock.close()


def torch_threads_per_worker(workers: int) -> int:
    """Intra-op threads for each forward so that `workers` forwards at once do not oversubscribe the threads torch
    would use (the cores, or OMP_NUM_THREADS when set)."""
    return max(1, torch.get_num_threads() // workers)


def serve_forever(app: FastAPI, sock: socket.socket) -> None:
    """Serve on an already bound socket in the main thread until Ctrl-C / SIGTERM."""
    uvicorn_server(app).run(sockets=[sock])
