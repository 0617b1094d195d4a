"""Face confirmation: a detection is protected only if a second, independent detector also sees a face there.

MTCNN alone takes some non-faces for faces (in the bundled sample3.jpg a chest at O-Net score 0.918, the largest
"face"). Each MTCNN face is therefore shown to a second detector (BlazeFace, faceveil.models.blazeface, wired in by
faceveil.pipeline.faces): a square crop of `CROP_FACTOR` times the face size around the face centre, resized to the
second detector's input. The face is confirmed when one of the second detector's boxes overlaps the MTCNN box (IoU
>= `MIN_IOU`) with a face probability >= `MIN_SCORE`. A face elsewhere in the crop (the chest crop holds the woman's
own face, BlazeFace 0.92) does not confirm it. The check is deterministic: fixed crops, one image a forward pass.

This module knows no model: the second detector is any callable with the `SecondDetector` shape (detect may not
import models: they are sibling wings).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from PIL import Image

from faceveil.detect.mtcnn import Face

CROP_FACTOR = 2.0  # crop side / MTCNN face size: the face fills about half the crop, as BlazeFace-back expects
MIN_IOU = 0.3  # a second-detector box must overlap the MTCNN box this much to speak for it
MIN_SCORE = 0.5  # BlazeFace probability that confirms (MediaPipe's own default minimum)


class SecondOpinion(Protocol):
    scores: np.ndarray  # [N, A] face probabilities
    boxes: np.ndarray  # [N, A, 4] (x1, y1, x2, y2) in input pixels


class SecondDetector(Protocol):
    input_size: int

    def __call__(self, images: np.ndarray) -> SecondOpinion:
        """Every candidate box of uint8 NHWC images [N, input_size, input_size, 3]."""
        ...


@dataclass(frozen=True)
class FaceConfirmation:
    """One MTCNN detection and the second detector's verdict on it."""

    face: Face
    score: float  # the best second-detector probability among boxes overlapping the face (0 when none)
    confirmed: bool

    def to_dict(self) -> dict:
        return {"box": [round(float(v), 1) for v in self.face.box], "mtcnn_score": round(float(self.face.score), 4),
                "face_score": round(self.score, 4), "confirmed": self.confirmed}

    def describe(self) -> str:
        """The line a user reads for a skipped detection."""
        x1, y1, x2, y2 = (round(v) for v in self.face.box)
        return (f"skipped: not a face (score {self.score:.2f}; detector score {self.face.score:.2f}, "
                f"box {x1},{y1},{x2},{y2})")


class FaceConfirmer:
    """Splits detections into confirmed faces and skipped non-faces."""

    def __init__(self, second: SecondDetector, min_score: float = MIN_SCORE, min_iou: float = MIN_IOU,
                 crop_factor: float = CROP_FACTOR) -> None:
        self.second = second
        self.min_score = min_score
        self.min_iou = min_iou
        self.crop_factor = crop_factor

    def check(self, rgb: np.ndarray, faces: Sequence[Face]) -> list[FaceConfirmation]:
        """A verdict for each face, in order."""
        checks = []
        for face in faces:
            crop, box = face_crop(rgb, face, self.crop_factor, self.second.input_size)
            opinion = self.second(crop[None])
            scale = self.second.input_size / (box[2] - box[0])
            target = (np.asarray(face.box, dtype=np.float64) - (box[0], box[1], box[0], box[1])) * scale
            overlapping = box_iou(target, np.asarray(opinion.boxes[0], dtype=np.float64)) >= self.min_iou
            score = float(np.max(opinion.scores[0], where=overlapping, initial=0.0))
            checks.append(FaceConfirmation(face, score, score >= self.min_score))
        return checks

    def faces(self, rgb: np.ndarray, faces: Sequence[Face]) -> list[Face]:
        """The confirmed faces, in their order."""
        return self.split(rgb, faces)[0]

    def split(self, rgb: np.ndarray, faces: Sequence[Face]) -> tuple[list[Face], list[FaceConfirmation]]:
        """(confirmed faces in their order, the checks of the skipped ones)."""
        checks = self.check(rgb, faces)
        return [c.face for c in checks if c.confirmed], [c for c in checks if not c.confirmed]


def face_crop(rgb: np.ndarray, face: Face, factor: float, size: int) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """The square crop of side factor * face size around the face centre (black outside the photo), resized to
    size x size (antialiased); and the crop's box (x1, y1, x2, y2) in photo pixels."""
    cx, cy = face.center
    side = max(int(round(face.size * factor)), 1)
    x1, y1 = int(round(cx - side / 2)), int(round(cy - side / 2))
    height, width = rgb.shape[:2]
    pad = max(0, -x1, -y1, x1 + side - width, y1 + side - height)
    padded = np.pad(rgb, ((pad, pad), (pad, pad), (0, 0))) if pad else rgb
    window = np.ascontiguousarray(padded[y1 + pad:y1 + pad + side, x1 + pad:x1 + pad + side])
    crop = np.asarray(Image.fromarray(window).resize((size, size), Image.BILINEAR))
    return crop, (x1, y1, x1 + side, y1 + side)


def box_iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Intersection over union of one box (x1, y1, x2, y2) with each of boxes [A, 4]."""
    ix = np.clip(np.minimum(box[2], boxes[:, 2]) - np.maximum(box[0], boxes[:, 0]), 0, None)
    iy = np.clip(np.minimum(box[3], boxes[:, 3]) - np.maximum(box[1], boxes[:, 1]), 0, None)
    inter = ix * iy
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = np.clip(boxes[:, 2] - boxes[:, 0], 0, None) * np.clip(boxes[:, 3] - boxes[:, 1], 0, None)
    return inter / np.maximum(area + areas - inter, 1e-9)
