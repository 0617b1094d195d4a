"""`faceveil eval robustness`: does protection survive what happens to a photo after it is posted?

An identification protocol is run ONCE (the probes are protected once per surrogate set); then the protected
probes go through each transform of the registry (faceveil.evaluate.transforms) and are scored again by every
judge. In crops mode the transform is applied to the protected aligned (canonical) face, which is then re-aligned
with the same landmarks; in photos mode it is applied to the saved photo, the face is detected again and aligned
with the new landmarks (as a recogniser's own pipeline would). `realign` moves the landmarks instead.

Per judge and transform the row gives the protocol's protection rate (Rank-1-UT for tip-im), `retained` = that
rate / the untransformed rate, and the same rate for the UNPROTECTED probes after the same transform: a transform
that destroys recognition by itself makes any protection look retained, so `gain` = protected rate - clean rate
(what the protection adds over the transform alone) and `gain_retained` = gain / untransformed gain are given too.
`judge_seen_by_surrogates` says whether the judge was among the models the protection was optimised against
(white-box) or not (black-box: leave-one-family-out by default).

With --adaptive, one more row per judge: the adaptive attacker (faceveil.evaluate.adaptive) who maps protected
embeddings back towards clean ones with a linear probe trained on other identities' protected/clean pairs.

A protocol plugs in through an adapter (`Adapter`): its scenarios (per surrogate set: protected probe images,
the clean probe images, their landmarks, the probes' identities) and its scorer (scenario, judge, probe
embeddings -> rates). Adapters: tip-im (Rank-1-UT), opom (M-O Top-1 protection success rate; the gallery's clean
images are not transformed) and apf (Eq. 11 ASR of one gradient algorithm and stage; the server model fixes the
surrogates: the client's probe and the server models).
"""

from __future__ import annotations

import hashlib
import importlib.util
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from tqdm import tqdm

from faceveil.datasets.faces import embed_files
from faceveil.errors import FaceveilError
from faceveil.evaluate import adaptive, transforms
from faceveil.evaluate.adaptive import DEFAULT_FOLDS
from faceveil.evaluate.protocols import tip_im as identification
from faceveil.models import zoo

NONE = "none"  # the untransformed protected probes: the reference of `retained`
PLAIN = "plain"
ADAPTIVE = "adaptive (linear probe)"
PROTOCOL_METRICS = {"tip-im": "rank1_ut", "opom": "top1_psr", "apf": "asr"}
# Modules the colleagues' protocols live in: their adapters are used once these exist.
PROTOCOL_MODULES = {"opom": "faceveil.evaluate.protocols.opom", "apf": "faceveil.evaluate.protocols.apf"}

Redetect = Callable[[np.ndarray, np.ndarray], "np.ndarray | None"]  # (image, previous landmarks) -> landmarks


@dataclass
class ProbeImages:
    """Probe images (canonical faces or photos) with the landmarks [5,2] a recogniser aligns them with."""

    images: list[np.ndarray]
    landmarks: list[np.ndarray]


@dataclass
class Scenario:
    """One protection run: its surrogate set, the judges scored against it, its protected probes and the same
    probes unprotected (same order), and each probe's identity (the adaptive attacker trains on other ones)."""

    surrogates: list[str]
    judges: list[str]
    protected: ProbeImages
    clean: ProbeImages
    identities: list[str]
    protect_seconds: float = 0.0
    info: dict = field(default_factory=dict)  # reported per surrogate set (quality)
    context: Any = None  # the adapter's own bookkeeping for its scorer (e.g. which rows are whose)


class Adapter(Protocol):
    protocol: str
    metric: str  # the key of the protection rate among rates()
    mode: str  # "crops" (canonical faces, landmarks kept) | "photos" (re-detected after a pixel transform)

    def scenarios(self) -> Iterator[Scenario]: ...

    def rates(self, scenario: Scenario, judge: str, embeddings: torch.Tensor) -> dict[str, float]: ...

    def meta(self) -> dict: ...


@dataclass
class Options:
    transforms: list[str]
    seed: int = 0
    adaptive: bool = False
    folds: int = DEFAULT_FOLDS
    progress: bool = True


