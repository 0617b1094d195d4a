"""Every preset in one place: what `protect` does at each strength, the default and thorough recipes, the papers'
own settings (from the method registry), and how explicit values win over a preset. The CLI, the Python API and
the benchmarks all resolve their settings here."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from faceveil.errors import FaceveilError
from faceveil.methods.registry import ADVCLOAK_PAPER, OPOM_PAPER, TIP_IM_PAPER

if TYPE_CHECKING:  # the presets themselves import no torch: `--help` reads them
    from faceveil.attacks.core import AttackConfig
    from faceveil.pipeline.protect import ProtectSettings

STRENGTHS = {  # L-inf eps (0..255 units), iterations
    "low": (4.0, 30),
    "mid": (8.0, 50),
    "high": (12.0, 50),
}
# What each strength measured (README, "What the strength presets trade": default method and surrogates, 20 LFW
# probes of the identification protocol, photos saved and re-detected): the face area's SSIM and PSNR against the
# original, and per judge the share of probes no longer ranked first (Rank-1-UT). Re-measure when STRENGTHS change;
# the web app shows these to people choosing a strength.
STRENGTH_MEASURED = {
    "low": {"face_ssim": 0.968, "face_psnr_db": 39.1, "not_ranked_first": {
        "mobileface": 0.15, "mfn512": 0.35, "faceres": 0.15, "faceres-deep": 0.35, "dlib": 0.25, "mfn192": 0.00}},
    "mid": {"face_ssim": 0.899, "face_psnr_db": 33.2, "not_ranked_first": {
        "mobileface": 0.55, "mfn512": 0.90, "faceres": 0.45, "faceres-deep": 0.60, "dlib": 0.55, "mfn192": 0.35}},
    "high": {"face_ssim": 0.819, "face_psnr_db": 29.8, "not_ranked_first": {
        "mobileface": 0.85, "mfn512": 1.00, "faceres": 0.60, "faceres-deep": 0.70, "dlib": 0.85, "mfn192": 0.80}},
}
# What protect optimises against, and how, unless told otherwise; THOROUGH: what carried protection furthest to
# unseen model families at the default's visibility (README, "Towards the project's goal": black-box Rank-1-UT
# 0.67 against 0.48 at face-area SSIM 0.896 / 0.898, photos mode), in about 3.5 times the time.
DEFAULT = {"surrogates": "mobileface,mfn512", "diversity": 0.0, "smoothing": 0, "iterations_factor": 1}
THOROUGH = {"surrogates": "mobileface,mfn512,dlib", "diversity": 0.5, "smoothing": 7, "iterations_factor": 2}
# TIP-IM §5.1 for every image method with the paper preset: L-inf eps 12, alpha 1.5, 50 iterations, momentum 1,
# 10 targets.
PAPER_DEFAULTS = dict(TIP_IM_PAPER)
# enroll: OPOM §4.2.1 and Algorithms 1-2 (L-inf 8, 16 iterations, alpha 1); with an L2 budget AdvCloak's (§4.1.4).
DEFAULT_MAX_TARGETS = 10  # targeted methods outside the paper preset: the paper's target count too
# The levers (momentum, DFANet dropout, the texture budget, a visibility budget) stay the paper's (off) until measured
# to help what users get (docs/research/person-masks.md).
ENROLL_DEFAULTS: dict[str, float | str] = {"eps": OPOM_PAPER["eps"], "iters": OPOM_PAPER["iters"],
                                           "alpha": OPOM_PAPER["alpha"], "momentum": 0.0, "dropout": 0.0,
                                           "budget": "linf", "ssim": 0.0, "psnr": 0.0}
L2_DEFAULT_EPS = float(ADVCLOAK_PAPER["eps"])
# The largest budget enroll makes, in the user's units (L-inf 0..255; L2 at the 112-crop scale): twice each paper's
# (OPOM's L-inf 8, AdvCloak's L2 1200). A mask file is shared between devices and its checksum proves no origin, so
# `apply` refuses a file whose budget is above these: a tampered file cannot paint a pattern over a face.
ENROLL_MAX_EPS = {"linf": 2 * OPOM_PAPER["eps"], "l2": 2 * L2_DEFAULT_EPS}
ENROLL_MAX_MASKS = 32  # diverse masks per file (n_M): the OPOM paper uses up to 10


@dataclass(frozen=True)
class Range:
    """The values a setting takes (both ends included unless low_open), in the user's units: what the CLI checks at
    parse time and the library checks again, so that both refuse the same values with one line naming the range."""

    low: float
    high: float
    integer: bool = False
    low_open: bool = False

    def text(self) -> str:
        kind = "a whole number" if self.integer else "a number"
        return f"{kind} in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}]"

    def contains(self, value: float) -> bool:
        if not math.isfinite(value) or (self.integer and value != int(value)):
            return False
        return (value > self.low if self.low_open else value >= self.low) and value <= self.high

    def check(self, name: str, value: float | None) -> None:
        if value is not None and (isinstance(value, bool) or not self.contains(value)):
            raise FaceveilError(f"`{name}` takes {self.text()}, got {value!r}")


# protect's numeric settings: eps above 32/255 is no longer an imperceptible mask (high is 12), nan or inf is no number
PROTECT_RANGES = {
    "eps": Range(0, 32, low_open=True), "iters": Range(1, 10_000, integer=True), "alpha": Range(0, 32, low_open=True),
    "momentum": Range(0, 10), "jitter": Range(0, 16), "diversity": Range(0, 1), "smoothing": Range(0, 63, integer=True),
    "gamma": Range(0, 100), "jpeg_quality": Range(1, 100, integer=True), "batch_faces": Range(1, 4096, integer=True),
    "seed": Range(0, 2**32 - 1, integer=True),
}


def check_protect_values(values: dict[str, float | None]) -> None:
    """FaceveilError naming the first value outside its PROTECT_RANGES range."""
    for name, value in values.items():
        if name in PROTECT_RANGES:
            PROTECT_RANGES[name].check(name, value)


@dataclass
class ProtectChoices:
    """What a user chose for `protect` (None = the preset's value): the strength and recipe presets, and any value
    given explicitly, which always wins over the presets."""

    method: str = "pgd"
    strength: str = "mid"
    thorough: bool = False
    paper_defaults: bool = False
    eps: float | None = None  # 0..255 units
    iters: int | None = None
    alpha: float | None = None  # 0..255 units
    momentum: float = 1.0
    jitter: float = 2.0
    diversity: float | None = None
    smoothing: int | None = None
    surrogates: str | None = None  # comma list
    judges: str = "all"
    seed: int = 0


def _given(value, preset):
    return preset if value is None else value


def attack_config(c: ProtectChoices) -> tuple[AttackConfig, int]:
    """The attack budget and loop of these choices, and the target count of targeted methods."""
    from faceveil.attacks.core import AttackConfig

    if c.strength not in STRENGTHS:
        raise FaceveilError(f"`strength` takes {', '.join(STRENGTHS)}, got {c.strength!r}")
    check_protect_values({"eps": c.eps, "iters": c.iters, "alpha": c.alpha, "momentum": c.momentum,
                          "jitter": c.jitter, "diversity": c.diversity, "smoothing": c.smoothing, "seed": c.seed})
    if c.smoothing is not None and c.smoothing > 0 and c.smoothing % 2 == 0:
        raise FaceveilError(f"`smoothing` takes 0 or an odd whole number, got {c.smoothing}")
    eps, iters = STRENGTHS[c.strength]
    preset_alpha, momentum, max_targets = None, c.momentum, DEFAULT_MAX_TARGETS
    if c.paper_defaults:  # the paper preset replaces the strength; explicit eps / iters / alpha still win
        eps, iters, preset_alpha = PAPER_DEFAULTS["eps"], PAPER_DEFAULTS["iters"], PAPER_DEFAULTS["alpha"]
        momentum, max_targets = PAPER_DEFAULTS["momentum"], int(PAPER_DEFAULTS["max_targets"])
    eps = _given(c.eps, eps)
    recipe = THOROUGH if c.thorough else DEFAULT
    iters = c.iters if c.iters is not None else int(iters * recipe["iterations_factor"])
    alpha_255 = _given(c.alpha, preset_alpha)
    alpha = alpha_255 / 255 if alpha_255 is not None else max(eps / 255 * 2.5 / iters, 1.0 / 255)
    attack = AttackConfig(eps=eps / 255, alpha=alpha, steps=iters, norm="linf", momentum=momentum,
                          diversity=_given(c.diversity, recipe["diversity"]), jitter=c.jitter,
                          smoothing=_given(c.smoothing, recipe["smoothing"]), seed=c.seed)
    return attack, max_targets


def protect_settings(c: ProtectChoices, **job: object) -> ProtectSettings:
    """The photo job's settings from a user's choices; `job` holds the job's own fields (faces, fmt, jpeg_quality,
    keep_metadata, targets_dir, server, ...: see ProtectSettings)."""
    from faceveil.models import zoo
    from faceveil.pipeline.protect import ProtectSettings

    attack, max_targets = attack_config(c)
    check_protect_values({k: v for k, v in job.items() if isinstance(v, int | float) or v is None})
    recipe = THOROUGH if c.thorough else DEFAULT
    surrogates = zoo.parse_models(_given(c.surrogates, recipe["surrogates"]))
    if job.get("targets_dir") is not None:
        job["targets_dir"] = Path(str(job["targets_dir"]))
    return ProtectSettings(method=c.method, surrogates=surrogates, attack=attack, judges=zoo.parse_models(c.judges),
                           max_targets=max_targets, **job)  # type: ignore[arg-type]
