"""The jobs behind `faceveil enroll` and `faceveil apply` (OPOM's person-specific masks, §3 and §4.3.2-4.3.3).

enroll: detect the largest face in each of the person's photos, learn n_M canonical-space masks from them (one
optimisation for the person, or one generator pass: the person methods of faceveil.methods.registry) and store them
in a .fvmask file with the person's clean embeddings under the cheap matching models (and the surrogates), so that
apply can find the person.

apply: no optimisation at all: detect the faces of each photo or video frame, keep those that match the enrolled
person (each matching model votes: best cosine to the stored references at or above the model's calibrated
threshold; a face matches when at least half the models vote for it), and paste the mask onto them through the
canonical warp. Outputs are written atomically with metadata stripped, as protect does; then, as protect does, the
saved photo is re-read and every masked face re-detected and checked by the judges (score original -> masked).
"""

from __future__ import annotations

import datetime
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from faceveil import __version__
from faceveil.attacks.core import AttackConfig, Ensemble, dropout_setting
from faceveil.attacks.faces import FaceBatch, from_photos
from faceveil.detect import canonical as C
from faceveil.detect.align import align
from faceveil.detect.mtcnn import MTCNN, Face
from faceveil.errors import FaceveilError
from faceveil.io.images import read_image
from faceveil.methods import registry
from faceveil.methods.base import PersonMaskOptions
from faceveil.methods.opom.learners import paper_config
from faceveil.methods.opom.loss import DEFAULT_DIVERSITY_WEIGHT
from faceveil.models import zoo
from faceveil.pipeline.batch import BatchItem
from faceveil.pipeline.faces import default_confirmer
from faceveil.pipeline.job import OutputSettings, PhotoJob, paste_faces, with_skipped
from faceveil.pipeline.maskfile import PersonMask
from faceveil.pipeline.presets import ENROLL_MAX_EPS, ENROLL_MAX_MASKS, ENROLL_STRENGTHS, L2_DEFAULT_EPS
from faceveil.pipeline.results import FaceCheck
from faceveil.pipeline.verify import verify_faces

# Cheap ArcFace-112 models (a few ms a face): their references are always stored, and they decide who matches.
MATCH_MODELS = ("mobileface", "mfn512", "mfn192")
MIN_IMAGES_ADVISED = 3  # fewer and the subspace of the person is a point or a segment: warn
# fi-uap-all in enroll: the other identities are the faces of the installed sample photos (sure faces only).
MIN_SAMPLE_FACE_SCORE = 0.95
# Video: an unmatched track is looked at again every this many frames, at most this many times (a first frame
# in profile or blurred should not decide for the whole track).
RECHECK_FRAMES = 12
MAX_CHECKS = 8


# ----------------------------------------------------------------------------------------------- enroll


@dataclass
class EnrollSettings:
    name: str
    method: str = "opom-convex"
    surrogates: list[str] = field(default_factory=lambda: ["mobileface", "mfn512"])
    attack: AttackConfig = field(default_factory=paper_config)
    masks: int = 1
    diversity_weight: float = DEFAULT_DIVERSITY_WEIGHT
    mode: str = "photos"  # photos | crops


