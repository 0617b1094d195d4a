"""Face tracking and protect_video on clips generated here from a sample photo (a slow pan/zoom over three faces,
1280x720, 25 fps, sine audio); nothing is stored. Also: canonical.paste, sped up for video, gives exactly what
the original implementation gave."""

from __future__ import annotations

import contextlib
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("imageio_ffmpeg")

from conftest import needs_weights  # noqa: E402

from faceveil.bench.video import FPS, HEIGHT, WIDTH, TestClip, make_test_clip, test_delta  # noqa: E402
from faceveil.detect import canonical  # noqa: E402
from faceveil.detect.align import ARCFACE_112, inverse_matrix, warp_matrix  # noqa: E402
from faceveil.detect.mtcnn import default_detector  # noqa: E402
from faceveil.detect.track import FaceTracker, OneEuro, Track, greedy_match, iou  # noqa: E402
from faceveil.io import weights  # noqa: E402
from faceveil.io.images import read_image  # noqa: E402
from faceveil.io.video import ffmpeg_exe, iter_frames, probe_video  # noqa: E402
from faceveil.pipeline.video import protect_video  # noqa: E402

pytestmark = needs_weights  # the MTCNN weights and the sample photos


# ------------------------------------------------------------------------------------------- paste: unchanged


def _old_face_mask(size: int = canonical.CANONICAL_SIZE) -> torch.Tensor:
    """canonical.face_mask before the speed-up (computed on every call)."""
    c = (size - 1) / 2
    k = size / canonical.CANONICAL_SIZE
    y, x = torch.meshgrid(torch.arange(size, dtype=torch.float64), torch.arange(size, dtype=torch.float64),
                          indexing="ij")
    r = ((x - c).abs() ** 4 + (y - c).abs() ** 4) ** 0.25
    return torch.sigmoid((canonical.MASK_HALF_SIDE * k - r) / (canonical.MASK_FEATHER * k / 4)).float()[None]


def _old_paste(photo: np.ndarray, landmarks: np.ndarray, delta: torch.Tensor,
               mask: torch.Tensor | None = None) -> np.ndarray:
    """canonical.paste before the speed-up, verbatim."""
    h, w = photo.shape[:2]
    canonical_to_photo = inverse_matrix(warp_matrix(landmarks, canonical.CANONICAL))
    box = canonical.region_box(canonical_to_photo, w, h)
    x0, y0, x1, y1 = box
    if x1 <= x0 or y1 <= y0:
        return photo.copy()
    mask = _old_face_mask() if mask is None else mask
    masked = (delta.detach().float() * mask)[None]
    region_delta = canonical.canonical_to_region(masked, canonical_to_photo, box)[0].permute(1, 2, 0).numpy()
    out = photo.copy()
    region = out[y0:y1, x0:x1].astype(np.float32) / 255 + region_delta
    out[y0:y1, x0:x1] = np.clip(np.rint(region * 255), 0, 255).astype(np.uint8)
    return out


