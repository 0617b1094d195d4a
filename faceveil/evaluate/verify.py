"""`faceveil verify ORIGINAL PROTECTED`: does a protected photo still give its person away? Works on any pair of
photos, whatever tool made the protected one.

Faces are detected in both files (MTCNN detect_large) and each original face is matched to the protected face
whose landmarks are nearest. Per judge model: the similarity original -> protected, whether that still matches at
the model's calibrated threshold, and the rank of the true identity when the protected face is searched in a
gallery of the original face plus distractors (the faces of the installed sample photos, or 500 LFW images of
distinct identities). Distractors that every model matches with the original face are the same person and are
left out. The same again after transforms of the protected photo (re-detected after each transform).

A protected video: `frames` frames sampled evenly over it (pipeline.verify.sample_frames), each checked as a photo
against the same frame of the original video (faces detected in each original frame; a frame without one is
reported as such), or against the faces of an original photo (each judge takes the frame's face it finds most alike:
pipeline.verify.best_probes). Rows then carry the frame index; transforms default to none for videos.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from faceveil.detect.cache import cache_for, detect_file
from faceveil.detect.mtcnn import MTCNN, Face, match_face
from faceveil.errors import FaceveilError
from faceveil.evaluate import transforms
from faceveil.io import weights
from faceveil.io.images import read_image
from faceveil.io.paths import is_video_path
from faceveil.models import zoo
from faceveil.pipeline.results import NO_FACE_IN_ORIGINAL, face_verdict, frames_verdict, photo_verdict
from faceveil.pipeline.verify import DEFAULT_FRAMES, best_probes, embed_faces, original_faces, sample_frames

CHECKED_TRANSFORMS = ("none", "jpeg75", "resize0.5", "blur1")
VIDEO_TRANSFORMS = ("none",)  # every transform re-detects and re-embeds each frame: opt in with --transforms
LFW_GALLERY_SIZE = 500
SAMPLE_MAX_SIDE = 1024  # detect_large's default, so the sample photos share the detection cache


@dataclass
class Gallery:
    """Distractor faces: a label each and, per model, their embeddings [N, D]."""

    source: str
    labels: list[str]
    embeddings: dict[str, torch.Tensor]


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


def checked_transforms(names: str | None, video: bool) -> list[str]:
    """The transforms checked: "none" (the file as it is) first, then those asked for (comma list; None: the
    default, CHECKED_TRANSFORMS for photos, VIDEO_TRANSFORMS for videos)."""
    if names is None:
        return list(VIDEO_TRANSFORMS if video else CHECKED_TRANSFORMS)
    asked = [n.strip() for n in names.split(",") if n.strip()]
    usable = [n for n, t in transforms.TRANSFORMS.items() if not t.landmark_jitter]  # pixel changes only
    wrong = [n for n in asked if n != "none" and n not in usable]
    if wrong:
        raise FaceveilError(f"`transforms`: unknown {', '.join(wrong)} (choose from none, {', '.join(usable)})")
    return ["none"] + [n for n in dict.fromkeys(asked) if n != "none"]


@dataclass
class _Original:
    """The original faces of one check, their embeddings and which distractors are the same person."""

    faces: list[Face]
    reference: dict[str, torch.Tensor]
    same: torch.Tensor


def _prepare(image: np.ndarray, faces: list[Face], gallery: Gallery, models: list[str]) -> _Original:
    reference = embed_faces(image, faces, models)
    return _Original(faces, reference, same_person_mask(reference, gallery, models))


def _check_rows(original: _Original, after: np.ndarray, gallery: Gallery, models: list[str], checked: list[str],
                detector: MTCNN, seed: int, same_scene: bool = True) -> list[dict]:
    """Rows (transform x face x model) of one protected image against its original faces: faces found again by
    landmarks (same_scene), else each judge's most alike face of the image (the original is another photo)."""
    rows = []
    for name in checked:
        image = after if name == "none" else transforms.apply(name, after, seed)
        probes = (_probe_embeddings(image, original.faces, detector, models) if same_scene
                  else best_probes(image, original.reference, detector, models))
        for i, probe in enumerate(probes):
            for m in models:
                result = _face_rows(None if probe is None else probe[m], original.reference[m][i],
                                    gallery.embeddings[m][~original.same[i]], m)
                rows.append({"model": m, "transform": name, "face": i, **result,
                             "gallery_size": 1 + int((~original.same[i]).sum())})
    return rows


def run(original: Path, protected: Path, models: list[str], dataset: Path | None = None, faces: str = "all",
        seed: int = 0, detector: MTCNN | None = None, frames: int = DEFAULT_FRAMES,
        transforms_checked: str | None = None) -> tuple[list[dict], dict]:
    """Rows (face x transform x model; a video: frame x ...) and the settings of one verification. A video
    ORIGINAL needs a video PROTECTED; a photo ORIGINAL may come with either."""
    original, protected = Path(original), Path(protected)
    video = is_video_path(protected) or is_video_path(original)
    checked = checked_transforms(transforms_checked, video)
    if video:
        if frames <= 0:
            raise FaceveilError(f"`frames` must be a positive number of frames, got {frames}")
        return _run_video(original, protected, models, dataset, faces, seed, detector or MTCNN(), frames, checked)
    before, after = _read_rgb(original, "original"), _read_rgb(protected, "protected")
    detector = detector or MTCNN()
    originals = original_faces(before, detector, faces)
    if not originals:
        raise FaceveilError(f"{original}: no face found in the original photo")
    gallery = _gallery(models, dataset, detector, seed)
    prepared = _prepare(before, originals, gallery, models)
    rows = _check_rows(prepared, after, gallery, models, checked, detector, seed)
    settings = _settings(original, protected, models, faces, gallery, checked, seed)
    settings.update(faces_in_original=len(originals), excluded_as_same_person=[int(s.sum()) for s in prepared.same])
    return rows, settings


