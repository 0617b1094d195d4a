"""The APF evaluation protocol (apf-mm2020 §4.1-4.3) on LFW, in crops mode (the aligned face is perturbed).

Pairs: the positive pairs of LFW's pairs.txt (the paper's "3,000 positive pairs"), spread evenly over the ten
folds when limited. In each pair the first image is enrolled (x_e) and the second (x) is protected.

Table 2 / 3 (`table` = "asr"): for each gradient algorithm the client computes g with the probe against the enrolled
face (Eq. 1-2); the protected face is x + noise with noise = g (APF_g), T(g) (APF_g_hat) or s = clip(T(g) + E(u))
(APF_s), upsampled to canonical space and pasted with the face mask, then rounded to 8 bits. "original image
accessible" is the same algorithm run by the server models themselves on x (ensemble loss, weights alpha_k), the
setting that violates non-accessibility. Each judge decides "recognised" by its calibrated threshold
(faceveil.models.zoo.threshold) on the enrolled photo's embedding and the (protected) face's, and
ASR = (N_w/o - N_w/) / N_total (Eq. 11). `box`: white = a server model (white-box to the server), probe = the
client's probe, family = same family as one of those, black = a family neither side saw (black-box).

Table 4 (`table` = "adversarial-matching"): pairs whose identity has a third image e: e is enrolled and both images
of the pair are protected against it, without and with the Eq. 13 offset. adversarial-original matches each
protected image with e; adversarial-adversarial matches the two protected images with each other; each ASR is
against the same matches without protection.

SSIM (Fig. 4): protected vs original face area (the face mask's square in canonical space), 8-bit images.
"""

from __future__ import annotations

import dataclasses
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from faceveil.attacks.core import Ensemble
from faceveil.attacks.faces import FaceBatch
from faceveil.datasets.faces import embed_images, landmarks_for
from faceveil.datasets.lfw import Pair, identities, read_pairs
from faceveil.detect import canonical as C
from faceveil.detect.align import transform_points, warp_matrix
from faceveil.errors import FaceveilError
from faceveil.evaluate.protocols.tip_im import face_area, to_uint8
from faceveil.evaluate.quality import ssim
from faceveil.evaluate.robustness import ProbeImages, Request, Scenario
from faceveil.io.images import read_image
from faceveil.methods.apf.networks import ApfServerModel, default_checkpoint, load_server_model
from faceveil.methods.apf.probe import (
    GRADIENT_ALGORITHMS,
    STAGES,
    ApfClientConfig,
    adversarial_noise,
    check_budget,
    probe_gradient,
    stage_noise,
    to_canonical,
)
from faceveil.methods.apf.train import face_batch
from faceveil.models import zoo

STAGE_NAMES = {"g": "APF_g", "g_hat": "APF_g_hat", "s": "APF_s"}
BASELINE = "original image accessible"
TABLE4_ALGORITHMS = ("di2-fgsm", "m-di2-fgsm")  # the paper's Table 4
TABLE4_STAGES = ("g", "s")
SSIM_GOOD = 0.8  # Fig. 4's reference line
ITERATIONS = 30  # of the gradient algorithms (§4.1)


@dataclass
class Options:
    algorithms: list[str]
    judges: list[str]
    stages: list[str] = field(default_factory=lambda: ["g", "g_hat", "s"])
    limit: int | None = None
    baseline: bool = True
    adversarial: bool = True
    adversarial_limit: int | None = None
    batch: int = 8
    seed: int = 0
    iterations: int = 30
    progress: bool = True


def positive_pairs(root: Path, limit: int | None) -> list[Pair]:
    """Positive pairs, interleaved over the folds (fold 1's first, fold 2's first, ...) so a limit spreads."""
    by_fold: dict[int, list[Pair]] = defaultdict(list)
    for pair in read_pairs(root):
        if pair.same:
            by_fold[pair.fold].append(pair)
    rounds = max(len(v) for v in by_fold.values())
    ordered = [by_fold[f][i] for i in range(rounds) for f in sorted(by_fold) if i < len(by_fold[f])]
    return ordered[:limit] if limit else ordered


def third_images(root: Path, pairs: list[Pair]) -> list[tuple[Pair, Path]]:
    """(pair, enrolled e) for pairs whose identity has an image other than both of the pair's."""
    people = identities(root)
    out = []
    for pair in pairs:
        others = [p for p in people.get(pair.a.parent.name, []) if p not in (pair.a, pair.b)]
        if others:
            out.append((pair, others[0]))
    return out


