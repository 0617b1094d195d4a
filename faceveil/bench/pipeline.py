"""Photo-pipeline measurements: detection time on a 12-megapixel photo, and round-trip drift — how far the crop a
model sees in the SAVED, re-read, re-detected, re-aligned file is from the crop the optimiser saw."""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from faceveil.attacks.core import AttackConfig, Ensemble
from faceveil.attacks.faces import from_photos
from faceveil.detect import canonical as C
from faceveil.detect.align import align
from faceveil.detect.mtcnn import MTCNN, match_face
from faceveil.io import weights
from faceveil.io.images import read_image, write_image
from faceveil.methods import pgd
from faceveil.models import zoo

TWELVE_MP = (4243, 2828)  # width, height of the ~12-megapixel test photos


def bench_detect_12mp(repeats: int = 5) -> list[dict]:
    """Median seconds of `detect_large` on each sample photo upscaled to ~12 MP (4243 x 2828)."""
    detector = MTCNN()
    rows = []
    for path in weights.sample_photos()[:3]:
        big = np.asarray(Image.fromarray(read_image(path).rgb).resize(TWELVE_MP, Image.BICUBIC))
        detector.detect_large(big)  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            faces = detector.detect_large(big)
            times.append(time.perf_counter() - start)
        rows.append({"photo": path.name, "megapixels": round(big.shape[0] * big.shape[1] / 1e6, 1),
                     "faces": len(faces), "seconds_median": statistics.median(times)})
    return rows


@torch.no_grad()
def _embed_one(name: str, crop: torch.Tensor) -> torch.Tensor:
    return zoo.load(name)(crop[None].contiguous())


def roundtrip_drift(surrogates: list[str], judges: list[str], steps: int = 20, seed: int = 0) -> list[dict]:
    """Protect the largest face of each sample photo, save as PNG and JPEG q95, re-read, re-detect, re-align:
    cosine between each model's embedding of the optimiser's crop and of the saved file's crop."""
    detector = MTCNN()
    ensemble = Ensemble(surrogates)
    cfg = AttackConfig(eps=8 / 255, alpha=1 / 255, steps=steps, momentum=1.0, seed=seed)
    drift: dict[tuple[str, str], list[float]] = {}
    lost: dict[str, int] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for path in weights.sample_photos():
            photo = read_image(path)
            face = max(detector.detect_large(photo.rgb), key=lambda f: f.size)
            batch = from_photos([photo.rgb], [face.landmarks], sorted({zoo.spec(j).geometry for j in judges}))
            delta = pgd.protect(batch, ensemble, cfg)
            seen = batch.perturbed(delta)
            protected = C.paste(photo.rgb, face.landmarks, delta[0])
            for fmt, suffix in (("png", ".png"), ("jpg", ".jpg")):
                out = write_image(protected, Path(tmp) / f"{path.stem}{suffix}", fmt=fmt, jpeg_quality=95)
                again = read_image(out).rgb
                match = match_face(face, detector.detect_large(again))
                if match is None:  # the mask broke detection itself: no crop to compare, counted apart
                    lost[fmt] = lost.get(fmt, 0) + 1
                    continue
                for name in judges:
                    g = zoo.spec(name).geometry
                    a = _embed_one(name, batch.crops(seen, g)[0])
                    crop = torch.from_numpy(align(again, match.landmarks, g)).permute(2, 0, 1).float() / 255
                    b = _embed_one(name, crop)
                    drift.setdefault((fmt, name), []).append(float(torch.cosine_similarity(a, b)[0]))
    return [{"format": fmt, "model": name, "faces": len(v), "not_redetected": lost.get(fmt, 0),
             "cosine_mean": float(np.mean(v)), "cosine_min": float(np.min(v))} for (fmt, name), v in drift.items()]
