"""The photo job behind `faceveil protect` and `faceveil demo`: read, detect, optimise every selected face through
paste-back and 8-bit rounding, paste, write atomically, then re-read the saved file, re-detect, re-align and report
what each judge model now sees (similarity original -> protected, and whether it still matches)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from faceveil.attacks.core import AttackConfig, Ensemble, listening
from faceveil.attacks.faces import FaceBatch, from_photos
from faceveil.detect.mtcnn import Face
from faceveil.io.images import read_image
from faceveil.methods import registry
from faceveil.methods.base import MethodOptions, Perturbation
from faceveil.methods.targets import DEFAULT_MAX_TARGETS, load_targets
from faceveil.models import zoo
from faceveil.pipeline.batch import BatchItem
from faceveil.pipeline.job import (
    FaceChoice,
    OutputSettings,
    PhotoJob,
    PreparedPhoto,
    paste_faces,
    select_faces,
    with_skipped,
)
from faceveil.pipeline.results import FaceCheck
from faceveil.pipeline.verify import verify_arrays

# The share of a photo's time that its optimisation takes (the rest: writing and checking it): how far the progress
# bar has moved through a group of photos when their optimisation ends.
OPTIMISE_SHARE = 0.8


@dataclass
class ProtectSettings(OutputSettings):
    method: str = "pgd"
    surrogates: list[str] = field(default_factory=lambda: ["mobileface", "mfn512"])
    judges: list[str] = field(default_factory=lambda: list(zoo.SPECS))
    attack: AttackConfig = field(default_factory=AttackConfig)
    faces: FaceChoice = "all"  # all | largest | N (the N largest) | face indices, largest first
    verify: bool = True
    # targeted methods (TIP-IM and its baselines)
    gamma: float = 0.0  # weight of TIP-IM's MMD naturalness term (tip_im.DEFAULT_GAMMA)
    gain: str = "g"  # g | g1 | g2 | rand
    targets_dir: Path | None = None  # None: the faces in the sample photos
    max_targets: int = DEFAULT_MAX_TARGETS
    best_of_targets: bool = False  # single-target methods: try every target, keep the best (paper protocol)
    # APF: the server URL (method apf), the client's gradient algorithm (None = the one the server was trained on),
    # the Eq. 13 feature offset, and the probe model that computes g on the device
    server: str | None = None
    apf_algorithm: str | None = None
    apf_offset: bool = False
    apf_probe: str = "mobileface"
    batch_faces: int = 16  # faces of consecutive photos optimised together (1: every photo alone)

    def method_options(self) -> MethodOptions:
        return MethodOptions(gamma=self.gamma, gain=self.gain, max_targets=self.max_targets,
                             best_of_targets=self.best_of_targets, server=self.server,
                             apf_algorithm=self.apf_algorithm, apf_offset=self.apf_offset, apf_probe=self.apf_probe,
                             seed=self.attack.seed)


@dataclass
class ArrayProtection:
    """One photo protected in memory: the protected pixels, the faces protected (largest first) and the method's
    result (the perturbations, and targets for targeted methods)."""

    rgb: np.ndarray
    faces: list[Face]
    perturbation: Perturbation | None


class PhotoProtector(PhotoJob):
    """Holds the detector, the surrogate ensemble and the settings across a batch of photos.

    Given the run's items (`upcoming`), the faces of consecutive photos are optimised together, up to
    settings.batch_faces faces: the surrogates' convolutions cost less per face in a batch (measured 2.8 s for one
    face alone, 1.2 s per face among 16). Each photo is still pasted, written and verified on its own, and reports
    its own result or error when the run reaches it; a photo's faces always stay in one batch."""

    def __init__(self, settings: ProtectSettings, out_dir: Path | None, upcoming: list[BatchItem] | None = None):
        super().__init__(settings, out_dir)
        self.settings = settings
        entry = registry.check_kind(settings.method, "image", "end-cloud")
        # an end-cloud client needs only its probe model (the server models never run here)
        self.ensemble = Ensemble([settings.apf_probe] if entry.kind == "end-cloud" else settings.surrogates)
        self.targets = load_targets(settings.targets_dir, self.detector, self.ensemble) if entry.targeted else None
        self.method = registry.image_method(settings.method, settings.method_options(), self.targets)
        self.plan(upcoming or [])
        self.batches: list[int] = []  # faces optimised together, batch by batch (bench protect's floor)

    def plan(self, upcoming: list[BatchItem]) -> None:
        """The run's items: the faces of consecutive photos among them are optimised together."""
        self._upcoming = [i for i in upcoming if i.kind == "image"]
        self._position = {i.path: k for k, i in enumerate(self._upcoming)}
        self._ready: dict[Path, PreparedPhoto] = {}  # read and detected ahead, not in a batch yet
        self._outcomes: dict[Path, dict | Exception] = {}  # done with an earlier photo's batch

    def select(self, rgb: np.ndarray, faces: list[Face]) -> list[Face]:
        return select_faces(faces, self.settings.faces)

    def photo(self, item: BatchItem) -> dict:
        if item.path in self._outcomes:
            return _raise_or_return(self._outcomes.pop(item.path))
        first = self._prepare(item)
        if not first.faces:
            chosen = not isinstance(self.settings.faces, str)  # an empty selection of indices
            return self.unprotected(first, "no face chosen" if chosen else "no face found")
        group = [first, *self._companions(item, len(first.faces))]
        self._protect_together(group)
        return _raise_or_return(self._outcomes.pop(item.path))

    def take_finished(self) -> list[tuple[Path, dict | Exception]]:
        """The photos finished ahead of their turn (optimised with an earlier photo): reported as soon as they
        are written, also when the run is interrupted before it reaches them."""
        finished = [(path, self.with_conversion(path, outcome)) for path, outcome in self._outcomes.items()]
        self._outcomes.clear()
        return finished

    def _prepare(self, item: BatchItem) -> PreparedPhoto:
        return self._ready.pop(item.path) if item.path in self._ready else self.prepare(item)

    def _companions(self, item: BatchItem, faces: int) -> list[PreparedPhoto]:
        """The photos after `item` whose faces join its batch (up to batch_faces faces in all). Photos without a
        face, or that fail to read, get their outcome now and report it when the run reaches them."""
        group: list[PreparedPhoto] = []
        start = self._position.get(item.path)
        for later in self._upcoming[start + 1:] if start is not None else []:
            if faces >= self.settings.batch_faces:
                break
            try:
                prepared = self._prepare(later)
                if not prepared.faces:
                    self._outcomes[later.path] = {**self.unprotected(prepared, "no face found"),
                                                  "seconds": prepared.seconds}
                    continue
            except Exception as exc:  # this photo's own error, reported in its turn
                self._outcomes[later.path] = exc
                continue
            if faces + len(prepared.faces) > self.settings.batch_faces:
                self._ready[later.path] = prepared  # heads the next batch
                break
            group.append(prepared)
            faces += len(prepared.faces)
        return group

    def _protect_together(self, group: list[PreparedPhoto]) -> None:
        """One optimisation for every face of the group, then each photo pasted, written and verified; each
        photo's outcome is kept (self._outcomes) as soon as it is written."""
        start = time.perf_counter()
        try:
            marks = [f.landmarks for p in group for f in p.faces]
            photos = [p.photo.rgb for p in group for _ in p.faces]
            # the bar moves per optimisation step: the group's photos are OPTIMISE_SHARE done when it ends
            steps = listening(lambda done, total: self.report_progress(OPTIMISE_SHARE * len(group) * done / total))
            with self.stages.timing("optimise"), steps:
                delta, result = self.optimise(from_photos(photos, marks, self.ensemble.geometries, "photos"))
        except Exception as exc:
            for prepared in group:
                self._outcomes[prepared.item.path] = exc
            return
        self.batches.append(len(marks))
        seconds_per_face = (time.perf_counter() - start) / len(marks)
        self.report_progress(OPTIMISE_SHARE * len(group))
        targets = self._target_rows(result) if result is not None else None
        first = 0
        for prepared in group:
            faces = slice(first, first + len(prepared.faces))
            first = faces.stop
            outcome: dict | Exception
            finish = time.perf_counter()
            try:
                outcome = self._finish(prepared, delta[faces], None if targets is None else targets[faces],
                                       seconds_per_face, (len(group), len(marks)))
                # its own share of the batch: its reading, its faces' part of the optimisation, its writing and
                # checking, so that the rows of a batch add up to its time
                outcome["seconds"] = (prepared.seconds + seconds_per_face * len(prepared.faces)
                                      + time.perf_counter() - finish)
            except Exception as exc:
                outcome = exc
            self._outcomes[prepared.item.path] = outcome

    def _finish(self, prepared: PreparedPhoto, delta: torch.Tensor, targets: list[dict] | None,
                seconds_per_face: float, batch: tuple[int, int]) -> dict:
        """Paste each face's perturbation, write the photo atomically, and verify it."""
        self.write(prepared, delta)
        details: dict = {"seconds_per_face": seconds_per_face, "faces": []}
        if batch[0] > 1:
            details["batch"] = {"photos": batch[0], "faces": batch[1]}
        if self.settings.verify:
            with self.stages.timing("verify"):
                checks = self.verify(prepared.item.path, prepared.out_path, prepared.faces, targets)
            details["faces"] = [check.to_dict() for check in checks]
        elif targets is not None:
            details["faces"] = [{"face": i, "target": t} for i, t in enumerate(targets)]
        return {"status": "ok", "faces": len(prepared.faces), "output": prepared.out_path,
                "details": with_skipped(details, prepared.skipped)}

    def protect_array(self, rgb: np.ndarray) -> ArrayProtection:
        """One photo's pixels protected in memory (no file written): every selected face optimised together."""
        faces = self.select(rgb, self.find_faces(rgb)[0])
        if not faces:
            return ArrayProtection(rgb.copy(), [], None)
        batch = from_photos([rgb] * len(faces), [f.landmarks for f in faces], self.ensemble.geometries, "photos")
        result = self.method(batch, self.ensemble, self.settings.attack)
        return ArrayProtection(paste_faces(rgb, faces, result.delta), faces, result)

    def optimise(self, batch: FaceBatch) -> tuple[torch.Tensor, Perturbation | None]:
        """The perturbation [B,3,256,256], and for targeted methods the full result (chosen targets)."""
        result = self.method(batch, self.ensemble, self.settings.attack)
        return result.delta, (result if result.targeted else None)

    def _target_rows(self, result: Perturbation) -> list[dict]:
        """Per face: the chosen target identity and for how many iterations it was the one aimed at."""
        return [{"identity": name, "chosen_steps": int((result.history[:, i] == index).sum()),
                 "steps": int(result.history.shape[0])}
                for i, (name, index) in enumerate(zip(result.targets, result.target_index, strict=True))]

    def video(self, item: BatchItem) -> dict:
        """Each tracked face gets its mask optimised once, on the frame where the track is first seen, and that
        mask follows the face through the warp on every later frame (a per-track mask: no per-frame optimisation)."""
        masks: dict[int, torch.Tensor] = {}

        def delta_for_track(track, frame: np.ndarray) -> torch.Tensor:
            if track.id not in masks:
                batch = from_photos([frame], [track.landmarks], self.ensemble.geometries, "photos")
                masks[track.id] = self.optimise(batch)[0][0]
            return masks[track.id]

        out_path, stats = self.write_video(item, delta_for_track)
        details = {"frames": stats.get("frames"), "tracks": len(masks), "fps": stats.get("fps")}
        if not stats.get("pasted"):
            return {**self.unprotected_video(stats, "no face found in the video", details), "output": out_path}
        return {"status": "ok", "faces": len(masks), "output": out_path, "details": details}

    def verify(self, original: Path, saved: Path, faces: list[Face],
               targets: list[dict] | None = None) -> list[FaceCheck]:
        """Re-read both files, re-detect, re-align: each judge's score original -> protected per face."""
        return self.check(read_image(original).rgb, read_image(saved).rgb, faces, targets)

    def check(self, before: np.ndarray, after: np.ndarray, faces: list[Face],
              targets: list[dict] | None = None) -> list[FaceCheck]:
        """Each judge's score original -> protected per face, and with targets (the chosen identity per face),
        each surrogate's score protected -> that target identity."""
        centres = None
        if targets is not None and self.targets is not None:
            index = {name: i for i, name in enumerate(self.targets.names)}
            centres = [{m: c[index[t["identity"]]] for m, c in self.targets.centres.items()} for t in targets]
        checks = verify_arrays(before, after, faces, self.settings.judges, self.detector, centres)
        for check, target in zip(checks, targets or [], strict=False):
            check.target = {**target, **(check.target or {})}
        return checks

    def target_rows(self, result: Perturbation) -> list[dict] | None:
        return self._target_rows(result) if result.targeted else None


def _raise_or_return(outcome: dict | Exception) -> dict:
    if isinstance(outcome, Exception):
        raise outcome
    return outcome