def client_config(server: ApfServerModel, algorithm: str, options: Options, offset: bool = False) -> ApfClientConfig:
    """The client settings the server model was trained with (budget, step, probe), for `algorithm`."""
    trained = server.meta.get("client", {})
    cfg = ApfClientConfig(algorithm=algorithm, eps=server.eps, offset=offset, seed=options.seed,
                          iterations=options.iterations)
    for name in ("step", "diversity", "momentum", "probe"):
        if name in trained:
            setattr(cfg, name, trained[name])
    return cfg.validate()


def box(judge: str, server: ApfServerModel, probe: str) -> str:
    """white: a server model; probe: the client's probe; family: another model of a server model's or the probe's
    family (same layers, other weights: not a fair black-box judge); black: a family neither side has seen."""
    servers = server.meta.get("server_models", [])
    if judge in servers:
        return "white"
    if judge == probe:
        return "probe"
    seen = {zoo.spec(name).family for name in [*servers, probe]}
    return "family" if zoo.spec(judge).family in seen else "black"


def _canonical_marks(marks: np.ndarray) -> np.ndarray:
    return transform_points(warp_matrix(marks, C.CANONICAL).numpy(), marks)


class Judges:
    """The judges' embeddings of canonical faces (as a saved crop holds them) and of original photos."""

    def __init__(self, judges: list[str]):
        self.judges = judges

    def canonical(self, images: list[np.ndarray], marks: list[np.ndarray]) -> dict[str, torch.Tensor]:
        canonical = [_canonical_marks(m) for m in marks]
        return {j: embed_images(j, images, canonical) for j in self.judges}

    def photos(self, files: list[Path], landmarks: dict[Path, np.ndarray]) -> dict[str, torch.Tensor]:
        photos = [read_image(f).rgb for f in files]
        return {j: embed_images(j, photos, [landmarks[f] for f in files]) for j in self.judges}


def recognised(judge: str, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return zoo.score(zoo.spec(judge).metric, a, b) >= zoo.threshold(judge)


@dataclass
class Collected:
    """Per key: each judge's embeddings of the protected faces, and their SSIMs."""

    embeddings: dict[tuple, dict[str, list[torch.Tensor]]] = field(default_factory=lambda: defaultdict(
        lambda: defaultdict(list)))
    ssim: dict[tuple, list[float]] = field(default_factory=lambda: defaultdict(list))
    seconds: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))

    def add(self, key: tuple, judged: dict[str, torch.Tensor], clean: list[np.ndarray],
            protected: list[np.ndarray]) -> None:
        for j, e in judged.items():
            self.embeddings[key][j].append(e)
        self.ssim[key] += [ssim(face_area(a), face_area(b)) for a, b in zip(clean, protected,
                                                                                           strict=True)]

    def stacked(self, key: tuple, judge: str) -> torch.Tensor:
        return torch.cat(self.embeddings[key][judge])


def _protect_and_judge(out: Collected, key: tuple, batch: FaceBatch, grid_noise: torch.Tensor, judges: Judges,
                       marks: list[np.ndarray], clean: list[np.ndarray]) -> None:
    protected = to_uint8(batch.perturbed(to_canonical(grid_noise)))
    out.add(key, judges.canonical(protected, marks), clean, protected)


def _timed(out: Collected, name: str, faces: int, fn):
    start = time.perf_counter()
    value = fn()
    out.seconds[name].append((time.perf_counter() - start) / max(1, faces))
    return value


def _asr_chunk(out: Collected, pairs: list[Pair], landmarks: dict[Path, np.ndarray], server: ApfServerModel,
               options: Options, judges: Judges, servers: Ensemble, geometries: list[str]) -> None:
    enrolled = face_batch([p.a for p in pairs], landmarks, geometries)
    batch = face_batch([p.b for p in pairs], landmarks, geometries)
    marks = [landmarks[p.b] for p in pairs]
    clean = to_uint8(batch.regions)
    out.add(("clean",), judges.canonical(clean, marks), clean, clean)
    for j, e in judges.photos([p.a for p in pairs], landmarks).items():
        out.embeddings[("enrolled",)][j].append(e)
    for algorithm in options.algorithms:
        cfg = client_config(server, algorithm, options)
        g = _timed(out, f"client {algorithm}", len(pairs), lambda c=cfg: probe_gradient(batch, c, enrolled))
        for stage in options.stages:
            noise = _timed(out, f"server {stage}", len(pairs), lambda s=stage, g=g: stage_noise(server, g, s))
            _protect_and_judge(out, ("asr", algorithm, STAGE_NAMES[stage]), batch, noise, judges, marks, clean)
        if options.baseline:
            noise = _timed(out, f"baseline {algorithm}", len(pairs),
                           lambda c=cfg: adversarial_noise(batch, servers, c, enrolled))
            _protect_and_judge(out, ("asr", algorithm, BASELINE), batch, noise, judges, marks, clean)


