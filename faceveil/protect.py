"""The photo job behind `faceveil protect` and `faceveil demo`: read, detect, optimise every selected face through
paste-back and 8-bit rounding, paste, write atomically, then re-read the saved file, re-detect, re-align and report
what each judge model now sees (similarity original -> protected, and whether it still matches)."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from faceveil.attacks.core import AttackConfig, Ensemble
from faceveil.attacks.faces import FaceBatch, from_photos
from faceveil.detect import canonical as C
from faceveil.detect.align import align
from faceveil.detect.mtcnn import MTCNN, Face
from faceveil.errors import FaceveilError
from faceveil.io.batch import BatchItem
from faceveil.io.images import read_image, write_image
from faceveil.models import zoo

Method = Callable[[FaceBatch, Ensemble, AttackConfig], torch.Tensor]


@dataclass
class ProtectSettings:
    method: str = "pgd"
    surrogates: list[str] = field(default_factory=lambda: ["mobileface", "mfn512"])
    judges: list[str] = field(default_factory=lambda: list(zoo.SPECS))
    attack: AttackConfig = field(default_factory=AttackConfig)
    faces: str = "all"  # all | largest | N (the N largest)
    fmt: str = "same"
    jpeg_quality: int = 95
    keep_metadata: bool = False
    copy_unprotected: bool = False
    verify: bool = True


def select_faces(faces: list[Face], which: str) -> list[Face]:
    """Largest first; 'all', 'largest' or a count N."""
    ordered = sorted(faces, key=lambda f: -f.size)
    if which == "all":
        return ordered
    if which == "largest":
        return ordered[:1]
    if which.isdigit() and int(which) > 0:
        return ordered[: int(which)]
    raise FaceveilError(f"--faces takes all, largest or a positive number, got {which!r}")


def method_function(name: str) -> Method:
    if name == "pgd":
        from faceveil.methods import pgd

        return pgd.protect
    raise FaceveilError(f"unknown method {name!r}")


class PhotoProtector:
    """Holds the detector, the surrogate ensemble and the settings across a batch of photos."""

    def __init__(self, settings: ProtectSettings, out_dir: Path):
        self.settings = settings
        self.out_dir = Path(out_dir)
        self.detector = MTCNN()
        self.ensemble = Ensemble(settings.surrogates)
        self.method = method_function(settings.method)

    def __call__(self, item: BatchItem) -> dict:
        s = self.settings
        photo = read_image(item.path)
        out_path = item.output_path(self.out_dir, s.fmt)
        faces = select_faces(self.detector.detect_large(photo.rgb), s.faces)
        if not faces:
            if s.copy_unprotected:
                write_image(photo, out_path, fmt=s.fmt, jpeg_quality=s.jpeg_quality, keep_metadata=s.keep_metadata)
                return {"status": "no_face", "message": "no face found; copied unprotected", "output": out_path}
            return {"status": "no_face", "message": "no face found; nothing written (see --copy-unprotected)"}
        start = time.perf_counter()
        marks = [f.landmarks for f in faces]
        batch = from_photos([photo.rgb] * len(faces), marks, self.ensemble.geometries, "photos")
        delta = self.method(batch, self.ensemble, s.attack)
        protected = photo.rgb
        for m, d in zip(marks, delta, strict=True):
            protected = C.paste(protected, m, d)
        seconds = time.perf_counter() - start
        write_image(dataclasses.replace(photo, rgb=protected), out_path, fmt=s.fmt, jpeg_quality=s.jpeg_quality,
                    keep_metadata=s.keep_metadata)
        details = {"seconds_per_face": seconds / len(faces), "faces": []}
        if s.verify:
            details["faces"] = self.verify(item.path, out_path, faces)
        return {"status": "ok", "faces": len(faces), "output": out_path, "details": details}

    def verify(self, original: Path, saved: Path, faces: list[Face]) -> list[dict]:
        """Re-read both files, re-detect, re-align: each judge's score original -> protected per face."""
        return verify_faces(original, saved, faces, self.settings.judges, self.detector)


def _match(face: Face, candidates: list[Face]) -> Face | None:
    """The re-detected face whose landmarks are nearest the original's (within half the face size)."""
    if not candidates:
        return None
    dist = [float(np.linalg.norm(c.landmarks - face.landmarks, axis=1).mean()) for c in candidates]
    best = int(np.argmin(dist))
    return candidates[best] if dist[best] < 0.5 * face.size else None


@torch.no_grad()
def verify_faces(original: Path, saved: Path, faces: list[Face], judges: list[str], detector: MTCNN) -> list[dict]:
    before = read_image(original).rgb
    after = read_image(saved).rgb
    found_after = detector.detect_large(after)
    rows = []
    for i, face in enumerate(faces):
        again = _match(face, found_after)
        row: dict = {"face": i, "box": [round(float(v), 1) for v in face.box], "redetected": again is not None}
        if again is not None:
            for name in judges:
                model = zoo.load(name)
                g = model.spec.geometry
                crops = np.stack([align(before, face.landmarks, g), align(after, again.landmarks, g)])
                emb = zoo.embed_crops(model, crops)
                score = float(model.score(emb[:1], emb[1:])[0])
                row[name] = {"score": round(score, 4), "matches": score >= zoo.threshold(name)}
        rows.append(row)
    return rows