def enroll_settings(*, name: str, method: str = "opom-convex", seed: int = 0, surrogates: str | None = None,
                    eps: float | None = None, norm: str | None = None, iters: int | None = None,
                    alpha: float | None = None,
                    momentum: float | None = None, dropout: float | str | None = None, masks: int = 1,
                    diversity_weight: float | None = None, mode: str = "photos",
                    jitter: float | None = None, budget: str | None = None, ssim: float | None = None,
                    psnr: float | None = None, strength: str = "mid") -> EnrollSettings:
    """enroll's settings from a user's values (None = the preset's): eps and alpha in 0..255 units, L-inf (default
    8, OPOM's) or with norm "l2" the L2 norm of the 112x112x3 face (default 1200, AdvCloak's). The norm defaults to
    the method's paper's: L2 for AdvCloak (its generators were trained under an L2 norm; their mean mask scaled to
    an L-inf eps is peaky and mostly rounds away), L-inf for OPOM and its baselines. dropout: one DFANet rate for
    every surrogate, or "calibrated" (each its own, attacks.core.CALIBRATED_DROPOUT). budget "texture": the L-inf
    budget shaped by the person's face texture (eps its face-area mean); ssim / psnr > 0: a visibility budget,
    face-area SSIM / PSNR on the person's photos, every mask projected onto it (attacks.perceptual). The levers'
    defaults are the strength's (ENROLL_STRENGTHS: mid = ENROLL_DEFAULTS; the texture budget only under L-inf);
    values given explicitly win over them."""
    norm = norm or str(registry.check_kind(method, "person").preset.get("norm", "linf"))
    preset = _strength_preset(strength, norm, eps)
    momentum, dropout, budget, ssim, psnr = _lever_defaults(preset, norm, momentum, dropout, budget, ssim, psnr)
    iters = int(preset["iters"]) if iters is None else iters
    eps, alpha = _user_budget(preset, norm, eps, alpha, iters)
    if norm not in ("linf", "l2"):
        raise FaceveilError(f"norm takes linf or l2, got {norm!r}")
    if not 0 < eps <= ENROLL_MAX_EPS[norm]:  # a mask file above it is refused by apply as tampered
        raise FaceveilError(f"eps must be in (0, {ENROLL_MAX_EPS[norm]:g}] under {norm}, got {eps:g}")
    if not alpha > 0 or iters < 0:
        raise FaceveilError("alpha must be above 0 and iters at least 0")
    rate, per_model = dropout_setting(dropout)
    if budget not in ("linf", "texture") or (budget == "texture" and norm != "linf"):
        raise FaceveilError(f"budget takes linf or texture (texture shapes an L-inf budget), got {budget!r} with "
                            f"norm {norm}")
    if not 0 <= ssim < 1 or psnr < 0:
        raise FaceveilError(f"ssim must be in [0, 1) and psnr at least 0 (0 = off), got {ssim} and {psnr}")
    if not 1 <= masks <= ENROLL_MAX_MASKS:
        raise FaceveilError(f"masks must be in 1..{ENROLL_MAX_MASKS}, got {masks}")
    attack = paper_config(seed)
    # L2 budgets are given at the 112-crop scale; canonical pixels are 1/CANONICAL_ZOOM of a crop pixel per side
    scale = 1 / 255 if norm == "linf" else C.CANONICAL_ZOOM / 255
    attack.eps, attack.alpha, attack.steps, attack.norm = eps * scale, alpha * scale, iters, norm
    attack.momentum, attack.dropout, attack.model_dropout = momentum, rate, per_model
    attack.budget, attack.ssim_target, attack.psnr_floor = budget, ssim, psnr
    attack.jitter = jitter if jitter is not None else (2.0 if mode == "photos" else 0.0)
    weight = diversity_weight if diversity_weight is not None else DEFAULT_DIVERSITY_WEIGHT
    return EnrollSettings(name=name, method=method, surrogates=zoo.parse_models(surrogates or "mobileface,mfn512"),
                          attack=attack, masks=masks, diversity_weight=weight, mode=mode)


def _strength_preset(strength: str, norm: str, eps: float | None) -> dict[str, float | str]:
    """The defaults of an enroll strength; high is a budget in L-inf units (an L2 method takes it with --eps)."""
    if strength not in ENROLL_STRENGTHS:
        raise FaceveilError(f"strength takes {', '.join(ENROLL_STRENGTHS)}, got {strength!r}")
    if strength != "mid" and norm != "linf" and eps is None:
        raise FaceveilError(f"strength {strength} is an L-inf budget (OPOM's methods); under the L2 norm give the "
                            "budget with eps")
    return ENROLL_STRENGTHS[strength]


def _lever_defaults(preset: dict[str, float | str], norm: str, momentum: float | None, dropout: float | str | None,
                    budget: str | None, ssim: float | None,
                    psnr: float | None) -> tuple[float, float | str, str, float, float]:
    """The transfer and visibility levers a user left unset, from the strength's preset (a texture budget shapes an
    L-inf budget only: under L2 the default is the plain budget)."""
    if budget is None:
        budget = str(preset["budget"]) if norm == "linf" else "linf"
    pick = {"momentum": momentum, "dropout": dropout, "ssim": ssim, "psnr": psnr}
    chosen = {k: preset[k] if v is None else v for k, v in pick.items()}
    return float(chosen["momentum"]), chosen["dropout"], budget, float(chosen["ssim"]), float(chosen["psnr"])


