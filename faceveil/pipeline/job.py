"""The one job skeleton every photo job follows: read -> detect -> select faces -> perturbation -> paste -> write ->
check. A job says which faces it takes and what perturbation each gets (protect: an optimisation; apply: a person's
mask); reading, detection, pasting, atomic writing, the no-face rule and videos are here, once.

Outcomes are the mappings the batch runner (faceveil.pipeline.batch.run_batch) turns into report rows:
status ok | no_face, message, faces, output, details."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from faceveil.detect import canonical as C
from faceveil.detect.confirm import FaceConfirmation, FaceConfirmer
from faceveil.detect.mtcnn import MTCNN, Face
from faceveil.detect.track import Track
from faceveil.errors import FaceveilError
from faceveil.io import atomic
from faceveil.io.images import DEFAULT_JPEG_QUALITY, Photo, read_image, write_image
from faceveil.io.paths import conversion, is_video_path, relative_output_path
from faceveil.pipeline.batch import BatchItem, BatchReport, SkipItem, expand_inputs, run_batch

EXISTING_CHOICES = ("refuse", "overwrite", "skip")
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
    existing: str = "refuse"  # an output file that exists before the run: refuse (error row) | overwrite | skip
    drop_audio: bool = False  # videos: write no sound track (voices identify people too)

    def __post_init__(self) -> None:
        if self.existing not in EXISTING_CHOICES:
            raise FaceveilError(f"`existing` takes {', '.join(EXISTING_CHOICES)}, got {self.existing!r}")


FaceChoice = str | Sequence[int]  # all | largest | N (the N largest) | the indices of the faces, largest first


def order_faces(faces: list[Face]) -> list[Face]:
    """The order faces are numbered in everywhere (detect_faces, selections, reports): largest first."""
    return sorted(faces, key=lambda f: -f.size)


def select_faces(faces: list[Face], which: FaceChoice) -> list[Face]:
    """Largest first; 'all', 'largest', a count N, or a selection of indices into the largest-first order (the
    numbers faceveil.api.detect_faces gives; an empty selection protects no face)."""
    ordered = order_faces(faces)
    if not isinstance(which, str):
        return [ordered[i] for i in chosen_indices(which, len(ordered))]
    if which == "all":
        return ordered
    if which == "largest":
        return ordered[:1]
    if which.isdigit() and int(which) > 0:
        return ordered[: int(which)]
    raise FaceveilError(f"faces takes all, largest, a positive number or a list of face indices, got {which!r}")


def chosen_indices(which: Sequence[int], found: int) -> list[int]:
    """A selection of face indices, checked against the faces found, sorted and without repeats."""
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in which):
        raise FaceveilError(f"faces: a selection is a list of face indices (whole numbers), got {list(which)!r}")
    wrong = [i for i in which if not 0 <= i < found]
    if wrong:
        raise FaceveilError(f"faces: no face {wrong[0]} in this photo: {found} face(s) found (indices 0..{found - 1})"
                            if found else f"faces: no face {wrong[0]} in this photo: no face found")
    return sorted(set(which))


def with_skipped(details: dict | None, skipped: list[FaceConfirmation]) -> dict | None:
    """A photo's details with its skipped detections (not a face) under "not_faces" (unchanged when none)."""
    if not skipped:
        return details
    return {**(details or {}), "not_faces": [{**c.to_dict(), "reason": c.describe()} for c in skipped]}


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
    skipped: list[FaceConfirmation] = field(default_factory=list)  # detections that are not faces
    seconds: float = 0.0  # reading and detecting it