# ----------------------------------------------------------------------------------------------- adapters


class TipImAdapter:
    """The TIP-IM identification protocol (faceveil.evaluate.protocols.tip_im): Rank-1-UT against the gallery."""

    protocol = "tip-im"
    metric = PROTOCOL_METRICS["tip-im"]

    def __init__(self, root: Path, judges: list[str], surrogates: list[str] | None,
                 settings: identification.Settings, seed: int = 0, limit: int | None = None,
                 extra: int | None = None) -> None:
        self.root, self.judges, self.surrogates = root, judges, surrogates
        self.settings, self.seed, self.limit, self.extra = settings, seed, limit, extra
        self.mode = settings.mode
        self.prepared: identification.Prepared | None = None
        self.photo_redetect_failures: dict[str, int] = {}

    def scenarios(self) -> Iterator[Scenario]:
        self.prepared = identification.prepare(self.root, self.judges, self.settings, self.seed, self.limit,
                                               self.extra)
        names = [n for n, _ in self.prepared.split.probes]
        for group in identification.protect_groups(self.prepared, self.judges, self.surrogates, self.settings):
            p = group.protected
            self.photo_redetect_failures["+".join(group.surrogates)] = p.redetect_failures
            yield Scenario(group.surrogates, group.judges, ProbeImages(p.images, p.landmarks),
                           ProbeImages(p.clean_images, p.clean_landmarks), names, group.seconds,
                           {"psnr": float(np.mean(p.psnr)), "ssim": float(np.mean(p.ssim))})

    def rates(self, scenario: Scenario, judge: str, embeddings: torch.Tensor) -> dict[str, float]:
        split = self._prepared().split
        scores = zoo.score_matrix(zoo.spec(judge).metric, embeddings, self._prepared().galleries[judge])
        return identification.rank_metrics(scores, [n for n, _ in split.gallery], [n for n, _ in split.probes],
                                           {n for n, _ in split.targets})

    def meta(self) -> dict:
        return {**self._prepared().meta(), "protected_photo_redetect_failures": self.photo_redetect_failures}

    def _prepared(self) -> identification.Prepared:
        if self.prepared is None:
            raise RuntimeError("scenarios() has not run yet")
        return self.prepared


