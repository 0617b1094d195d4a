"""The photo job behind `faceveil protect` and `faceveil demo`: read, detect, optimise every selected face through
paste-back and 8-bit rounding, paste, write atomically, then re-read the saved file, re-detect, re-align and report
what each judge model now sees (similarity original -> protected, and whether it still matches)."""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from faceveil.attacks.core import AttackConfig, Ensemble
from faceveil.attacks.faces import FaceBatch, from_photos
from faceveil.detect import canonical as C
from faceveil.detect.align import align
from faceveil.detect.mtcnn import MTCNN, Face, match_face
from faceveil.errors import FaceveilError
from faceveil.io.images import Photo, read_image, write_image
from faceveil.methods.targets import DEFAULT_MAX_TARGETS, TargetedResult, TargetSet, load_targets
from faceveil.models import zoo
from faceveil.pipeline.batch import BatchItem

# A method returns the perturbation, or (targeted methods) the perturbation with each face's chosen target.
Method = Callable[[FaceBatch, Ensemble, AttackConfig], torch.Tensor | TargetedResult]
TARGETED_METHODS = ("tip-im", "center-opt", "mim", "dim", "mt-dim", "single-target")
# APF (end-cloud): "apf" sends only the probe gradient g to a `faceveil serve` server; "apf-local" runs both halves here
APF_METHODS = ("apf", "apf-local")
METHODS = ("pgd", *TARGETED_METHODS)


@dataclass
class ProtectSettings:
    method: str = "pgd"
    surrogates: list[str] = field(default_factory=lambda: ["mobileface", "mfn512"])
    judges: list[str] = field(default_factory=lambda: list(zoo.SPECS))
    attack: AttackConfig = field(default_factory=AttackConfig)
    faces: str = "all"  # all | largest | N (the N largest)
    fmt: str = "same"
    jpeg_quality: int = 95
    keep_metadata: bool = False
    copy_unprotected: bool = False
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


def select_faces(faces: list[Face], which: str) -> list[Face]:
    """Largest first; 'all', 'largest' or a count N."""
    ordered = sorted(faces, key=lambda f: -f.size)
    if which == "all":
        return ordered
    if which == "largest":
        return ordered[:1]
    if which.isdigit() and int(which) > 0:
        return ordered[: int(which)]
    raise FaceveilError(f"--faces takes all, largest or a positive number, got {which!r}")


def method_function(name: str, settings: ProtectSettings | None = None, target_set: TargetSet | None = None) -> Method:
    if name == "pgd":
        from faceveil.methods import pgd

        return pgd.protect
    if name in TARGETED_METHODS:
        if target_set is None:
            raise FaceveilError(f"method {name!r} needs a target set")
        return _targeted_method(name, settings or ProtectSettings(method=name), target_set)
    if name in APF_METHODS:
        return _apf_method(name, settings or ProtectSettings(method=name))
    raise FaceveilError(f"unknown method {name!r}; known: {', '.join(METHODS + APF_METHODS)}")


def _targeted_method(name: str, s: ProtectSettings, target_set: TargetSet) -> Method:
    from faceveil.methods import baselines, tip_im

    if s.gain not in tip_im.GAINS:
        raise FaceveilError(f"--gain takes {', '.join(tip_im.GAINS)}, got {s.gain!r}")
    options = tip_im.TipImOptions(gamma=s.gamma, gain="g1" if name == "center-opt" else s.gain,
                                  max_targets=s.max_targets)
    if name in ("tip-im", "center-opt"):
        return lambda batch, ensemble, cfg: tip_im.protect(batch, ensemble, cfg, target_set, options)
    if name == "mt-dim":
        return lambda batch, ensemble, cfg: baselines.mt_dim(batch, ensemble, cfg, target_set, options)
    single = {"mim": baselines.mim, "dim": baselines.dim, "single-target": baselines.single_target}[name]
    return lambda batch, ensemble, cfg: single(batch, ensemble, cfg, target_set, options, best_of=s.best_of_targets)


