"""Person-specific masks under 1:N identification: the OPOM protocol (Zhong & Deng, TPAMI 2022, §4.1) on LFW.

Split (seeded, deterministic): the LFW identities with at least `min_images` (12) images are shuffled; the first
`limit` of them (default all) are protected. Each protected identity's images are shuffled: the first
`train_images` (10) learn the person's mask(s), the next `test_images` (the command's default 5; None = all the
rest) are its test images. The paper tests a handful of images per person (§4.1: 10 train, 10 test); without the
cap an identity with hundreds of LFW images (George_W_Bush: 530, i.e. ~270,000 tests) would dominate the pooled
rates. Distractors: all LFW images (or a seeded sample of `distractors` of them for quick runs); for a person, those
of its own identity are left out, so its gallery is the other identities' images plus its one enrolled image.

M-O (Tables 2-5): each test image in turn joins the gallery as the person's clean image, and every other test image
of that person, masked, is a probe: T test images give T(T-1) tests. A test protects at Top-1 / Top-5 when the
person's gallery image is not ranked 1st / not among the first 5 (ties go to the person: a distractor must score
strictly higher to outrank it). The rate is pooled over all tests of all persons. With n_M masks each mask is scored
on its own; rows give the mean over masks (and the std).
M-M (Table 6): the gallery image is masked too; n_M = 1: with the same mask, n_M > 1: each ordered pair of different
masks (gallery mask, probe mask); rows give the mean over pairs (and the std).
clean_top1 / clean_top5 are the judges' identification accuracies without masks (the paper asks for test faces that
are recognised normally, i.e. a clean protection rate near 0). PSNR and SSIM compare the face area of each masked
test face with the original (as evaluate/identification.py).

Modes: crops (the paper: the mask added to the aligned face), photos (pasted into the photo, saved as PNG, re-read,
re-detected) and users: every person goes through the product exactly as a user does, `faceveil enroll` on the
training photos (faceveil.pipeline.person.enroll, the mask file saved and loaded) and `faceveil apply` on the test
photos (the MaskApplier job: the person's faces found by matching, the mask pasted, JPEG written), the saved files
re-read and re-detected; a test photo in which apply did not mask the person stays a clean probe (what the user
would post). Its budget is resolved as enroll resolves it (faceveil.pipeline.person.enroll_settings).

By default each judge is scored against masks learned by the models of the other families (leave-one-family-out);
judges sharing a surrogate set share one mask-learning run. The mask-learning method is a parameter (a person
learner, faceveil.methods.base.PersonLearner), built by name by the method registry; with `paste_l2` every mask is
scaled to one pasted L2 norm after learning (AdvCloak's comparison, faceveil.evaluate.protocols.advcloak); a
universal method (FI-UAP-all) learns one mask per surrogate set on the training images of all protected persons.
Several methods can share one run (`run_methods`): the landmarks and the clean embeddings of the test images and
distractors are computed once. A method name may end in TRANSFER_SUFFIX ("+md", e.g. opom-convex+md): the method
combined with the transferability methods of §3.2.3 (Tables 4-5), momentum mu = 1 (Eq. 14) and DFANet dropout
(Eq. 15).
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from faceveil.attacks.budgets import scale_paste_l2
from faceveil.attacks.core import AttackConfig, Ensemble, dropout_setting
from faceveil.attacks.faces import from_photos
from faceveil.datasets.faces import EmbeddingTable, embed_files, embed_images, landmarks_for
from faceveil.detect import canonical as C
from faceveil.detect.align import align
from faceveil.errors import FaceveilError
from faceveil.evaluate.protocols.tip_im import (
    Protected,
    collect_crops,
    collect_photos,
    record_quality,
    surrogate_groups,
)
from faceveil.evaluate.robustness import ProbeImages, Request, Scenario
from faceveil.io.images import read_image
from faceveil.methods import registry
from faceveil.methods.base import PersonLearner, PersonMaskOptions
from faceveil.methods.opom.learners import paper_config
from faceveil.models import zoo

DEFAULT_METHOD = "opom-convex"
MIN_IMAGES = 12
TRAIN_IMAGES = 10
# Methods whose one mask is universal (FI-UAP-all, §3.3.2: learned on the training images of ALL protected persons):
# learned once per surrogate set and applied to everybody.
UNIVERSAL_METHODS = ("fi-uap-all",)
DISTRACTORS_LIMITED = 2000  # distractor sample of a limited run that names no count: quick runs stay quick
TEST_IMAGES = 5  # test images per person (the command's default; the paper uses a handful per person)
MODES = ("crops", "photos", "users")
USERS_JPEG_QUALITY = 95  # apply's default
# §3.2.3 combined with momentum and DFANet (Tables 4-5): "+md" after a method name. Eq. 14: "mu is usually set to 1
# following the original paper". Eq. 15 names the Bernoulli rate p_d without a value; DFANet's own 0.1 ([34], Zhong
# & Deng 2020) leaves faceres, faceres-deep, mfn512 and mfn192 recognising nobody, so each surrogate drops at the
# rate calibrated for it (attacks.core.CALIBRATED_DROPOUT: each still recognises >= 95 % of LFW faces).
TRANSFER_SUFFIX = "+md"
TRANSFER_MOMENTUM = 1.0
TRANSFER_DROPOUT = "calibrated"
BATCH = 8

Labelled = tuple[str, Path]  # (identity, image file)


@dataclass(frozen=True)
class Person:
    name: str
    train: tuple[Path, ...]
    test: tuple[Path, ...]


@dataclass(frozen=True)
class Split:
    people: list[Person]
    distractors: list[Labelled]
    eligible_identities: int  # identities with >= min_images images
    available_distractors: int  # all LFW images
    min_images: int = MIN_IMAGES
    train_images: int = TRAIN_IMAGES
    test_images: int | None = None  # cap of test images per person; None = all images not used for training

    def counts(self) -> dict:
        return {"min_images": self.min_images, "train_images": self.train_images,
                "test_images_per_person": "all" if self.test_images is None else self.test_images,
                "eligible_identities": self.eligible_identities, "protected_identities": len(self.people),
                "protected_names": [p.name for p in self.people],
                "train_images_used": sum(len(p.train) for p in self.people),
                "test_images": sum(len(p.test) for p in self.people),
                "distractor_images": len(self.distractors), "distractors_available": self.available_distractors,
                "distractors_capped": len(self.distractors) < self.available_distractors}


def make_split(people: dict[str, list[Path]], seed: int = 0, limit: int | None = None,
               min_images: int = MIN_IMAGES, train_images: int = TRAIN_IMAGES,
               distractors: int | None = None, test_images: int | None = None) -> Split:
    """The seeded protocol split (module docstring). The first N persons do not depend on `limit`, the persons
    do not depend on the distractor sample (separate random streams), and the test images under a cap are the
    first ones of the uncapped order (the cap does not change the persons nor their training images)."""
    if train_images < 1:
        raise FaceveilError(f"`train_images` must be at least 1, got {train_images}")
    if test_images is not None and test_images < 2:
        raise FaceveilError(f"`test_images` must be at least 2 (one in the gallery, one probe) or None (all), "
                            f"got {test_images}")
    if min_images < train_images + 2:
        raise FaceveilError(f"`min_images` ({min_images}) must be at least `train_images` + 2 ({train_images + 2}): "
                            "a person needs two test images (one in the gallery, one probe)")
    if limit is not None and limit < 1:
        raise FaceveilError(f"`limit` must be at least 1, got {limit}")
    if distractors is not None and distractors < 1:
        raise FaceveilError(f"`distractors` must be at least 1 (or None: all), got {distractors}")
    rng = np.random.default_rng([seed, 0])
    names = sorted(people)
    eligible = [n for n in names if len(people[n]) >= min_images]
    if not eligible:
        raise FaceveilError(f"no identity has at least {min_images} images in this dataset")
    order = [eligible[i] for i in rng.permutation(len(eligible))][:limit]
    persons = []
    for name in order:
        files = sorted(people[name])
        pick = rng.permutation(len(files))
        test = pick[train_images:] if test_images is None else pick[train_images:train_images + test_images]
        persons.append(Person(name, tuple(sorted(files[i] for i in pick[:train_images])),
                              tuple(sorted(files[i] for i in test))))
    pool = [(n, p) for n in names for p in sorted(people[n])]
    chosen = pool
    if distractors is not None and distractors < len(pool):
        index = np.sort(np.random.default_rng([seed, 1]).choice(len(pool), distractors, replace=False))
        chosen = [pool[i] for i in index]
    return Split(persons, chosen, len(eligible), len(pool), min_images, train_images, test_images)


# ---- metrics ---------------------------------------------------------------------------------------------------

def sorted_scores(metric: str, probes: torch.Tensor, distractors: torch.Tensor) -> torch.Tensor:
    """[P, G] scores of each probe against the distractors, ascending per row (for rank look-ups)."""
    return zoo.score_matrix(metric, probes, distractors).sort(dim=1).values.contiguous()


def own_ranks(metric: str, probes: torch.Tensor, gallery: torch.Tensor, others: torch.Tensor) -> torch.Tensor:
    """Ranks [T, T] (long): entry (j, i) = rank of the person's gallery image i for probe j among the distractors
    (1 + the number of distractors scoring strictly higher); the diagonal (a probe against itself) is 0 = no test.
    probes, gallery: [T, D] embeddings of the same T test images; others: `sorted_scores` of the probes."""
    own = zoo.score_matrix(metric, probes, gallery).contiguous()
    above = others.shape[1] - torch.searchsorted(others, own, right=True)
    ranks = 1 + above
    ranks.fill_diagonal_(0)
    return ranks


@dataclass
class Tally:
    """Tests counted over persons: `top1` / `top5` = tests where the person is NOT at rank 1 / not in the top 5."""

    tests: int = 0
    top1: int = 0
    top5: int = 0

    def add(self, ranks: torch.Tensor) -> None:
        valid = ranks[ranks > 0]
        self.tests += int(valid.numel())
        self.top1 += int((valid > 1).sum())
        self.top5 += int((valid > 5).sum())

    def rates(self) -> tuple[float, float]:
        """(Top-1, Top-5) protection success rates."""
        return (self.top1 / self.tests, self.top5 / self.tests) if self.tests else (0.0, 0.0)


def mm_pairs(n_masks: int) -> list[tuple[int, int]]:
    """(gallery mask, probe mask) pairs of the M-M setting: the same mask for n_M = 1 (Table 6), else every ordered
    pair of different masks."""
    if n_masks < 1:
        raise ValueError("at least one mask")
    if n_masks == 1:
        return [(0, 0)]
    return [(g, p) for g in range(n_masks) for p in range(n_masks) if g != p]


def _summary(prefix: str, tallies: list[Tally]) -> dict:
    rates = np.array([t.rates() for t in tallies])
    out = {f"{prefix}top1_psr": float(rates[:, 0].mean()), f"{prefix}top5_psr": float(rates[:, 1].mean())}
    if len(tallies) > 1:
        out[f"{prefix}top1_psr_std"] = float(rates[:, 0].std())
        out[f"{prefix}top5_psr_std"] = float(rates[:, 1].std())
    return out


# ---- masks -----------------------------------------------------------------------------------------------------

@dataclass
class Settings:
    method: str = "opom-convex"  # the learner's name (rows and JSON)
    mode: str = "crops"  # crops | photos | users (MODES)
    attack: AttackConfig = field(default_factory=AttackConfig)
    batch: int = BATCH  # test faces masked at once
    progress: bool = True
    universal: bool = False  # one mask learned on every person's training images (UNIVERSAL_METHODS)
    options: PersonMaskOptions = field(default_factory=PersonMaskOptions)  # n_M masks, ...
    paste_l2: float | None = None  # every mask scaled to this pasted L2 norm (0..255 units, 112x112x3) after learning


@dataclass
class GroupResult:
    """One surrogate set's masks applied to every person's test images, embedded by the judges of the group."""

    surrogates: list[str]
    judges: list[str]
    masked: dict[str, list[list[torch.Tensor]]]  # judge -> per person -> per mask [T, D]
    psnr: list[float] = field(default_factory=list)
    ssim: list[float] = field(default_factory=list)
    redetect_failures: int = 0
    learn_seconds: float = 0.0
    apply_seconds: float = 0.0
    learn_times: list[float] = field(default_factory=list)  # seconds of each learner call (t1 per person)
    train_faces: list[int] = field(default_factory=list)  # faces of each learner call
    applied: dict[str, int] = field(default_factory=dict)  # users mode: what apply did with the test photos


def _photos(files: tuple[Path, ...] | list[Path], landmarks: dict[Path, np.ndarray]):
    return [read_image(f).rgb for f in files], [landmarks[f] for f in files]


def learn_masks(train: tuple[Path, ...], landmarks: dict[Path, np.ndarray], ensemble: Ensemble,
                learner: PersonLearner, settings: Settings, cfg: AttackConfig,
                result: GroupResult | None = None) -> torch.Tensor:
    """Masks [n_M,3,256,256] learned on these training images (in the evaluation's mode), scaled to the pasted L2
    norm when the settings ask for it; the learner's time and faces go to `result`."""
    photos, marks = _photos(train, landmarks)
    batch = from_photos(photos, marks, ensemble.geometries, settings.mode)
    start = time.perf_counter()
    masks = learner(batch, ensemble, cfg, settings.options, False).masks.detach()
    if masks.ndim != 4 or masks.shape[1:] != (3, 256, 256):
        raise ValueError(f"a mask learner must return [n_M,3,256,256] masks, got {tuple(masks.shape)}")
    if settings.paste_l2 is not None:
        masks = scale_paste_l2(masks, settings.paste_l2)
    if result is not None:
        result.learn_times.append(time.perf_counter() - start)
        result.train_faces.append(len(batch))
    return masks


def apply_mask(files: tuple[Path, ...], landmarks: dict[Path, np.ndarray], mask: torch.Tensor, settings: Settings,
               folder: Path, detector) -> Protected:
    """The test images with one mask: canonical crops (crops mode) or pasted photos saved as PNG, re-read and
    re-detected (photos mode); with the face-area quality of each."""
    out = Protected()
    for start in range(0, len(files), settings.batch):
        photos, marks = _photos(files[start:start + settings.batch], landmarks)
        delta = mask.expand(len(photos), -1, -1, -1)
        if settings.mode == "crops":
            collect_crops(out, from_photos(photos, marks, [], "crops"), delta, marks)
        else:
            collect_photos(out, photos, delta, marks, folder, detector)
    return out


def person_config(cfg: AttackConfig, index: int) -> AttackConfig:
    """Each person its own random stream (random start, diversity), derived from the run's seed."""
    return dataclasses.replace(cfg, seed=cfg.seed * 100_003 + index)


def mask_group(split: Split, landmarks: dict[Path, np.ndarray], surrogates: list[str], judges: list[str],
               learner: PersonLearner, settings: Settings) -> GroupResult:
    """Learn every person's masks with these surrogates, mask its test images, embed them with the judges."""
    if settings.mode == "users":
        return users_group(split, landmarks, surrogates, judges, settings)
    ensemble = Ensemble(surrogates)
    result = GroupResult(list(surrogates), list(judges), {j: [] for j in judges})
    detector = None
    if settings.mode == "photos":
        from faceveil.detect.mtcnn import default_detector

        detector = default_detector()
    universal = None
    if settings.universal:
        start = time.perf_counter()
        everybody = tuple(f for p in split.people for f in p.train)
        universal = learn_masks(everybody, landmarks, ensemble, learner, settings, settings.attack, result)
        result.learn_seconds += time.perf_counter() - start
    with tempfile.TemporaryDirectory(prefix="faceveil-opom-") as tmp:
        bar = tqdm(split.people, desc=f"masks ({'+'.join(surrogates)})", disable=not settings.progress,
                   unit="person")
        for index, person in enumerate(bar):
            start = time.perf_counter()
            masks = universal if universal is not None else learn_masks(
                person.train, landmarks, ensemble, learner, settings, person_config(settings.attack, index), result)
            middle = time.perf_counter()
            for judge in judges:
                result.masked[judge].append([])
            for mask in masks:  # one mask's images at a time: memory stays flat for persons with many images
                masked = apply_mask(person.test, landmarks, mask, settings, Path(tmp), detector)
                record_masked(result, judges, masked)
            result.learn_seconds += middle - start
            result.apply_seconds += time.perf_counter() - middle
    return result


# ---- users mode: enroll -> .fvmask -> apply -> saved JPEG ------------------------------------------------------

def check_users_methods(methods: list[MethodRun]) -> None:
    """One line before any work: users mode enrolls each person alone, a universal method has no such run."""
    universal = [m.settings.method for m in methods if m.settings.universal]
    if universal:
        raise FaceveilError(f"{', '.join(universal)}: users mode enrolls each person alone (enroll's fi-uap-all "
                            "learns on the sample photos' faces); score universal masks in crops or photos mode")


def users_group(split: Split, landmarks: dict[Path, np.ndarray], surrogates: list[str], judges: list[str],
                settings: Settings) -> GroupResult:
    """Every person through the product (module docstring, users mode): enroll on the training photos with these
    surrogates, the mask file written and read back, apply on the test photos (JPEG), the saved photos re-read,
    re-detected and embedded by the judges."""
    from faceveil.detect.mtcnn import default_detector
    from faceveil.pipeline.maskfile import load_mask, save_mask
    from faceveil.pipeline.person import EnrollSettings, enroll

    if settings.universal:
        raise FaceveilError(f"{settings.method}: users mode enrolls each person alone (enroll's fi-uap-all learns "
                            "on the sample photos' faces); score universal masks in crops or photos mode")
    detector = default_detector()
    method = split_method_name(settings.method)[0]
    result = GroupResult(list(surrogates), list(judges), {j: [] for j in judges})
    with tempfile.TemporaryDirectory(prefix="faceveil-opom-users-") as tmp:
        folder = Path(tmp)
        bar = tqdm(split.people, desc=f"enroll+apply ({'+'.join(surrogates)})", disable=not settings.progress,
                   unit="person")
        for index, person in enumerate(bar):
            start = time.perf_counter()
            chosen = EnrollSettings(name=person.name, method=method, surrogates=list(surrogates),
                                    attack=person_config(settings.attack, index), masks=settings.options.masks,
                                    diversity_weight=settings.options.diversity_weight, mode="photos")
            enrolled = enroll(list(person.train), chosen, detector=detector, notice=lambda _line: None)
            path = folder / f"person{index}.fvmask"
            save_mask(enrolled.mask, path)
            mask = load_mask(path)
            middle = time.perf_counter()
            result.learn_times.append(middle - start)
            result.train_faces.append(int(mask.meta["images_used"]))
            for judge in judges:
                result.masked[judge].append([])
            for k in range(mask.count):
                masked = applied_photos(person.test, landmarks, mask, k, folder / f"person{index}-mask{k}", detector,
                                        result.applied)
                record_masked(result, judges, masked)
            result.learn_seconds += middle - start
            result.apply_seconds += time.perf_counter() - middle
    return result


def record_masked(result, judges: list[str], masked: Protected) -> None:
    """One mask's protected test images into the person's last row of `result`: each judge's embeddings and the
    images' visibility and re-detection figures."""
    for judge in judges:
        result.masked[judge][-1].append(embed_images(judge, masked.images, masked.landmarks))
    result.psnr += masked.psnr
    result.ssim += masked.ssim
    result.redetect_failures += masked.redetect_failures


def applied_photos(files: tuple[Path, ...], landmarks: dict[Path, np.ndarray], mask, mask_index: int,
                   out_dir: Path, detector, counts: dict[str, int]) -> Protected:
    """`faceveil apply MASK FILES -o OUT_DIR --format jpg` (the MaskApplier job; its check of the saved photos is
    left to the protocol's judges), then each test photo's labelled face as a judge sees it: the saved file
    re-read and re-detected (nearest the centre), or the original photo where apply did not mask that face.
    Quality is that of the masked faces (face area, original landmarks); `counts` tallies what apply did."""
    from faceveil.detect.mtcnn import nearest_to_center
    from faceveil.pipeline.job import run_on_files
    from faceveil.pipeline.person import ApplySettings, MaskApplier

    job = MaskApplier(mask, ApplySettings(mask_index=mask_index, fmt="jpg", jpeg_quality=USERS_JPEG_QUALITY,
                                          verify=False), detector=detector)
    report = run_on_files(job, list(files), out_dir, progress=False, desc="apply")
    outcome = {Path(r.file): r for r in report.results}
    out = Protected()
    for f in files:
        photo, marks, row = read_image(f).rgb, np.asarray(landmarks[f], dtype=np.float64), outcome[f]
        if row.status == "error":
            raise FaceveilError(f"apply failed on {f.name}: {row.message}")
        faces = (row.details or {}).get("faces") or []
        labelled = row.output is not None and _labelled_face_masked(faces, marks)
        _tally(counts, "test_photos")
        _tally(counts, "written", row.output is not None)
        _tally(counts, "person_masked", labelled)
        _tally(counts, "other_faces_masked", sum(bool(x["masked"]) for x in faces) - int(labelled))
        again, found = photo, marks
        if row.output is not None:
            again = read_image(row.output).rgb
            face = nearest_to_center(detector.detect_large(again), again.shape[1], again.shape[0])
            out.redetect_failures += face is None
            found = marks if face is None else np.asarray(face.landmarks, dtype=np.float64)
        out.images.append(again)
        out.landmarks.append(found)
        out.clean_images.append(photo)
        out.clean_landmarks.append(marks)
        if labelled:
            record_quality(out, align(photo, marks, C.CANONICAL), align(again, marks, C.CANONICAL))
    return out


def _labelled_face_masked(faces: list[dict], marks: np.ndarray) -> bool:
    """Whether a masked face of apply's rows is the labelled one: its box holds the labelled face's landmarks."""
    cx, cy = marks.mean(axis=0)
    return any(f["masked"] and f["box"][0] <= cx <= f["box"][2] and f["box"][1] <= cy <= f["box"][3] for f in faces)


def _tally(counts: dict[str, int], key: str, value: int | bool = 1) -> None:
    counts[key] = counts.get(key, 0) + int(value)


# ---- scoring ---------------------------------------------------------------------------------------------------

def _own_identity_excluded(split: Split, name: str) -> torch.Tensor:
    return torch.tensor([i for i, (n, _) in enumerate(split.distractors) if n != name], dtype=torch.long)


def score_judge(judge: str, split: Split, clean: EmbeddingTable, masked: list[list[torch.Tensor]]) -> dict:
    """M-O (per mask), M-M (per mask pair) and clean tallies of one judge, pooled over persons -> row fields."""
    metric = zoo.spec(judge).metric
    distractors = clean.of(judge, [p for _, p in split.distractors])
    n_masks = len(masked[0])
    mo, mm, plain = [Tally() for _ in range(n_masks)], {pair: Tally() for pair in mm_pairs(n_masks)}, Tally()
    for person, person_masked in zip(split.people, masked, strict=True):
        others = distractors[_own_identity_excluded(split, person.name)]
        originals = clean.of(judge, person.test)
        plain.add(own_ranks(metric, originals, originals, sorted_scores(metric, originals, others)))
        for p, probes in enumerate(person_masked):
            ranked = sorted_scores(metric, probes, others)
            mo[p].add(own_ranks(metric, probes, originals, ranked))
            for (gallery_mask, probe_mask), tally in mm.items():
                if probe_mask == p:
                    tally.add(own_ranks(metric, probes, person_masked[gallery_mask], ranked))
    clean_psr = plain.rates()
    return {**_summary("", mo), **_summary("mm_", list(mm.values())),
            "clean_top1": 1 - clean_psr[0], "clean_top5": 1 - clean_psr[1],
            "n_probes": mo[0].tests, "n_mm_probes": next(iter(mm.values())).tests}


def judge_row(judge: str, group: GroupResult, split: Split, clean: EmbeddingTable, settings: Settings) -> dict:
    scores = score_judge(judge, split, clean, group.masked[judge])
    return {"judge": judge, "method": settings.method, "surrogates": list(group.surrogates),
            "white_box": judge in group.surrogates, "mode": settings.mode, "masks": len(group.masked[judge][0]),
            **scores, "psnr": float(np.mean(group.psnr)), "ssim": float(np.mean(group.ssim))}


def attack_config(seed: int = 0, mode: str = "crops", eps: float | None = None, alpha: float | None = None,
                  iters: int | None = None, momentum: float | None = None, dropout: float | str = 0.0,
                  jitter: float | None = None, **levers) -> AttackConfig:
    """The OPOM paper's configuration (faceveil.methods.opom.learners.paper_config) with the values given: eps and
    alpha in 0..255 units, None = the paper's; dropout a rate or "calibrated"; jitter None = 2 crop pixels in photos
    and users mode (enroll's), 0 in crops mode; `levers`: further AttackConfig fields (budget, ssim_target,
    psnr_floor)."""
    rate, per_model = dropout_setting(dropout)
    changes: dict = {"dropout": rate, "model_dropout": per_model, **levers,
                     "jitter": jitter if jitter is not None else (0.0 if mode == "crops" else 2.0)}
    if eps is not None:
        changes["eps"] = eps / 255
    if alpha is not None:
        changes["alpha"] = alpha / 255
    if iters is not None:
        changes["steps"] = iters
    if momentum is not None:
        changes["momentum"] = momentum
    for key in ("eps", "alpha", "jitter"):
        if changes.get(key, 0.0) < 0:
            raise FaceveilError(f"`{key}` must not be negative")
    return dataclasses.replace(paper_config(seed), **changes)


@dataclass(frozen=True)
class MethodRun:
    """One method of a run: its person learner and its settings (name, attack configuration, universal or not)."""

    learner: PersonLearner
    settings: Settings


def split_method_name(method: str) -> tuple[str, bool]:
    """(registered method, combined with momentum + DFANet) of a name that may end in TRANSFER_SUFFIX."""
    if method.endswith(TRANSFER_SUFFIX):
        return method[:-len(TRANSFER_SUFFIX)], True
    return method, False


def registry_method(method: str, masks: int, base: Settings) -> MethodRun:
    """A registered person method (optionally with the "+md" suffix: momentum 1 and DFANet dropout, overriding the
    base configuration's) with the run's shared settings, learning `masks` diverse masks per person."""
    name, transfer = split_method_name(method)
    learner = registry.person_learner(name)
    if masks < 1:
        raise FaceveilError(f"the number of masks must be at least 1, got {masks}")
    attack = base.attack
    if transfer:
        rate, per_model = dropout_setting(TRANSFER_DROPOUT)
        attack = dataclasses.replace(attack, momentum=TRANSFER_MOMENTUM, dropout=rate, model_dropout=per_model)
    options = dataclasses.replace(base.options, masks=masks)
    settings = dataclasses.replace(base, method=method, attack=attack, universal=name in UNIVERSAL_METHODS,
                                   options=options)
    return MethodRun(learner, settings)


def run(split: Split, judges: list[str], surrogates: list[str] | None, learner: PersonLearner,
        settings: Settings) -> tuple[list[dict], dict]:
    """Rows (one per judge) and settings (split counts, timings) of the protocol on a split."""
    return run_methods(split, judges, surrogates, [MethodRun(learner, settings)])


def run_methods(split: Split, judges: list[str], surrogates: list[str] | None,
                methods: list[MethodRun]) -> tuple[list[dict], dict]:
    """Rows (one per method and judge) and settings of several methods on one split: landmarks and clean
    embeddings are computed once. Timings and re-detection failures are per surrogate set, and with more than one
    method per method, then per surrogate set."""
    if not methods:
        raise ValueError("at least one method")
    first = methods[0].settings
    if len({m.settings.method for m in methods}) < len(methods):
        raise FaceveilError("`method` lists a method twice")
    if any(m.settings.mode != first.mode for m in methods):
        raise ValueError("the methods of one run share the mode")
    files = sorted({f for p in split.people for f in p.train + p.test} | {f for _, f in split.distractors})
    landmarks, info = landmarks_for(files, first.progress)
    clean_files = sorted({f for p in split.people for f in p.test} | {f for _, f in split.distractors})
    start = time.perf_counter()
    clean = embed_files(judges, clean_files, landmarks, first.progress)
    clean_seconds = round(time.perf_counter() - start, 2)
    rows: list[dict] = []
    learn, apply, failures, applied = {}, {}, {}, {}
    for method in methods:
        settings = method.settings
        for group, group_judges in surrogate_groups(judges, surrogates).items():
            result = mask_group(split, landmarks, list(group), group_judges, method.learner, settings)
            key = "+".join(group)
            for table, value in ((learn, round(result.learn_seconds, 2)), (apply, round(result.apply_seconds, 2)),
                                 (failures, result.redetect_failures), (applied, result.applied)):
                (table.setdefault(settings.method, {}) if len(methods) > 1 else table)[key] = value
            rows += [judge_row(judge, result, split, clean, settings) for judge in group_judges]
    meta = {**split.counts(), "learn_seconds": learn, "apply_embed_seconds": apply,
            "clean_embed_seconds": clean_seconds, "redetect_failures": failures, "detected": info["detected"],
            "images": info["images"], "fallback_alignment_count": len(info["fallback_alignment"])}
    if first.mode == "users":  # what apply did with the test photos, per surrogate set
        meta["users_applied"] = applied
    return rows, meta


# ---- robustness ------------------------------------------------------------------------------------------------

class OpomAdapter:
    """`eval robustness` on this protocol (faceveil.evaluate.robustness), M-O setting: each masked test image of a
    person is a probe against the person's other clean test images and the distractors; Top-1 / Top-5 protection
    success rates pooled over persons (and masks: each mask has the same tests, so the pool is the mean over masks).
    The gallery stays clean: only the probes go through the transforms."""

    protocol = "opom"
    metric = "top1_psr"

    def __init__(self, split: Split, judges: list[str], surrogates: list[str] | None, learner: PersonLearner,
                 settings: Settings) -> None:
        self.split, self.judges, self.surrogates = split, judges, surrogates
        self.learner, self.settings, self.mode = learner, settings, settings.mode
        self.info: dict = {}
        self.clean: EmbeddingTable | None = None  # the test images and distractors, clean
        self.photo_redetect_failures: dict[str, int] = {}

    def scenarios(self) -> Iterator[Scenario]:
        people, progress = self.split.people, self.settings.progress
        files = sorted({f for p in people for f in p.train + p.test} | {f for _, f in self.split.distractors})
        landmarks, self.info = landmarks_for(files, progress)
        clean_files = sorted({f for p in people for f in p.test} | {f for _, f in self.split.distractors})
        self.clean = embed_files(self.judges, clean_files, landmarks, progress)
        for group, group_judges in surrogate_groups(self.judges, self.surrogates).items():
            start = time.perf_counter()
            protected, clean, layout, quality = self._mask_everybody(list(group), landmarks)
            names = [people[index].name for index, rows in layout for _ in rows]
            yield Scenario(list(group), group_judges, protected, clean, names, round(time.perf_counter() - start, 2),
                           quality, context=layout)

    def _mask_everybody(self, surrogates: list[str], landmarks: dict[Path, np.ndarray]):
        """Every person's masks learned with these surrogates (as mask_group: same seeds, same masks) and applied
        to its test images; the images are kept (the protocol itself keeps embeddings only)."""
        ensemble, settings, people = Ensemble(surrogates), self.settings, self.split.people
        detector = None
        if settings.mode == "photos":
            from faceveil.detect.mtcnn import default_detector

            detector = default_detector()
        universal = None
        if settings.universal:
            everybody = tuple(f for p in people for f in p.train)
            universal = learn_masks(everybody, landmarks, ensemble, self.learner, settings, settings.attack)
        protected, clean, layout = ProbeImages([], []), ProbeImages([], []), []
        psnr, ssim, failures = [], [], 0
        with tempfile.TemporaryDirectory(prefix="faceveil-robust-opom-") as tmp:
            bar = tqdm(people, desc=f"masks ({'+'.join(surrogates)})", disable=not settings.progress, unit="person")
            for index, person in enumerate(bar):
                masks = universal if universal is not None else learn_masks(
                    person.train, landmarks, ensemble, self.learner, settings,
                    person_config(settings.attack, index))  # the protocol's own per-person seed
                for mask in masks:
                    masked = apply_mask(person.test, landmarks, mask, settings, Path(tmp), detector)
                    first = len(protected.images)
                    protected.images.extend(masked.images)
                    protected.landmarks.extend(masked.landmarks)
                    clean.images.extend(masked.clean_images)
                    clean.landmarks.extend(masked.clean_landmarks)
                    layout.append((index, range(first, len(protected.images))))
                    psnr += masked.psnr
                    ssim += masked.ssim
                    failures += masked.redetect_failures
        self.photo_redetect_failures["+".join(surrogates)] = failures
        return protected, clean, layout, {"psnr": float(np.mean(psnr)), "ssim": float(np.mean(ssim))}

    def rates(self, scenario: Scenario, judge: str, embeddings: torch.Tensor) -> dict[str, float]:
        if self.clean is None:
            raise RuntimeError("scenarios() has not run yet")
        metric, split = zoo.spec(judge).metric, self.split
        distractors = self.clean.of(judge, [f for _, f in split.distractors])
        names = [n for n, _ in split.distractors]
        tally = Tally()
        for index, rows in scenario.context:
            person = split.people[index]
            others = distractors[torch.tensor([i for i, n in enumerate(names) if n != person.name], dtype=torch.long)]
            originals = self.clean.of(judge, person.test)
            probes = embeddings[torch.tensor(list(rows), dtype=torch.long)]
            tally.add(own_ranks(metric, probes, originals, sorted_scores(metric, probes, others)))
        top1, top5 = tally.rates()
        return {"top1_psr": top1, "top5_psr": top5, "tests": tally.tests}

    def meta(self) -> dict:
        return {**self.split.counts(), "detected": self.info.get("detected"), "images": self.info.get("images"),
                "fallback_alignment_count": len(self.info.get("fallback_alignment", [])),
                "protected_photo_redetect_failures": self.photo_redetect_failures, "setting": "M-O"}


def robustness_adapter(request: Request) -> tuple[OpomAdapter, dict]:
    """The adapter of a robustness request (method default opom-convex, budget default OPOM §4.1), and its
    settings."""
    from faceveil.datasets.lfw import identities

    method = request.method or DEFAULT_METHOD
    attack = attack_config(request.seed, request.mode, request.eps, request.alpha, request.iters, request.momentum,
                           request.dropout, request.jitter)
    base = Settings(mode=request.mode, attack=attack, batch=request.batch, progress=request.progress)
    chosen = registry_method(method, request.masks, base)  # "+md": momentum 1 and DFANet dropout (§3.2.3)
    attack = chosen.settings.attack
    min_images = MIN_IMAGES if request.min_images is None else request.min_images
    train_images = TRAIN_IMAGES if request.train_images is None else request.train_images
    split = make_split(identities(request.root), request.seed, request.limit, min_images, train_images,
                       request.distractors, request.test_images)
    resolved = {"method": method, "masks": request.masks, "eps": round(attack.eps * 255, 4),
                "alpha": round(attack.alpha * 255, 4), "iters": attack.steps, "momentum": attack.momentum,
                "dropout": attack.dropout, "model_dropout": dict(attack.model_dropout), "jitter": attack.jitter,
                "distractors": "all" if request.distractors is None else request.distractors,
                "batch": request.batch, "dataset": str(request.root)}
    return OpomAdapter(split, request.judges, request.surrogates, chosen.learner, chosen.settings), resolved
