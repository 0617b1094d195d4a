"""Face identification under protection: the TIP-IM protocol (Yang et al., ICCV 2021, §5.1) on LFW.

The split (seeded, deterministic; faceveil.datasets.splits): protected identities (LFW identities with at least 2
images, up to 500) give one probe image each and their other images to the gallery; 10 disjoint target identities
(at least 2 images) give one image each to the target set and the rest to the gallery; further disjoint identities
(500, or 50 with --limit) add all their images; every identity gives at most 20 images to the gallery. Every probe is
protected by the method against the surrogates, then each judge ranks the gallery by its score to the protected
probe:

    rank1_t / rank5_t    a target identity's image is among the top 1 / 5 (targeted success)
    rank1_ut / rank5_ut  none of the top 1 / 5 is the probe's own identity (untargeted success)

By default a judge is attacked by the models of the other families (leave-one-family-out); judges sharing a
surrogate set share one protection run. PSNR and SSIM compare the face area (the perturbation mask's square in the
canonical face space) of the original and the protected face; MMD (the paper's naturalness metric, Eq. 3) compares
the set of protected face areas with the set of original ones.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from faceveil.attacks.core import AttackConfig, Ensemble
from faceveil.attacks.faces import from_photos
from faceveil.datasets.faces import embed_files, embed_images, landmarks_for
from faceveil.datasets.lfw import identities
from faceveil.datasets.splits import Labelled, Split, make_split
from faceveil.detect import canonical as C
from faceveil.detect.align import align, transform_points, warp_matrix
from faceveil.errors import FaceveilError
from faceveil.evaluate.quality import psnr, set_mmd, ssim
from faceveil.evaluate.robustness import ProbeImages, Request, Scenario
from faceveil.io.images import JPEG_SUBSAMPLING, read_image
from faceveil.io.paths import DEFAULT_JPEG_QUALITY
from faceveil.methods import registry
from faceveil.methods.base import ImageMethod, MethodOptions
from faceveil.methods.targets import TargetIdentity, TargetSet, target_face
from faceveil.models import zoo

BATCH = 8
# The face area in canonical space: the perturbation mask's square.
_LO = round(C.CANONICAL_SIZE / 2 - C.MASK_HALF_SIDE)
_HI = round(C.CANONICAL_SIZE / 2 + C.MASK_HALF_SIDE)


def surrogate_groups(judges: list[str], surrogates: list[str] | None,
                     pool: list[str] | None = None) -> dict[tuple[str, ...], list[str]]:
    """Surrogate set -> the judges evaluated against it: the given surrogates, else leave-one-family-out, the models
    of `pool` (default every model) outside the judge's family (a judge with none left is skipped)."""
    groups: dict[tuple[str, ...], list[str]] = {}
    for judge in judges:
        family = zoo.spec(judge).family
        chosen = surrogates or [m for m in (pool or zoo.SPECS) if zoo.spec(m).family != family]
        if chosen:
            groups.setdefault(tuple(chosen), []).append(judge)
    return groups


@dataclass
class Protected:
    """Protected probes as images with their landmarks (canonical crops or re-read photos), the same probes
    unprotected (canonical crops or the original photos, with their landmarks), and the quality."""

    images: list[np.ndarray] = field(default_factory=list)
    landmarks: list[np.ndarray] = field(default_factory=list)
    clean_images: list[np.ndarray] = field(default_factory=list)
    clean_landmarks: list[np.ndarray] = field(default_factory=list)
    psnr: list[float] = field(default_factory=list)
    ssim: list[float] = field(default_factory=list)
    # face areas (canonical space) of the originals and the protected probes, for the set-level MMD
    original_areas: list[np.ndarray] = field(default_factory=list)
    protected_areas: list[np.ndarray] = field(default_factory=list)
    redetect_failures: int = 0


@dataclass
class Settings:
    method: str = "pgd"
    mode: str = "crops"
    attack: AttackConfig = field(default_factory=AttackConfig)
    gamma: float = 0.0
    batch: int = BATCH
    progress: bool = True
    save_as: str = "png"  # photos mode: how each protected photo is saved before it is re-read (png, or jpg)
    jpeg_quality: int = DEFAULT_JPEG_QUALITY  # with save_as "jpg" (protect's default quality)