def _table4_chunk(out: Collected, items: list[tuple[Pair, Path]], landmarks: dict[Path, np.ndarray],
                  server: ApfServerModel, options: Options, judges: Judges, geometries: list[str]) -> None:
    """Both images of each pair protected against the third image e (one batch: a's then b's)."""
    files = [p.a for p, _ in items] + [p.b for p, _ in items]
    enrolled_files = [e for _, e in items] * 2
    batch = face_batch(files, landmarks, geometries)
    enrolled = face_batch(enrolled_files, landmarks, geometries)
    marks = [landmarks[f] for f in files]
    clean = to_uint8(batch.regions)
    out.add(("t4-clean",), judges.canonical(clean, marks), clean, clean)
    for j, e in judges.photos([e for _, e in items], landmarks).items():
        out.embeddings[("t4-enrolled",)][j].append(e)
    for algorithm in [a for a in options.algorithms if a in TABLE4_ALGORITHMS]:
        for offset in (False, True):
            g = probe_gradient(batch, client_config(server, algorithm, options, offset), enrolled)
            for stage in [s for s in options.stages if s in TABLE4_STAGES]:
                key = ("t4", algorithm, STAGE_NAMES[stage], offset)
                _protect_and_judge(out, key, batch, stage_noise(server, g, stage), judges, marks, clean)