def _apf_method(name: str, s: ProtectSettings) -> Method:
    """APF's user end: the probe gradient g of each detected, aligned face; s from the server (apf) or from the
    packaged server networks in this process (apf-local); the canonical noise is pasted back by the caller.
    The client's eps is the server's: g must lie in the eps-ball the server networks were trained for."""
    from faceveil.methods.apf.probe import probe as apf

    if name == "apf-local":
        from faceveil.methods.apf.networks import load_server_model

        model = load_server_model()
        return apf.local_method(model, _apf_client_config(s, model.eps, model.meta))
    if not s.server:
        raise FaceveilError("--method apf needs --server URL (a `faceveil serve` address); --method apf-local runs "
                            "the server networks here instead")
    from faceveil.methods.apf.client import NoiseClient
    from faceveil.methods.apf.networks import APF_GRID

    client = NoiseClient(s.server)
    health = client.health()
    if health["grid"] != APF_GRID:
        raise FaceveilError(f"the APF server at {s.server} works on a {health['grid']} px grid, this client on "
                            f"{APF_GRID} px: versions differ ({health.get('version')})")
    cfg = _apf_client_config(s, health["eps"], health.get("model") or {})
    return lambda batch, _ensemble, _attack: apf.to_canonical(client.noise(apf.probe_gradient(batch, cfg)))


def _apf_client_config(s: ProtectSettings, eps: float, meta: dict):
    """The client settings: the server's eps, and unless given, the gradient algorithm it was trained on."""
    from faceveil.methods.apf.probe import probe as apf

    algorithm = s.apf_algorithm or meta.get("algorithm") or apf.ApfClientConfig.algorithm
    probe = meta.get("probe", s.apf_probe)
    if probe != s.apf_probe:
        raise FaceveilError(f"the APF server networks were trained for probe {probe!r}, this client uses "
                            f"{s.apf_probe!r}")
    return apf.ApfClientConfig(algorithm=algorithm, eps=float(eps), offset=s.apf_offset, seed=s.attack.seed,
                               probe=s.apf_probe).validate()


@dataclass
class StageSeconds:
    """Wall seconds per stage of the photo job (read, detect, optimise, paste, write, verify), summed over the
    photos since the last `clear`: where a run's time went (`bench protect` reports it per face)."""

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
    """A photo read and its faces detected and selected: ready for optimisation."""

    item: BatchItem
    photo: Photo
    faces: list[Face]
    out_path: Path


