"""The APF cloud and its client (apf-mm2020 §3.2, non-accessibility): the real uvicorn server on 127.0.0.1 accepts
only a gradient, refuses photos and malformed bodies with 4xx and keeps answering, logs no request data, stays
responsive under concurrent load; the client sends exactly one float32 tensor (checked on the wire by a recording
TCP proxy) and turns every failure into one clear line."""

from __future__ import annotations

import http.client
import io
import json
import logging
import math
import socket
import struct
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import needs_weights
from PIL import Image

from faceveil.errors import FaceveilError
from faceveil.io import weights
from faceveil.methods.apf import server, wire
from faceveil.methods.apf.client import NoiseClient
from faceveil.methods.apf.networks import (
    APF_GRID,
    ApfServerModel,
    default_checkpoint,
    load_server_model,
    save_server_model,
)

S = APF_GRID
EPS = 8 / 255
MAX_BATCH = 4


@pytest.fixture(scope="module")
def model() -> ApfServerModel:
    """The real server networks (T + u + E), seeded weights: the transport does not depend on training."""
    torch.manual_seed(0)
    net = ApfServerModel(eps=EPS, meta={"server_models": ["faceres", "dlib"], "probe": "mobileface"})
    with torch.no_grad():
        net.universal.uniform_(-EPS, EPS)
    return net.eval()


@pytest.fixture(scope="module")
def url(model):
    with server.background(server.create_app(model, max_batch=MAX_BATCH)) as base:
        yield base


def _gradient(batch: int = 1, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (EPS * torch.randn(batch, 3, S, S, generator=gen).sign()).float()


def _raw_tensor(array: np.ndarray, dtype: str | None = None, extra: dict | None = None) -> bytes:
    """A wire body with any header (to forge bad ones)."""
    header = json.dumps({"dtype": dtype or str(array.dtype), "shape": list(array.shape), **(extra or {})}).encode()
    return struct.pack("<4sI", wire.MAGIC, len(header)) + header + array.tobytes()


def _post(base: str, body: bytes, content_type: str | None = wire.MEDIA_TYPE, path: str = "/v1/noise",
          method: str = "POST") -> tuple[int, dict | bytes]:
    parts = urllib.parse.urlsplit(base)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    headers = {"Content-Type": content_type} if content_type else {}
    try:
        conn.request(method, path, body=body, headers=headers)
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server may answer (413) and close before a big body is all sent: its answer is still there
    response = conn.getresponse()
    data = response.read()
    conn.close()
    if response.getheader("Content-Type", "").startswith("application/json"):
        return response.status, json.loads(data)
    return response.status, data


def _healthy(base: str) -> bool:
    return NoiseClient(base).health()["status"] == "ok"


def _png_bytes() -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.full((112, 112, 3), 128, np.uint8)).save(out, format="PNG")
    return out.getvalue()


# --- the format ----------------------------------------------------------------------------------------------------

def test_wire_round_trip_has_the_exact_size():
    g = _gradient(2)
    body = wire.encode(g)
    assert len(body) == wire.encoded_size((2, 3, S, S)) == 8 + len(wire.header_bytes((2, 3, S, S))) + 2 * 3 * S * S * 4
    assert torch.equal(wire.to_tensor(wire.decode(body)), g)
    with pytest.raises(wire.WireError, match="float32"):
        wire.encode(np.zeros((112, 112, 3), np.uint8))
    assert wire.image_signature(_png_bytes()) == "PNG"


# --- the service ---------------------------------------------------------------------------------------------------

def test_health_publishes_the_limits(url, model):
    info = NoiseClient(url).health()
    assert info["grid"] == S and info["eps"] == pytest.approx(EPS) and info["max_batch"] == MAX_BATCH
    assert info["wire"]["media_type"] == wire.MEDIA_TYPE and info["stages"] == list(server.STAGES)
    assert info["model"]["server_models"] == ["faceres", "dlib"]