def _user_budget(preset: dict[str, float | str], norm: str, eps: float | None, alpha: float | None,
                 iters: int) -> tuple[float, float]:
    """(eps, alpha) in the user's units: L-inf 0..255 (defaults 8, 1); L2 at the 112-crop scale (default 1200,
    alpha 2.5 eps / iters: the budget is crossed in under half the iterations)."""
    if norm == "linf":
        eps = float(preset["eps"]) if eps is None else eps
        return eps, float(preset["alpha"]) if alpha is None else alpha
    eps = L2_DEFAULT_EPS if eps is None else eps
    return eps, 2.5 * eps / max(iters, 1) if alpha is None else alpha


def user_budget(attack: AttackConfig) -> tuple[float, float]:
    """An enroll budget (eps, alpha) back in the user's units (0..255; L2 at the 112-crop scale)."""
    scale = 255 if attack.norm == "linf" else 255 / C.CANONICAL_ZOOM
    return attack.eps * scale, attack.alpha * scale


@dataclass
class Enrolled:
    mask: PersonMask
    images: list[dict]  # per input image: file name, used or why not, face size
    info: dict  # the learner's figures (seconds, convex-hull solver ms per step, ...)


@dataclass
class FoundFace:
    rgb: np.ndarray
    face: Face


def largest_faces(paths: list[Path], detector: MTCNN, progress: bool = False) -> tuple[list[FoundFace], list[dict]]:
    """The largest face of each image, and one report row per image (unusable ones named with the reason)."""
    found, rows = [], []
    for index, path in enumerate(tqdm(paths, desc="detect", disable=not progress, leave=False)):
        row: dict = {"image": index, "file": Path(path).name}
        try:
            rgb = read_image(path).rgb
        except FaceveilError as exc:
            rows.append({**row, "status": "unreadable", "message": str(exc)})
            continue
        faces, skipped = default_confirmer().split(rgb, detector.detect_large(rgb))
        if not faces:
            why = "; ".join(c.describe() for c in skipped)
            rows.append({**row, "status": "no_face", "message": f"no face found ({why})" if why else "no face found"})
            continue
        face = max(faces, key=lambda f: f.size)
        found.append(FoundFace(rgb, face))
        rows.append({**row, "status": "used", "face_px": round(face.size), "faces_in_image": len(faces)})
    return found, rows


def enroll(paths: list[Path], settings: EnrollSettings, progress: bool = False, detector: MTCNN | None = None,
           notice: Callable[[str], None] | None = None) -> Enrolled:
    """Learn the person's masks from their photos (the largest face of each). `notice` gets each line the user
    should read before the masks are learned (photos skipped, too few photos); default: the faceveil logger."""
    name = settings.name.strip()
    if not name or not name.isprintable():
        raise FaceveilError("`name` must be a non-empty printable name")
    if settings.mode not in ("photos", "crops"):
        raise FaceveilError(f"`mode` takes photos or crops, got {settings.mode!r}")
    registry.check_kind(settings.method, "person")
    detector = detector or MTCNN()
    found, rows = largest_faces(paths, detector, progress)
    if not found:
        raise FaceveilError(f"no usable face in any of the {len(paths)} image(s): nothing to enroll")
    notice = notice or logging.getLogger("faceveil").warning
    skipped = [r["file"] for r in rows if r["status"] != "used"]
    if skipped:
        notice(f"skipped {len(skipped)} image(s) with no usable face: {', '.join(skipped)}")
    if len(found) < MIN_IMAGES_ADVISED:
        notice(f"warning: only {len(found)} usable image(s) of {name}; at least {MIN_IMAGES_ADVISED} (10 in the "
               "paper) give a mask that carries over to new photos")
    ensemble = Ensemble(settings.surrogates)
    batch = from_photos([f.rgb for f in found], [f.face.landmarks for f in found], ensemble.geometries,
                        settings.mode)
    options = PersonMaskOptions(masks=settings.masks, diversity_weight=settings.diversity_weight)
    if settings.method == "fi-uap-all":
        options.universal_faces = sample_faces(detector, ensemble.geometries, settings.mode)
    result = registry.learn_person_masks(settings.method, batch, ensemble, settings.attack, options, progress)
    models = sorted(set(MATCH_MODELS) | set(settings.surrogates))
    masks = within_enroll_cap(result.masks, settings.attack.norm)
    mask = PersonMask(name=name, masks=masks, geometry=C.CANONICAL.name, method=settings.method,
                      surrogates=list(settings.surrogates), eps=recorded_budget(masks, settings.attack),
                      norm=settings.attack.norm,
                      references=reference_embeddings(found, models), meta=_meta(settings, len(found), len(paths)))
    return Enrolled(mask, rows, result.info)


