"""`faceveil verify ORIGINAL PROTECTED`: does a protected photo still give its person away? Works on any pair of
photos, whatever tool made the protected one.

Faces are detected in both files (MTCNN detect_large) and each original face is matched to the protected face
whose landmarks are nearest. Per judge model: the similarity original -> protected, whether that still matches at
the model's calibrated threshold, and the rank of the true identity when the protected face is searched in a
gallery of the original face plus distractors (the faces of the installed sample photos, or 500 LFW images of
distinct identities). Distractors that every model matches with the original face are the same person and are
left out. The same again after transforms of the protected photo (re-detected after each transform).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from faceveil.detect.align import align
from faceveil.detect.cache import cache_for, detect_file
from faceveil.detect.mtcnn import MTCNN, Face, match_face
from faceveil.errors import FaceveilError
from faceveil.evaluate import transforms
from faceveil.io import weights
from faceveil.io.images import read_image
from faceveil.models import zoo
from faceveil.pipeline.faces import default_confirmer
from faceveil.pipeline.job import select_faces

CHECKED_TRANSFORMS = ("none", "jpeg75", "resize0.5", "blur1")
LFW_GALLERY_SIZE = 500
SAMPLE_MAX_SIDE = 1024  # detect_large's default, so the sample photos share the detection cache


@dataclass
class Gallery:
    """Distractor faces: a label each and, per model, their embeddings [N, D]."""

    source: str
    labels: list[str]
    embeddings: dict[str, torch.Tensor]


@torch.no_grad()
def embed_faces(image: np.ndarray, faces: list[Face], models: list[str]) -> dict[str, torch.Tensor]:
    """Per model, the embeddings [len(faces), D] of the faces aligned with that model's crop geometry."""
    out = {}
    for name in models:
        model = zoo.load(name)
        crops = [align(image, f.landmarks, model.spec.geometry) for f in faces]
        out[name] = zoo.embed_crops(model, np.stack(crops)) if crops else torch.empty(0, model.spec.embedding_dim)
    return out


def _stack(parts: list[dict[str, torch.Tensor]], models: list[str]) -> dict[str, torch.Tensor]:
    return {m: torch.cat([p[m] for p in parts]) if parts else torch.empty(0, zoo.spec(m).embedding_dim)
            for m in models}


def sample_gallery(models: list[str], detector: MTCNN) -> Gallery:
    """Every detected face of the installed sample photos (through the detection cache)."""
    cache = cache_for(detector, f"detect_large:{SAMPLE_MAX_SIDE}")
    labels, parts = [], []
    for path in weights.sample_photos():
        faces, _ = detect_file(path, detector, cache, max_side=SAMPLE_MAX_SIDE)
        if faces:
            parts.append(embed_faces(read_image(path).rgb, faces, models))
            labels += [f"{path.stem}#{i}" for i in range(len(faces))]
    return Gallery("samples", labels, _stack(parts, models))


def lfw_gallery(root: Path, models: list[str], detector: MTCNN, seed: int = 0,
                size: int = LFW_GALLERY_SIZE) -> Gallery:
    """One image each of `size` LFW identities (seeded choice), their labelled face (cached detection)."""
    from faceveil.datasets.lfw import identities
    from faceveil.datasets.lfw_faces import detect_lfw_face

    people = identities(root)
    names = sorted(n for n, files in people.items() if files)
    rng = np.random.default_rng(seed)
    chosen = sorted(rng.choice(len(names), size=min(size, len(names)), replace=False).tolist())
    labels, parts = [], []
    for index in chosen:
        files = people[names[index]]
        path = files[int(rng.integers(len(files)))]
        face = detect_lfw_face(path, detector)
        if face is not None:
            parts.append(embed_faces(read_image(path).rgb, [face], models))
            labels.append(path.stem)
    return Gallery(f"lfw:{root}", labels, _stack(parts, models))


def same_person_mask(reference: dict[str, torch.Tensor], gallery: Gallery, models: list[str]) -> torch.Tensor:
    """[F, N]: distractor n matches original face f by every model (the same person: not a distractor)."""
    mask = None
    for m in models:
        hit = zoo.score_matrix(zoo.spec(m).metric, reference[m], gallery.embeddings[m]) >= zoo.threshold(m)
        mask = hit if mask is None else mask & hit
    return mask


