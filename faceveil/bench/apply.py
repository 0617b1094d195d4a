"""`faceveil bench apply`: what a person mask costs. Enroll once (seconds for ~10 photos, paper settings), then
apply with no optimisation: seconds per 12-megapixel photo including detection and matching (goal <= 0.8 s), and
frames per second on a generated 720p clip (goal >= 25, detection + tracking + matching + paste-back, as
`bench video` counts it).

Enroll photos: the first LFW identity (alphabetical) with enough images when LFW is present, else the largest face
of each sample photo. Wall seconds and CPU seconds are both given: on a machine shared with other jobs the wall
time is inflated, the CPU time is what a core of its own would take. The apply figures use the enrolled mask with
references of the sample photo's faces, so that faces are found, matched and pasted as in real use: one of the
12 MP photo's faces, every face of the clip.
"""

from __future__ import annotations

import dataclasses
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from faceveil.bench.pipeline import TWELVE_MP
from faceveil.detect.mtcnn import MTCNN
from faceveil.io import weights
from faceveil.io.images import read_image, write_image
from faceveil.pipeline.maskfile import PersonMask
from faceveil.pipeline.person import (
    MATCH_MODELS,
    ApplySettings,
    EnrollSettings,
    FoundFace,
    MaskApplier,
    enroll,
    reference_embeddings,
)

APPLY_GOAL_SECONDS = 0.8
VIDEO_GOAL_FPS = 25.0


def enroll_photos(count: int) -> tuple[list[Path], str]:
    """`count` photos of one person from LFW (first identity with enough images), else the sample photos."""
    from faceveil.datasets.lfw import default_lfw_root, identities

    root = default_lfw_root()
    if root is not None:
        for name, files in identities(root).items():
            if len(files) >= count:
                return files[:count], f"lfw:{name}"
    return weights.sample_photos()[:count], "sample photos"


def _with_references(mask: PersonMask, photo: np.ndarray, faces) -> PersonMask:
    """The mask with the given faces as its person (their embeddings as references)."""
    models = sorted(set(MATCH_MODELS) & set(mask.references)) or list(MATCH_MODELS)
    refs = reference_embeddings([FoundFace(photo, f) for f in faces], models)
    return dataclasses.replace(mask, references=refs)


def bench_enroll(count: int, iters: int, progress: bool) -> tuple[PersonMask, dict]:
    paths, source = enroll_photos(count)
    settings = EnrollSettings(name="bench")
    settings.attack = dataclasses.replace(settings.attack, steps=iters, jitter=2.0)
    start, start_cpu = time.perf_counter(), time.process_time()
    enrolled = enroll(paths, settings, progress=progress)
    seconds, cpu = time.perf_counter() - start, time.process_time() - start_cpu
    row = {"stage": "enroll", "images": enrolled.mask.meta["images_used"], "source": source,
           "seconds": round(seconds, 2), "cpu_seconds": round(cpu, 2), "goal": None,
           "hull_solver_ms_per_step": round(enrolled.info.get("hull_solver_ms_per_step", 0.0), 2)}
    return enrolled.mask, row


def bench_photo(mask: PersonMask, repeats: int, detector: MTCNN) -> list[dict]:
    """Median seconds of detection + matching + paste on sample1 upscaled to 12 MP, and with a JPEG write."""
    big = np.asarray(Image.fromarray(read_image(weights.sample_photos()[0]).rgb).resize(TWELVE_MP, Image.BICUBIC))
    faces = sorted(detector.detect_large(big), key=lambda f: -f.size)
    applier = MaskApplier(_with_references(mask, big, faces[:1]), ApplySettings(), detector=detector)
    applier.apply_to_pixels(big)  # warm-up: weights loaded, caches filled
    times, cpu, written, written_cpu = [], [], [], []
    with tempfile.TemporaryDirectory(prefix="faceveil-bench-") as tmp:
        for _ in range(repeats):
            start, start_cpu = time.perf_counter(), time.process_time()
            protected, rows = applier.apply_to_pixels(big)
            times.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
            write_image(protected, Path(tmp) / "out.jpg", fmt="jpg", jpeg_quality=95)
            written.append(time.perf_counter() - start)
            written_cpu.append(time.process_time() - start_cpu)
    masked = sum(r["masked"] for r in rows)
    megapixels = round(big.shape[0] * big.shape[1] / 1e6, 1)
    return [{"stage": "apply 12 MP photo (detect+match+paste)", "megapixels": megapixels, "faces": len(rows),
             "masked": masked, "seconds": round(statistics.median(times), 3),
             "cpu_seconds": round(statistics.median(cpu), 3), "goal": f"<= {APPLY_GOAL_SECONDS}",
             "meets_goal": statistics.median(times) <= APPLY_GOAL_SECONDS},
            {"stage": "apply 12 MP photo + JPEG q95 write", "megapixels": megapixels, "faces": len(rows),
             "masked": masked, "seconds": round(statistics.median(written), 3),
             "cpu_seconds": round(statistics.median(written_cpu), 3), "goal": None}]


def bench_video_apply(mask: PersonMask, seconds: float, detector: MTCNN, progress: bool) -> dict:
    """720p clip of sample1's three faces, every one the enrolled person (references of all three)."""
    from faceveil.bench.video import FPS, HEIGHT, WIDTH, make_test_clip
    from faceveil.detect.track import FaceTracker
    from faceveil.pipeline.video import protect_video

    photo = read_image(weights.sample_photos()[0]).rgb
    faces = detector.detect_large(photo, 1024)
    applier = MaskApplier(_with_references(mask, photo, faces), ApplySettings(), detector=detector)
    with tempfile.TemporaryDirectory(prefix="faceveil-bench-") as tmp:
        clip = make_test_clip(Path(tmp) / "clip.mp4", seconds, np.stack([f.landmarks for f in faces]))
        tracker = FaceTracker(fps=FPS)
        tracker.update(np.zeros((HEIGHT, WIDTH, 3), np.uint8))  # weights and warm-up outside the timing
        delta_for_track = applier.delta_for_track_function()
        stats = protect_video(clip.path, Path(tmp) / "out.mp4", delta_for_track, progress, tracker=tracker)
    frames = stats["frames"]
    core_fps, core_cpu_fps = (_core_fps(frames, stats[key]) for key in ("split_seconds", "split_cpu_seconds"))
    states = delta_for_track.states
    return {"stage": "apply 720p video (detect+track+match+paste)", "frames": frames,
            "tracks": len(states), "masked_tracks": sum(s.matched for s in states.values()),
            "fps": round(core_fps, 1), "fps_cpu": round(core_cpu_fps, 1), "end_to_end_fps": round(stats["fps"], 1),
            "goal": f">= {VIDEO_GOAL_FPS}", "meets_goal": core_fps >= VIDEO_GOAL_FPS}


def _core_fps(frames: int, split: dict) -> float:
    """Frames per second of detection + tracking + paste (matching happens inside paste), as `bench video`."""
    core = split["detection"] + split["tracking"] + split["paste"]
    return frames / core if core > 0 else 0.0


def run(images: int = 10, iters: int = 16, repeats: int = 3, seconds: float = 10.0,
        progress: bool = False) -> tuple[list[dict], dict]:
    """Rows for the table (enroll, 12 MP photo, 720p video) and settings facts."""
    mask, enroll_row = bench_enroll(images, iters, progress)
    detector = MTCNN()
    rows = [enroll_row, *bench_photo(mask, repeats, detector), bench_video_apply(mask, seconds, detector, progress)]
    return rows, {"source": enroll_row["source"], "method": mask.method, "surrogates": mask.surrogates}
