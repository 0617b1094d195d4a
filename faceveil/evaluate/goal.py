"""`faceveil eval goal`: the headline numbers of protection against recognisers the mask never saw (issue 23).

The TIP-IM identification protocol (faceveil.evaluate.protocols.tip_im) in photos mode: every probe is protected in
its whole photo, saved as a JPEG the way `protect` writes one (its default quality 85, 4:2:0), re-read and
re-detected, and each judge ranks the gallery by its score to what it finds. Leave-one-family-out over every family:
a judge faces a mask optimised against the recipe's surrogates minus its own family (judges of one family share one
run), so every judge is black-box. The probes are a fixed seeded set (the split's first N identities, seed 0).

One row per recipe (faceveil.pipeline.presets.RECIPES: "previous" is the default before issue 23): the mean and
per-judge black-box Rank-1-UT, face-area SSIM and PSNR (the mean over every run's protected probes), and seconds
per face of the evaluation's runs (one optimisation per held-out family: a product run, which optimises against
every family at once, is timed by `faceveil bench protect`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from faceveil.errors import FaceveilError
from faceveil.evaluate.protocols import tip_im
from faceveil.io.paths import DEFAULT_JPEG_QUALITY
from faceveil.models import zoo
from faceveil.pipeline.presets import RECIPES, Recipe

DEFAULT_PROBES = 50
DEFAULT_EXTRA = 50  # further gallery identities (the protocol's --limit default)


@dataclass
class Options:
    root: Path
    recipes: list[str]
    judges: list[str]
    probes: int = DEFAULT_PROBES
    extra: int = DEFAULT_EXTRA
    seed: int = 0
    batch: int = tip_im.BATCH
    progress: bool = True


def recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise FaceveilError(f"unknown recipe {name!r}; known: {', '.join(RECIPES)}")
    return RECIPES[name]


def recipe_row(name: str, prepared: tip_im.Prepared, options: Options) -> tuple[dict, list[dict]]:
    """The summary row of one recipe and its per-judge rows."""
    r = recipe(name)
    attack = r.attack(options.seed)
    settings = tip_im.Settings(method=r.method, mode="photos", attack=attack, batch=options.batch,
                               progress=options.progress, save_as="jpg", jpeg_quality=DEFAULT_JPEG_QUALITY)
    judge_rows, ssims, psnrs, seconds, optimised = [], [], [], 0.0, 0
    groups = tip_im.surrogate_groups(options.judges, None, zoo.parse_models(r.surrogates))
    for surrogates, judges in groups.items():
        start = time.perf_counter()
        protected = tip_im.protect_probes(prepared.split, prepared.landmarks, list(surrogates), settings)
        seconds += time.perf_counter() - start
        optimised += len(prepared.split.probes)
        ssims += protected.ssim
        psnrs += protected.psnr
        for judge in judges:
            row = tip_im.judge_row(judge, list(surrogates), protected, prepared.split, prepared.galleries[judge],
                                   settings)
            judge_rows.append({"recipe": name, **row, "redetect_failures": protected.redetect_failures})
    rates = {row["judge"]: row["rank1_ut"] for row in judge_rows}
    summary = {"recipe": name, "mean_rank1_ut": round(float(np.mean(list(rates.values()))), 4),
               **{f"r1ut_{judge}": round(rate, 4) for judge, rate in rates.items()},
               "ssim": round(float(np.mean(ssims)), 4), "psnr": round(float(np.mean(psnrs)), 2),
               "s_per_face": round(seconds / max(optimised, 1), 2), "runs": len(groups)}
    return summary, judge_rows


def run(options: Options) -> tuple[list[dict], dict]:
    """Summary rows (one per recipe) and settings (split counts, every recipe's fields, per-judge rows)."""
    for name in options.recipes:
        recipe(name)  # every name known before minutes of preparation
    base = tip_im.Settings(mode="photos", progress=options.progress)
    prepared = tip_im.prepare(options.root, options.judges, base, options.seed, options.probes, options.extra)
    rows, per_judge = [], []
    for name in options.recipes:
        summary, judges = recipe_row(name, prepared, options)
        rows.append(summary)
        per_judge += judges
    clean = {judge: tip_im.clean_rank1(judge, prepared.split, prepared.landmarks, prepared.galleries[judge])
             for judge in options.judges}
    meta = {**prepared.meta(), "probes": options.probes, "extra": options.extra, "save_as": "jpg",
            "jpeg_quality": DEFAULT_JPEG_QUALITY, "clean_rank1": clean,
            "recipes": {name: _fields(recipe(name)) for name in options.recipes}, "judge_rows": per_judge}
    return rows, meta


def _fields(r: Recipe) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(replace(r)).items()}