class PhotoProtector:
    """Holds the detector, the surrogate ensemble and the settings across a batch of photos.

    Given the run's items (`upcoming`), the faces of consecutive photos are optimised together, up to
    settings.batch_faces faces: the surrogates' convolutions cost less per face in a batch (measured 2.8 s for one
    face alone, 1.2 s per face among 16). Each photo is still pasted, written and verified on its own, and reports
    its own result or error when the run reaches it; a photo's faces always stay in one batch."""

    def __init__(self, settings: ProtectSettings, out_dir: Path, upcoming: list[BatchItem] | None = None):
        self.settings = settings
        self.out_dir = Path(out_dir)
        self.detector = MTCNN()
        # APF's client needs only its probe model (the server models never run here)
        self.ensemble = Ensemble([settings.apf_probe] if settings.method in APF_METHODS else settings.surrogates)
        self.targets = (load_targets(settings.targets_dir, self.detector, self.ensemble)
                        if settings.method in TARGETED_METHODS else None)
        self.method = method_function(settings.method, settings, self.targets)
        self._upcoming = [i for i in upcoming or [] if i.kind == "image"]
        self._position = {i.path: k for k, i in enumerate(self._upcoming)}
        self._ready: dict[Path, PreparedPhoto] = {}  # read and detected ahead, not in a batch yet
        self._outcomes: dict[Path, dict | Exception] = {}  # done with an earlier photo's batch
        self.batches: list[int] = []  # faces optimised together, batch by batch (bench protect's floor)
        self.stages = StageSeconds()

    def __call__(self, item: BatchItem) -> dict:
        if item.kind == "video":
            return self.protect_video(item)
        if item.path in self._outcomes:
            return _raise_or_return(self._outcomes.pop(item.path))
        first = self._prepare(item)
        if not first.faces:
            return self._no_face(first)
        group = [first, *self._companions(item, len(first.faces))]
        outcomes = self._protect_together(group)
        for prepared, outcome in zip(group[1:], outcomes[1:], strict=True):
            self._outcomes[prepared.item.path] = outcome
        return _raise_or_return(outcomes[0])

    def _prepare(self, item: BatchItem) -> PreparedPhoto:
        if item.path in self._ready:
            return self._ready.pop(item.path)
        with self.stages.timing("read"):
            photo = read_image(item.path)
        with self.stages.timing("detect"):
            faces = select_faces(self.detector.detect_large(photo.rgb), self.settings.faces)
        return PreparedPhoto(item, photo, faces, item.output_path(self.out_dir, self.settings.fmt))

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
                    self._outcomes[later.path] = self._no_face(prepared)
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

    def _protect_together(self, group: list[PreparedPhoto]) -> list[dict | Exception]:
        """One optimisation for every face of the group, then each photo pasted, written and verified."""
        start = time.perf_counter()
        try:
            marks = [f.landmarks for p in group for f in p.faces]
            photos = [p.photo.rgb for p in group for _ in p.faces]
            with self.stages.timing("optimise"):
                delta, result = self.optimise(from_photos(photos, marks, self.ensemble.geometries, "photos"))
        except Exception as exc:
            return [exc] * len(group)
        self.batches.append(len(marks))
        seconds_per_face = (time.perf_counter() - start) / len(marks)
        targets = self._target_rows(result) if result is not None else None
        outcomes: list[dict | Exception] = []
        first = 0
        for prepared in group:
            faces = slice(first, first + len(prepared.faces))
            first = faces.stop
            try:
                outcomes.append(self._finish(prepared, delta[faces], None if targets is None else targets[faces],
                                             seconds_per_face, (len(group), len(marks))))
            except Exception as exc:
                outcomes.append(exc)
        return outcomes

    def _finish(self, prepared: PreparedPhoto, delta: torch.Tensor, targets: list[dict] | None,
                seconds_per_face: float, batch: tuple[int, int]) -> dict:
        """Paste each face's perturbation into one copy of the photo (the original array stays untouched),
        write it atomically, and verify it."""
        s, faces = self.settings, prepared.faces
        with self.stages.timing("paste"):
            protected = prepared.photo.rgb.copy()
            for face, d in zip(faces, delta, strict=True):
                C.paste_into(protected, face.landmarks, d)
        with self.stages.timing("write"):
            write_image(dataclasses.replace(prepared.photo, rgb=protected), prepared.out_path, fmt=s.fmt,
                        jpeg_quality=s.jpeg_quality, keep_metadata=s.keep_metadata)
        details: dict = {"seconds_per_face": seconds_per_face, "faces": []}
        if batch[0] > 1:
            details["batch"] = {"photos": batch[0], "faces": batch[1]}
        if s.verify:
            with self.stages.timing("verify"):
                details["faces"] = self.verify(prepared.item.path, prepared.out_path, faces, targets)
        elif targets is not None:
            details["faces"] = [{"face": i, "target": t} for i, t in enumerate(targets)]
        return {"status": "ok", "faces": len(faces), "output": prepared.out_path, "details": details}

    def _no_face(self, prepared: PreparedPhoto) -> dict:
        s = self.settings
        if s.copy_unprotected:
            write_image(prepared.photo, prepared.out_path, fmt=s.fmt, jpeg_quality=s.jpeg_quality,
                        keep_metadata=s.keep_metadata)
            return {"status": "no_face", "message": "no face found; copied unprotected", "output": prepared.out_path}
        return {"status": "no_face", "message": "no face found; nothing written (see --copy-unprotected)"}

    def optimise(self, batch: FaceBatch) -> tuple[torch.Tensor, TargetedResult | None]:
        """The perturbation [B,3,256,256], and for targeted methods the full result (chosen targets)."""
        result = self.method(batch, self.ensemble, self.settings.attack)
        return (result.delta, result) if isinstance(result, TargetedResult) else (result, None)

    def _target_rows(self, result: TargetedResult) -> list[dict]:
        """Per face: the chosen target identity and for how many iterations it was the one aimed at."""
        return [{"identity": name, "chosen_steps": int((result.history[:, i] == index).sum()),
                 "steps": int(result.history.shape[0])}
                for i, (name, index) in enumerate(zip(result.targets, result.target_index, strict=True))]

    def protect_video(self, item: BatchItem) -> dict:
        """Each tracked face gets its mask optimised once, on the frame where the track is first seen, and that
        mask follows the face through the warp on every later frame (a per-track mask: no per-frame optimisation)."""
        from faceveil.pipeline.video import protect_video

        masks: dict[int, torch.Tensor] = {}

        def delta_for_track(track, frame: np.ndarray) -> torch.Tensor:
            if track.id not in masks:
                batch = from_photos([frame], [track.landmarks], self.ensemble.geometries, "photos")
                masks[track.id] = self.optimise(batch)[0][0]
            return masks[track.id]

        out_path = item.output_path(self.out_dir)
        stats = protect_video(item.path, out_path, delta_for_track, progress=False,
                              keep_metadata=self.settings.keep_metadata)
        return {"status": "ok" if masks else "no_face", "faces": len(masks), "output": out_path,
                "details": {"frames": stats.get("frames"), "tracks": len(masks), "fps": stats.get("fps")}}

    def verify(self, original: Path, saved: Path, faces: list[Face], targets: list[dict] | None = None) -> list[dict]:
        """Re-read both files, re-detect, re-align: each judge's score original -> protected per face, and with
        targets, each surrogate's score protected -> chosen target identity."""
        centres = None
        if targets is not None and self.targets is not None:
            index = {name: i for i, name in enumerate(self.targets.names)}
            centres = [{m: c[index[t["identity"]]] for m, c in self.targets.centres.items()} for t in targets]
        rows = verify_faces(original, saved, faces, self.settings.judges, self.detector, centres)
        for row, target in zip(rows, targets or [], strict=False):
            row["target"] = {**target, **row.pop("target_scores", {})}
        return rows


