"""The one job skeleton every photo job follows: read -> detect -> select faces -> perturbation -> paste -> write ->
check. A job says which faces it takes and what perturbation each gets (protect: an optimisation; apply: a person's
mask); reading, detection, pasting, atomic writing, the no-face rule and videos are here, once.

Outcomes are the mappings the batch runner (faceveil.pipeline.batch.run_batch) turns into report rows:
status ok | no_face, message, faces, output, details."""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from faceveil.detect import canonical as C
from faceveil.detect.mtcnn import MTCNN, Face
from faceveil.detect.track import Track
from faceveil.errors import FaceveilError
from faceveil.io.images import DEFAULT_JPEG_QUALITY, Photo, read_image, write_image
from faceveil.io.paths import conversion
from faceveil.pipeline.batch import BatchItem, BatchReport, expand_inputs, run_batch

DeltaForTrack = Callable[[Track, np.ndarray], "torch.Tensor | None"]  # (track, frame) -> its perturbation or None


@dataclass
class OutputSettings:
    """How every job writes what it made: format (same | png | jpg | heic | avif), the quality of lossy formats,
    metadata kept or stripped (keep_date: only the capture date kept), and whether photos without a face to protect
    are copied unprotected."""

    fmt: str = "same"
    jpeg_quality: int = DEFAULT_JPEG_QUALITY
    keep_metadata: bool = False
    keep_date: bool = False
    copy_unprotected: bool = False


def select_faces(faces: list[Face], which: str) -> list[Face]:
    """Largest first; 'all', 'largest' or a count N."""
    ordered = sorted(faces, key=lambda f: -f.size)
    if which == "all":
        return ordered
    if which == "largest":
        return ordered[:1]
    if which.isdigit() and int(which) > 0:
        return ordered[: int(which)]
    raise FaceveilError(f"faces takes all, largest or a positive number, got {which!r}")


def paste_faces(rgb: np.ndarray, faces: list[Face], deltas) -> np.ndarray:
    """A copy of the photo with each face's canonical perturbation pasted on (the original array stays untouched)."""
    out = rgb.copy()
    for face, delta in zip(faces, deltas, strict=True):
        C.paste_into(out, face.landmarks, delta)
    return out


@dataclass
class StageSeconds:
    """Wall seconds per stage of a job (read, detect, optimise, paste, write, verify), summed over the photos since
    the last `clear`: where a run's time went (`bench protect` reports it per face)."""

    seconds: dict[str, float] = field(default_factory=dict)

    @contextlib.contextmanager
    def timing(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start

    def clear(self) -> None:
        self.seconds.clear()


@dataclass
class PreparedPhoto:
    """A photo read and its faces detected and selected: ready for its perturbations."""

    item: BatchItem
    photo: Photo
    faces: list[Face]
    out_path: Path


class PhotoJob:
    """The skeleton: subclasses give `select` (the faces to protect among those detected) and handle `photo`."""

    def __init__(self, output: OutputSettings, out_dir: Path | None, detector: MTCNN | None = None):
        self.output = output
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.detector = detector or MTCNN()
        self.stages = StageSeconds()

    def __call__(self, item: BatchItem) -> dict:
        outcome = self.video(item) if item.kind == "video" else self.photo(item)
        converted = conversion(item.path, outcome.get("output"), self.output.fmt if item.kind == "image" else "same")
        return {**outcome, "converted": converted} if converted else outcome

    def plan(self, upcoming: list[BatchItem]) -> None:
        """The run's items, before the first is processed (a job may work ahead, e.g. batch photos together)."""

    def photo(self, item: BatchItem) -> dict:
        raise NotImplementedError

    def video(self, item: BatchItem) -> dict:
        raise NotImplementedError

    def select(self, rgb: np.ndarray, faces: list[Face]) -> list[Face]:
        raise NotImplementedError

    def prepare(self, item: BatchItem) -> PreparedPhoto:
        """Read the photo, detect its faces, select those the job protects."""
        with self.stages.timing("read"):
            photo = read_image(item.path)
        with self.stages.timing("detect"):
            faces = self.select(photo.rgb, self.detector.detect_large(photo.rgb))
        return PreparedPhoto(item, photo, faces, item.output_path(self._out_dir(), self.output.fmt))

    def write(self, prepared: PreparedPhoto, deltas) -> np.ndarray:
        """Paste the faces' perturbations and write the protected photo atomically; returns its pixels."""
        with self.stages.timing("paste"):
            protected = paste_faces(prepared.photo.rgb, prepared.faces, deltas)
        with self.stages.timing("write"):
            self._write(dataclasses.replace(prepared.photo, rgb=protected), prepared.out_path)
        return protected

    def unprotected(self, prepared: PreparedPhoto, what: str, details: dict | None = None) -> dict:
        """The outcome of a photo with no face to protect: written unchanged only when copy_unprotected asks."""
        outcome: dict = {"status": "no_face", "details": details} if details is not None else {"status": "no_face"}
        if self.output.copy_unprotected:
            self._write(prepared.photo, prepared.out_path)
            return {**outcome, "message": f"{what}; copied unprotected", "output": prepared.out_path}
        return {**outcome, "message": f"{what}; nothing written (copying unprotected photos is off)"}

    def write_video(self, item: BatchItem, delta_for_track: DeltaForTrack) -> tuple[Path, dict]:
        """The video with every tracked face's perturbation pasted on each frame; (output path, statistics)."""
        from faceveil.pipeline.video import protect_video

        out_path = item.output_path(self._out_dir())
        stats = protect_video(item.path, out_path, delta_for_track, progress=False,
                              keep_metadata=self.output.keep_metadata, keep_date=self.output.keep_date)
        return out_path, stats

    def _write(self, photo: Photo, path: Path) -> None:
        o = self.output
        write_image(photo, path, fmt=o.fmt, jpeg_quality=o.jpeg_quality, keep_metadata=o.keep_metadata,
                    keep_date=o.keep_date)

    def _out_dir(self) -> Path:
        if self.out_dir is None:
            raise FaceveilError("this job was made without an output folder: it can only work on pixels in memory")
        return self.out_dir


def run_on_files(job: PhotoJob, inputs: Iterable[str | Path], out_dir: str | Path, *, recursive: bool = False,
                 report_path: str | Path | None = None, progress: bool = True, desc: str = "faceveil",
                 header: dict | None = None) -> BatchReport:
    """Every photo and video of `inputs` (files or folders) through the job into out_dir under the same names (never
    over an input, never taking the output folder as input); one bad file is one error row, never the end."""
    from faceveil.io.paths import ensure_safe_out_dir

    inputs, out_dir = [str(i) for i in inputs], Path(out_dir)
    for raw in inputs:  # before expanding: the output folder is excluded from the inputs
        ensure_safe_out_dir(Path(raw) / "x" if Path(raw).is_dir() else Path(raw), out_dir)
    items = expand_inputs(inputs, kinds=("image", "video"), exclude=out_dir, recursive=recursive)
    out_dir.mkdir(parents=True, exist_ok=True)
    job.out_dir = out_dir
    job.plan(items)
    return run_batch(items, job, report_path=report_path, quiet=not progress, desc=desc, header=header)
