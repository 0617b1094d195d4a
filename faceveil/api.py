"""The public Python API: what the command line, the web app and the distributed runner call.

    import faceveil
    result = faceveil.protect("me.jpg", strength="mid", seed=0)     # a path, a PIL image or an RGB uint8 array
    result.save("me-protected.jpg")                                   # atomic, location and camera metadata stripped
    print(result.verdict)                                             # per face: "protected against all 7 models"

    protector = faceveil.Protector(strength="high")                  # models loaded once, reused
    report = protector.protect_files(["album/"], "protected/")       # every photo and video of a folder

    mask = faceveil.enroll(["ada1.jpg", "ada2.jpg", "ada3.jpg"], name="Ada")
    mask.save("ada.fvmask")
    faceveil.apply(faceveil.PersonMask.load("ada.fvmask"), "party.jpg").save("party-protected.jpg")
    faceveil.verify("me.jpg", "me-protected.jpg")                    # what each judge model still recognises

    faces = faceveil.detect_faces("group.jpg")                        # boxes, scores, confirmed or not
    faceveil.protect("group.jpg", faces=[0, 2])                       # only faces 0 and 2 (detect_faces' numbers)

Images come in as paths, PIL images or numpy arrays (H x W x 3 uint8 RGB) and go out as numpy arrays (`.pil()` for
a PIL image). Errors are FaceveilError with one line that names the parameter at fault.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from faceveil.errors import FaceveilError
from faceveil.io.paths import DEFAULT_JPEG_QUALITY
from faceveil.runtime import prepare_process

if TYPE_CHECKING:
    from PIL import Image

    from faceveil.detect.mtcnn import MTCNN
    from faceveil.pipeline.batch import BatchItem, BatchReport
    from faceveil.pipeline.maskfile import PersonMask
    from faceveil.pipeline.protect import PhotoProtector, ProtectSettings
    from faceveil.pipeline.results import FaceCheck
    from faceveil.pipeline.verify import FrameCheck

FrameProgress = Callable[[Path, int, "int | None"], None]  # (video, frames written, frames in all or None)

def sample_photos() -> list[Path]:
    """The sample photos the install brought (six photos of several people, from a registry package)."""
    from faceveil.io.weights import sample_photos as installed

    return installed()


def strengths() -> list[dict[str, Any]]:
    """The strength presets of `protect`, weakest first: name, L-inf eps (0..255), iterations, whether it is the
    default, and what it measured (face-area SSIM / PSNR, per judge the share of people no longer ranked first; None
    where not measured)."""
    from faceveil.pipeline import presets

    default = presets.ProtectChoices().strength
    return [{"name": name, "eps": recipe.eps, "iters": recipe.iters, "default": name == default,
             "measured": presets.STRENGTH_MEASURED.get(name)}
            for name, recipe in presets.STRENGTHS.items()]


def judge_names() -> list[str]:
    """The face-recognition models that check results by default (every model of the zoo)."""
    from faceveil.models import zoo

    return list(zoo.SPECS)


def load_pixels(image: Any) -> np.ndarray:
    """H x W x 3 uint8 RGB from a path (read as the product reads photos: orientation applied), a PIL image or an
    array."""
    from PIL import Image

    from faceveil.io.images import read_image

    if isinstance(image, (str, Path)):
        return read_image(image).rgb
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB")).copy()
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise FaceveilError(f"image: expected an H x W x 3 uint8 RGB array, got {image.dtype} {image.shape}")
        return np.ascontiguousarray(image)
    raise FaceveilError(f"image: expected a path, a PIL image or a numpy array, got {type(image).__name__}")


@dataclass(frozen=True)
class DetectedFace:
    """One detection in a photo, in the order faces are numbered everywhere (largest first). `index` is the number
    a selection (`faces=[...]`) uses; None for a detection the face confirmation turned down (not a face: never
    protected)."""

    index: int | None
    box: tuple[float, float, float, float]  # x1, y1, x2, y2 in photo pixels
    score: float  # the face detector's (MTCNN) probability
    face_score: float  # the confirming detector's (BlazeFace) probability
    confirmed: bool

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "box": [round(v, 1) for v in self.box], "score": round(self.score, 4),
                "face_score": round(self.face_score, 4), "confirmed": self.confirmed}


_DETECTOR: MTCNN | None = None
_DETECTOR_LOCK = threading.Lock()


def detect_faces(image: Any) -> list[DetectedFace]:
    """The faces `protect` would find in an image, before protecting: confirmed faces first, numbered largest first
    as `protect(..., faces=[...])` takes them, then the detections turned down as not a face (index None)."""
    prepare_process()
    from faceveil.detect.mtcnn import MTCNN
    from faceveil.pipeline.faces import default_confirmer
    from faceveil.pipeline.job import order_faces

    global _DETECTOR
    rgb = load_pixels(image)
    with _DETECTOR_LOCK:  # one detector for the process; its callers may be threads (the web app)
        _DETECTOR = _DETECTOR or MTCNN()
        checks = default_confirmer().check(rgb, _DETECTOR.detect_large(rgb))
    confirmed = order_faces([c.face for c in checks if c.confirmed])
    verdicts = {id(c.face): c for c in checks}
    rejected = [c for c in checks if not c.confirmed]
    found = [_detected(i, verdicts[id(face)]) for i, face in enumerate(confirmed)]
    return found + [_detected(None, c) for c in sorted(rejected, key=lambda c: -c.face.size)]


def _detected(index: int | None, check: Any) -> DetectedFace:
    x1, y1, x2, y2 = (float(v) for v in check.face.box)
    return DetectedFace(index, (x1, y1, x2, y2), float(check.face.score), float(check.score), bool(check.confirmed))


def video_info(path: str | Path) -> dict[str, Any]:
    """What a video file holds (width, height, fps, frames, seconds, audio), read without decoding it; a
    FaceveilError with one line when it is not a readable video."""
    from faceveil.io.video import probe_video

    info = probe_video(path)
    return {"width": info.width, "height": info.height, "fps": float(info.fps), "frames": info.frame_count,
            "seconds": info.duration, "audio": info.has_audio}


def verdict_text(faces: Sequence[FaceCheck]) -> str:
    """One line per face, in plain words: which judges still recognise it (FaceCheck.verdict, the words every
    command prints)."""
    return "\n".join(f"face {check.face}: {check.verdict}" for check in faces) or "no face found"


def face_verdict(row: dict) -> str:
    """One face row of a JSON report (a FaceCheck's to_dict, or apply's row) in plain words."""
    from faceveil.pipeline.results import face_verdict as verdict_of

    return verdict_of(row).words


@dataclass
class ImageResult:
    """A protected (or masked) image in memory and what the judges say about each of its faces."""

    image: np.ndarray  # H x W x 3 uint8 RGB
    faces: list[FaceCheck]

    @property
    def verdict(self) -> str:
        return verdict_text(self.faces)

    @property
    def protected(self) -> bool:
        """Every face found and checked, and none recognised by any judge."""
        return bool(self.faces) and all(check.protected for check in self.faces)

    @property
    def summary(self) -> str:
        """The whole image in one line, as the terminal table and the JSON report say it."""
        from faceveil.pipeline.results import photo_verdict

        return photo_verdict([check.to_dict() for check in self.faces])[1] if self.faces else "no face found"

    def pil(self) -> Image.Image:
        from PIL import Image

        return Image.fromarray(self.image)

    def save(self, path: str | Path, *, jpeg_quality: int = DEFAULT_JPEG_QUALITY) -> Path:
        """Write atomically in the format of the file name's extension (.jpg, .png, .heic, .avif, ...), without
        metadata."""
        from faceveil.io.images import write_image

        return write_image(self.image, path, jpeg_quality=jpeg_quality)


class Protector:
    """Protects image after image with one set of settings; the detector and models are loaded once.

    method, strength (low | mid | high), thorough and seed are the everyday choices; `advanced` takes any other
    preset value (eps, iters, alpha, momentum, jitter, diversity, smoothing, surrogates, judges, paper_defaults) and
    job setting (faces, fmt, jpeg_quality, keep_metadata, keep_date, copy_unprotected, existing, drop_audio, verify,
    batch_faces, targets_dir, gamma, gain, server, ...)."""

    def __init__(self, *, method: str = "pgd", strength: str = "mid", thorough: bool = False, seed: int = 0,
                 **advanced: Any):
        prepare_process()
        from faceveil.pipeline import presets

        choice_fields = {f.name for f in dataclasses.fields(presets.ProtectChoices)}
        choices = {k: v for k, v in advanced.items() if k in choice_fields}
        job = {k: v for k, v in advanced.items() if k not in choice_fields}
        self.settings = presets.protect_settings(
            presets.ProtectChoices(method=method, strength=strength, thorough=thorough, seed=seed, **choices), **job)
        self._job = None

    @classmethod
    def from_settings(cls, settings: ProtectSettings) -> Protector:
        """A Protector with the photo job's settings as they are (the CLI resolves them from its flags)."""
        protector = cls.__new__(cls)
        protector.settings, protector._job = settings, None
        return protector

    def _protector(self) -> PhotoProtector:
        from faceveil.pipeline.protect import PhotoProtector

        if self._job is None:
            self._job = PhotoProtector(self.settings, None)
        return self._job

    @contextlib.contextmanager
    def _choosing(self, faces: str | Sequence[int] | None) -> Iterator[PhotoProtector]:
        """The job, with this call's face selection in place of the settings' (restored after)."""
        job = self._protector()
        if faces is None:
            yield job
            return
        kept = self.settings.faces
        self.settings.faces = faces if isinstance(faces, str) else list(faces)
        try:
            yield job
        finally:
            self.settings.faces = kept

    def protect(self, image: Any, *, faces: str | Sequence[int] | None = None) -> ImageResult:
        """One image protected in memory; its faces checked by the judges (unless verify=False). faces: this call's
        selection (all | largest | N | face indices as detect_faces numbers them); None: the settings'."""
        rgb = load_pixels(image)
        with self._choosing(faces) as job:
            done = job.protect_array(rgb)
        faces = []
        if self.settings.verify and done.faces:
            targets = job.target_rows(done.perturbation) if done.perturbation is not None else None
            faces = job.check(rgb, done.rgb, done.faces, targets)
        return ImageResult(done.rgb, faces)

    def protect_files(self, inputs: Iterable[str | Path], out_dir: str | Path, *, recursive: bool = False,
                      report_path: str | Path | None = None, progress: bool = True,
                      header: dict | None = None, faces: str | Sequence[int] | None = None,
                      on_frame: FrameProgress | None = None) -> BatchReport:
        """Every photo and video of `inputs` (files or folders) protected into out_dir under the same names (never
        over an input, never over a file this run did not make unless existing="overwrite"; existing="skip"
        resumes a batch); one bad file is one error row, never the end of the run. The inputs and the output
        folder are checked before any model is loaded. faces: this call's selection (as in `protect`; face indices
        apply to every photo). on_frame: called as each video frame is written."""
        from faceveil.pipeline.job import plan_files, run_on_files

        plan = plan_files(inputs, out_dir, self.settings, recursive=recursive)
        with self._choosing(faces) as job:
            job.on_frame = on_frame
            return run_on_files(job, plan, out_dir, report_path=report_path, progress=progress,
                                desc="protect", header=header)

    def protect_items(self, items: Sequence[BatchItem], out_dir: str | Path) -> BatchReport:
        """Inputs already expanded (a distributed engine's share of a run: faceveil.distributed) protected into
        out_dir as protect_files would, the faces of consecutive items optimised together; no report file, no bar."""
        from faceveil.pipeline.batch import run_batch

        job = self._protector()
        job.out_dir = Path(out_dir)
        job.plan(list(items))
        return run_batch(items, job, quiet=True, desc="protect")