class PhotoJob:
    """The skeleton: subclasses give `select` (the faces to protect among those detected) and handle `photo`."""

    def __init__(self, output: OutputSettings, out_dir: Path | None, detector: MTCNN | None = None):
        self.output = output
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.detector = detector or MTCNN()
        self.confirmer: FaceConfirmer | None = None  # None: the default (BlazeFace), loaded on first use
        self.on_frame: Callable[[Path, int, int | None], None] | None = None  # video progress (frames written, all)
        self.stages = StageSeconds()
        self.created: set[Path] = set()  # outputs this job wrote: only these may be written again
        self.refused: dict[Path, Exception] = {}  # input -> why it is not processed (its output exists)
        self._progress: Callable[[float], None] | None = None  # the batch runner's bar (see set_progress)

    def set_progress(self, advance: Callable[[float], None] | None) -> None:
        """The batch runner's hook: advance(files' worth of the work in progress); None: no bar."""
        self._progress = advance

    def report_progress(self, worth: float) -> None:
        """Work in progress on the current item(s), in files' worth (e.g. 2.5 = two and a half photos)."""
        if self._progress is not None:
            self._progress(worth)

    def __call__(self, item: BatchItem) -> dict:
        if item.path in self.refused:
            raise self.refused[item.path]
        outcome = self.video(item) if item.kind == "video" else self.photo(item)
        return self.with_conversion(item.path, outcome)

    def with_conversion(self, path: Path, outcome: dict | Exception) -> dict | Exception:
        """The outcome with `converted` ("gif -> png: why") when the file written is of another type than its
        input (also for outcomes finished ahead of their turn, see take_finished)."""
        if isinstance(outcome, BaseException):
            return outcome
        converted = conversion(path, outcome.get("output"), "same" if is_video_path(path) else self.output.fmt)
        return {**outcome, "converted": converted} if converted else outcome

    def take_finished(self) -> list[tuple[Path, dict | Exception]]:
        """Outcomes of later items finished ahead of their turn (see batch.run_batch); none by default."""
        return []

    def plan(self, upcoming: list[BatchItem]) -> None:
        """The run's items, before the first is processed (a job may work ahead, e.g. batch photos together)."""

    def photo(self, item: BatchItem) -> dict:
        raise NotImplementedError

    def video(self, item: BatchItem) -> dict:
        raise NotImplementedError

    def select(self, rgb: np.ndarray, faces: list[Face]) -> list[Face]:
        raise NotImplementedError

    def find_faces(self, rgb: np.ndarray) -> tuple[list[Face], list[FaceConfirmation]]:
        """The detections confirmed as faces, and the skipped ones (not a face)."""
        from faceveil.pipeline.faces import default_confirmer

        return (self.confirmer or default_confirmer()).split(rgb, self.detector.detect_large(rgb))

    def prepare(self, item: BatchItem) -> PreparedPhoto:
        """Read the photo, detect its faces, select those the job protects (among the confirmed ones)."""
        start = time.perf_counter()
        with self.stages.timing("read"):
            photo = read_image(item.path)
        with self.stages.timing("detect"):
            found, skipped = self.find_faces(photo.rgb)
            faces = self.select(photo.rgb, found)
        return PreparedPhoto(item, photo, faces, item.output_path(self._out_dir(), self.output.fmt), skipped,
                             time.perf_counter() - start)

    def write(self, prepared: PreparedPhoto, deltas) -> np.ndarray:
        """Paste the faces' perturbations and write the protected photo atomically; returns its pixels."""
        with self.stages.timing("paste"):
            protected = paste_faces(prepared.photo.rgb, prepared.faces, deltas)
        with self.stages.timing("write"):
            self._write(dataclasses.replace(prepared.photo, rgb=protected), prepared.out_path)
        return protected

    def unprotected(self, prepared: PreparedPhoto, what: str, details: dict | None = None) -> dict:
        """The outcome of a photo with no face to protect: written unchanged only when copy_unprotected asks."""
        details = with_skipped(details, prepared.skipped)
        outcome: dict = {"status": "no_face", "details": details} if details is not None else {"status": "no_face"}
        if self.output.copy_unprotected:
            self._write(prepared.photo, prepared.out_path)
            return {**outcome, "message": f"{what}; copied unprotected", "output": prepared.out_path}
        return {**outcome, "message": f"{what}; nothing written (copying unprotected photos is off)"}

    def write_video(self, item: BatchItem, delta_for_track: DeltaForTrack) -> tuple[Path | None, dict]:
        """The video with every tracked face's perturbation pasted on each frame; (output path, statistics). A video
        on which no face was masked follows the photos' rule: written only with copy_unprotected (path None)."""
        from faceveil.pipeline.video import protect_video

        out_path = self._target(item.output_path(self._out_dir()))
        stats = protect_video(item.path, out_path, delta_for_track, progress=False,
                              keep_metadata=self.output.keep_metadata, keep_date=self.output.keep_date,
                              keep_untouched=self.output.copy_unprotected, drop_audio=self.output.drop_audio,
                              replace=self._may_replace(out_path), max_mode=_mode_of(item.path),
                              on_frame=self._frame_progress(item.path), on_progress=self.report_progress)
        if not stats["written"]:
            return None, stats
        self.created.add(out_path)
        return out_path, stats

    def _frame_progress(self, path: Path) -> Callable[[int, list[Track]], None] | None:
        """protect_video's per-frame hook, told to `on_frame` as (video, frames written, frames in all)."""
        if self.on_frame is None:
            return None
        from faceveil.io.video import probe_video

        report, total = self.on_frame, probe_video(path).frame_count or None
        return lambda index, _tracks: report(path, index + 1, total)

    def unprotected_video(self, stats: dict, what: str, details: dict) -> dict:
        """The outcome of a video on which no face was masked: written unchanged only when copy_unprotected asks."""
        if stats.get("written"):
            return {"status": "no_face", "faces": 0, "message": f"{what}; copied unprotected", "details": details}
        return {"status": "no_face", "faces": 0, "details": details,
                "message": f"{what}; nothing written (copying unprotected videos is off)"}

    def _write(self, photo: Photo, path: Path) -> None:
        o, path = self.output, self._target(path)
        write_image(photo, path, fmt=o.fmt, jpeg_quality=o.jpeg_quality, keep_metadata=o.keep_metadata,
                    keep_date=o.keep_date, replace=self._may_replace(path), max_mode=_mode_of(photo.path))
        self.created.add(path)

    def _target(self, path: Path) -> Path:
        """The output path with its folder made (sub-folders of --recursive mirror the input's)."""
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise FaceveilError(f"cannot create the output folder {path.parent}: {exc.strerror or exc}") from None
        return path

    def _may_replace(self, path: Path) -> bool:
        return self.output.existing == "overwrite" or path in self.created

    def _out_dir(self) -> Path:
        if self.out_dir is None:
            raise FaceveilError("this job was made without an output folder: it can only work on pixels in memory")
        return self.out_dir