class OpomAdapter:
    """The OPOM person-mask protocol (faceveil.evaluate.protocols.opom), M-O setting: each masked test image of a
    person is a probe against the person's other clean test images and the distractors; Top-1 / Top-5 protection
    success rates pooled over persons (and masks: each mask has the same tests, so the pool is the mean over masks).
    The gallery stays clean: only the probes go through the transforms."""

    protocol = "opom"
    metric = PROTOCOL_METRICS["opom"]

    def __init__(self, split, judges: list[str], surrogates: list[str] | None, learner, settings) -> None:
        self.split, self.judges, self.surrogates = split, judges, surrogates
        self.learner, self.settings, self.mode = learner, settings, settings.mode
        self.info: dict = {}
        self.clean = None  # evaluate.faces.EmbeddingTable of the test images and distractors
        self.photo_redetect_failures: dict[str, int] = {}

    def scenarios(self) -> Iterator[Scenario]:
        from faceveil.datasets.faces import landmarks_for

        people, progress = self.split.people, self.settings.progress
        files = sorted({f for p in people for f in p.train + p.test} | {f for _, f in self.split.distractors})
        landmarks, self.info = landmarks_for(files, progress)
        clean_files = sorted({f for p in people for f in p.test} | {f for _, f in self.split.distractors})
        self.clean = embed_files(self.judges, clean_files, landmarks, progress)
        for group, group_judges in identification.surrogate_groups(self.judges, self.surrogates).items():
            start = time.perf_counter()
            protected, clean, layout, quality = self._mask_everybody(list(group), landmarks)
            names = [people[index].name for index, rows in layout for _ in rows]
            yield Scenario(list(group), group_judges, protected, clean, names, round(time.perf_counter() - start, 2),
                           quality, context=layout)

    def _mask_everybody(self, surrogates: list[str], landmarks: dict[Path, np.ndarray]):
        """Every person's masks learned with these surrogates (as opom_protocol.mask_group: same seeds, same
        masks) and applied to its test images; the images are kept (the protocol itself keeps embeddings only)."""
        from faceveil.attacks.core import Ensemble
        from faceveil.evaluate.protocols import opom as P

        ensemble, settings, people = Ensemble(surrogates), self.settings, self.split.people
        detector = None
        if settings.mode == "photos":
            from faceveil.detect.mtcnn import default_detector

            detector = default_detector()
        universal = None
        if settings.universal:
            everybody = tuple(f for p in people for f in p.train)
            universal = P.learn_masks(everybody, landmarks, ensemble, self.learner, settings, settings.attack)
        protected, clean, layout = ProbeImages([], []), ProbeImages([], []), []
        psnr, ssim, failures = [], [], 0
        with tempfile.TemporaryDirectory(prefix="faceveil-robust-opom-") as tmp:
            bar = tqdm(people, desc=f"masks ({'+'.join(surrogates)})", disable=not settings.progress, unit="person")
            for index, person in enumerate(bar):
                masks = universal if universal is not None else P.learn_masks(
                    person.train, landmarks, ensemble, self.learner, settings,
                    P.person_config(settings.attack, index))  # the protocol's own per-person seed
                for mask in masks:
                    masked = P.apply_mask(person.test, landmarks, mask, settings, Path(tmp), detector)
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
        from faceveil.evaluate.protocols import opom as P

        metric, split = zoo.spec(judge).metric, self.split
        distractors = self.clean.of(judge, [f for _, f in split.distractors])
        names = [n for n, _ in split.distractors]
        tally = P.Tally()
        for index, rows in scenario.context:
            person = split.people[index]
            others = distractors[torch.tensor([i for i, n in enumerate(names) if n != person.name], dtype=torch.long)]
            originals = self.clean.of(judge, person.test)
            probes = embeddings[torch.tensor(list(rows), dtype=torch.long)]
            tally.add(P.own_ranks(metric, probes, originals, P.sorted_scores(metric, probes, others)))
        top1, top5 = tally.rates()
        return {"top1_psr": top1, "top5_psr": top5, "tests": tally.tests}

    def meta(self) -> dict:
        return {**self.split.counts(), "detected": self.info.get("detected"), "images": self.info.get("images"),
                "fallback_alignment_count": len(self.info.get("fallback_alignment", [])),
                "protected_photo_redetect_failures": self.photo_redetect_failures, "setting": "M-O"}


