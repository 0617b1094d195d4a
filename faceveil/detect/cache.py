"""Detection cache: the faces in an image file, keyed by the sha256 of its bytes and the detector settings.

Layout: <home>/cache/detections/<settings-hash>/<sha[:2]>/<sha>.json with the image size and the faces. Writes
go to a temp file in the same folder and are renamed into place (os.replace), so concurrent processes at worst
compute the same entry twice and readers never see a partial file. An unreadable entry counts as a miss.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from faceveil.detect.mtcnn import MTCNN, Face, default_detector
from faceveil.io import weights

FORMAT_VERSION = 1


def default_root() -> Path:
    return weights.home() / "cache" / "detections"


def file_sha256(path: Path | str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def load_rgb(source: Path | str | bytes) -> np.ndarray:
    """A file (path or bytes) as HxWx3 uint8 RGB, EXIF orientation applied (cached faces refer to this)."""
    with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
        return np.asarray(ImageOps.exif_transpose(image).convert("RGB"))


class DetectionCache:
    """Cached faces for one detector configuration (`settings` is any JSON-able description of it)."""

    def __init__(self, settings: dict, root: Path | str | None = None) -> None:
        self.settings = {"format": FORMAT_VERSION, **settings}
        text = json.dumps(self.settings, sort_keys=True)
        self.folder = Path(root or default_root()) / hashlib.sha256(text.encode()).hexdigest()[:16]

    def path_for(self, digest: str) -> Path:
        return self.folder / digest[:2] / f"{digest}.json"

    def get(self, digest: str) -> tuple[list[Face], tuple[int, int]] | None:
        """(faces, (width, height)) or None on a miss."""
        try:
            data = json.loads(self.path_for(digest).read_text())
            faces = [Face.from_dict(f) for f in data["faces"]]
            width, height = data["image_size"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return faces, (int(width), int(height))

    def put(self, digest: str, faces: list[Face], size: tuple[int, int]) -> None:
        target = self.path_for(digest)
        target.parent.mkdir(parents=True, exist_ok=True)
        data = {"settings": self.settings, "image_size": list(size), "faces": [f.to_dict() for f in faces]}
        _write_atomic(target, json.dumps(data))


def _write_atomic(target: Path, text: str) -> None:
    fd, temp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.replace(temp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise


def cache_for(detector: MTCNN, mode: str = "detect", root: Path | str | None = None) -> DetectionCache:
    """The cache of a detector used via `detect` or `detect_large:<max_side>` on images from load_rgb."""
    return DetectionCache({**detector.settings, "mode": mode, "loader": "exif-rgb"}, root)


def detect_file(path: Path | str, detector: MTCNN | None = None, cache: DetectionCache | None = None,
                max_side: int | None = None) -> tuple[list[Face], tuple[int, int]]:
    """Faces in an image file and its (width, height), through the cache.

    max_side: use detect_large with that size (for big photos); None: plain detect.
    """
    detector = detector or default_detector()
    mode = "detect" if max_side is None else f"detect_large:{max_side}"
    cache = cache or cache_for(detector, mode)
    data = Path(path).read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    hit = cache.get(digest)
    if hit is not None:
        return hit
    image = load_rgb(data)
    faces = detector.detect(image) if max_side is None else detector.detect_large(image, max_side)
    size = (image.shape[1], image.shape[0])
    cache.put(digest, faces, size)
    return faces, size
