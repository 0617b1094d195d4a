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

With the adaptive option, one more row per judge: the adaptive attacker (faceveil.evaluate.adaptive) who maps protected
embeddings back towards clean ones with a linear probe trained on other identities' protected/clean pairs.

A protocol plugs in through an adapter (`Adapter`): its scenarios (per surrogate set: protected probe images,
the clean probe images, their landmarks, the probes' identities) and its scorer (scenario, judge, probe
embeddings -> rates). Each adapter lives in its protocol's module (faceveil.evaluate.protocols, whose ROBUSTNESS
lists them), built from a `Request` by that module's `robustness_adapter`: tip-im (Rank-1-UT), opom (M-O Top-1
protection success rate; the gallery's clean images are not transformed) and apf (Eq. 11 ASR of one gradient
algorithm and stage; the server model fixes the surrogates: the client's probe and the server models). This module
is the engine they share: it imports no protocol module (they import it).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from tqdm import tqdm

from faceveil.datasets.faces import embed_images
from faceveil.evaluate import adaptive, transforms
from faceveil.evaluate.adaptive import DEFAULT_FOLDS
from faceveil.models import zoo

NONE = "none"  # the untransformed protected probes: the reference of `retained`
PLAIN = "plain"
ADAPTIVE = "adaptive (linear probe)"

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


# ----------------------------------------------------------------------------------------------- protocols


@dataclass
class Request:
    """What `eval robustness` asks of a protocol: the dataset, judges and surrogates, the method and its budget
    (eps and alpha in 0..255 units; None = the protocol's paper default), and each protocol's own choices."""

    root: Path
    judges: list[str]
    surrogates: list[str] | None = None  # None: leave-one-family-out per judge
    method: str | None = None
    strength: str | None = None  # tip-im: `protect --strength`'s recipe instead of the method's budget flags
    mode: str = "crops"
    limit: int | None = None
    eps: float | None = None
    alpha: float | None = None
    iters: int | None = None
    momentum: float | None = None
    jitter: float | None = None
    batch: int = 8
    seed: int = 0
    progress: bool = True
    extra: int | None = None  # tip-im: further gallery identities
    gamma: float = 0.0  # tip-im: the MMD naturalness weight
    masks: int = 1  # opom: diverse masks per person
    dropout: float = 0.0  # opom: feature dropout while learning masks
    distractors: int | None = None  # opom: distractor images (None = all)
    train_images: int | None = None  # opom: images per person that learn the mask (None: the protocol's 10)
    test_images: int | None = 5  # opom: test images per person (the protocol's TEST_IMAGES; None = all)
    min_images: int | None = None  # opom: identities with this many images are protected (None: the protocol's 12)
    checkpoint: str | None = None  # apf: the server networks (None = the packaged ones)
    stage: str = "s"  # apf: g, g_hat or s
    # tip-im: how the probe batches' masks are computed (tip_im.MaskMap; None: here, one after another)
    mask_map: Callable[..., Any] | None = None


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
            p = embed_images(judge, protected.images, protected.landmarks)
            c = embed_images(judge, clean.images, clean.landmarks)
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