class ApfAdapter:
    """The APF protocol's ASR table (faceveil.evaluate.protocols.apf, Eq. 11), one gradient algorithm and one stage:
    positive LFW pairs, the second image protected against the first (enrolled, clean photo). A judge recognises
    a face when its score to the enrolled face reaches the calibrated threshold. asr = (N_w/o - N_w) / N with N_w/o
    the clean untransformed faces recognised: after a transform, the clean row's asr is what the transform alone
    breaks, and gain = protected - clean asr is Eq. 11 with both sides transformed. Crops mode (the protocol's)."""

    protocol = "apf"
    metric = PROTOCOL_METRICS["apf"]
    mode = "crops"

    def __init__(self, root: Path, server, judges: list[str], algorithm: str, stage: str, limit: int | None,
                 batch: int, seed: int, iterations: int, progress: bool) -> None:
        from faceveil.evaluate.protocols import apf as A

        self.root, self.server, self.judges, self.stage = root, server, judges, stage
        self.options = A.Options(algorithms=[algorithm], judges=judges, stages=[stage], limit=limit,
                                 baseline=False, adversarial=False, batch=batch, seed=seed, iterations=iterations,
                                 progress=progress)
        self.config = A.client_config(server, algorithm, self.options)
        A.check_budget(server, self.config)
        self.info: dict = {}
        self.pairs: list = []
        self.enrolled: dict[str, torch.Tensor] = {}
        self.clean_recognised: dict[str, torch.Tensor] = {}

    def scenarios(self) -> Iterator[Scenario]:
        from faceveil.datasets.faces import landmarks_for
        from faceveil.detect import canonical as C
        from faceveil.detect.align import transform_points, warp_matrix
        from faceveil.evaluate.protocols import apf as A
        from faceveil.evaluate.quality import ssim

        server_models = list(self.server.meta.get("server_models", []))
        geometries = sorted({zoo.spec(n).geometry for n in [self.config.probe, *server_models]})
        self.pairs = A.positive_pairs(self.root, self.options.limit)
        landmarks, self.info = landmarks_for(sorted({p for pr in self.pairs for p in (pr.a, pr.b)}),
                                             self.options.progress)
        protected, clean, quality, start = ProbeImages([], []), ProbeImages([], []), [], time.perf_counter()
        chunks = [self.pairs[i:i + self.options.batch] for i in range(0, len(self.pairs), self.options.batch)]
        for chunk in tqdm(chunks, desc="apf protect", disable=not self.options.progress, unit="batch"):
            enrolled = A.face_batch([p.a for p in chunk], landmarks, geometries)
            batch = A.face_batch([p.b for p in chunk], landmarks, geometries)
            noise = A.stage_noise(self.server, A.probe_gradient(batch, self.config, enrolled), self.stage)
            after = identification.to_uint8(batch.perturbed(A.to_canonical(noise)))
            before = identification.to_uint8(batch.regions)
            marks = [transform_points(warp_matrix(landmarks[p.b], C.CANONICAL).numpy(), landmarks[p.b])
                     for p in chunk]
            protected.images.extend(after)
            clean.images.extend(before)
            protected.landmarks.extend(marks)
            clean.landmarks.extend(marks)
            quality += [ssim(identification.face_area(a), identification.face_area(b))
                        for a, b in zip(before, after, strict=True)]
        seconds = round(time.perf_counter() - start, 2)
        self.enrolled = A.Judges(self.judges).photos([p.a for p in self.pairs], landmarks)
        for judge in self.judges:
            untransformed = identification.embed_images(judge, clean.images, clean.landmarks)
            self.clean_recognised[judge] = A.recognised(judge, untransformed, self.enrolled[judge])
        yield Scenario([self.config.probe, *server_models], self.judges, protected, clean,
                       [p.a.parent.name for p in self.pairs], seconds, {"ssim": float(np.mean(quality))})

    def rates(self, scenario: Scenario, judge: str, embeddings: torch.Tensor) -> dict[str, float]:
        from faceveil.evaluate.protocols import apf as A

        recognised = A.recognised(judge, embeddings, self.enrolled[judge])
        n = len(recognised)
        lost = int(self.clean_recognised[judge].sum()) - int(recognised.sum())
        return {"asr": lost / n if n else 0.0, "recognised": float(recognised.float().mean()) if n else 0.0}

    def meta(self) -> dict:
        return {"pairs": len(self.pairs), "algorithm": self.config.algorithm, "stage": self.stage,
                "probe": self.config.probe, "server_models": list(self.server.meta.get("server_models", [])),
                "eps": round(self.server.eps * 255, 4), "iterations": self.config.iterations,
                "thresholds": {j: zoo.threshold(j) for j in self.judges}, "detected": self.info.get("detected"),
                "images": self.info.get("images")}


def protocol_available(protocol: str) -> bool:
    """tip-im always; opom/apf once their protocol modules exist."""
    module = PROTOCOL_MODULES.get(protocol)
    return module is None or importlib.util.find_spec(module) is not None


def require_protocol(protocol: str) -> None:
    if protocol not in PROTOCOL_METRICS:
        raise FaceveilError(f"unknown protocol {protocol!r}; known: {', '.join(PROTOCOL_METRICS)}")
    if not protocol_available(protocol):
        raise FaceveilError(f"--protocol {protocol}: its protocol module ({PROTOCOL_MODULES[protocol]}) is not built "
                            "yet, so robustness cannot run it; use --protocol tip-im")


# ----------------------------------------------------------------------------------------------- transforms