def within_enroll_cap(masks: torch.Tensor, norm: str) -> torch.Tensor:
    """Masks brought within the largest budget a mask file may hold (ENROLL_MAX_EPS: apply refuses more as
    tampered), for the settings that let a mask pass its nominal eps: L-inf clipped, L2 (on what is pasted) scaled
    down."""
    from faceveil.attacks.budgets import pasted_l2

    if norm == "linf":
        cap = ENROLL_MAX_EPS["linf"] / 255
        return masks.clamp(-cap, cap)
    cap = ENROLL_MAX_EPS["l2"] * C.CANONICAL_ZOOM / 255
    factor = (cap / pasted_l2(masks).clamp_min(1e-12)).clamp(max=1.0)
    return masks * factor.view(-1, 1, 1, 1)


def recorded_budget(masks: torch.Tensor, attack: AttackConfig) -> float:
    """The budget the mask file records: the nominal eps, or the bound the masks really reach where the setting lets
    them pass it (a texture-shaped L-inf budget is eps on average over the face, up to TEXTURE_MAX times eps in hair
    and brows; a visibility budget scales every mask onto its SSIM, up or down), so that the file's budget is one its
    masks respect (load_mask refuses a mask above its budget)."""
    from faceveil.attacks.budgets import pasted_l2

    if attack.budget == "linf" and attack.ssim_target <= 0 and attack.psnr_floor <= 0:
        return attack.eps
    reached = masks.flatten(1).abs().amax(1) if attack.norm == "linf" else pasted_l2(masks)
    return max(attack.eps, float(reached.max()))