def test_noise_is_the_model_output(url, model):
    g = _gradient(3, seed=1)
    client = NoiseClient(url)
    with torch.no_grad():
        expected_s, expected_g_hat = model(g), model.transferred(g)
    s = client.noise(g)
    assert s.shape == g.shape and s.dtype == torch.float32
    assert torch.allclose(s, expected_s, atol=1e-6) and s.abs().max() <= EPS + 1e-6
    assert torch.allclose(client.noise(g, stage="g_hat"), expected_g_hat, atol=1e-6)
    answer = client.request_noise(g[:1])
    assert answer.server_ms is not None and answer.server_ms > 0


def test_client_splits_batches_beyond_the_server_limit(url, model):
    client = NoiseClient(url)
    client.health()
    g = _gradient(MAX_BATCH + 2, seed=2)
    with torch.no_grad():
        assert torch.allclose(client.noise(g), model(g), atol=1e-6)


def _bad_requests() -> dict[str, tuple[bytes, str | None, int]]:
    good = _gradient().numpy()
    nan = good.copy()
    nan[0, 0, 0, 0] = np.nan
    photo = weights.sample_photos()[2].read_bytes() if weights.sample_photos()[2].exists() else b"\xff\xd8\xff\xe0"
    boundary = "faceveilboundary"
    multipart = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"me.jpg\"\r\n"
                 f"Content-Type: image/jpeg\r\n\r\n").encode() + photo[:4096] + f"\r\n--{boundary}--\r\n".encode()
    face = np.full((112, 112, 3), 128, np.uint8)
    return {
        "malformed JSON header": (struct.pack("<4sI", wire.MAGIC, 9) + b'{"dtype":' + good.tobytes(), wire.MEDIA_TYPE,
                                  400),
        "extra header field": (_raw_tensor(good, extra={"filename": "me.jpg"}), wire.MEDIA_TYPE, 400),
        "wrong magic": (b"XXXX" + wire.encode(good)[4:], wire.MEDIA_TYPE, 400),
        "truncated data": (wire.encode(good)[:-4], wire.MEDIA_TYPE, 400),
        "empty body": (b"", wire.MEDIA_TYPE, 400),
        "wrong shape": (wire.encode(np.zeros((1, 3, S // 2, S // 2), np.float32)), wire.MEDIA_TYPE, 422),
        "wrong dtype float64": (_raw_tensor(good.astype(np.float64)), wire.MEDIA_TYPE, 422),
        "NaN": (wire.encode(nan), wire.MEDIA_TYPE, 422),
        "beyond eps": (wire.encode(good * 3), wire.MEDIA_TYPE, 422),
        "batch over the limit": (wire.encode(np.zeros((MAX_BATCH + 1, 3, S, S), np.float32)), wire.MEDIA_TYPE, 413),
        "PNG upload": (_png_bytes(), "image/png", 415),
        "PNG bytes as a tensor": (_png_bytes(), wire.MEDIA_TYPE, 415),
        "JPEG photo as octet-stream": (photo, "application/octet-stream", 415),
        "JPEG bytes as a tensor": (photo[:100_000], wire.MEDIA_TYPE, 415),
        "multipart form": (multipart, f"multipart/form-data; boundary={boundary}", 415),
        "[112,112,3] uint8 array": (_raw_tensor(face), wire.MEDIA_TYPE, 422),
        "[112,112,3] float32 array": (wire.encode(face.astype(np.float32) / 255 * EPS), wire.MEDIA_TYPE, 422),
        "JSON instead of a tensor": (json.dumps({"g": [0.0] * 10}).encode(), "application/json", 415),
        "no content type": (wire.encode(good), None, 415),
    }


@pytest.mark.parametrize("case", list(_bad_requests()))
def test_bad_requests_get_4xx_and_the_server_keeps_answering(url, case):
    body, content_type, status = _bad_requests()[case]
    got, answer = _post(url, body, content_type)
    assert got == status, (case, answer)
    assert isinstance(answer, dict) and answer["status"] == status and answer["error"]
    assert _healthy(url)


def test_other_routes_and_stages_answer_json_errors(url):
    assert _post(url, wire.encode(_gradient()), path="/v1/noise?stage=x")[0] == 400
    assert _post(url, b"", path="/v1/noise", method="GET")[0] == 405
    status, answer = _post(url, b"", path="/upload")
    assert status == 404 and "error" in answer
    assert _healthy(url)


def test_oversized_body_is_refused_before_it_is_read(url):
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    conn.putrequest("POST", "/v1/noise")
    conn.putheader("Content-Type", wire.MEDIA_TYPE)
    conn.putheader("Content-Length", str(10**9))
    conn.endheaders()  # not one byte of the (announced) gigabyte is sent
    response = conn.getresponse()
    assert response.status == 413 and "exceeds" in json.loads(response.read())["error"]
    conn.close()
    # chunked, no Content-Length: cut off as soon as the limit is passed
    limit = NoiseClient(url).health()["max_body_bytes"]
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    conn.putrequest("POST", "/v1/noise")
    conn.putheader("Content-Type", wire.MEDIA_TYPE)
    conn.putheader("Transfer-Encoding", "chunked")
    conn.endheaders()
    chunk = b"\0" * 65536
    for _ in range(limit // len(chunk) + 2):
        conn.send(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
    response = conn.getresponse()
    assert response.status == 413
    conn.close()
    assert _healthy(url)


def test_request_log_is_path_only(model, caplog):
    caplog.set_level(logging.DEBUG)
    with server.background(server.create_app(model, max_batch=MAX_BATCH)) as base:
        g = _gradient(seed=3)
        NoiseClient(base).noise(g, stage="g_hat")
        _post(base, _png_bytes(), "image/png")
        port = str(urllib.parse.urlsplit(base).port)
    lines = [r.getMessage() for r in caplog.records if r.name.startswith(("faceveil.serve", "uvicorn"))]
    served = [line for line in lines if line.startswith("POST /v1/noise")]
    assert [line.split()[2] for line in served] == ["200", "415"], lines
    body_hex = wire.encode(g)[8:40].hex()
    for text in [r.getMessage() for r in caplog.records]:
        assert "stage" not in text and "127.0.0.1" not in text and port not in text.split()
        assert "PNG" not in text and body_hex not in text
    assert not [r for r in caplog.records if r.name == "uvicorn.access"]


def test_concurrent_load_stays_responsive(url, model):
    """40 requests from 4 clients: every answer is the model's for its own g, and /health answers meanwhile."""
    gradients = [_gradient(1, seed=100 + i) for i in range(40)]
    client = NoiseClient(url)

    def one(i: int) -> bool:
        return torch.allclose(client.noise(gradients[i]), expected[i], atol=1e-6)

    with torch.no_grad():
        expected = [model(g) for g in gradients]
    with ThreadPoolExecutor(4) as pool:
        answers = pool.map(one, range(40))
        assert _healthy(url)
        assert all(answers)


# --- the client's failures, one line each ------------------------------------------------------------------------

def test_client_errors_are_one_line(url):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        free_port = probe.getsockname()[1]
    with socket.create_server(("127.0.0.1", 0)) as silent:  # accepts, never answers
        silent_url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        cases = [
            (lambda: NoiseClient(f"http://127.0.0.1:{free_port}").health(), "connection refused"),
            (lambda: NoiseClient(silent_url, timeout=0.5).health(), "did not answer within 0.5 s"),
            (lambda: NoiseClient(url).noise(_gradient() * 2), r"refused the request: 422 max \|g\|"),
            (lambda: NoiseClient(url).noise(torch.zeros(112, 112, 3, dtype=torch.uint8)), "only a gradient"),
            (lambda: NoiseClient("ftp://example.org"), "http"),
        ]
        for call, message in cases:
            with pytest.raises(FaceveilError, match=message) as error:
                call()
            assert "\n" not in str(error.value)


def test_serve_refuses_a_public_host_without_public(capsys):
    from faceveil.cli import main

    assert main(["serve", "--host", "0.0.0.0", "--port", "0"]) == 2
    assert "no TLS and no authentication" in capsys.readouterr().err
    server.check_host("0.0.0.0", public=True)
    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        server.check_host(host, public=False)


# --- the whole path: protect a photo through the server ----------------------------------------------------------

class RecordingProxy:
    """A TCP relay on 127.0.0.1 that keeps every byte the client sends (one request per connection: urllib
    closes after each)."""

    def __init__(self, target: str):
        parts = urllib.parse.urlsplit(target)
        self.target = (parts.hostname, parts.port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.sent: list[bytes] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._relay, args=(conn,), daemon=True).start()

    def _relay(self, conn: socket.socket) -> None:
        record = bytearray()
        with conn, socket.create_connection(self.target) as upstream:
            threading.Thread(target=self._pump, args=(conn, upstream, record), daemon=True).start()
            self._pump(upstream, conn, None)
        with self._lock:
            self.sent.append(bytes(record))

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket, record: bytearray | None) -> None:
        try:
            while data := src.recv(65536):
                if record is not None:
                    record += data
                dst.sendall(data)
        except OSError:
            pass

    def close(self) -> None:
        self.listener.close()


def _split_request(raw: bytes) -> tuple[str, dict[str, str], bytes]:
    head, body = raw.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    return lines[0], headers, body


@needs_weights
@pytest.mark.slow
def test_protect_a_photo_through_the_server_sends_only_the_gradient(url, tmp_path: Path, capsys):
    """`faceveil protect --method apf --server URL` on a sample photo, every byte to the server recorded."""
    from faceveil.cli import main
    from faceveil.io.images import read_image

    photo_path = tmp_path / "in" / "face.jpg"
    photo_path.parent.mkdir()
    with Image.open(weights.sample_photos()[2]) as im:  # one face, downscaled: fast
        im.convert("RGB").resize((640, 427)).save(photo_path, quality=95, exif=_exif())
    proxy = RecordingProxy(url)
    try:
        code = main(["protect", str(photo_path), "-o", str(tmp_path / "out"), "--method", "apf", "--server",
                     proxy.url, "--apf-algorithm", "fgsm", "--faces", "largest", "--judges", "mobileface", "--quiet"])
    finally:
        proxy.close()
    assert code in (0, 3), capsys.readouterr().err  # 3: written, the face still recognised
    assert "| face.jpg | 0 | written |" in capsys.readouterr().out
    before, after = read_image(photo_path).rgb.astype(int), read_image(tmp_path / "out" / "face.jpg").rgb.astype(int)
    assert np.abs(after - before).max() > 0  # the noise landed on the photo

    posts = [r for r in proxy.sent if r.startswith(b"POST")]
    assert len(posts) == 1 and len(proxy.sent) == 2  # GET /health, then one POST with the face's g
    request_line, headers, body = _split_request(posts[0])
    assert request_line.startswith("POST /v1/noise")
    assert set(headers) <= {"host", "content-type", "content-length", "accept", "accept-encoding", "connection"}
    assert headers["content-type"] == wire.MEDIA_TYPE and int(headers["content-length"]) == len(body)
    g = wire.decode(body)  # exactly one float32 tensor, nothing else
    assert g.dtype == np.float32 and g.shape == (1, 3, S, S)
    assert len(body) == wire.encoded_size(g.shape) == 8 + len(wire.header_bytes(g.shape)) + math.prod(g.shape) * 4
    assert np.isfinite(g).all() and np.abs(g).max() <= EPS + 1e-6 and np.abs(g).max() > 0
    for magic in (b"\x89PNG", b"\xff\xd8\xff", b"Exif", b"JFIF", b"face.jpg", b"faceveil-test"):
        assert magic not in posts[0]
    pixels = read_image(photo_path).rgb
    h, w = pixels.shape[:2]
    face_row = pixels[h // 3, w // 3:w // 3 + 32].tobytes()  # 96 bytes of the photo's own pixels
    assert face_row not in body and pixels[h // 3:h // 3 + 8].astype(np.float32).tobytes()[:64] not in body


def _exif() -> Image.Exif:
    exif = Image.Exif()
    exif[0x0110] = "faceveil-test"  # camera model: must never reach the server
    return exif


# --- `faceveil serve` as a process and the load test ---------------------------------------------------------------

def test_bench_serve_runs_the_cli_server(model, tmp_path: Path):
    """`faceveil serve` in a child process (a saved checkpoint), a tiny load test against it."""
    from faceveil.bench import serve as bench_serve

    checkpoint = tmp_path / "apf.pt"
    save_server_model(model, checkpoint)
    rows, info = bench_serve.run(8, 2, checkpoint=str(checkpoint), progress=False)
    row = rows[0]
    assert row["all_answered"] and row["answered"] == 8 and row["errors"] == 0
    assert 0 < row["p50_ms"] <= row["p90_ms"] <= row["p99_ms"] and row["throughput_rps"] > 0
    assert row["server_ms_mean"] > 0 and info["grid"] == S and row["request_bytes"] == wire.encoded_size((1, 3, S, S))


class _BrokenModel(ApfServerModel):
    """Answers outside the budget: the server must say 500, not hand it out as protection."""

    def forward(self, g: torch.Tensor) -> torch.Tensor:
        return g * 10


def test_a_broken_model_gives_500_and_the_server_lives_on():
    with server.background(server.create_app(_BrokenModel(eps=EPS).eval())) as base:
        status, answer = _post(base, wire.encode(_gradient()))
        assert status == 500 and "contract" in answer["error"]
        assert _healthy(base)


@needs_weights
@pytest.mark.skipif(not default_checkpoint().is_file(), reason=f"no packaged APF checkpoint at {default_checkpoint()} "
                    "(faceveil train apf ships it)")
def test_protect_apf_local_uses_the_packaged_networks(tmp_path: Path):
    """--method apf-local: both halves in this process; the photo changes by at most the server's eps."""
    from faceveil.io.images import read_image
    from faceveil.pipeline.batch import BatchItem
    from faceveil.pipeline.protect import PhotoProtector, ProtectSettings

    photo_path = tmp_path / "face.jpg"
    with Image.open(weights.sample_photos()[2]) as im:
        im.convert("RGB").resize((640, 427)).save(photo_path, quality=95)
    (tmp_path / "out").mkdir()
    settings = ProtectSettings(method="apf-local", apf_algorithm="fgsm", faces="largest", verify=False, fmt="png")
    result = PhotoProtector(settings, tmp_path / "out")(BatchItem(photo_path))
    assert result["status"] == "ok" and result["faces"] == 1
    change = np.abs(read_image(result["output"]).rgb.astype(int) - read_image(photo_path).rgb.astype(int))
    assert 0 < change.max() <= math.ceil(load_server_model().eps * 255) + 1


def test_cli_offers_the_apf_methods():
    from faceveil.cli import build_parser
    from faceveil.cli.protect import protect_settings
    from faceveil.methods import registry

    assert registry.names("end-cloud") == ["apf", "apf-local"]
    args = build_parser().parse_args(["protect", "x", "-o", "y", "--method", "apf", "--server", "http://h:1",
                                          "--apf-algorithm", "fgsm", "--apf-offset"])
    settings = protect_settings(args)
    assert (settings.server, settings.apf_algorithm, settings.apf_offset) == ("http://h:1", "fgsm", True)


# --- slow clients (issue 24, item 14) ------------------------------------------------------------------------------

def _stalled_socket(base: str, source: str = "127.0.0.1", sent: int = 1024) -> socket.socket:
    """A request that announces a full body, sends `sent` bytes of it, then nothing."""
    parts = urllib.parse.urlsplit(base)
    sock = socket.create_connection((parts.hostname, parts.port), timeout=10, source_address=(source, 0))
    body = wire.encode(_gradient())
    sock.sendall(f"POST /v1/noise HTTP/1.1\r\nHost: x\r\nContent-Type: {wire.MEDIA_TYPE}\r\n"
                 f"Content-Length: {len(body)}\r\n\r\n".encode() + body[:sent])
    return sock


def _response_of(sock: socket.socket) -> tuple[int, dict, str]:
    """(status, JSON body, raw head) of the one response on a raw socket, read until the server closes it."""
    raw = b""
    while chunk := sock.recv(65536):
        raw += chunk
    head, body = raw.split(b"\r\n\r\n", 1)
    return int(head.split()[1]), json.loads(body), head.decode("latin-1").lower()


@pytest.mark.slow
def test_slow_clients_do_not_starve_well_behaved_ones(model):
    """100 stalled connections (headers and 1 KB of a body, then nothing, from 10 loopback addresses) held while 8
    well-behaved clients send 200 requests: all 200 answered, none of the 100 cut meanwhile (the grace period is
    longer than the phase), the server holding them all in flight; p99 printed."""
    from faceveil.bench import serve as bench_serve

    policy = server.ClientPolicy(body_grace_s=300)  # held for the whole phase: what starves is the test's to see
    with server.background(server.create_app(model, max_batch=MAX_BATCH, policy=policy)) as base:
        client = NoiseClient(base)
        gradients = bench_serve.synthetic_gradients(8, 1, S, EPS, seed=0)
        client.request_noise(gradients[0])  # warm-up
        with bench_serve.StalledClients(base, 100, wire.encoded_size((1, 3, S, S))) as slow:
            deadline = time.monotonic() + 10
            while NoiseClient(base).health()["in_flight"] < 100 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert NoiseClient(base).health()["in_flight"] == 100  # every stalled body is being waited for
            outcomes, wall = bench_serve.fire(client, gradients, 200, 8, progress=False)
            row = bench_serve.summarise(outcomes, wall, 1)
            assert slow.answered() == 0 and NoiseClient(base).health()["in_flight"] == 100
        print(f"slow-client phase: 100 stalled, 8 clients x 200 requests: answered {row['answered']}, "
              f"p50 {row['p50_ms']:.1f} ms, p99 {row['p99_ms']:.1f} ms, {row['throughput_rps']:.1f} req/s")
        assert row["all_answered"] and row["answered"] == 200, row["first_error"]


def test_a_stalled_body_gets_408_a_hang_up_is_logged_as_one_and_per_client_limits_hold(model, caplog):
    caplog.set_level(logging.INFO, logger="faceveil.serve")
    policy = server.ClientPolicy(body_grace_s=0.5, min_body_rate=1000, per_client=2)
    with server.background(server.create_app(model, max_batch=MAX_BATCH, policy=policy)) as base:
        start = time.monotonic()
        stalled = [_stalled_socket(base, "127.0.0.2"), _stalled_socket(base, "127.0.0.2")]
        time.sleep(0.1)  # both admitted before the third
        status, answer, _ = _response_of(_stalled_socket(base, "127.0.0.2"))  # a third from the same address
        assert status == 429 and "too many requests from this client" in answer["error"]
        assert _post(base, wire.encode(_gradient()))[0] == 200  # another address is served meanwhile
        for sock in stalled:
            status, answer, head = _response_of(sock)
            assert status == 408 and "request body too slow: 1024 bytes" in answer["error"]
            assert "connection: close" in head
        assert time.monotonic() - start < 0.5 + 1024 / 1000 + 2  # grace + what 1 KB buys at the minimum rate
        _stalled_socket(base, "127.0.0.3").close()  # hangs up mid-body
        deadline = time.monotonic() + 5
        while not any("closed the request" in r.getMessage() for r in caplog.records) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _healthy(base) and NoiseClient(base).health()["in_flight"] == 0
    lines = [r.getMessage() for r in caplog.records if r.name == "faceveil.serve"]
    served = sorted(line.split()[2] for line in lines if line.startswith("POST /v1/noise"))
    assert served == ["200", "408", "408", "429", "499"], lines
    assert "client closed the request after 1024 bytes of the body" in lines
    assert not [line for line in lines if "internal error" in line or " 500 " in line], lines
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.parametrize(("flag", "value"), [("--per-client", "0"), ("--body-grace", "nan"), ("--min-body-rate", "-1"),
                                             ("--max-connections", "0")])
def test_serve_refuses_a_client_policy_that_admits_nothing_in_one_line(capsys, flag: str, value: str):
    from faceveil.cli import main

    assert main(["serve", "--port", "0", flag, value]) == 2
    err = capsys.readouterr().err.strip()
    assert "per-client and connection limits at least 1" in err and "\n" not in err