def _raise_or_return(outcome: dict | Exception) -> dict:
    if isinstance(outcome, Exception):
        raise outcome
    return outcome


@torch.no_grad()
def verify_faces(original: Path, saved: Path, faces: list[Face], judges: list[str], detector: MTCNN,
                 target_centres: list[dict[str, torch.Tensor]] | None = None) -> list[dict]:
    """Per face: each judge's score original -> protected; with target_centres (per face, model -> identity
    centre embedding), also 'target_scores': each of those models' score protected -> target."""
    before = read_image(original).rgb
    after = read_image(saved).rgb
    found_after = detector.detect_large(after)
    rows = []
    for i, face in enumerate(faces):
        again = match_face(face, found_after)
        row: dict = {"face": i, "box": [round(float(v), 1) for v in face.box], "redetected": again is not None}
        if again is not None:
            for name in judges:
                model = zoo.load(name)
                g = model.spec.geometry
                crops = np.stack([align(before, face.landmarks, g), align(after, again.landmarks, g)])
                emb = zoo.embed_crops(model, crops)
                score = float(model.score(emb[:1], emb[1:])[0])
                row[name] = {"score": round(score, 4), "matches": score >= zoo.threshold(name)}
            if target_centres is not None:
                row["target_scores"] = _target_scores(after, again, target_centres[i])
        rows.append(row)
    return rows


def _target_scores(photo: np.ndarray, face: Face, centres: dict[str, torch.Tensor]) -> dict:
    """Each model's similarity of the (re-detected, re-aligned) protected face to a target identity's centre."""
    out = {}
    for name, centre in centres.items():
        model = zoo.load(name)
        emb = zoo.embed_crops(model, align(photo, face.landmarks, model.spec.geometry)[None])
        score = float(model.score(emb, centre[None])[0])
        out[name] = {"score": round(score, 4), "matches": score >= zoo.threshold(name)}
    return out
