"""`faceveil bench video`: frames per second of detection + tracking + paste-back on a generated 720p clip.

The clip is made here from a sample photo (never stored): a slow pan and zoom over sample1 (three faces; 10
seconds one way, then back) at 1280x720, 25 fps, with a 440 Hz sine audio track from ffmpeg's lavfi source.
Because each frame is a known crop of the photo, the true landmarks of every face in every frame are known too
(tests use them).
"""

from __future__ import annotations

import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from faceveil.detect.canonical import CANONICAL_SIZE
from faceveil.io import weights
from faceveil.io.images import read_image
from faceveil.io.video import ffmpeg_exe

WIDTH, HEIGHT, FPS = 1280, 720, 25
# Crop windows (centre x, centre y, width) of sample1 at the first and the last frame; height = width * 9/16.
_START = (960.0, 560.0, 1800.0)
_END = (1043.0, 430.0, 1400.0)
_PAN_SECONDS = 10
Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class TestClip:
    """A generated clip and, per frame, the true landmarks [faces, 5, 2] of the photo's faces in it."""

    path: Path
    frames: int
    landmarks: np.ndarray  # [frames, faces, 5, 2]


def _window(index: int) -> Box:
    """Crop box (x0, y0, x1, y1) in photo pixels for a frame: from _START to _END in 10 seconds (easing in and
    out), back in the next 10, and so on."""
    s = 0.5 - 0.5 * np.cos(np.pi * index / (_PAN_SECONDS * FPS - 1))
    cx, cy, w = (a + (b - a) * s for a, b in zip(_START, _END, strict=True))
    h = w * HEIGHT / WIDTH
    return cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2


def _frames(photo: Image.Image, count: int, blank: int) -> Iterator[tuple[np.ndarray, Box]]:
    for index in range(count):
        box = _window(index)
        if index < blank:
            yield np.zeros((HEIGHT, WIDTH, 3), np.uint8), box
        else:
            yield np.asarray(photo.resize((WIDTH, HEIGHT), Image.BILINEAR, box=box)), box


def _to_frame(marks: np.ndarray, box: Box) -> np.ndarray:
    """Photo landmarks (pixel centres) -> frame landmarks for the crop box."""
    x0, y0, x1, y1 = box
    scale = np.array([WIDTH / (x1 - x0), HEIGHT / (y1 - y0)])
    return (marks + 0.5 - np.array([x0, y0])) * scale - 0.5


def make_test_clip(path: Path | str, seconds: float = 10.0, photo_landmarks: np.ndarray | None = None,
                   blank_frames: int = 0) -> TestClip:
    """Write the pan/zoom clip (H.264 + AAC sine audio) to `path`; photo_landmarks [faces,5,2] from the photo
    (default: MTCNN's) are mapped into every frame. The first `blank_frames` frames are black (no faces; their
    landmarks are still given, as if the faces were there)."""
    path = Path(path)
    photo = Image.fromarray(read_image(weights.sample_photos()[0]).rgb)
    if photo_landmarks is None:
        from faceveil.detect.mtcnn import default_detector

        faces = default_detector().detect_large(np.asarray(photo), 1024)
        photo_landmarks = np.stack([f.landmarks for f in faces]).astype(np.float64)
    count = round(seconds * FPS)
    cmd = [
        ffmpeg_exe(), "-hide_banner", "-nostdin", "-loglevel", "error", "-y",
        "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{WIDTH}x{HEIGHT}", "-framerate", str(FPS), "-i", "-",
        "-f", "lavfi", "-i", f"sine=frequency=440:sample_rate=48000:duration={count / FPS}",
        "-map", "0:v", "-map", "1:a", "-c:v", "libx264", "-preset", "ultrafast", "-crf", "16",
        "-pix_fmt", "yuv420p", "-c:a", "aac", "-b:a", "96k", str(path),
    ]
    marks = []
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE)
    assert proc.stdin is not None
    try:
        for frame, box in _frames(photo, count, blank_frames):
            proc.stdin.write(frame.tobytes())
            marks.append(_to_frame(photo_landmarks, box))
    finally:
        proc.stdin.close()
        if proc.wait() != 0:
            raise RuntimeError(f"ffmpeg could not write {path}")
    return TestClip(path=path, frames=count, landmarks=np.stack(marks))


def test_delta(seed: int = 0, epsilon: float = 8 / 255) -> torch.Tensor:
    """A seeded random canonical perturbation [3,256,256]: +-epsilon per pixel."""
    gen = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (3, CANONICAL_SIZE, CANONICAL_SIZE), generator=gen).float() * 2 - 1
    return signs * epsilon


def bench_video(seconds: float = 10.0, detect_every: int = 10, progress: bool = False) -> dict:
    """Protect a generated 720p clip (three faces, every one masked) and time it.

    Returns protect_video's statistics plus: core_fps, frames per second of detection + tracking + paste-back
    alone, in wall time (the project goal: >= 25 on a 2-core CPU), and core_cpu_fps, the same in CPU time (what
    a core of its own would give; wall time suffers when other jobs share the CPU); fps, end to end (decode and
    encode included, ffmpeg running beside us); split_fps / split_cpu_fps, frames per second each stage alone
    would allow; clip_seconds, the time spent making the clip (not counted).
    """
    from faceveil.detect.track import FaceTracker
    from faceveil.pipeline.video import protect_video

    delta = test_delta()
    with tempfile.TemporaryDirectory(prefix="faceveil-bench-") as tmp:
        start = time.perf_counter()
        clip = make_test_clip(Path(tmp) / "clip.mp4", seconds)
        clip_seconds = time.perf_counter() - start
        tracker = FaceTracker(detect_every=detect_every, fps=FPS)
        tracker.update(np.zeros((HEIGHT, WIDTH, 3), np.uint8))  # load weights and warm up outside the timing
        stats = protect_video(clip.path, Path(tmp) / "out.mp4", lambda track, frame: delta, progress,
                              tracker=tracker)
    frames = stats["frames"]
    for kind in ("", "cpu_"):
        split = stats[f"split_{kind}seconds"]
        core = split["detection"] + split["tracking"] + split["paste"]
        stats[f"core_{kind}seconds"] = core
        stats[f"core_{kind}fps"] = frames / core if core > 0 else 0.0
        stats[f"split_{kind}fps"] = {k: frames / v if v > 0 else None for k, v in split.items()}
    stats["clip_seconds"] = clip_seconds
    stats["detect_every"] = detect_every
    return stats


def rows(stats: dict) -> list[dict]:
    """bench_video's result as table rows: one per stage, then core (detection + tracking + paste) and end to end.

    wall_s / cpu_s: seconds of this process (ffmpeg's own CPU is in stats["ffmpeg_cpu_seconds"]); fps: frames per
    second that stage alone would allow, from wall and from CPU time.
    """
    frames = stats["frames"]

    def row(stage: str, wall: float, cpu: float) -> dict:
        return {"stage": stage, "wall_s": round(wall, 3), "cpu_s": round(cpu, 3),
                "fps_wall": round(frames / wall, 1) if wall > 0 else None,
                "fps_cpu": round(frames / cpu, 1) if cpu > 0 else None}

    out = [row(k, v, stats["split_cpu_seconds"][k]) for k, v in stats["split_seconds"].items()]
    out.append(row("core: detection+tracking+paste", stats["core_seconds"], stats["core_cpu_seconds"]))
    out.append(row("end to end", stats["seconds"], stats["cpu_seconds"]))
    return out


test_delta.__test__ = False  # type: ignore[attr-defined]  # not a pytest test
TestClip.__test__ = False  # type: ignore[attr-defined]
