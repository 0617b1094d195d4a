"""What each judge model sees in a saved file: re-read the original and the protected photo, re-detect the faces in
the protected one, re-align, and compare every judge's embedding original -> protected per face (and with targets,
the protected face -> its target identity). Used by every job that writes photos and by evaluation.

Videos (`verify_video`): frames sampled evenly over the protected video (`sample_frame_indices`), each checked
against the same frame of the original video (faces matched by landmarks, as a photo pair), or against the faces of
one photo of the person (then each judge takes the face of the frame it finds most alike: the one an observer
comparing every face of the frame with the photo would pick)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from faceveil.detect.align import align
from faceveil.detect.mtcnn import MTCNN, Face, match_face
from faceveil.errors import FaceveilError
from faceveil.io.images import read_image
from faceveil.io.paths import is_video_path
from faceveil.io.video import probe_video, read_frames_at, sample_frame_indices
from faceveil.models import zoo
from faceveil.pipeline.faces import default_confirmer
from faceveil.pipeline.job import FaceChoice, select_faces
from faceveil.pipeline.results import NO_FACE_IN_ORIGINAL, FaceCheck, JudgeScore, photo_verdict

DEFAULT_FRAMES = 8  # frames sampled from a protected video


def verify_faces(original: Path, saved: Path, faces: list[Face], judges: list[str], detector: MTCNN,
                 target_centres: list[dict[str, torch.Tensor]] | None = None) -> list[FaceCheck]:
    """`verify_arrays` on two files, each read as the product reads it."""
    return verify_arrays(read_image(original).rgb, read_image(saved).rgb, faces, judges, detector, target_centres)


@torch.no_grad()
def verify_arrays(before: np.ndarray, after: np.ndarray, faces: list[Face], judges: list[str], detector: MTCNN,
                  target_centres: list[dict[str, torch.Tensor]] | None = None) -> list[FaceCheck]:
    """Per face of `before`: found again in `after`, and each judge's score original -> protected; with
    target_centres (per face, model -> identity centre embedding), also each of those models' score protected ->
    target (in FaceCheck.target)."""
    found_after = detector.detect_large(after)
    checks = []
    for i, face in enumerate(faces):
        again = match_face(face, found_after)
        check = FaceCheck(i, [round(float(v), 1) for v in face.box], again is not None)
        if again is not None:
            for name in judges:
                check.judges[name] = _judge(name, before, face, after, again)
            if target_centres is not None:
                check.target = _target_scores(after, again, target_centres[i])
        checks.append(check)
    return checks


def _judge(name: str, before: np.ndarray, face: Face, after: np.ndarray, again: Face) -> JudgeScore:
    model = zoo.load(name)
    g = model.spec.geometry
    emb = zoo.embed_crops(model, np.stack([align(before, face.landmarks, g), align(after, again.landmarks, g)]))
    score = float(model.score(emb[:1], emb[1:])[0])
    return JudgeScore(round(score, 4), score >= zoo.threshold(name))


def _target_scores(photo: np.ndarray, face: Face, centres: dict[str, torch.Tensor]) -> dict:
    """Each model's similarity of the (re-detected, re-aligned) protected face to a target identity's centre."""
    out = {}
    for name, centre in centres.items():
        model = zoo.load(name)
        emb = zoo.embed_crops(model, align(photo, face.landmarks, model.spec.geometry)[None])
        score = float(model.score(emb, centre[None])[0])
        out[name] = {"score": round(score, 4), "matches": score >= zoo.threshold(name)}
    return out


def original_faces(image: np.ndarray, detector: MTCNN, which: FaceChoice = "all") -> list[Face]:
    """The faces of an original that a check compares: confirmed faces only (a non-face is never checked), the
    user's selection of them (faceveil.pipeline.job.select_faces)."""
    return select_faces(default_confirmer().split(image, detector.detect_large(image))[0], which)


@torch.no_grad()
def embed_faces(image: np.ndarray, faces: list[Face], models: list[str]) -> dict[str, torch.Tensor]:
    """Per model, the embeddings [len(faces), D] of the faces aligned with that model's crop geometry."""
    out = {}
    for name in models:
        model = zoo.load(name)
        crops = [align(image, f.landmarks, model.spec.geometry) for f in faces]
        out[name] = zoo.embed_crops(model, np.stack(crops)) if crops else torch.empty(0, model.spec.embedding_dim)
    return out