def redetector(detector) -> Redetect:
    """Finds the face again in a transformed photo: the detection whose landmarks lie nearest the previous ones,
    within one eye distance (None when there is none: the caller keeps the previous landmarks and counts it)."""
    def find(image: np.ndarray, previous: np.ndarray) -> np.ndarray | None:
        faces = detector.detect_large(image)
        if not faces:
            return None
        previous = np.asarray(previous, dtype=np.float64)
        dist = [float(np.linalg.norm(np.asarray(f.landmarks) - previous, axis=1).mean()) for f in faces]
        best = int(np.argmin(dist))
        eye_distance = float(np.linalg.norm(previous[1] - previous[0]))
        return np.asarray(faces[best].landmarks, dtype=np.float64) if dist[best] < eye_distance else None

    return find


def transformed(probes: ProbeImages, name: str, seed: int,
                redetect: Redetect | None = None) -> tuple[ProbeImages, int]:
    """The probes after transform `name` (each with its own seed, the same for a protected probe and its clean
    original) and the count of faces not found again (their previous landmarks are kept)."""
    if name == NONE:
        return probes, 0
    images, marks, failures = [], [], 0
    for index, (image, landmarks) in enumerate(zip(probes.images, probes.landmarks, strict=True)):
        item = transforms.item_seed(seed, index)
        out = transforms.apply(name, image, item)
        base = np.asarray(landmarks, dtype=np.float64)
        if redetect is not None and not np.array_equal(out, image):  # pixels changed: the pipeline looks again
            found = redetect(out, base)
            failures += found is None
            base = base if found is None else found
        images.append(out)
        marks.append(transforms.landmarks_after(name, base, item))
    return ProbeImages(images, marks), failures


def fingerprint(probes: ProbeImages) -> str:
    digest = hashlib.sha1()
    for image, marks in zip(probes.images, probes.landmarks, strict=True):
        digest.update(np.ascontiguousarray(image).tobytes())
        digest.update(np.asarray(marks, dtype=np.float64).tobytes())
    return digest.hexdigest()


class CleanCache:
    """The clean probes' landmarks after each transform, shared by scenarios with the same clean probes (every
    surrogate set of one protocol run), so the clean side is re-detected once; the pixels (cheap, seeded) are
    transformed again rather than kept, so memory stays one transform's worth."""

    def __init__(self) -> None:
        self._landmarks: dict[tuple[str, str], tuple[list[np.ndarray], int]] = {}

    def get(self, key: str, probes: ProbeImages, name: str, seed: int,
            redetect: Redetect | None) -> tuple[ProbeImages, int]:
        if (key, name) not in self._landmarks or name == NONE:
            out, lost = transformed(probes, name, seed, redetect)
            self._landmarks[(key, name)] = (out.landmarks, lost)
            return out, lost
        marks, lost = self._landmarks[(key, name)]
        images = [transforms.apply(name, image, transforms.item_seed(seed, i)) for i, image in enumerate(probes.images)]
        return ProbeImages(images, marks), lost


# ----------------------------------------------------------------------------------------------- rows


def ratio(value: float, reference: float) -> float | None:
    """value / reference; None when the reference is 0 (nothing to retain)."""
    return None if reference == 0 else value / reference


@dataclass
class Measured:
    """One judge's rates on the protected and on the clean probes (after one transform or attacker)."""

    rates: dict[str, float]
    clean_rates: dict[str, float]


def make_row(metric: str, judge: str, surrogates: list[str], transform: str, attacker: str, measured: Measured,
             reference: Measured) -> dict:
    """The row of one judge x transform (or attacker), `retained` relative to the untransformed reference."""
    rate, clean = measured.rates[metric], measured.clean_rates[metric]
    base, base_clean = reference.rates[metric], reference.clean_rates[metric]
    return {"judge": judge, "judge_seen_by_surrogates": "white-box" if judge in surrogates else "black-box",
            "transform": transform, "attacker": attacker, metric: rate, "retained": ratio(rate, base),
            f"clean_{metric}": clean, "gain": rate - clean, "gain_retained": ratio(rate - clean, base - base_clean),
            "surrogates": list(surrogates), "rates": measured.rates, "clean_rates": measured.clean_rates}