def _meta(settings: EnrollSettings, used: int, given: int) -> dict:
    a = settings.attack
    return {"iterations": a.steps, "alpha": a.alpha, "momentum": a.momentum, "dropout": a.dropout,
            "model_dropout": dict(a.model_dropout), "budget": a.budget, "ssim_target": a.ssim_target,
            "psnr_floor": a.psnr_floor,
            "jitter": a.jitter, "diversity": a.diversity, "random_start": a.random_start, "seed": a.seed,
            "mode": settings.mode, "diversity_weight": settings.diversity_weight, "images_used": used,
            "images_given": given, "faceveil": __version__,
            "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}


@torch.no_grad()
def reference_embeddings(found: list[FoundFace], models: list[str]) -> dict[str, torch.Tensor]:
    """model -> [n, D]: each model's embedding of the person's clean, aligned faces."""
    out = {}
    for name in models:
        model = zoo.load(name)
        crops = np.stack([align(f.rgb, f.face.landmarks, model.spec.geometry) for f in found])
        out[name] = zoo.embed_crops(model, crops).float()
    return out


def sample_faces(detector: MTCNN, geometries: list[str], mode: str) -> FaceBatch:
    """Every sure face of the installed sample photos: the other identities fi-uap-all learns its mask on."""
    from faceveil.io import weights

    photos, marks = [], []
    for path in weights.sample_photos():
        rgb = read_image(path).rgb
        for face in detector.detect_large(rgb):
            if face.score >= MIN_SAMPLE_FACE_SCORE:
                photos.append(rgb)
                marks.append(face.landmarks)
    if not photos:
        raise FaceveilError("fi-uap-all needs other people's faces: no sample photos found (faceveil models fetch)")
    return from_photos(photos, marks, geometries, mode)


# ----------------------------------------------------------------------------------------------- matching


class PersonMatcher:
    """Decides whether a face is the enrolled person: each matching model votes with its best score to the
    stored references against its calibrated threshold; at least half the votes make a match."""

    def __init__(self, mask: PersonMask):
        chosen = [m for m in MATCH_MODELS if m in mask.references] or sorted(mask.references)
        self.models = [m for m in chosen if m in zoo.SPECS]
        self.references = {m: mask.references[m] for m in self.models}
        for m, ref in self.references.items():
            if ref.shape[1] != zoo.spec(m).embedding_dim:
                raise FaceveilError(f"the mask's {m} references are {ref.shape[1]}-d, the model's are "
                                    f"{zoo.spec(m).embedding_dim}-d")

    @property
    def usable(self) -> bool:
        return bool(self.models)

    @torch.no_grad()
    def scores(self, rgb: np.ndarray, landmarks: list[np.ndarray]) -> list[dict[str, float]]:
        """Per face: model -> best similarity to the person's references."""
        rows: list[dict[str, float]] = [{} for _ in landmarks]
        if not landmarks:
            return rows
        for name in self.models:
            model = zoo.load(name)
            crops = np.stack([align(rgb, m, model.spec.geometry) for m in landmarks])
            emb = zoo.embed_crops(model, crops)
            best = zoo.score_matrix(model.spec.metric, emb, self.references[name]).amax(1)
            for row, value in zip(rows, best.tolist(), strict=True):
                row[name] = value
        return rows

    def matches(self, scores: dict[str, float]) -> bool:
        votes = sum(scores[m] >= zoo.threshold(m) for m in self.models)
        return 2 * votes >= len(self.models)


# ----------------------------------------------------------------------------------------------- apply


@dataclass
class ApplySettings(OutputSettings):
    all_faces: bool = False
    mask_index: int = 0
    # after writing, every masked face of the saved photo is checked as protect checks it (pipeline.verify): each
    # judge's score original -> masked, so that a mask that protects nothing is reported as such
    verify: bool = True
    judges: list[str] = field(default_factory=lambda: list(zoo.SPECS))


@dataclass
class _TrackState:
    matched: bool = False
    checks: int = 0
    seen: int = 0


def with_checks(rows: list[dict], checks: list[FaceCheck]) -> list[dict]:
    """apply's face rows (every detected face: box, masked, the matcher's scores) with the masked faces' checks
    merged in, in the row shape of protect's details.faces (redetected, and judge -> {score, matches})."""
    masked = [row for row in rows if row["masked"]]
    for row, check in zip(masked, checks, strict=True):
        row.update({k: v for k, v in check.to_dict().items() if k not in ("face", "box")})
    return rows


def verdict(checks: list[FaceCheck]) -> dict:
    """The masked faces of one photo by what the judges say: no judge recognises them any more (protected), some
    still do, every judge still does (the mask protects nothing against them), or not found again."""
    judged = [c for c in checks if c.redetected and c.judges]
    return {"masked": len(checks), "protected": sum(not c.recognised_by for c in judged),
            "recognised_by_some": sum(0 < len(c.recognised_by) < len(c.judges) for c in judged),
            "recognised_by_all": sum(len(c.recognised_by) == len(c.judges) for c in judged),
            "not_redetected": sum(not c.redetected for c in checks)}


class MaskApplier(PhotoJob):
    """Holds the detector, the mask and the matcher across a batch of photos and videos (a run_batch callback).
    Its selection is the matching: only the enrolled person's faces get the mask (every face with all_faces)."""

    def __init__(self, mask: PersonMask, settings: ApplySettings, out_dir: Path | None = None,
                 detector: MTCNN | None = None):
        if not 0 <= settings.mask_index < mask.count:
            raise FaceveilError(f"mask index {settings.mask_index} is out of range: the mask file holds "
                                f"{mask.count} mask(s) (0..{mask.count - 1})")
        super().__init__(settings, out_dir, detector)
        self.mask, self.settings = mask, settings
        self.delta = mask.masks[settings.mask_index].float()
        self.matcher = PersonMatcher(mask)
        if not settings.all_faces and not self.matcher.usable:
            raise FaceveilError("the mask file holds no reference embeddings to find its person: mask all faces")
        self._rows: list[dict] = []  # the last photo's detected faces, masked or not (for its report)

    def select(self, rgb: np.ndarray, faces: list[Face]) -> list[Face]:
        """Every detected face (largest first) is scored; the person's are selected."""
        faces = sorted(faces, key=lambda f: -f.size)
        scores = ([{} for _ in faces] if self.settings.all_faces
                  else self.matcher.scores(rgb, [f.landmarks for f in faces]))
        self._rows, chosen = [], []
        for index, (face, score) in enumerate(zip(faces, scores, strict=True)):
            masked = self.settings.all_faces or self.matcher.matches(score)
            if masked:
                chosen.append(face)
            self._rows.append({"face": index, "box": [round(float(v), 1) for v in face.box], "masked": masked,
                               "scores": {m: round(s, 4) for m, s in score.items()}})
        return chosen

    def apply_faces(self, rgb: np.ndarray, faces: list[Face]) -> np.ndarray:
        """A copy of the photo with the mask pasted on these faces."""
        return paste_faces(rgb, faces, [self.delta] * len(faces))

    def apply_to_pixels(self, rgb: np.ndarray) -> tuple[np.ndarray, list[dict]]:
        """Detection + matching + paste on one photo in memory: (protected copy, one row per detected face)."""
        chosen = self.select(rgb, self.find_faces(rgb)[0])
        return self.apply_faces(rgb, chosen), self._rows

    def photo(self, item: BatchItem) -> dict:
        start = time.perf_counter()
        prepared = self.prepare(item)
        rows = self._rows
        masked = len(prepared.faces)
        details = {"faces_detected": len(rows), "masked": masked, "skipped": len(rows) - masked,
                   "seconds": round(time.perf_counter() - start, 3), "faces": rows}
        if not masked:
            what = "no face found" if not rows else f"no face of {self.mask.name} ({len(rows)} other face(s) left)"
            return self.unprotected(prepared, what, details)
        self.write(prepared, [self.delta] * masked)
        if self.settings.verify:
            with self.stages.timing("verify"):
                checks = verify_faces(item.path, prepared.out_path, prepared.faces, self.settings.judges,
                                      self.detector)
            details["faces"] = with_checks(rows, checks)
            details["verdict"] = verdict(checks)
        return {"status": "ok", "faces": masked, "output": prepared.out_path,
                "details": with_skipped(details, prepared.skipped)}

    def delta_for_track_function(self):
        """A video_pipeline `delta_for_track` with its own per-track state: the mask for tracks of the person,
        None for the others (unmatched tracks are looked at again every RECHECK_FRAMES frames)."""
        states: dict[int, _TrackState] = {}

        def delta_for_track(track, frame: np.ndarray) -> torch.Tensor | None:
            state = states.setdefault(track.id, _TrackState())
            state.seen += 1
            if self.settings.all_faces:
                state.matched = True
            elif not state.matched and state.checks < MAX_CHECKS and (state.seen - 1) % RECHECK_FRAMES == 0:
                state.checks += 1
                state.matched = self.matcher.matches(self.matcher.scores(frame, [track.landmarks])[0])
            return self.delta if state.matched else None

        delta_for_track.states = states  # type: ignore[attr-defined]  # read back for the report
        return delta_for_track

    def video(self, item: BatchItem) -> dict:
        delta_for_track = self.delta_for_track_function()
        out_path, stats = self.write_video(item, delta_for_track)
        states = delta_for_track.states
        matched = sum(s.matched for s in states.values())
        details = {"frames": stats.get("frames"), "fps": stats.get("fps"), "tracks": len(states),
                   "masked_tracks": matched, "skipped_tracks": len(states) - matched,
                   "masked_face_frames": stats.get("pasted")}
        if not stats.get("pasted"):
            return {**self.unprotected_video(stats, f"no face of {self.mask.name} in the video", details),
                    "output": out_path}
        return {"status": "ok", "faces": matched, "output": out_path, "details": details}