def _sample_faces() -> list[tuple[np.ndarray, np.ndarray]]:
    """(image, landmarks) pairs: sample1 at full size (faces bigger than canonical space) and at 1/4 (smaller:
    the antialiased path), plus a face pushed half out of the picture (clipped region)."""
    rgb = read_image(weights.sample_photos()[0]).rgb
    small = np.asarray(Image.fromarray(rgb).resize((rgb.shape[1] // 4, rgb.shape[0] // 4), Image.BILINEAR))
    pairs = [(rgb, f.landmarks) for f in default_detector().detect_large(rgb, 1024)]
    pairs += [(small, f.landmarks) for f in default_detector().detect(small)]
    edge = pairs[0][1] - pairs[0][1][:, :1].min() * np.array([1.0, 0.0])  # left eye at x = 0
    return [*pairs, (rgb, edge.astype(np.float32))]


def test_paste_matches_the_original_implementation() -> None:
    pairs = _sample_faces()
    assert len(pairs) >= 7
    delta = (torch.rand(3, 256, 256, generator=torch.Generator().manual_seed(1)) * 2 - 1) * (12 / 255)
    half = _old_face_mask() * 0.5
    assert torch.equal(canonical.face_mask(), _old_face_mask())
    for image, marks in pairs:
        before = image.copy()
        for mask in (None, half):
            new, old = canonical.paste(image, marks, delta, mask), _old_paste(image, marks, delta, mask)
            assert np.array_equal(new, old)
            assert not np.array_equal(new, image)
        assert np.array_equal(image, before)  # paste returns a copy


@pytest.mark.slow
def test_paste_matches_the_original_on_random_faces() -> None:
    """Any size (canonical space shrunk 10x to grown 5x), angle, place (also partly or wholly outside the picture),
    perturbation strength (up to 1.0) and mask, on random and on saturated pictures."""
    rng = np.random.default_rng(7)
    gen = torch.Generator().manual_seed(7)
    template = np.array(ARCFACE_112) - 55.5
    for i in range(80):
        h, w = (int(v) for v in rng.integers(40, 600, 2))
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8) if i % 5 else np.full((h, w, 3), 255, np.uint8)
        scale, angle = float(np.exp(rng.uniform(np.log(0.1), np.log(5)))), float(rng.uniform(-np.pi, np.pi))
        turn = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]) * scale
        marks = template @ turn.T + rng.uniform([-100, -100], [w + 100, h + 100]) + rng.normal(0, scale, (5, 2))
        delta = (torch.rand(3, 256, 256, generator=gen) * 2 - 1) * float(rng.choice([1 / 255, 8 / 255, 1.0]))
        mask = [None, _old_face_mask() * 0.5, torch.ones(1, 256, 256), torch.rand(1, 256, 256, generator=gen)][i % 4]
        marks = marks.astype(np.float32)
        assert np.array_equal(canonical.paste(image, marks, delta, mask), _old_paste(image, marks, delta, mask)), i


def test_paste_into_equals_chained_paste() -> None:
    (image, a), (_, b), *_ = _sample_faces()
    delta = test_delta(3)
    chained = canonical.paste(canonical.paste(image, a, delta), b, delta)
    frame = image.copy()
    box = canonical.paste_into(frame, a, delta)
    canonical.paste_into(frame, b, delta)
    assert np.array_equal(frame, chained)
    assert box is not None and box[2] > box[0] and box[3] > box[1]
    outside = a - 5000.0
    assert canonical.paste_into(frame, outside, delta) is None
    unchanged = frame.copy()
    assert canonical.paste_into(frame, a, delta * 1e-4) is not None  # too weak to change an 8-bit pixel
    assert np.array_equal(frame, unchanged) and np.array_equal(_old_paste(unchanged, a, delta * 1e-4), unchanged)


def test_face_mask_is_a_fresh_tensor() -> None:
    mask = canonical.face_mask()
    mask.zero_()
    assert float(canonical.face_mask().max()) > 0.99


# ------------------------------------------------------------------------------------------- tracker pieces


def test_iou_and_matching() -> None:
    assert iou((0, 0, 10, 10), (0, 0, 10, 10)) == pytest.approx(1.0)
    assert iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)
    assert iou((0, 0, 10, 10), (20, 20, 30, 30)) == 0.0
    tracks = [(0, 0, 10, 10), (100, 100, 120, 120)]
    found = [(101, 99, 121, 119), (50, 50, 60, 60), (1, 1, 11, 11)]
    assert sorted(greedy_match(tracks, found, 0.3)) == [(0, 2), (1, 0)]


def test_one_euro_smooths_noise_and_follows_motion() -> None:
    rng = np.random.default_rng(0)
    base = np.array([[40.0, 50], [80, 50], [60, 70], [45, 90], [75, 90]])
    still, moving = OneEuro(25.0), OneEuro(25.0)
    noisy_in, noisy_out, moving_out = [], [], []
    for i in range(100):
        noisy_in.append(base + rng.normal(0, 1.0, base.shape))
        noisy_out.append(still(noisy_in[-1], 100.0))
        moving_out.append(moving(base + [4.0 * i, 0.0], 100.0))  # one face size per second
    def jitter(points: list[np.ndarray]) -> float:
        return float(np.abs(np.diff(np.array(points[20:]), axis=0)).mean())
    assert jitter(noisy_out) < jitter(noisy_in) / 3
    lag = 4.0 * 99 + base[0, 0] - moving_out[-1][0, 0]
    assert 0 <= lag < 4.0  # less than a frame behind


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> TestClip:
    return make_test_clip(tmp_path_factory.mktemp("clip") / "pan.mp4", seconds=10)


def _eye_distance(marks: np.ndarray) -> np.ndarray:
    return np.linalg.norm(marks[..., 0, :] - marks[..., 1, :], axis=-1)