def _gallery(models: list[str], dataset: Path | None, detector: MTCNN, seed: int) -> Gallery:
    return lfw_gallery(dataset, models, detector, seed) if dataset else sample_gallery(models, detector)


def _settings(original: Path, protected: Path, models: list[str], faces: str, gallery: Gallery, checked: list[str],
              seed: int) -> dict:
    return {"original": str(original), "protected": str(protected), "models": models, "faces": faces,
            "gallery": gallery.source, "gallery_faces": len(gallery.labels), "transforms": checked,
            "thresholds": {m: zoo.threshold(m) for m in models}, "seed": seed,
            "score": "cosine similarity; -L2 distance for dlib", "rank": "1 = the true identity ranks first"}


def _run_video(original: Path, protected: Path, models: list[str], dataset: Path | None, faces: str, seed: int,
               detector: MTCNN, frames: int, checked: list[str]) -> tuple[list[dict], dict]:
    sampled = sample_frames(original, protected, frames)
    photo_image, photo_faces = None, []
    if sampled.original is None:  # a photo of the person: its faces, once
        photo_image = _read_rgb(original, "original")
        photo_faces = original_faces(photo_image, detector, faces)
        if not photo_faces:
            raise FaceveilError(f"{original}: no face found in the original photo")
    gallery = _gallery(models, dataset, detector, seed)
    photo = _prepare(photo_image, photo_faces, gallery, models) if photo_image is not None else None
    rows, without_face = [], []
    for k in sampled.indices:
        if sampled.original is None:
            prepared = photo
        else:
            frame_faces = original_faces(sampled.original[k], detector, faces)
            if not frame_faces:
                without_face.append(k)
                continue
            prepared = _prepare(sampled.original[k], frame_faces, gallery, models)
        rows += [{"frame": k, **r} for r in _check_rows(prepared, sampled.protected[k], gallery, models, checked,
                                                        detector, seed, same_scene=photo is None)]
    settings = _settings(original, protected, models, faces, gallery, checked, seed)
    settings.update(frames=sampled.indices, frames_asked=frames, frames_without_face_in_original=without_face,
                    frame_sampling="the middle frame of each of N equal stretches of the protected video (0 = first "
                                   "frame)",
                    matching="same frame of the original video, faces paired by landmarks" if photo is None else
                    "original photo: each model takes the face of the frame it finds most alike")
    if photo is not None:
        settings.update(faces_in_original=len(photo.faces),
                        excluded_as_same_person=[int(s.sum()) for s in photo.same])
    return rows, settings


NOT_FOUND = "not re-detected"


def display_rows(rows: list[dict]) -> list[dict]:
    """The rows for the markdown table: scores with 4 decimals; a face not found again in the protected photo says
    so instead of leaving its row blank."""
    return [{**r, "score": f"{r['score']:.4f}"} if r["score"] is not None
            else {**r, "score": NOT_FOUND, "matches": "", "rank": ""} for r in rows]


def lost_faces_note(rows: list[dict]) -> str:
    """One line naming the faces of the original that were not found again in the protected photo ('' if none)."""
    lost = sorted({int(r["face"]) for r in rows if r["score"] is None and r.get("transform", "none") == "none"
                   and "frame" not in r})  # a video's frames say it in their own verdicts
    if not lost:
        return ""
    names = ", ".join(str(i) for i in lost)
    return (f"face {names}: {NOT_FOUND} in the protected photo, so no model could compare it (the detector no "
            "longer finds it there, or the two photos do not show the same scene)")


def frame_faces(rows: list[dict], frames: list[int]) -> list[tuple[int, list[dict]]]:
    """Per sampled frame, its face rows in the verdict's shape (face, redetected, model -> {score, matches}) from
    the untransformed rows; a frame without rows had no face in the original frame."""
    faces: dict[int, dict[int, dict]] = {k: {} for k in frames}
    for row in rows:
        if row.get("transform", "none") != "none":
            continue
        face = faces.setdefault(int(row["frame"]), {}).setdefault(int(row["face"]), {"face": int(row["face"])})
        face["redetected"] = row["score"] is not None
        if row["score"] is not None:
            face[row["model"]] = {"score": row["score"], "matches": bool(row["matches"])}
    return [(k, [by_face[i] for i in sorted(by_face)]) for k, by_face in sorted(faces.items())]


def frame_summaries(rows: list[dict], frames: list[int]) -> tuple[list[dict], str]:
    """Per sampled frame its verdict in words ({frame, protected, verdict}), and the line over all frames."""
    per_frame = frame_faces(rows, frames)
    summaries = []
    for k, faces in per_frame:
        protected, words = photo_verdict(faces) if faces else (None, NO_FACE_IN_ORIGINAL)
        summaries.append({"frame": k, "protected": protected, "verdict": words,
                          "recognised_by": sorted({m for f in faces for m in face_verdict(f).recognised_by})})
    return summaries, frames_verdict([faces for _, faces in per_frame])[1]
