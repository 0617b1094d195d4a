"""Detection cache: the faces in an image file, keyed by the sha256 of its bytes and the detector settings.

Layout: <home>/cache/detections/<settings-hash>/<sha[:2]>/<sha>.json with the image size and the faces. Entries are
written atomically (faceveil.io.atomic), so concurrent processes at worst compute the same entry twice and readers
never see a partial file. An unreadable entry counts as a miss.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from faceveil.detect.mtcnn import MTCNN, Face, default_detector
from faceveil.io import weights
from faceveil.io.atomic import atomic_path
from faceveil.io.images import read_image

FORMAT_VERSION = 1


def default_root() -> Path:
    return weights.home() / "cache" / "detections"


def file_sha256(path: Path | str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


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
        with atomic_path(target) as temp:
            temp.write_text(json.dumps(data))


def cache_for(detector: MTCNN, mode: str = "detect", root: Path | str | None = None) -> DetectionCache:
    """The cache of a detector used via `detect` or `detect_large:<max_side>` on images decoded by
    faceveil.io.images.read_image (EXIF orientation applied, 8-bit RGB; the "loader" key names that decoding)."""
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
    image = read_image(path, data=data).rgb
    faces = detector.detect(image) if max_side is None else detector.detect_large(image, max_side)
    size = (image.shape[1], image.shape[0])
    cache.put(digest, faces, size)
    return faces, size