def _mode_of(source: Path | None) -> int | None:
    """The permission bits of a source file: its outputs get these at most (None: unknown, the umask's)."""
    if source is None:
        return None
    try:
        return os.stat(source).st_mode & 0o777
    except OSError:
        return None


@dataclass
class FilesPlan:
    """A run's items with their outputs decided before any work: no two inputs share an output, outputs that exist
    already are refused (or skipped, or replaced) by the rule the user chose."""

    items: list[BatchItem]
    out_dir: Path
    refused: dict[Path, Exception]  # input -> SkipItem (skip) or FaceveilError (refuse)
    stale_removed: int  # temp files of killed runs removed from the output folders
    max_mode: int | None  # the inputs' shared permission bits (reports get these at most)


def plan_files(inputs: Iterable[str | Path], out_dir: str | Path, output: OutputSettings, *,
               recursive: bool = False) -> FilesPlan:
    """Expand the inputs, check the output folder can be written, give every input its own output name (renamed,
    and said so in its report row, when two inputs would share one), and apply the existing-file rule. Costs no
    model loading: call it before building a job so that bad inputs or folders are refused at once."""
    from faceveil.io.paths import ensure_safe_out_dir, prepare_output_folder

    inputs, out_dir = [str(i) for i in inputs], Path(out_dir)
    for raw in inputs:  # before expanding: the output folder is excluded from the inputs
        ensure_safe_out_dir(Path(raw) / "x" if Path(raw).is_dir() else Path(raw), out_dir)
    items = expand_inputs(inputs, kinds=("image", "video"), exclude=out_dir, recursive=recursive)
    prepare_output_folder(out_dir)
    items = unique_outputs(items, output.fmt)
    folders = {(out_dir / item.output).parent for item in items if item.output is not None}
    stale = sum(atomic.remove_stale_temp_files(folder) for folder in folders)
    refused = existing_outputs(items, out_dir, output.existing)
    modes = [m for m in (_mode_of(item.path) for item in items) if m is not None]
    max_mode = functools.reduce(lambda a, b: a & b, modes) if modes else None
    return FilesPlan(items, out_dir, refused, stale, max_mode)