def _nearest(truth: np.ndarray, marks: np.ndarray) -> tuple[int, float]:
    """Index of the true face [F,5,2] nearest to landmarks [5,2], and the mean error in eye distances."""
    errors = np.linalg.norm(truth - marks[None], axis=-1).mean(-1) / _eye_distance(truth)
    return int(errors.argmin()), float(errors.min())


def test_tracker_loses_faces_on_black_frames_and_revives_their_ids(clip: TestClip) -> None:
    tracker = FaceTracker(detect_every=10)
    with contextlib.closing(iter_frames(clip.path)) as frames:
        first = [tracker.update(next(frames)) for _ in range(3)]
        assert [len(t) for t in first] == [3, 3, 3] and tracker.detections == 1
        ids = {t.id for t in first[-1]}
        assert tracker.update(np.zeros((HEIGHT, WIDTH, 3), np.uint8)) == []  # frame 3
        assert tracker.detections == 2  # a lost track triggers a detection at once
        empty = [tracker.update(next(frames)) for _ in range(9)]  # frames 4-12: no tracks, no detection due
        assert empty == [[]] * 9 and tracker.detections == 2
        again = tracker.update(next(frames))  # frame 13: ten frames after the last detection
    assert tracker.detections == 3
    assert {t.id for t in again} == ids  # found near where they were lost: the same ids
    assert all(t.detected and t.age == 0 for t in again)


class _BlindAfterFirst:
    """The real detector, except that every detection after the first finds nothing."""

    def __init__(self) -> None:
        self.real, self.calls = default_detector(), 0
        self.onet = self.real.onet

    def detect_large(self, image: np.ndarray, max_side: int = 1024) -> list:
        self.calls += 1
        return self.real.detect_large(image, max_side) if self.calls == 1 else []


def test_tracks_that_detection_keeps_missing_are_dropped(clip: TestClip) -> None:
    tracker = FaceTracker(_BlindAfterFirst(), detect_every=5, max_missed=2)  # type: ignore[arg-type]
    with contextlib.closing(iter_frames(clip.path)) as frames:
        counts = [len(tracker.update(next(frames))) for _ in range(16)]
    # detections at frames 0, 5, 10, 15: the third miss (frame 15) is one too many
    assert counts == [3] * 15 + [0] and tracker.detections == 4


def _audio_pcm(path: Path) -> bytes:
    cmd = [ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-i", str(path), "-map", "0:a:0",
           "-f", "s16le", "-ac", "1", "-"]
    return subprocess.run(cmd, capture_output=True, check=True).stdout


def _face_boxes(truth: np.ndarray) -> list[tuple[int, int, int, int]]:
    """Per true face: the box spanned by its landmarks (inside the mask's full-strength area)."""
    boxes = []
    for marks in truth:
        (x0, y0), (x1, y1) = np.floor(marks.min(0)).astype(int), np.ceil(marks.max(0)).astype(int)
        boxes.append((x0, y0, x1, y1))
    return boxes


def _outside_faces(truth: np.ndarray) -> np.ndarray:
    """HxW bool: pixels outside every face's paste region."""
    outside = np.ones((HEIGHT, WIDTH), bool)
    for marks in truth:
        to_photo = inverse_matrix(warp_matrix(marks, canonical.CANONICAL))
        x0, y0, x1, y1 = canonical.region_box(to_photo, WIDTH, HEIGHT, margin=4)
        outside[y0:y1, x0:x1] = False
    return outside