def _face_rows(probe: torch.Tensor | None, reference: torch.Tensor, distractors: torch.Tensor, model: str) -> dict:
    """score, matches and rank of one (protected) probe embedding [D] against its original [D]."""
    if probe is None:
        return {"score": None, "matches": None, "rank": None}
    metric = zoo.spec(model).metric
    true = float(zoo.score(metric, probe[None], reference[None])[0])
    others = zoo.score_matrix(metric, probe[None], distractors)[0] if len(distractors) else torch.empty(0)
    return {"score": round(true, 4) + 0.0, "matches": true >= zoo.threshold(model),
            "rank": 1 + int((others > true).sum())}


def _probe_embeddings(image: np.ndarray, faces: list[Face], detector: MTCNN,
                      models: list[str]) -> list[dict[str, torch.Tensor] | None]:
    """Per original face: the matching face re-detected in `image`, embedded by every model (None: not found)."""
    found = detector.detect_large(image)
    out: list[dict[str, torch.Tensor] | None] = []
    for face in faces:
        again = match_face(face, found)
        out.append(None if again is None else {m: e[0] for m, e in embed_faces(image, [again], models).items()})
    return out


def _read_rgb(path: Path, role: str) -> np.ndarray:
    try:
        return read_image(path).rgb
    except FaceveilError as exc:
        raise FaceveilError(f"cannot read the {role} photo: {exc}") from None


def run(original: Path, protected: Path, models: list[str], dataset: Path | None = None, faces: str = "all",
        seed: int = 0, detector: MTCNN | None = None) -> tuple[list[dict], dict]:
    """Rows (face x transform x model) and the settings of one verification."""
    before, after = _read_rgb(Path(original), "original"), _read_rgb(Path(protected), "protected")
    detector = detector or MTCNN()
    originals = select_faces(default_confirmer().split(before, detector.detect_large(before))[0], faces)
    if not originals:
        raise FaceveilError(f"{original}: no face found in the original photo")
    reference = embed_faces(before, originals, models)
    gallery = lfw_gallery(dataset, models, detector, seed) if dataset else sample_gallery(models, detector)
    same = same_person_mask(reference, gallery, models)
    rows = []
    for name in CHECKED_TRANSFORMS:
        image = after if name == "none" else transforms.apply(name, after, seed)
        probes = _probe_embeddings(image, originals, detector, models)
        for i, probe in enumerate(probes):
            for m in models:
                result = _face_rows(None if probe is None else probe[m], reference[m][i],
                                    gallery.embeddings[m][~same[i]], m)
                rows.append({"model": m, "transform": name, "face": i, **result,
                             "gallery_size": 1 + int((~same[i]).sum())})
    settings = {"original": str(original), "protected": str(protected), "models": models, "faces": faces,
                "faces_in_original": len(originals), "gallery": gallery.source, "gallery_faces": len(gallery.labels),
                "excluded_as_same_person": [int(s.sum()) for s in same], "transforms": list(CHECKED_TRANSFORMS),
                "thresholds": {m: zoo.threshold(m) for m in models}, "seed": seed,
                "score": "cosine similarity; -L2 distance for dlib", "rank": "1 = the true identity ranks first"}
    return rows, settings


NOT_FOUND = "not re-detected"


def display_rows(rows: list[dict]) -> list[dict]:
    """The rows for the markdown table: scores with 4 decimals; a face not found again in the protected photo says
    so instead of leaving its row blank."""
    return [{**r, "score": f"{r['score']:.4f}"} if r["score"] is not None
            else {**r, "score": NOT_FOUND, "matches": "", "rank": ""} for r in rows]


def lost_faces_note(rows: list[dict]) -> str:
    """One line naming the faces of the original that were not found again in the protected photo ('' if none)."""
    lost = sorted({int(r["face"]) for r in rows if r["score"] is None and r.get("transform", "none") == "none"})
    if not lost:
        return ""
    names = ", ".join(str(i) for i in lost)
    return (f"face {names}: {NOT_FOUND} in the protected photo, so no model could compare it (the detector no "
            "longer finds it there, or the two photos do not show the same scene)")