def protect(image: Any, *, method: str = "pgd", strength: str = "mid", thorough: bool = False, seed: int = 0,
            **advanced: Any) -> ImageResult:
    """One image protected in memory (see Protector for the settings); `.save(path)` writes it."""
    return Protector(method=method, strength=strength, thorough=thorough, seed=seed, **advanced).protect(image)


def protect_files(inputs: Iterable[str | Path], out_dir: str | Path, *, recursive: bool = False,
                  report_path: str | Path | None = None, progress: bool = True, header: dict | None = None,
                  **settings: Any) -> BatchReport:
    """Photos and videos (files or folders) protected into out_dir: what `faceveil protect` runs."""
    return Protector(**settings).protect_files(inputs, out_dir, recursive=recursive, report_path=report_path,
                                               progress=progress, header=header)


def enroll(photos: Sequence[str | Path], *, name: str, method: str = "opom-convex", seed: int = 0,
           progress: bool = False, **settings: Any) -> PersonMask:
    """One person's mask learned from a few photos of them (the largest face of each); `.save(path)` writes the
    .fvmask file. `settings`: surrogates, masks, mode and the attack budget (eps, alpha, iters, norm, momentum,
    dropout, jitter: 0..255 units as on the command line)."""
    prepare_process()
    from faceveil.pipeline.person import enroll as enroll_job
    from faceveil.pipeline.person import enroll_settings

    config = enroll_settings(name=name, method=method, seed=seed, **settings)
    return enroll_job([Path(p) for p in photos], config, progress=progress).mask