def _adaptive_row(adapter: Adapter, scenario: Scenario, judge: str, embedded: tuple[torch.Tensor, torch.Tensor],
                  reference: Measured, options: Options) -> dict:
    protected, clean = embedded
    fit = adaptive.cross_fitted(protected, clean, scenario.identities, zoo.spec(judge).metric, options.folds,
                                options.seed)
    measured = Measured(adapter.rates(scenario, judge, fit.mapped_protected),
                        adapter.rates(scenario, judge, fit.mapped_clean))
    row = make_row(adapter.metric, judge, scenario.surrogates, NONE, ADAPTIVE, measured, reference)
    return {**row, "adaptive_folds": fit.folds, "adaptive_train_pairs": fit.train_pairs,
            "adaptive_lambdas": fit.lambdas}


def scenario_rows(adapter: Adapter, scenario: Scenario, options: Options, redetect: Redetect | None,
                  cache: CleanCache, failures: dict[str, dict[str, int]]) -> list[dict]:
    """Every judge of one scenario x (none + transforms), then the adaptive rows."""
    measured: dict[str, dict[str, Measured]] = {j: {} for j in scenario.judges}
    untransformed: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    group, clean_key = "+".join(scenario.surrogates), fingerprint(scenario.clean)
    names = [NONE, *[n for n in options.transforms if n != NONE]]
    for name in tqdm(names, desc=f"transforms ({group})", disable=not options.progress, unit="transform"):
        protected, lost = transformed(scenario.protected, name, options.seed, redetect)
        clean, clean_lost = cache.get(clean_key, scenario.clean, name, options.seed, redetect)
        if redetect is not None and name != NONE:
            failures.setdefault(group, {})[name] = lost
            failures.setdefault("clean", {})[name] = clean_lost
        for judge in scenario.judges:
            p = identification.embed_images(judge, protected.images, protected.landmarks)
            c = identification.embed_images(judge, clean.images, clean.landmarks)
            measured[judge][name] = Measured(adapter.rates(scenario, judge, p), adapter.rates(scenario, judge, c))
            if name == NONE:
                untransformed[judge] = (p, c)
    rows = []
    for judge in scenario.judges:
        reference = measured[judge][NONE]
        rows += [make_row(adapter.metric, judge, scenario.surrogates, name, PLAIN, m, reference)
                 for name, m in measured[judge].items()]
        if options.adaptive:
            rows.append(_adaptive_row(adapter, scenario, judge, untransformed[judge], reference, options))
    return rows


def evaluate(adapter: Adapter, options: Options, detector=None) -> tuple[list[dict], dict]:
    """Rows (judge x transform, plus adaptive) and settings of one robustness run."""
    for name in options.transforms:
        transforms.get(name)
    redetect = None
    if adapter.mode == "photos":
        from faceveil.detect.mtcnn import default_detector

        redetect = redetector(detector or default_detector())
    cache, failures, seconds, quality, rows = CleanCache(), {}, {}, {}, []
    for scenario in adapter.scenarios():
        group = "+".join(scenario.surrogates)
        seconds[group], quality[group] = scenario.protect_seconds, scenario.info
        rows += scenario_rows(adapter, scenario, options, redetect, cache, failures)
    meta = {"protocol": adapter.protocol, "metric": adapter.metric, "mode": adapter.mode,
            "transforms": {n: transforms.get(n).description for n in options.transforms}, "seed": options.seed,
            "adaptive": options.adaptive, "adaptive_folds": options.folds if options.adaptive else None,
            "protect_seconds": seconds, "quality": quality, "redetect_failures_after_transform": failures,
            **adapter.meta()}
    return rows, meta


DISPLAY_DROP = ("surrogates", "rates", "clean_rates", "adaptive_folds", "adaptive_train_pairs", "adaptive_lambdas")


def display_rows(rows: list[dict]) -> list[dict]:
    """Rows for the markdown table: the main columns, rates with 4 decimals, undefined ratios blank."""
    def cell(value):
        if isinstance(value, float):
            return f"{value:.4f}"
        return "" if value is None else value

    return [{k: cell(v) for k, v in row.items() if k not in DISPLAY_DROP} for row in rows]