def _chunks(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def asr(judge: str, clean_match: torch.Tensor, protected_match: torch.Tensor) -> dict:
    """Eq. 11 with its counts."""
    n = len(clean_match)
    n_wo, n_w = int(clean_match.sum()), int(protected_match.sum())
    return {"asr": (n_wo - n_w) / n if n else 0.0, "recognised_clean": n_wo, "recognised_protected": n_w,
            "total": n}


def _asr_rows(out: Collected, server: ApfServerModel, options: Options, probe: str) -> list[dict]:
    rows = []
    stage_names = [STAGE_NAMES[s] for s in options.stages] + ([BASELINE] if options.baseline else [])
    for algorithm in options.algorithms:
        for stage in stage_names:
            key = ("asr", algorithm, stage)
            scores = out.ssim[key]
            for judge in options.judges:
                enrolled = out.stacked(("enrolled",), judge)
                clean = recognised(judge, out.stacked(("clean",), judge), enrolled)
                protected = recognised(judge, out.stacked(key, judge), enrolled)
                rows.append({"table": "asr", "algorithm": algorithm, "stage": stage, "judge": judge,
                             "box": box(judge, server, probe), **asr(judge, clean, protected),
                             "ssim": float(np.mean(scores)), "ssim_min": float(np.min(scores)),
                             "ssim_over_0.8": float(np.mean(np.asarray(scores) >= SSIM_GOOD))})
    return rows


def _table4_rows(out: Collected, server: ApfServerModel, options: Options, probe: str, count: int) -> list[dict]:
    rows = []
    for key in [k for k in out.embeddings if k[0] == "t4"]:
        _, algorithm, stage, offset = key
        for judge in options.judges:
            enrolled = out.stacked(("t4-enrolled",), judge)  # e, in pair order
            clean, protected = out.stacked(("t4-clean",), judge), out.stacked(key, judge)
            # the batches hold a's then b's per chunk: pair them chunk by chunk
            a_clean, b_clean = _halves(clean, options.batch, count)
            a_prot, b_prot = _halves(protected, options.batch, count)
            enrolled_ab = torch.cat([enrolled, enrolled])
            base = {"table": "adversarial-matching", "algorithm": algorithm, "stage": stage,
                    "offset": "w/ delta" if offset else "w/o delta", "judge": judge, "box": box(judge, server, probe)}
            rows.append({**base, "matching": "adversarial-original", **asr(
                judge, recognised(judge, torch.cat([a_clean, b_clean]), enrolled_ab),
                recognised(judge, torch.cat([a_prot, b_prot]), enrolled_ab))})
            rows.append({**base, "matching": "adversarial-adversarial", **asr(
                judge, recognised(judge, a_clean, b_clean), recognised(judge, a_prot, b_prot))})
    return rows


def _halves(stacked: torch.Tensor, batch: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Undo the per-chunk [a's, b's] layout: (all a's, all b's) in pair order."""
    a_parts, b_parts, start = [], [], 0
    for n in [len(c) for c in _chunks(list(range(count)), batch)]:
        a_parts.append(stacked[start:start + n])
        b_parts.append(stacked[start + n:start + 2 * n])
        start += 2 * n
    return torch.cat(a_parts), torch.cat(b_parts)


def run(root: Path, server: ApfServerModel, options: Options) -> tuple[list[dict], dict]:
    """Rows of both tables and the settings (counts, thresholds, timings)."""
    probe = client_config(server, options.algorithms[0], options).probe
    check_budget(server, client_config(server, options.algorithms[0], options))
    server_models = list(server.meta.get("server_models", []))
    servers = Ensemble(server_models, server.meta.get("ensemble_weights")) if options.baseline else None
    geometries = sorted({zoo.spec(n).geometry for n in [probe, *server_models]})
    pairs = positive_pairs(root, options.limit)
    table4 = third_images(root, positive_pairs(root, options.adversarial_limit or options.limit))
    table4 = table4 if options.adversarial and any(a in TABLE4_ALGORITHMS for a in options.algorithms) else []
    files = sorted({p for pair in pairs for p in (pair.a, pair.b)} | {p for pair, e in table4
                                                                      for p in (pair.a, pair.b, e)})
    landmarks, info = landmarks_for(files, options.progress)
    judges, out = Judges(options.judges), Collected()
    start = time.perf_counter()
    for chunk in tqdm(_chunks(pairs, options.batch), desc="asr pairs", disable=not options.progress, unit="batch"):
        _asr_chunk(out, chunk, landmarks, server, options, judges, servers, geometries)
    for chunk in tqdm(_chunks(table4, options.batch), desc="table 4", disable=not options.progress, unit="batch"):
        _table4_chunk(out, chunk, landmarks, server, options, judges, geometries)
    rows = _asr_rows(out, server, options, probe) + _table4_rows(out, server, options, probe, len(table4))
    settings = {"protocol": "apf", "dataset": str(root), "pairs": len(pairs), "table4_pairs": len(table4),
                "mode": "crops", "probe": probe, "server_models": server_models,
                "ensemble_weights": server.meta.get("ensemble_weights"), "eps": round(server.eps * 255, 4),
                "iterations": options.iterations, "seed": options.seed,
                "trained_algorithm": server.meta.get("algorithm"), "judges": options.judges,
                "thresholds": {j: zoo.threshold(j) for j in options.judges},
                "box": {j: box(j, server, probe) for j in options.judges},
                "seconds_per_face": {k: round(float(np.mean(v)), 4) for k, v in out.seconds.items()},
                "seconds": round(time.perf_counter() - start, 1), "images": info["images"],
                "detected": info["detected"], "fallback_alignment_count": len(info["fallback_alignment"]),
                "options": dataclasses.asdict(options)}
    return rows, settings


def pivot(rows: list[dict], columns: list[str]) -> list[dict]:
    """One line per (algorithm, stage[, offset, matching]) with each judge's ASR as a column (judge[box])."""
    keys = ["algorithm", "stage"] + [k for k in ("offset", "matching") if k in columns]
    lines: dict[tuple, dict] = {}
    quality: dict[tuple, dict] = {}
    for row in rows:
        key = tuple(row[k] for k in keys)
        line = lines.setdefault(key, {k: row[k] for k in keys})
        line[f"{row['judge']} [{row['box']}]"] = f"{row['asr']:.4f}"
        if "ssim" in row:
            quality[key] = {"ssim": f"{row['ssim']:.4f}", "ssim>=0.8": f"{row['ssim_over_0.8']:.4f}"}
    return [{**line, **quality.get(key, {})} for key, line in lines.items()]


# ----------------------------------------------------------------------------------------------- robustness


class ApfAdapter:
    """`eval robustness` on this protocol's ASR table (Eq. 11), one gradient algorithm and one stage: positive LFW
    pairs, the second image protected against the first (enrolled, clean photo). A judge recognises a face when its
    score to the enrolled face reaches the calibrated threshold. asr = (N_w/o - N_w) / N with N_w/o the clean
    untransformed faces recognised: after a transform, the clean row's asr is what the transform alone breaks, and
    gain = protected - clean asr is Eq. 11 with both sides transformed. Crops mode (the protocol's)."""

    protocol = "apf"
    metric = "asr"
    mode = "crops"

    def __init__(self, root: Path, server: ApfServerModel, judges: list[str], algorithm: str, stage: str,
                 limit: int | None, batch: int, seed: int, iterations: int, progress: bool) -> None:
        self.root, self.server, self.judges, self.stage = root, server, judges, stage
        self.options = Options(algorithms=[algorithm], judges=judges, stages=[stage], limit=limit, baseline=False,
                               adversarial=False, batch=batch, seed=seed, iterations=iterations, progress=progress)
        self.config = client_config(server, algorithm, self.options)
        check_budget(server, self.config)
        self.info: dict = {}
        self.pairs: list[Pair] = []
        self.enrolled: dict[str, torch.Tensor] = {}
        self.clean_recognised: dict[str, torch.Tensor] = {}

    def scenarios(self) -> Iterator[Scenario]:
        server_models = list(self.server.meta.get("server_models", []))
        geometries = sorted({zoo.spec(n).geometry for n in [self.config.probe, *server_models]})
        self.pairs = positive_pairs(self.root, self.options.limit)
        landmarks, self.info = landmarks_for(sorted({p for pr in self.pairs for p in (pr.a, pr.b)}),
                                             self.options.progress)
        protected, clean, quality, start = ProbeImages([], []), ProbeImages([], []), [], time.perf_counter()
        for chunk in tqdm(_chunks(self.pairs, self.options.batch), desc="apf protect",
                          disable=not self.options.progress, unit="batch"):
            enrolled = face_batch([p.a for p in chunk], landmarks, geometries)
            batch = face_batch([p.b for p in chunk], landmarks, geometries)
            noise = stage_noise(self.server, probe_gradient(batch, self.config, enrolled), self.stage)
            after = to_uint8(batch.perturbed(to_canonical(noise)))
            before = to_uint8(batch.regions)
            marks = [transform_points(warp_matrix(landmarks[p.b], C.CANONICAL).numpy(), landmarks[p.b])
                     for p in chunk]
            protected.images.extend(after)
            clean.images.extend(before)
            protected.landmarks.extend(marks)
            clean.landmarks.extend(marks)
            quality += [ssim(face_area(a), face_area(b)) for a, b in zip(before, after, strict=True)]
        seconds = round(time.perf_counter() - start, 2)
        self.enrolled = Judges(self.judges).photos([p.a for p in self.pairs], landmarks)
        for judge in self.judges:
            untransformed = embed_images(judge, clean.images, clean.landmarks)
            self.clean_recognised[judge] = recognised(judge, untransformed, self.enrolled[judge])
        yield Scenario([self.config.probe, *server_models], self.judges, protected, clean,
                       [p.a.parent.name for p in self.pairs], seconds, {"ssim": float(np.mean(quality))})

    def rates(self, scenario: Scenario, judge: str, embeddings: torch.Tensor) -> dict[str, float]:
        found = recognised(judge, embeddings, self.enrolled[judge])
        n = len(found)
        lost = int(self.clean_recognised[judge].sum()) - int(found.sum())
        return {"asr": lost / n if n else 0.0, "recognised": float(found.float().mean()) if n else 0.0}

    def meta(self) -> dict:
        return {"pairs": len(self.pairs), "algorithm": self.config.algorithm, "stage": self.stage,
                "probe": self.config.probe, "server_models": list(self.server.meta.get("server_models", [])),
                "eps": round(self.server.eps * 255, 4), "iterations": self.config.iterations,
                "thresholds": {j: zoo.threshold(j) for j in self.judges}, "detected": self.info.get("detected"),
                "images": self.info.get("images")}


def robustness_adapter(request: Request) -> tuple[ApfAdapter, dict]:
    """The adapter of a robustness request (the method is the gradient algorithm, default m-di2-fgsm; iterations
    default 30, §4.1), and its settings. The server model fixes the surrogates and the budget."""
    if request.surrogates:
        raise FaceveilError("the apf protocol's surrogates are fixed by the server model (its probe and server "
                            "models); leave `surrogates` out")
    if request.mode != "crops":
        raise FaceveilError(f"`mode` {request.mode!r}: the apf protocol runs in crops mode only (it perturbs the "
                            "aligned face)")
    algorithm = request.method or "m-di2-fgsm"
    if algorithm not in GRADIENT_ALGORITHMS:
        raise FaceveilError(f"`method` {algorithm!r} is not an APF gradient algorithm; known: "
                            f"{', '.join(GRADIENT_ALGORITHMS)}")
    if request.stage not in STAGES:
        raise FaceveilError(f"`stage` {request.stage!r} is not an APF stage; known: {', '.join(STAGES)}")
    iterations = request.iters if request.iters is not None else ITERATIONS
    adapter = ApfAdapter(request.root, load_server_model(request.checkpoint), request.judges, algorithm,
                         request.stage, request.limit, request.batch, request.seed, iterations, request.progress)
    resolved = {"method": algorithm, "stage": request.stage,
                "checkpoint": str(request.checkpoint or default_checkpoint()), "batch": request.batch,
                "dataset": str(request.root)}
    return adapter, resolved