def unique_outputs(items: list[BatchItem], fmt: str) -> list[BatchItem]:
    """Each item with its own output (relative to the output folder): when several inputs map to one name (a/x.jpg
    and b/x.jpg named alone, x.jpg and x.png under --format png, clip.mov and clip.mp4), the first keeps it and the
    others get NAME-2, NAME-3, ... with a note for their report rows. Names are compared case-blind (a file system
    that ignores case would merge them too)."""
    planned = [(item, relative_output_path(item.path, fmt if item.kind == "image" else "same",
                                           relative_to=item.root)) for item in items]
    taken = {str(out).casefold() for _, out in planned}
    used: set[str] = set()
    assigned: dict[Path, BatchItem] = {}
    # an input whose output keeps its own name (x.png -> x.png) has the first claim on it, then the inputs in order
    for item, path in sorted(planned, key=lambda pair: pair[1].name != pair[0].path.name):
        note = ""
        if str(path).casefold() in used:
            first = path
            path = _free_name(path, used | taken)
            note = f"output renamed to {path.name}: another input also maps to {first.name}"
        used.add(str(path).casefold())
        assigned[item.path] = dataclasses.replace(item, output=path, note=note)
    return [assigned[item.path] for item in items]


def _free_name(path: Path, taken: set[str]) -> Path:
    for n in itertools.count(2):
        candidate = path.with_name(f"{path.stem}-{n}{path.suffix}")
        if str(candidate).casefold() not in taken:
            return candidate
    raise AssertionError("unreachable")


def existing_outputs(items: list[BatchItem], out_dir: Path, existing: str) -> dict[Path, Exception]:
    """Inputs whose output already exists (a file this run did not make): refused with an error, or skipped."""
    refused: dict[Path, Exception] = {}
    if existing == "overwrite":
        return refused
    for item in items:
        target = out_dir / (item.output or relative_output_path(item.path, relative_to=item.root))
        if not os.path.lexists(target):
            continue
        if existing == "skip":
            refused[item.path] = SkipItem(f"{target} exists (--skip-existing): kept as it is")
        else:
            refused[item.path] = FaceveilError(
                f"{target} exists and was not made by this run: not overwritten (--overwrite replaces it, "
                "--skip-existing keeps it)")
    return refused


def run_on_files(job: PhotoJob, inputs: Iterable[str | Path] | FilesPlan, out_dir: str | Path, *,
                 recursive: bool = False, report_path: str | Path | None = None, progress: bool = True,
                 desc: str = "faceveil", header: dict | None = None) -> BatchReport:
    """Every photo and video of `inputs` (files or folders, or a plan_files plan) through the job into out_dir under
    the same names (never over an input, never taking the output folder as input, never over a file the run did not
    make unless the job's output settings say overwrite); one bad file is one error row, never the end."""
    plan = inputs if isinstance(inputs, FilesPlan) else plan_files(inputs, out_dir, job.output, recursive=recursive)
    job.out_dir = plan.out_dir
    job.refused = dict(plan.refused)
    job.plan([item for item in plan.items if item.path not in plan.refused])
    header = {**(header or {}), "stale_temp_files_removed": plan.stale_removed} if plan.stale_removed else header
    return run_batch(plan.items, job, report_path=report_path, quiet=not progress, desc=desc, header=header,
                     max_mode=plan.max_mode)