def _correlation(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


@pytest.mark.slow
def test_protect_video_masks_every_face_in_every_frame(clip: TestClip, tmp_path: Path) -> None:
    delta = test_delta()
    seen: list[list[Track]] = []
    out = tmp_path / "protected.mp4"
    stats = protect_video(clip.path, out, lambda track, frame: delta, progress=False,
                          on_frame=lambda index, tracks: seen.append(tracks))

    # frames, duration and audio
    src, dst = probe_video(clip.path), probe_video(out)
    assert stats["frames"] == clip.frames == 250 and dst.frame_count == 250
    assert dst.fps == FPS and (dst.width, dst.height) == (WIDTH, HEIGHT)
    assert dst.duration == pytest.approx(src.duration, abs=0.05)
    assert dst.has_audio and dst.audio_codec == "aac"
    assert _audio_pcm(out) == _audio_pcm(clip.path)  # stream copy: identical samples

    # statistics
    assert stats["faces"] == 750 and stats["pasted"] == 750 and stats["tracks"] == 3
    assert 25 <= stats["detection_calls"] <= 27 and stats["fps"] > 0
    assert set(stats["split_seconds"]) == {"decode", "detection", "tracking", "paste", "encode"}

    # stable ids: each id always on the same true face, and the landmarks near the true ones
    assert len(seen) == 250 and all(len(tracks) == 3 for tracks in seen)
    owner: dict[int, int] = {}
    for truth, tracks in zip(clip.landmarks, seen, strict=True):
        for track in tracks:
            face, error = _nearest(truth, track.landmarks)
            assert owner.setdefault(track.id, face) == face
            assert error < 0.08
    assert sorted(owner.values()) == [0, 1, 2]

    # every face in every frame changed (well above the re-encoding noise outside the faces), in the right pattern
    pairs = zip(iter_frames(clip.path), iter_frames(out), clip.landmarks, seen, strict=True)
    for index, (before, after, truth, tracks) in enumerate(pairs):
        diff = np.abs(after.astype(np.int16) - before).mean(-1)
        noise = float(diff[_outside_faces(truth)].mean())
        assert noise < 2.0
        for x0, y0, x1, y1 in _face_boxes(truth):
            assert float(diff[y0:y1, x0:x1].mean()) > max(2.5, 2 * noise)
        if index % 25 == 0:
            expected = before.copy()
            for track in tracks:
                canonical.paste_into(expected, track.landmarks, delta)
            for x0, y0, x1, y1 in _face_boxes(truth):
                region = np.s_[y0:y1, x0:x1]
                got = after[region].astype(np.float32) - before[region]
                assert _correlation(got, expected[region].astype(np.float32) - before[region]) > 0.3


@pytest.mark.slow
def test_face_found_late_is_traced_back_and_none_leaves_a_face_alone(tmp_path: Path) -> None:
    clip = make_test_clip(tmp_path / "late.mp4", seconds=1, blank_frames=5)
    seen: list[list[Track]] = []
    out = tmp_path / "out.mp4"

    def delta_for(track: Track, frame: np.ndarray) -> torch.Tensor | None:
        return None if _nearest(clip.landmarks[0], track.landmarks)[0] == 0 else test_delta()

    stats = protect_video(clip.path, out, delta_for, progress=False, tracker=FaceTracker(detect_every=10),
                          on_frame=lambda index, tracks: seen.append(tracks))
    assert stats["frames"] == 25 and stats["detection_calls"] == 3  # frames 0, 10, 20
    assert [len(tracks) for tracks in seen] == [0] * 5 + [3] * 20
    assert stats["backfilled"] == 15  # frames 5-9, found at frame 10
    assert all(t.age < 0 for tracks in seen[5:10] for t in tracks)
    assert stats["pasted"] == 2 * 20
    plain = tmp_path / "plain.mp4"  # the same re-encoding, nothing pasted
    assert protect_video(clip.path, plain, lambda track, frame: None, progress=False)["pasted"] == 0
    for index in (6, 15):
        reference, after = _frame(plain, index), _frame(out, index)
        diff = np.abs(after.astype(np.int16) - reference).mean(-1)
        boxes = _face_boxes(clip.landmarks[index])
        assert float(diff[_region(boxes[0])].mean()) < 1.0  # left alone
        assert all(float(diff[_region(box)].mean()) > 2.5 for box in boxes[1:])


def _region(box: tuple[int, int, int, int]) -> tuple[slice, slice]:
    x0, y0, x1, y1 = box
    return np.s_[y0:y1, x0:x1]


def _frame(path: Path, index: int) -> np.ndarray:
    with contextlib.closing(iter_frames(path)) as frames:
        for i, frame in enumerate(frames):
            if i == index:
                return frame
    raise IndexError(index)


@pytest.mark.slow
def test_bench_reports_the_split() -> None:
    from faceveil.bench.video import bench_video, rows

    stats = bench_video(seconds=1)
    assert stats["frames"] == 25 and stats["core_fps"] > 0 and stats["core_cpu_fps"] > 0
    assert set(stats["split_fps"]) == {"decode", "detection", "tracking", "paste", "encode"}
    table = rows(stats)
    assert [r["stage"] for r in table][:5] == ["decode", "detection", "tracking", "paste", "encode"]
    assert len(table) == 7 and all(r["wall_s"] >= 0 for r in table)
