"""The detect wing: MTCNN on the sample photos, NMS, alignment geometry, the detection cache, LFW."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from faceveil.detect import align as A
from faceveil.detect.cache import DetectionCache, cache_for, detect_file
from faceveil.detect.mtcnn import MTCNN, Face, _Pieces, _torch_threads, nearest_to_center, nms
from faceveil.io import weights

MTCNN_FILES = [weights.home() / "mtcnn" / f"{n}.pt" for n in ("pnet", "rnet", "onet")]
FETCH_HINT = "run ./setup.sh or `faceveil models fetch`"
needs_mtcnn = pytest.mark.skipif(
    not all(p.is_file() for p in MTCNN_FILES), reason=f"MTCNN weights missing under {weights.home()}: {FETCH_HINT}"
)
SAMPLES = [weights.home() / "samples" / f"sample{i}.jpg" for i in range(1, 7)]
needs_samples = pytest.mark.skipif(
    not all(p.is_file() for p in SAMPLES), reason=f"sample photos missing: {FETCH_HINT}"
)
# Faces detected at >= 0.95 in each sample photo (by eye: all real, frontal-ish faces).
CONFIDENT_FACES = [3, 1, 3, 4, 5, 4]


def _lfw_root() -> Path | None:
    env = os.environ.get("FACEVEIL_LFW")
    beside = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "lfw"
    candidates = ([Path(env)] if env else []) + [beside]
    return next((c for c in candidates if (c / "images").is_dir()), None)


LFW = _lfw_root()
needs_lfw = pytest.mark.skipif(
    LFW is None, reason="LFW not found: set FACEVEIL_LFW or place it at ../shared/datasets/lfw beside the repo"
)


@pytest.fixture(scope="module")
def detector() -> MTCNN:
    return MTCNN()


def _load(path: Path, max_side: int | None = None) -> np.ndarray:
    image = Image.open(path).convert("RGB")
    if max_side:
        image.thumbnail((max_side, max_side), Image.BOX)
    return np.asarray(image)


# ----------------------------------------------------------------------------------------------- detector


@needs_mtcnn
def test_weights_load_strictly(detector: MTCNN) -> None:
    for net, path in zip((detector.pnet, detector.rnet, detector.onet), MTCNN_FILES, strict=True):
        saved = torch.load(path, weights_only=True)
        assert list(net.state_dict()) == list(saved)


@needs_mtcnn
@needs_samples
@pytest.mark.parametrize("index", range(6))
def test_sample_photo_faces(detector: MTCNN, index: int) -> None:
    image = _load(SAMPLES[index], max_side=960)
    faces = detector.detect(image)
    assert sum(f.score >= 0.95 for f in faces) >= CONFIDENT_FACES[index]
    for face in faces:
        x1, y1, x2, y2 = face.box
        pad = 0.1 * (x2 - x1)
        marks = face.landmarks
        assert marks.shape == (5, 2)
        assert np.all((marks[:, 0] > x1 - pad) & (marks[:, 0] < x2 + pad))
        assert np.all((marks[:, 1] > y1 - pad) & (marks[:, 1] < y2 + pad))
    for face in (f for f in faces if f.score >= 0.95):
        eyes, mouth = face.landmarks[:2], face.landmarks[3:]
        assert eyes[0, 0] < eyes[1, 0] and mouth[0, 0] < mouth[1, 0]  # left = image left
        assert eyes[:, 1].mean() < face.landmarks[2, 1] < mouth[:, 1].mean()  # eyes, nose, mouth downwards


@needs_mtcnn
@needs_samples
def test_detect_is_flip_equivariant(detector: MTCNN) -> None:
    image = _load(SAMPLES[0], max_side=800)
    width = image.shape[1]
    faces = sorted(detector.detect(image), key=lambda f: f.center[0])
    mirrored = sorted(detector.detect(np.ascontiguousarray(image[:, ::-1])), key=lambda f: -f.center[0])
    assert len(faces) == len(mirrored) >= 3
    for face, other in zip(faces, mirrored, strict=True):
        back = other.landmarks[[1, 0, 2, 4, 3]].copy()
        back[:, 0] = width - 1 - back[:, 0]
        assert np.abs(back - face.landmarks).max() < 0.05 * face.size


@needs_mtcnn
@needs_samples
@pytest.mark.slow
def test_detect_large_matches_full_resolution(detector: MTCNN) -> None:
    photo = Image.open(SAMPLES[0]).convert("RGB")
    big = np.asarray(photo.resize((4243, 2828), Image.BICUBIC))  # 12 megapixels
    faces = sorted(detector.detect_large(big, max_side=1024), key=lambda f: f.center[0])
    reference = sorted(detector.detect(np.asarray(photo)), key=lambda f: f.center[0])
    assert len(faces) == len(reference) == 3
    scale = big.shape[1] / photo.width
    for face, ref in zip(faces, reference, strict=True):
        assert np.abs(face.scaled(1 / scale, 1 / scale).landmarks - ref.landmarks).max() < 0.06 * ref.size


@needs_mtcnn
@needs_samples
def test_detection_does_not_depend_on_workers() -> None:
    """Pyramid levels, P-Net stripes and crop slices shared among threads give exactly one thread's result."""
    photo = np.asarray(Image.open(SAMPLES[3]).convert("RGB"))
    results = [MTCNN(workers=n).detect_large(photo) for n in (1, 2, 3)]
    assert len(results[0]) >= CONFIDENT_FACES[3]
    for other in results[1:]:
        assert [f.to_dict() for f in other] == [f.to_dict() for f in results[0]]


