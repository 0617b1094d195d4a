"""Face confirmation (faceveil.detect.confirm): BlazeFace equal to TF.js, its anchor decoding, and the check that
refuses non-faces (sample3's chest, a synthetic blob) while keeping real faces; deterministic."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import pytest

from faceveil.detect.confirm import FaceConfirmation, FaceConfirmer, box_iou, face_crop
from faceveil.detect.mtcnn import Face
from faceveil.pipeline.job import select_faces, with_skipped
from tests.conftest import needs_weights


def _face(box: tuple[float, float, float, float], score: float = 0.9) -> Face:
    x1, y1, x2, y2 = box
    marks = np.array([[x1 + 0.3 * (x2 - x1), y1 + 0.4 * (y2 - y1)], [x1 + 0.7 * (x2 - x1), y1 + 0.4 * (y2 - y1)],
                      [(x1 + x2) / 2, y1 + 0.6 * (y2 - y1)], [x1 + 0.35 * (x2 - x1), y1 + 0.8 * (y2 - y1)],
                      [x1 + 0.65 * (x2 - x1), y1 + 0.8 * (y2 - y1)]], dtype=np.float32)
    return Face(box, score, marks)


@dataclass
class _Opinion:
    scores: np.ndarray
    boxes: np.ndarray


class _OneBox:
    """A stand-in second detector: one box (in its input pixels) with a fixed probability."""

    input_size = 256

    def __init__(self, box: tuple[float, float, float, float], score: float) -> None:
        self.box, self.score = box, score

    def __call__(self, images: np.ndarray) -> _Opinion:
        n = len(images)
        return _Opinion(np.full((n, 1), self.score), np.tile(np.asarray(self.box, dtype=np.float64), (n, 1, 1)))


def test_box_iou() -> None:
    boxes = np.array([[0, 0, 10, 10], [5, 0, 15, 10], [20, 20, 30, 30]], dtype=np.float64)
    np.testing.assert_allclose(box_iou(np.array([0, 0, 10, 10.0]), boxes), [1.0, 50 / 150, 0.0])


def test_crop_pads_outside_the_photo() -> None:
    rgb = np.full((100, 100, 3), 200, dtype=np.uint8)
    crop, box = face_crop(rgb, _face((0, 0, 40, 40)), 2.0, 64)
    assert crop.shape == (64, 64, 3) and box == (-20, -20, 60, 60)
    assert crop[0, 0].tolist() == [0, 0, 0] and crop[-1, -1].tolist() == [200, 200, 200]


def test_only_an_overlapping_confident_box_confirms() -> None:
    rgb = np.zeros((400, 400, 3), dtype=np.uint8)
    face = _face((150, 150, 250, 250))  # the crop is (100..300): the face is the middle half, 64..192 at 256
    assert FaceConfirmer(_OneBox((64, 64, 192, 192), 0.9)).check(rgb, [face])[0].confirmed
    assert not FaceConfirmer(_OneBox((64, 64, 192, 192), 0.3)).check(rgb, [face])[0].confirmed  # unsure
    away = FaceConfirmer(_OneBox((0, 0, 60, 60), 0.99)).check(rgb, [face])[0]  # a face elsewhere in the crop
    assert not away.confirmed and away.score == 0.0


def test_skipped_detections_are_reported() -> None:
    check = FaceConfirmation(_face((10, 20, 110, 140), 0.918), 0.029, False)
    details = with_skipped({"faces": []}, [check])
    assert details is not None and details["not_faces"][0]["reason"].startswith("skipped: not a face (score 0.03")
    assert details["not_faces"][0]["mtcnn_score"] == pytest.approx(0.918)
    assert with_skipped(None, []) is None


# ------------------------------------------------------------------------------------- the real detector


@functools.cache
def _blazeface():
    from faceveil.models.blazeface import default_blazeface

    return default_blazeface()


@needs_weights
def test_blazeface_matches_tfjs() -> None:
    """Our graph equals TF.js 4.22 on the committed reference (tools/make_references/make_tfjs_references.py)."""
    from faceveil.models.references import compare_blazeface

    result = compare_blazeface()
    assert result["ok"], result


def test_anchor_decoding() -> None:
    from faceveil.models.blazeface import anchor_centres, decode

    anchors = anchor_centres()
    assert anchors.shape == (896, 2)
    np.testing.assert_allclose(anchors[:3], [[8, 8], [8, 8], [24, 8]])  # 2 anchors a 16-px cell, row by row
    np.testing.assert_allclose(anchors[512], [16, 16])  # then the 32-px cells, 6 anchors each
    regressors = np.zeros((1, 896, 16))
    regressors[0, 0, :4] = [2, -3, 20, 10]  # centre offset (x, y), size (w, h)
    out = decode(np.zeros((1, 896)), regressors, anchors)
    np.testing.assert_allclose(out.boxes[0, 0], [0, 0, 20, 10])
    np.testing.assert_allclose(out.scores[0, 0], 0.5)


@needs_weights
def test_synthetic_blob_is_refused() -> None:
    """A skin-coloured ellipse on grey (a face-sized blob, no features) and uniform noise are not faces."""
    y, x = np.mgrid[0:300, 0:300]
    blob = np.full((300, 300, 3), 128, dtype=np.uint8)
    blob[((x - 150) / 50) ** 2 + ((y - 150) / 65) ** 2 <= 1] = (224, 172, 140)
    noise = np.random.default_rng(0).integers(0, 256, (300, 300, 3), dtype=np.uint8)
    confirmer = FaceConfirmer(_blazeface())
    for rgb in (blob, noise):
        (check,) = confirmer.check(rgb, [_face((100, 85, 200, 215))])
        assert not check.confirmed, check


@pytest.fixture(scope="module")
def sample3() -> tuple[np.ndarray, list[Face]]:
    from faceveil.detect.mtcnn import default_detector
    from faceveil.io import weights
    from faceveil.io.images import read_image

    rgb = read_image(weights.sample_photos()[2]).rgb
    return rgb, default_detector().detect_large(rgb)


@needs_weights
def test_sample3_chest_refused_and_real_faces_kept(sample3) -> None:
    """MTCNN's largest 'face' in sample3 is a chest (0.918): refused; the three real faces are kept, and
    `--faces largest` now takes a real face."""
    rgb, detected = sample3
    chest = max(detected, key=lambda f: f.size)
    assert len(detected) == 4 and chest.score < 0.95
    kept, skipped = FaceConfirmer(_blazeface()).split(rgb, detected)
    assert [c.face for c in skipped] == [chest]
    assert len(kept) == 3 and chest not in kept
    assert select_faces(kept, "largest")[0] is not chest


@needs_weights
def test_confirmation_is_deterministic(sample3) -> None:
    rgb, detected = sample3
    first = [c.score for c in FaceConfirmer(_blazeface()).check(rgb, detected)]
    again = [c.score for c in FaceConfirmer(_blazeface()).check(rgb, list(reversed(detected)))][::-1]
    assert first == again


def test_tracker_starts_no_track_on_a_refused_detection() -> None:
    from faceveil.detect.track import FaceTracker

    class _Detector:
        def detect_large(self, image: np.ndarray, max_side: int = 1024) -> list[Face]:
            return [_face((10, 10, 60, 70))]

    frame = np.zeros((100, 100, 3), dtype=np.uint8)
    refusing = FaceTracker(_Detector(), confirm=lambda rgb, faces: [])  # type: ignore[arg-type]
    assert refusing.update(frame) == [] and refusing.not_faces == 1
    accepting = FaceTracker(_Detector(), confirm=lambda rgb, faces: list(faces))  # type: ignore[arg-type]
    assert len(accepting.update(frame)) == 1 and accepting.not_faces == 0
