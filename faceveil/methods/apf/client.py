"""The user-end transport of APF (apf-mm2020 §3.2): send the gradient g, get back the noise s.

Only the standard library (urllib), so the client side stays light. What goes over the wire is exactly one
float32 tensor in the faceveil/apf/wire.py format and the headers HTTP itself needs (Host, Content-Type,
Content-Length, Accept, Accept-Encoding, Connection): no User-Agent, no file name, no EXIF, no identifiers, no
telemetry. Environment proxies are ignored for loopback servers (a local proxy would otherwise see g).
"""

from __future__ import annotations

import http.client
import json
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass

import torch

from faceveil.errors import FaceveilError
from faceveil.methods.apf import wire
from faceveil.runtime.net import is_loopback

DEFAULT_TIMEOUT = 60.0


@dataclass(frozen=True)
class NoiseAnswer:
    noise: torch.Tensor  # [B,3,S,S] float32
    server_ms: float | None  # the model's own time, from the Server-Timing header


class NoiseClient:
    """`health()` -> the server's limits and model facts; `noise(g)` -> s. Every failure is one FaceveilError."""

    def __init__(self, url: str, timeout: float = DEFAULT_TIMEOUT):
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise FaceveilError(f"`server` takes an http(s)://HOST:PORT address, got {url!r}")
        if parts.query or parts.fragment or parts.username:
            raise FaceveilError(f"`server` takes a plain http(s)://HOST:PORT[/path] address, got {url!r}")
        self.url = url.rstrip("/")
        self.timeout = timeout
        handlers = [urllib.request.ProxyHandler({})] if is_loopback(parts.hostname) else []
        self._opener = urllib.request.build_opener(*handlers)
        self._opener.addheaders = []  # drop urllib's "User-Agent: Python-urllib/3.x"
        self.max_batch: int | None = None  # learnt from health(); noise() splits larger batches

    def health(self) -> dict:
        info = json.loads(self._call("GET", "/health", None, "application/json")[0])
        if not isinstance(info, dict) or info.get("status") != "ok":
            raise FaceveilError(f"APF server at {self.url} is not healthy: {str(info)[:200]}")
        self.max_batch = int(info["max_batch"]) if "max_batch" in info else None
        return info

    def noise(self, g: torch.Tensor, stage: str = "s") -> torch.Tensor:
        """s for g [B,3,S,S] (stage "s"), or the transferred gradient T(g) (stage "g_hat")."""
        step = self.max_batch or len(g)
        return torch.cat([self.request_noise(g[i:i + step], stage).noise for i in range(0, len(g), step)])

    def request_noise(self, g: torch.Tensor, stage: str = "s") -> NoiseAnswer:
        """One request: g -> s, with the server's model time."""
        _check_gradient(g)
        body, headers = self._call("POST", f"/v1/noise?stage={urllib.parse.quote(stage)}",
                                   wire.encode(g.detach().cpu().float().contiguous()), wire.MEDIA_TYPE)
        if headers.get_content_type() != wire.MEDIA_TYPE:
            raise FaceveilError(f"APF server at {self.url} answered {headers.get_content_type()}, not a tensor")
        try:
            noise = wire.to_tensor(wire.decode(body))
        except wire.WireError as exc:
            raise FaceveilError(f"APF server at {self.url} sent a malformed answer: {exc}") from None
        if noise.shape != g.shape or not torch.isfinite(noise).all():
            raise FaceveilError(f"APF server at {self.url} answered shape {list(noise.shape)} (or non-finite "
                                f"values) for g of shape {list(g.shape)}")
        return NoiseAnswer(noise, _server_ms(headers.get("Server-Timing")))

    def _call(self, method: str, path: str, data: bytes | None, media_type: str):
        request = urllib.request.Request(self.url + path, data=data, method=method)
        request.add_header("Accept", "application/json" if data is None else f"{wire.MEDIA_TYPE}, application/json")
        if data is not None:
            request.add_header("Content-Type", media_type)
        try:
            with self._opener.open(request, timeout=self.timeout) as response:
                return response.read(), response.headers
        except urllib.error.HTTPError as exc:
            raise FaceveilError(f"APF server at {self.url} refused the request: {exc.code} {_error_text(exc)}") \
                from None
        except urllib.error.URLError as exc:
            raise FaceveilError(self._unreachable(exc.reason)) from None
        except (OSError, http.client.HTTPException) as exc:  # timeouts and resets while reading
            raise FaceveilError(self._unreachable(exc)) from None

    def _unreachable(self, reason: object) -> str:
        if isinstance(reason, ConnectionRefusedError):
            return f"cannot reach the APF server at {self.url}: connection refused (is `faceveil serve` running?)"
        if isinstance(reason, TimeoutError):
            return f"the APF server at {self.url} did not answer within {self.timeout:g} s"
        text = " ".join(str(reason).split()) or type(reason).__name__
        return f"cannot reach the APF server at {self.url}: {text}"


def _check_gradient(g: torch.Tensor) -> None:
    if not isinstance(g, torch.Tensor) or not g.is_floating_point() or g.ndim != 4 or g.shape[1] != 3:
        shape = list(g.shape) if isinstance(g, torch.Tensor) else type(g).__name__
        raise FaceveilError(f"the client sends only a gradient g: a float tensor [B,3,S,S], got {shape}")
    if len(g) == 0 or not torch.isfinite(g).all():
        raise FaceveilError("g is empty or holds NaN/infinite values")


def _error_text(exc: urllib.error.HTTPError) -> str:
    """The server's one-line JSON error, or the HTTP reason."""
    try:
        return str(json.loads(exc.read(4096))["error"])
    except Exception:  # not our server's JSON: the reason phrase will do
        return str(exc.reason)


def _server_ms(timing: str | None) -> float | None:
    """'model;dur=12.345' -> 12.345."""
    for part in (timing or "").split(";"):
        if part.strip().startswith("dur="):
            try:
                return float(part.strip()[4:])
            except ValueError:
                return None
    return None
