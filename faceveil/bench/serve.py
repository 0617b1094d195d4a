"""`faceveil bench serve`: a short, bounded load test of the APF cloud on 127.0.0.1.

It starts `faceveil serve --port 0` as a child process (the server gets its own interpreter, as in production,
so the clients' threads do not share its GIL), waits for /health, then fires `requests` requests from `clients`
concurrent clients and reports: all answered or not, errors, latency p50/p90/p99 (client side, connect to last
byte), throughput, and the model's own time per request (the server's Server-Timing header).

With `stalled` > 0 the load runs while that many slow clients hold connections open (StalledClients: headers and
the first KB of a body, then nothing), the slow-client attack of issue 24: the well-behaved clients must all be
answered, and their p99 says at what cost.

The gradients are synthetic and seeded: g = eps * sign(N(0, 1)) on the server's grid, the shape and value range of
an FGSM gradient (Eq. 1). The server's work does not depend on g's content, and no photo is needed.
"""

from __future__ import annotations

import contextlib
import select
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from urllib.parse import urlsplit

import numpy as np
import torch
from tqdm import tqdm

from faceveil.errors import FaceveilError
from faceveil.methods.apf import wire
from faceveil.methods.apf.client import NoiseClient

STARTUP_TIMEOUT_S = 120.0  # importing torch and loading the checkpoint on a busy 2-core machine
READY_PREFIX = "faceveil serve: listening on "
DISTINCT_GRADIENTS = 8
STALLED_ADDRESSES = 10  # stalled clients come from 127.0.0.2..11: a spread sender, each address under per-client limits
STALLED_BODY_BYTES = 1024  # what a stalled client sends of its body before it stops


@dataclass
class Outcome:
    latency_ms: float
    server_ms: float | None
    error: str | None = None


@contextlib.contextmanager
def server_process(checkpoint: str | None = None, workers: int = 1, max_batch: int | None = None,
                   timeout: float = STARTUP_TIMEOUT_S) -> Iterator[str]:
    """`faceveil serve` on 127.0.0.1 (a free port) in a child process; yields its URL; stops it afterwards."""
    command = [sys.executable, "-m", "faceveil.cli", "serve", "--host", "127.0.0.1", "--port", "0", "--quiet",
               "--workers", str(workers)]
    command += ["--checkpoint", str(checkpoint)] if checkpoint else []
    command += ["--max-batch", str(max_batch)] if max_batch else []
    with tempfile.TemporaryFile() as stderr_file:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr_file, text=True)
        try:
            yield _wait_ready(process, stderr_file, timeout)
        finally:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _wait_ready(process: subprocess.Popen, stderr_file, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([process.stdout], [], [], 0.5)
        line = process.stdout.readline() if ready else ""
        if line.startswith(READY_PREFIX):
            return line[len(READY_PREFIX):].split()[0]
        if process.poll() is not None:
            stderr_file.seek(0)
            tail = stderr_file.read().decode(errors="replace").strip().splitlines()
            raise FaceveilError(f"`faceveil serve` exited ({process.returncode}): {tail[-1] if tail else 'no output'}")
    raise FaceveilError(f"`faceveil serve` did not start within {timeout:g} s")


class StalledClients:
    """`count` connections that each announce a full body (Content-Length `body_bytes`), send its first KB and then
    nothing, held open while the context is. On a loopback server they come from other loopback addresses than the
    well-behaved clients (127.0.0.2..), so a per-client limit does not simply refuse them all."""

    def __init__(self, url: str, count: int, body_bytes: int):
        parts = urlsplit(url)
        self.address, self.count, self.body_bytes = (parts.hostname, parts.port), count, body_bytes
        self.sockets: list[socket.socket] = []

    def __enter__(self) -> StalledClients:
        head = (f"POST /v1/noise HTTP/1.1\r\nHost: {self.address[0]}\r\nContent-Type: {wire.MEDIA_TYPE}\r\n"
                f"Content-Length: {self.body_bytes}\r\n\r\n").encode()
        loopback = self.address[0].startswith("127.")
        try:
            for i in range(self.count):
                source = (f"127.0.0.{2 + i % STALLED_ADDRESSES}", 0) if loopback else None
                sock = socket.create_connection(self.address, timeout=10, source_address=source)
                self.sockets.append(sock)
                sock.sendall(head + wire.MAGIC + bytes(min(STALLED_BODY_BYTES, self.body_bytes) - len(wire.MAGIC)))
        except OSError as exc:
            self.__exit__()
            raise FaceveilError(f"could not open stalled connection {len(self.sockets) + 1}: {exc}") from None
        return self

    def answered(self) -> int:
        """How many the server has answered or closed so far (each readable socket)."""
        if not self.sockets:
            return 0
        readable, _, _ = select.select(self.sockets, [], [], 0)
        return len(readable)

    def __exit__(self, *_exc) -> None:
        for sock in self.sockets:
            sock.close()
        self.sockets = []


def synthetic_gradients(count: int, batch: int, grid: int, eps: float, seed: int) -> list[torch.Tensor]:
    """`count` seeded FGSM-shaped gradients eps * sign(N(0,1)) [batch,3,grid,grid]."""
    gen = torch.Generator().manual_seed(seed)
    return [(eps * torch.randn(batch, 3, grid, grid, generator=gen).sign()).float() for _ in range(count)]


def fire(client: NoiseClient, gradients: list[torch.Tensor], requests: int, clients: int,
         progress: bool = True) -> tuple[list[Outcome], float]:
    """`requests` requests from `clients` threads; returns the outcomes and the wall time."""
    bar = tqdm(total=requests, desc="bench serve", unit="req", disable=not progress)
    lock = threading.Lock()

    def one(index: int) -> Outcome:
        start = time.perf_counter()
        try:
            answer = client.request_noise(gradients[index % len(gradients)])
            outcome = Outcome(1000 * (time.perf_counter() - start), answer.server_ms)
        except FaceveilError as exc:
            outcome = Outcome(1000 * (time.perf_counter() - start), None, str(exc))
        with lock:
            bar.update()
        return outcome

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=clients, thread_name_prefix="bench-client") as pool:
        outcomes = list(pool.map(one, range(requests)))
    wall = time.perf_counter() - start
    bar.close()
    return outcomes, wall