def test_detection_pieces_run_on_one_intra_op_thread_without_autograd() -> None:
    """A worker thread would otherwise start with OpenMP's default (every core) and nest a team in each op."""
    previous = torch.get_num_threads()
    with _torch_threads(1), _Pieces(2) as pieces:
        seen = pieces.map(lambda _: (torch.get_num_threads(), torch.is_inference_mode_enabled()), list(range(6)))
    assert seen == [(1, True)] * 6
    assert torch.get_num_threads() == previous


@needs_mtcnn
def test_no_faces_in_flat_image(detector: MTCNN) -> None:
    assert detector.detect(np.full((240, 320, 3), 128, np.uint8)) == []
    assert detector.detect(np.zeros((15, 15, 3), np.uint8)) == []


def _greedy_nms(boxes: np.ndarray, scores: np.ndarray, threshold: float) -> list[int]:
    order, keep = list(np.argsort(-scores, kind="stable")), []
    while order:
        best, order = order[0], order[1:]
        keep.append(best)
        low = np.maximum(boxes[best, :2], boxes[order, :2])
        high = np.minimum(boxes[best, 2:], boxes[order, 2:])
        inter = np.prod(np.clip(high - low, 0, None), axis=1)
        area = np.prod(boxes[:, 2:] - boxes[:, :2], axis=1)
        iou = inter / (area[best] + area[order] - inter)
        order = [o for o, v in zip(order, iou, strict=True) if v <= threshold]
    return keep


def test_nms_matches_greedy_reference() -> None:
    rng = np.random.default_rng(0)
    corner = rng.uniform(0, 100, (300, 2))
    boxes = np.concatenate([corner, corner + rng.uniform(5, 40, (300, 2))], axis=1)
    scores = rng.permutation(300) / 300.0
    got = nms(torch.from_numpy(boxes), torch.from_numpy(scores), 0.5).tolist()
    assert got == _greedy_nms(boxes, scores, 0.5)


def test_nearest_to_center() -> None:
    marks = np.zeros((5, 2), np.float32)
    faces = [Face((0, 0, 50, 50), 0.99, marks), Face((100, 100, 150, 150), 0.9, marks)]
    assert nearest_to_center(faces, 250, 250) is faces[1]
    assert Face.nearest_to_center([], 250, 250) is None


# ----------------------------------------------------------------------------------------------- alignment


@pytest.mark.parametrize("name", sorted(A.GEOMETRIES))
def test_template_round_trip_is_identity(name: str) -> None:
    geometry = A.get_geometry(name)
    matrix = A.warp_matrix(geometry.template, geometry)
    assert torch.allclose(matrix, torch.tensor([[1.0, 0, 0], [0, 1.0, 0]], dtype=torch.float64), atol=1e-9)
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (geometry.size, geometry.size, 3), dtype=np.uint8)
    assert np.array_equal(A.align(image, geometry.template, geometry), image)


def test_similarity_recovers_transform_and_never_reflects() -> None:
    rng = np.random.default_rng(2)
    src = rng.uniform(0, 200, (5, 2))
    angle, scale, shift = 0.4, 1.7, np.array([12.0, -30.0])
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    dst = src @ (scale * rotation).T + shift
    matrix = A.similarity_transform(src, dst)
    assert np.allclose(matrix, np.concatenate([scale * rotation, shift[:, None]], axis=1), atol=1e-9)
    mirrored = A.similarity_transform(src, dst * [-1, 1])
    assert np.linalg.det(mirrored[:, :2]) > 0