@torch.no_grad()
def best_probes(image: np.ndarray, reference: dict[str, torch.Tensor], detector: MTCNN,
                models: list[str]) -> list[dict[str, torch.Tensor] | None]:
    """Per original face (reference: model -> [F, D]), per model the embedding of the face of `image` that model
    finds most alike (None: no face in `image`). For an original that is another photo, where landmarks cannot
    pair the faces up."""
    found = detector.detect_large(image)
    faces = len(next(iter(reference.values()))) if reference else 0
    if not found:
        return [None] * faces
    probes = embed_faces(image, found, models)
    out: list[dict[str, torch.Tensor] | None] = []
    for i in range(faces):
        best = {}
        for m in models:
            scores = zoo.score_matrix(zoo.spec(m).metric, reference[m][i:i + 1], probes[m])[0]
            best[m] = probes[m][int(scores.argmax())]
        out.append(best)
    return out


@torch.no_grad()
def verify_best(reference: dict[str, torch.Tensor], faces: list[Face], after: np.ndarray, judges: list[str],
                detector: MTCNN) -> list[FaceCheck]:
    """Per face of another photo of the person (`faces`, embedded once by embed_faces as `reference`): each
    judge's score to the face of `after` it finds most alike (`best_probes`); redetected is False when `after` holds
    no face at all."""
    checks = []
    for i, (face, probe) in enumerate(zip(faces, best_probes(after, reference, detector, judges), strict=True)):
        check = FaceCheck(i, [round(float(v), 1) for v in face.box], probe is not None)
        for name in judges if probe is not None else []:
            score = float(zoo.score(zoo.spec(name).metric, probe[name][None], reference[name][i:i + 1])[0])
            check.judges[name] = JudgeScore(round(score, 4), score >= zoo.threshold(name))
        checks.append(check)
    return checks


@dataclass
class FrameCheck:
    """One sampled frame of a protected video: its index (0 = first frame) and the checks of the original's faces
    in it (empty when the original frame shows no face: nothing to protect there, not a failure)."""

    frame: int
    faces: list[FaceCheck] = field(default_factory=list)

    @property
    def verdict(self) -> str:
        return photo_verdict([f.to_dict() for f in self.faces])[1] if self.faces else NO_FACE_IN_ORIGINAL

    def to_dict(self) -> dict:
        return {"frame": self.frame, "faces": [f.to_dict() for f in self.faces], "verdict": self.verdict}


@dataclass
class SampledFrames:
    """The frames sampled from a protected video, and from the original video the same indices (None: the original
    is a photo; an index missing there: the original video is shorter)."""

    indices: list[int]
    protected: dict[int, np.ndarray]
    original: dict[int, np.ndarray] | None


def sample_frames(original: Path, protected: Path, count: int = DEFAULT_FRAMES) -> SampledFrames:
    """Read `count` evenly spaced frames of the protected video (and the same frames of the original, when it is a
    video). Refuses a video original with a photo protected (one clear line)."""
    original, protected = Path(original), Path(protected)
    if not is_video_path(protected):
        raise FaceveilError(f"{original} is a video but {protected} is not: give a protected video with its original "
                            "video, or a photo of the person first and the protected video second")
    info = probe_video(protected)
    indices = sample_frame_indices(info.frame_count, count)
    frames = read_frames_at(protected, indices, info)
    if not frames:
        raise FaceveilError(f"{protected}: the video has no frames")
    indices = sorted(frames)
    originals = read_frames_at(original, indices) if is_video_path(original) else None
    if originals is not None and len(originals) < len(indices):
        raise FaceveilError(f"{original}: the original video has fewer frames than the protected one (no frame "
                            f"{max(indices)}): are they the same video?")
    return SampledFrames(indices, frames, originals)


def verify_video(original: Path, protected: Path, judges: list[str], detector: MTCNN,
                 choose_faces: Callable[[np.ndarray], list[Face]], count: int = DEFAULT_FRAMES) -> list[FrameCheck]:
    """Per sampled frame of the protected video, the checks of the original's faces (see the module's docstring);
    choose_faces(image) -> the original faces to check in that image (confirmed faces, the user's selection)."""
    sampled = sample_frames(original, protected, count)
    if sampled.original is None:
        photo = read_image(original).rgb
        faces = choose_faces(photo)
        if not faces:
            raise FaceveilError(f"{original}: no face found in the original photo")
        reference = embed_faces(photo, faces, judges)  # once for every frame
        return [FrameCheck(k, verify_best(reference, faces, sampled.protected[k], judges, detector))
                for k in sampled.indices]
    checks = []
    for k in sampled.indices:
        before = sampled.original[k]
        faces = choose_faces(before)
        checks.append(FrameCheck(k, verify_arrays(before, sampled.protected[k], faces, judges, detector)
                                 if faces else []))
    return checks