def summarise(outcomes: list[Outcome], wall: float, batch: int) -> dict:
    ok = [o for o in outcomes if o.error is None]
    latency = np.array([o.latency_ms for o in ok]) if ok else np.array([np.nan])
    server = np.array([o.server_ms for o in ok if o.server_ms is not None] or [np.nan])
    errors = [o.error for o in outcomes if o.error is not None]
    return {"answered": len(ok), "errors": len(errors), "all_answered": len(ok) == len(outcomes),
            "p50_ms": float(np.percentile(latency, 50)), "p90_ms": float(np.percentile(latency, 90)),
            "p99_ms": float(np.percentile(latency, 99)), "mean_ms": float(latency.mean()),
            "throughput_rps": len(ok) / wall, "faces_per_s": len(ok) * batch / wall,
            "server_ms_mean": float(server.mean()), "server_ms_p50": float(np.percentile(server, 50)),
            "wall_s": wall, "first_error": errors[0] if errors else None}


def run(requests: int, clients: int, batch: int = 1, checkpoint: str | None = None, workers: int = 1,
        max_batch: int | None = None, seed: int = 0, progress: bool = True, stalled: int = 0
        ) -> tuple[list[dict], dict]:
    """Start the server, warm it up, fire (while `stalled` slow clients hold connections), stop it: ([one row],
    settings for the report)."""
    with server_process(checkpoint, workers, max_batch) as url:
        client = NoiseClient(url)
        health = client.health()
        if batch > health["max_batch"]:
            raise FaceveilError(f"`batch` {batch} exceeds the server's max batch {health['max_batch']}")
        gradients = synthetic_gradients(DISTINCT_GRADIENTS, batch, health["grid"], health["eps"], seed)
        for g in gradients[:2]:  # warm-up, not counted: first-call allocations
            client.request_noise(g)
        request_bytes = wire.encoded_size(tuple(gradients[0].shape))
        with StalledClients(url, stalled, request_bytes) as slow:
            outcomes, wall = fire(client, gradients, requests, clients, progress)
            cut = slow.answered()
    row = {"requests": requests, "clients": clients, "batch": batch, "stalled": stalled,
           "stalled_cut_during_load": cut, **summarise(outcomes, wall, batch), "request_bytes": request_bytes}
    info = {"url": url, "grid": health["grid"], "eps": health["eps"], "server_models": _server_models(health),
            "server_version": health["version"]}
    return [row], info


def _server_models(health: dict) -> object:
    model = health.get("model") or {}
    return model.get("server_models") or model.get("models")
