"""What each judge model sees in a saved file: re-read the original and the protected photo, re-detect the faces in
the protected one, re-align, and compare every judge's embedding original -> protected per face (and with targets,
the protected face -> its target identity). Used by every job that writes photos and by evaluation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from faceveil.detect.align import align
from faceveil.detect.mtcnn import MTCNN, Face, match_face
from faceveil.io.images import read_image
from faceveil.models import zoo
from faceveil.pipeline.results import FaceCheck, JudgeScore


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