def apply(mask: PersonMask | str | Path, image: Any, *, all_faces: bool = False, mask_index: int = 0,
          judges: Sequence[str] | None = None, verify: bool = True) -> ImageResult:
    """A person's mask pasted on their faces in one image (every face with all_faces), checked by the judges."""
    prepare_process()
    from faceveil.models import zoo
    from faceveil.pipeline.maskfile import PersonMask
    from faceveil.pipeline.person import ApplySettings, MaskApplier
    from faceveil.pipeline.verify import verify_arrays

    if not isinstance(mask, PersonMask):
        mask = PersonMask.load(mask)
    rgb = load_pixels(image)
    applier = MaskApplier(mask, ApplySettings(all_faces=all_faces, mask_index=mask_index))
    faces = applier.select(rgb, applier.find_faces(rgb)[0])
    out = applier.apply_faces(rgb, faces)
    checks = verify_arrays(rgb, out, faces, list(judges or zoo.SPECS), applier.detector) if verify else []
    return ImageResult(out, checks)


def apply_files(mask: PersonMask | str | Path, inputs: Iterable[str | Path], out_dir: str | Path, *,
                all_faces: bool = False, mask_index: int = 0, recursive: bool = False,
                report_path: str | Path | None = None, progress: bool = True, header: dict | None = None,
                on_frame: FrameProgress | None = None, **output: Any) -> BatchReport:
    """A person's mask pasted on their faces in every photo and video of `inputs`, written into out_dir, and every
    masked face of a saved photo checked by the judges: what `faceveil apply` runs. `output`: fmt, jpeg_quality,
    keep_metadata, keep_date, copy_unprotected, existing (refuse | overwrite | skip), drop_audio, verify (default
    True), judges (default all). on_frame(video, frames written, frames in all): called as each video frame is
    written (a page's progress bar)."""
    prepare_process()
    from faceveil.pipeline.job import plan_files, run_on_files
    from faceveil.pipeline.maskfile import PersonMask
    from faceveil.pipeline.person import ApplySettings, MaskApplier

    if not isinstance(mask, PersonMask):
        mask = PersonMask.load(mask)
    settings = ApplySettings(all_faces=all_faces, mask_index=mask_index, **output)
    plan = plan_files(inputs, out_dir, settings, recursive=recursive)
    job = MaskApplier(mask, settings)
    job.on_frame = on_frame
    return run_on_files(job, plan, out_dir, report_path=report_path, progress=progress, desc="apply",
                        header=header)