def settings_for(method: str, mode: str, eps: float, alpha: float, iters: int, momentum: float,
                 jitter: float | None, gamma: float, batch: int, seed: int, progress: bool) -> Settings:
    """Settings from command-line units: eps and alpha in 0..255, L-inf; jitter None = 0 in crops mode, 2 crop
    pixels in photos mode (the saved photo is re-detected, so the mask must survive a small misalignment)."""
    jitter = jitter if jitter is not None else (2.0 if mode == "photos" else 0.0)
    attack = AttackConfig(eps=eps / 255, alpha=alpha / 255, steps=iters, norm="linf", momentum=momentum,
                          jitter=jitter, seed=seed)
    return Settings(method=method, mode=mode, attack=attack, gamma=gamma, batch=batch, progress=progress)


def face_area(canonical: np.ndarray) -> np.ndarray:
    return canonical[_LO:_HI, _LO:_HI]


def record_quality(out: Protected, before: np.ndarray, after: np.ndarray) -> None:
    """before/after: canonical uint8 images of the same face."""
    a, b = face_area(before), face_area(after)
    out.psnr.append(psnr(a, b))
    out.ssim.append(ssim(a, b))
    out.original_areas.append(a)
    out.protected_areas.append(b)


def to_uint8(images: torch.Tensor) -> list[np.ndarray]:
    """[B,3,H,W] in [0,1] -> HxWx3 uint8 each (8-bit rounding: what a saved file holds)."""
    return list((images.detach().clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy())


def _canonical_landmarks(marks: np.ndarray) -> np.ndarray:
    return transform_points(warp_matrix(marks, C.CANONICAL).numpy(), marks)


def collect_crops(out: Protected, batch, delta: torch.Tensor, marks: list[np.ndarray]) -> None:
    clean = to_uint8(batch.regions)
    for before, after, m in zip(clean, to_uint8(batch.perturbed(delta)), marks, strict=True):
        out.images.append(after)
        out.landmarks.append(_canonical_landmarks(m))
        out.clean_images.append(before)
        out.clean_landmarks.append(out.landmarks[-1])
        record_quality(out, before, after)


def collect_photos(out: Protected, photos: list[np.ndarray], delta: torch.Tensor, marks: list[np.ndarray],
                   folder: Path, detector, save_as: str = "png",
                   jpeg_quality: int = DEFAULT_JPEG_QUALITY) -> None:
    """Paste, save (PNG, or JPEG at `jpeg_quality`: what `protect` writes for a JPEG photo), re-read, re-detect
    (nearest the centre), keep the re-read photo and its landmarks."""
    from faceveil.detect.mtcnn import nearest_to_center

    if save_as not in ("png", "jpg"):
        raise ValueError(f"save_as takes png or jpg, got {save_as!r}")
    for photo, d, m in zip(photos, delta, marks, strict=True):
        path = folder / f"probe{len(out.images):05d}.{save_as}"
        image = Image.fromarray(C.paste(photo, m, d))
        if save_as == "jpg":  # as faceveil.io.images writes a JPEG (its chroma subsampling)
            image.save(path, quality=jpeg_quality, subsampling=JPEG_SUBSAMPLING)
        else:
            image.save(path)
        again = read_image(path).rgb
        face = nearest_to_center(detector.detect_large(again), again.shape[1], again.shape[0])
        out.redetect_failures += face is None
        out.images.append(again)
        out.landmarks.append(m if face is None else np.asarray(face.landmarks, dtype=np.float64))
        out.clean_images.append(photo)
        out.clean_landmarks.append(np.asarray(m, dtype=np.float64))
        record_quality(out, align(photo, m, C.CANONICAL), align(again, m, C.CANONICAL))


@dataclass
class MaskJob:
    """One probe batch's protection as plain data, so that a process elsewhere can run it (MaskComputer): the
    surrogate set, the probe files and landmarks, the split's target identities (file and landmarks: targeted
    methods aim at them) and the settings. Each job's mask depends on the job alone (the core seeds each call)."""

    surrogates: tuple[str, ...]
    files: list[Path]
    marks: list[np.ndarray]
    targets: list[tuple[str, Path, np.ndarray]]
    settings: Settings


# The masks (delta [B,3,256,256]) of a protection run's jobs, in job order. The default computes them here, one
# after another; `faceveil eval ... --engine ray` passes one that spreads them over Ray actors
# (faceveil.distributed.ray_eval): this layer never imports it.
MaskMap = Callable[[list[MaskJob]], Iterable[torch.Tensor]]


class MaskComputer:
    """Runs mask jobs; builds one ensemble and method per surrogate set and method (models loaded on first use)."""

    def __init__(self) -> None:
        self._built: dict[tuple, tuple[Ensemble, ImageMethod]] = {}

    def __call__(self, job: MaskJob) -> torch.Tensor:
        ensemble, method = self._for(job)
        photos = [read_image(p).rgb for p in job.files]
        batch = from_photos(photos, job.marks, ensemble.geometries, job.settings.mode)
        return method(batch, ensemble, job.settings.attack).delta

    def _for(self, job: MaskJob) -> tuple[Ensemble, ImageMethod]:
        s = job.settings
        key = (job.surrogates, s.method, s.gamma, s.attack.seed, tuple(str(p) for _, p, _ in job.targets))
        if key not in self._built:
            ensemble = Ensemble(list(job.surrogates))
            self._built[key] = ensemble, _method(s, ensemble, job.targets)
        return self._built[key]


def local_masks(jobs: list[MaskJob]) -> Iterator[torch.Tensor]:
    """The default MaskMap: each job's mask computed in this process, as it is asked for."""
    computer = MaskComputer()
    return (computer(job) for job in jobs)


def probe_jobs(split: Split, landmarks: dict[Path, np.ndarray], surrogates: list[str],
               settings: Settings) -> list[MaskJob]:
    """The probes in batches of settings.batch, one job each."""
    targets = [(name, p, landmarks[p]) for name, p in split.targets]
    jobs = []
    for start in range(0, len(split.probes), settings.batch):
        files = [p for _, p in split.probes[start:start + settings.batch]]
        jobs.append(MaskJob(tuple(surrogates), files, [landmarks[p] for p in files], targets, settings))
    return jobs


def _target_set(targets: list[tuple[str, Path, np.ndarray]], ensemble: Ensemble) -> TargetSet:
    faces = [TargetIdentity(name, (target_face(read_image(p).rgb, marks, str(p)),)) for name, p, marks in targets]
    return TargetSet(faces, ensemble)


def _method(settings: Settings, ensemble: Ensemble, targets: list[tuple[str, Path, np.ndarray]]) -> ImageMethod:
    entry = registry.check_kind(settings.method, "image")
    target_set = _target_set(targets, ensemble) if entry.targeted else None
    return registry.image_method(settings.method, MethodOptions(gamma=settings.gamma, seed=settings.attack.seed),
                                 target_set)


def protect_probes(split: Split, landmarks: dict[Path, np.ndarray], surrogates: list[str],
                   settings: Settings, masks: MaskMap | None = None) -> Protected:
    """Protect every probe in batches; crops mode keeps the canonical faces, photos mode round-trips the files.
    masks: how the batches' masks are computed (default: here, in order); the collection stays here."""
    jobs = probe_jobs(split, landmarks, surrogates, settings)
    geometries = sorted({zoo.spec(name).geometry for name in surrogates})  # Ensemble.geometries, no model loaded
    out = Protected()
    detector = None
    if settings.mode == "photos":
        from faceveil.detect.mtcnn import default_detector

        detector = default_detector()
    with tempfile.TemporaryDirectory(prefix="faceveil-ident-") as tmp:
        computed = (masks or local_masks)(jobs)
        for job, delta in tqdm(zip(jobs, computed, strict=True), total=len(jobs), desc="protect",
                               disable=not settings.progress, unit="batch"):
            photos, marks = [read_image(p).rgb for p in job.files], job.marks
            batch = from_photos(photos, marks, geometries, settings.mode)
            if settings.mode == "crops":
                collect_crops(out, batch, delta, marks)
            else:
                collect_photos(out, photos, delta, marks, Path(tmp), detector, settings.save_as,
                               settings.jpeg_quality)
    return out


def _rate(hits: list[bool]) -> float:
    return float(np.mean(hits)) if hits else 0.0


def rank_metrics(scores: torch.Tensor, gallery_labels: list[str], true_labels: list[str],
                 target_labels: set[str]) -> dict[str, float]:
    """scores [P, G]: the four rank rates of the TIP-IM protocol."""
    top = scores.topk(min(5, scores.shape[1]), dim=1).indices.tolist()
    names = [[gallery_labels[j] for j in row] for row in top]
    return {
        "rank1_t": _rate([row[0] in target_labels for row in names]),
        "rank5_t": _rate([any(n in target_labels for n in row) for row in names]),
        "rank1_ut": _rate([row[0] != t for row, t in zip(names, true_labels, strict=True)]),
        "rank5_ut": _rate([t not in row for row, t in zip(names, true_labels, strict=True)]),
    }


def _gallery_embeddings(judges: list[str], gallery: list[Labelled], landmarks: dict[Path, np.ndarray],
                        progress: bool) -> dict[str, torch.Tensor]:
    return embed_files(judges, [p for _, p in gallery], landmarks, progress).rows


def clean_rank1(judge: str, split: Split, landmarks: dict[Path, np.ndarray], gallery: torch.Tensor) -> float:
    """Identification accuracy of the judge on the unprotected probes (sanity of the gallery)."""
    emb = embed_images(judge, [read_image(p).rgb for _, p in split.probes], [landmarks[p] for _, p in split.probes])
    scores = zoo.score_matrix(zoo.spec(judge).metric, emb, gallery)
    labels = [n for n, _ in split.gallery]
    return 1.0 - rank_metrics(scores, labels, [n for n, _ in split.probes], set())["rank1_ut"]


def judge_row(judge: str, surrogates: list[str], protected: Protected, split: Split, gallery: torch.Tensor,
              settings: Settings) -> dict:
    emb = embed_images(judge, protected.images, protected.landmarks)
    scores = zoo.score_matrix(zoo.spec(judge).metric, emb, gallery)
    ranks = rank_metrics(scores, [n for n, _ in split.gallery], [n for n, _ in split.probes],
                         {n for n, _ in split.targets})
    return {"judge": judge, "method": settings.method, "surrogates": list(surrogates),
            "white_box": judge in surrogates, "mode": settings.mode, **ranks,
            "psnr": float(np.mean(protected.psnr)), "ssim": float(np.mean(protected.ssim)),
            "mmd": set_mmd(protected.protected_areas, protected.original_areas)}


@dataclass
class Prepared:
    """What every surrogate group shares: the split, every file's landmarks, each judge's gallery embeddings."""

    split: Split
    landmarks: dict[Path, np.ndarray]
    galleries: dict[str, torch.Tensor]
    info: dict
    seed: int = 0
    limit: int | None = None

    def meta(self) -> dict:
        return {**self.split.counts(), "seed": self.seed, "limit": self.limit, "detected": self.info["detected"],
                "images": self.info["images"], "fallback_alignment_count": len(self.info["fallback_alignment"])}


@dataclass
class ProtectedGroup:
    """One protection run: the surrogate set, the judges scored against it, its protected probes, its seconds."""

    surrogates: list[str]
    judges: list[str]
    protected: Protected
    seconds: float


def prepare(root: Path, judges: list[str], settings: Settings, seed: int = 0, limit: int | None = None,
            extra: int | None = None) -> Prepared:
    """The seeded split, the landmarks of all its files and the judges' gallery embeddings."""
    split = make_split(identities(root), seed, limit, extra)
    files = sorted({p for _, p in split.probes + split.targets + split.gallery})
    landmarks, info = landmarks_for(files, settings.progress)
    galleries = _gallery_embeddings(judges, split.gallery, landmarks, settings.progress)
    return Prepared(split, landmarks, galleries, info, seed, limit)


def protect_groups(prepared: Prepared, judges: list[str], surrogates: list[str] | None,
                   settings: Settings, masks: MaskMap | None = None,
                   pool: list[str] | None = None) -> Iterator[ProtectedGroup]:
    """Protect the probes once per surrogate set (leave-one-family-out over `pool` by default), one group at a
    time."""
    for group, group_judges in surrogate_groups(judges, surrogates, pool).items():
        start = time.perf_counter()
        protected = protect_probes(prepared.split, prepared.landmarks, list(group), settings, masks)
        yield ProtectedGroup(list(group), group_judges, protected, round(time.perf_counter() - start, 2))


def run(root: Path, judges: list[str], surrogates: list[str] | None, settings: Settings, seed: int = 0,
        limit: int | None = None, extra: int | None = None, masks: MaskMap | None = None) -> tuple[list[dict], dict]:
    """Rows (one per judge) and settings (split counts, timings) of the protocol; masks: see protect_probes."""
    prepared = prepare(root, judges, settings, seed, limit, extra)
    split, landmarks = prepared.split, prepared.landmarks
    rows, timings, failures = [], {}, {}
    for run_ in protect_groups(prepared, judges, surrogates, settings, masks):
        timings["+".join(run_.surrogates)] = run_.seconds
        failures["+".join(run_.surrogates)] = run_.protected.redetect_failures
        for judge in run_.judges:
            row = judge_row(judge, run_.surrogates, run_.protected, split, prepared.galleries[judge], settings)
            row["clean_rank1"] = clean_rank1(judge, split, landmarks, prepared.galleries[judge])
            rows.append(row)
    meta = {**prepared.meta(), "protect_seconds": timings, "redetect_failures": failures}
    return rows, meta


# ----------------------------------------------------------------------------------------------- robustness


class TipImAdapter:
    """`eval robustness` on this protocol (faceveil.evaluate.robustness): Rank-1-UT against the gallery."""

    protocol = "tip-im"
    metric = "rank1_ut"

    def __init__(self, root: Path, judges: list[str], surrogates: list[str] | None, settings: Settings,
                 seed: int = 0, limit: int | None = None, extra: int | None = None,
                 masks: MaskMap | None = None, pool: list[str] | None = None) -> None:
        self.root, self.judges, self.surrogates, self.pool = root, judges, surrogates, pool
        self.settings, self.seed, self.limit, self.extra = settings, seed, limit, extra
        self.masks = masks
        self.mode = settings.mode
        self.prepared: Prepared | None = None
        self.photo_redetect_failures: dict[str, int] = {}

    def scenarios(self) -> Iterator[Scenario]:
        self.prepared = prepare(self.root, self.judges, self.settings, self.seed, self.limit, self.extra)
        names = [n for n, _ in self.prepared.split.probes]
        for group in protect_groups(self.prepared, self.judges, self.surrogates, self.settings, self.masks,
                                    self.pool):
            p = group.protected
            self.photo_redetect_failures["+".join(group.surrogates)] = p.redetect_failures
            yield Scenario(group.surrogates, group.judges, ProbeImages(p.images, p.landmarks),
                           ProbeImages(p.clean_images, p.clean_landmarks), names, group.seconds,
                           {"psnr": float(np.mean(p.psnr)), "ssim": float(np.mean(p.ssim))})

    def rates(self, scenario: Scenario, judge: str, embeddings: torch.Tensor) -> dict[str, float]:
        split = self._prepared().split
        scores = zoo.score_matrix(zoo.spec(judge).metric, embeddings, self._prepared().galleries[judge])
        return rank_metrics(scores, [n for n, _ in split.gallery], [n for n, _ in split.probes],
                            {n for n, _ in split.targets})

    def meta(self) -> dict:
        return {**self._prepared().meta(), "protected_photo_redetect_failures": self.photo_redetect_failures}

    def _prepared(self) -> Prepared:
        if self.prepared is None:
            raise RuntimeError("scenarios() has not run yet")
        return self.prepared


def robustness_adapter(request: Request) -> tuple[TipImAdapter, dict]:
    """The adapter of a robustness request (method default pgd, budget default TIP-IM §5.1; with a strength, the
    recipe `protect --strength` runs, its photos saved as protect writes a JPEG), and its settings."""
    if request.strength is not None:
        return _strength_adapter(request)
    method = request.method or "pgd"
    registry.check_kind(method, "image")
    given = {k: getattr(request, k) for k in ("eps", "alpha", "iters", "momentum")}
    eps, alpha, iters, momentum = (registry.TIP_IM_PAPER[k] if v is None else v for k, v in given.items())
    settings = settings_for(method, request.mode, eps, alpha, iters, momentum, request.jitter, request.gamma,
                            request.batch, request.seed, request.progress)
    adapter = TipImAdapter(request.root, request.judges, request.surrogates, settings, request.seed, request.limit,
                           request.extra, request.mask_map)
    resolved = {"method": method, "eps": eps, "alpha": alpha, "iters": iters, "momentum": momentum,
                "jitter": settings.attack.jitter, "gamma": request.gamma, "batch": request.batch,
                "dataset": str(adapter.root)}
    return adapter, resolved


def _strength_adapter(request: Request) -> tuple[TipImAdapter, dict]:
    """A `protect --strength` recipe (faceveil.pipeline.presets.STRENGTHS), leave-one-family-out over its surrogates
    unless surrogates are given; the method's own budget flags do not apply."""
    from faceveil.pipeline.presets import STRENGTHS

    if request.strength not in STRENGTHS:
        raise FaceveilError(f"--strength takes {', '.join(STRENGTHS)}, got {request.strength!r}")
    if request.method not in (None, "pgd") or any(getattr(request, k) is not None for k in ("eps", "alpha", "iters")):
        raise FaceveilError("--strength runs protect's own recipe: drop --method, --eps, --alpha and --iters")
    recipe = STRENGTHS[request.strength]
    save_as = "jpg" if request.mode == "photos" else "png"
    settings = Settings(method="pgd", mode=request.mode, attack=recipe.attack(request.seed), batch=request.batch,
                        progress=request.progress, save_as=save_as)
    adapter = TipImAdapter(request.root, request.judges, request.surrogates, settings, request.seed, request.limit,
                           request.extra, request.mask_map, pool=zoo.parse_models(recipe.surrogates))
    resolved = {"method": "pgd", "strength": request.strength, "recipe": vars(recipe), "batch": request.batch,
                "save_as": save_as, "dataset": str(adapter.root)}
    return adapter, resolved