@pytest.mark.parametrize("name", sorted(A.GEOMETRIES))
def test_warp_matrix_matches_align(name: str) -> None:
    geometry = A.get_geometry(name)
    rng = np.random.default_rng(3)
    image = rng.uniform(0, 255, (250, 230, 3)).astype(np.float32)
    marks = np.array([[95, 110], [150, 105], [125, 140], [103, 168], [146, 165]], dtype=np.float64)
    expected = A.align(image, marks, geometry)
    tensor = torch.from_numpy(image).permute(2, 0, 1)[None].double()
    got = A.warp_faces(tensor, torch.from_numpy(marks)[None], geometry)[0].permute(1, 2, 0).numpy()
    assert expected.shape == (geometry.size, geometry.size, 3)
    assert np.abs(got - expected).max() < 1e-3
    forward = A.warp_matrix(marks, geometry)
    assert np.abs(A.transform_points(forward, marks) - geometry.template).max() < 10
    both = A.inverse_matrix(forward) @ torch.cat([forward, torch.tensor([[0, 0, 1.0]], dtype=torch.float64)])
    assert torch.allclose(both, torch.eye(3, dtype=torch.float64)[:2], atol=1e-9)


def test_geometry_templates() -> None:
    dlib = A.get_geometry("dlib150").template
    assert np.allclose(dlib, [[47.2322, 46.2884], [99.8063, 46.2884], [73.5193, 76.0521],
                              [50.0788, 102.3365], [96.9597, 102.3365]], atol=1e-3)
    loose = A.get_geometry("loose224")
    assert loose.scale == pytest.approx(1 / 1.2)
    tight = loose.with_scale(1.0).template
    assert np.allclose(tight, np.asarray(A.ARCFACE_112) * 2 + 0.5)
    centre = (loose.size - 1) / 2
    assert np.allclose(loose.template - centre, (tight - centre) / 1.2)
    with pytest.raises(ValueError, match="unknown crop geometry"):
        A.get_geometry("nope")


# ----------------------------------------------------------------------------------------------- cache


class _CountingDetector(MTCNN):
    calls = 0

    def detect(self, image: np.ndarray) -> list[Face]:
        self.calls += 1
        return super().detect(image)


@needs_mtcnn
@needs_samples
def test_cache_hit_returns_identical_result(tmp_path: Path) -> None:
    photo = tmp_path / "photo.jpg"
    Image.open(SAMPLES[2]).convert("RGB").resize((640, 450)).save(photo, quality=92)
    detector = _CountingDetector()
    cache = DetectionCache(detector.settings, root=tmp_path / "cache")
    first, size = detect_file(photo, detector, cache)
    second, size2 = detect_file(photo, detector, cache)
    assert detector.calls == 1 and size == size2 == (640, 450) and len(first) >= 3
    for a, b in zip(first, second, strict=True):
        assert a.box == b.box and a.score == b.score and np.array_equal(a.landmarks, b.landmarks)
    entries = list((tmp_path / "cache").rglob("*"))
    assert not [p for p in entries if p.name.endswith(".part")]
    assert json.loads(next(p for p in entries if p.suffix == ".json").read_text())["image_size"] == [640, 450]
    other = cache_for(MTCNN(min_face_size=40), root=tmp_path / "cache")
    assert other.folder != cache.folder and other.get("0" * 64) is None


def test_cache_treats_broken_entry_as_miss(tmp_path: Path) -> None:
    cache = DetectionCache({"x": 1}, root=tmp_path)
    digest = "ab" * 32
    marks = np.arange(10, dtype=np.float32).reshape(5, 2)
    cache.put(digest, [Face((1.0, 2.0, 3.0, 4.0), 0.5, marks)], (9, 8))
    faces, size = cache.get(digest)
    assert size == (9, 8) and faces[0].box == (1.0, 2.0, 3.0, 4.0)
    cache.path_for(digest).write_text("{not json")
    assert cache.get(digest) is None


# ----------------------------------------------------------------------------------------------- LFW


@needs_mtcnn
@needs_lfw
@pytest.mark.lfw
@pytest.mark.slow
def test_lfw_detection_rate(detector: MTCNN) -> None:
    images = sorted((LFW / "images").glob("*/*.jpg"))
    chosen = images[:: max(1, len(images) // 200)][:200]
    found = 0
    for path in chosen:
        image = np.asarray(Image.open(path).convert("RGB"))
        face = nearest_to_center(detector.detect(image), image.shape[1], image.shape[0])
        if face is not None:
            found += 1
            assert np.hypot(face.center[0] - 125, face.center[1] - 125) < 60  # the labelled face is central
    assert found >= 0.99 * len(chosen)