def verify(original: Any, protected: Any, *, judges: Sequence[str] | None = None,
           faces: str = "all", frames: int = 8) -> list[FaceCheck] | list[FrameCheck]:
    """Each face of the original found again in the protected image, and whether each judge model still
    recognises it (a photo protected by any tool): a list of FaceCheck.

    A protected video (a path with a video suffix: .mp4, .mov, ...): `frames` frames sampled evenly over it (the
    middle frame of each of `frames` equal stretches), and a list of FrameCheck, one per sampled frame:
    FrameCheck.frame is the frame index (0 = first), FrameCheck.faces the FaceChecks of that frame (empty when the
    original frame shows no face), FrameCheck.verdict its words. The original is then either the original video
    (each frame checked against the same frame of it, faces paired by position as for photos) or a photo of the
    person (each judge scores the face of the frame it finds most alike). A video original needs a video
    protected."""
    prepare_process()
    from faceveil.detect.mtcnn import MTCNN
    from faceveil.io.paths import is_video_path
    from faceveil.models import zoo
    from faceveil.pipeline.verify import original_faces, verify_arrays, verify_video

    detector = MTCNN()

    def chosen_faces(image: np.ndarray) -> list:
        return original_faces(image, detector, faces)

    videos = [x for x in (original, protected) if isinstance(x, (str, Path)) and is_video_path(Path(x))]
    if videos:
        if not isinstance(original, (str, Path)) or not isinstance(protected, (str, Path)):
            raise FaceveilError("verify: a video is checked from files: give both the original and the protected as "
                                "paths")
        return verify_video(Path(original), Path(protected), list(judges or zoo.SPECS), detector, chosen_faces,
                            frames)
    before, after = load_pixels(original), load_pixels(protected)
    return verify_arrays(before, after, chosen_faces(before), list(judges or zoo.SPECS), detector)

