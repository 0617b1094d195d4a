"""The one method registry: every protection method by name, its kind, the paper it implements and that paper's
settings, and where it lives. Every list of method names in faceveil (CLI choices, help texts, protocols, the
Python API's `faceveil.methods.available()`) is derived from here.

A method's code is imported only when the method is built (`image_method`, `person_learner`), so that listing
methods, `--help` and `import faceveil` stay fast. Adding a method = one file with its builder + one line in
ENTRIES (or `register` for a method that lives outside the package). Builders, by kind:

- image / end-cloud: `build(name, options: MethodOptions, targets: TargetSet | None) -> ImageMethod`
- person: `build(name) -> PersonLearner`
(contracts in faceveil.methods.base)
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING

from faceveil.errors import FaceveilError
from faceveil.methods.base import KINDS, ImageMethod, MaskResult, MethodOptions, PersonLearner, PersonMaskOptions

if TYPE_CHECKING:
    import torch

    from faceveil.attacks.core import AttackConfig, Ensemble
    from faceveil.attacks.faces import FaceBatch
    from faceveil.methods.targets import TargetSet

# The papers' own settings (L-inf eps / step alpha in 0..255 units; AdvCloak's budget is an L2 norm on 0..255
# pixels of the 112x112x3 face).
Preset = Mapping[str, float | str | bool]
TIP_IM_PAPER: Preset = MappingProxyType({"eps": 12.0, "alpha": 1.5, "iters": 50, "momentum": 1.0, "max_targets": 10})
OPOM_PAPER: Preset = MappingProxyType({"norm": "linf", "eps": 8.0, "alpha": 1.0, "iters": 16, "random_start": True})
ADVCLOAK_PAPER: Preset = MappingProxyType({"norm": "l2", "eps": 1200.0})
APF_PAPER: Preset = MappingProxyType({"eps": 8.0, "alpha": 2.0, "iters": 30, "momentum": 1.0, "diversity": 0.5})


@dataclass(frozen=True)
class MethodEntry:
    name: str
    kind: str  # image | person | end-cloud
    paper: str  # the publication it implements, or "baseline"
    summary: str  # one line for help texts
    builder: str  # "module:function", imported on first use
    targeted: bool = False  # steers faces towards target identities (needs a target set)
    preset: Preset = field(default_factory=dict)  # the paper's settings

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"method {self.name}: kind must be one of {KINDS}, got {self.kind!r}")

    def load(self):
        module, _, function = self.builder.partition(":")
        return getattr(importlib.import_module(module), function)


_OPOM = "faceveil.methods.opom.learners:learner"
_ADVCLOAK = "faceveil.methods.advcloak.person:learner"
_TIP_IM = "faceveil.methods.tip_im:build"
_BASELINES = "faceveil.methods.baselines:build"

ENTRIES: list[MethodEntry] = [
    MethodEntry("pgd", "image", "baseline", "untargeted ensemble PGD: push every surrogate's embedding away from the "
                "original's", "faceveil.methods.pgd:build"),
    MethodEntry("tip-im", "image", "TIP-IM", "targeted identity protection with greedy target insertion",
                _TIP_IM, True, TIP_IM_PAPER),
    MethodEntry("center-opt", "image", "TIP-IM", "TIP-IM with gain G1: towards the targets' centre", _TIP_IM, True,
                TIP_IM_PAPER),
    MethodEntry("mim", "image", "TIP-IM", "momentum iterative steps towards one target (TIP-IM's baseline)",
                _BASELINES, True, TIP_IM_PAPER),
    MethodEntry("dim", "image", "TIP-IM", "MIM with input diversity (TIP-IM's baseline)", _BASELINES, True,
                TIP_IM_PAPER),
    MethodEntry("mt-dim", "image", "TIP-IM", "DIM with a dynamic target: the nearest at every step (TIP-IM's "
                "baseline)", _BASELINES, True, TIP_IM_PAPER),
    MethodEntry("single-target", "image", "TIP-IM", "TIP-IM with one fixed target", _BASELINES, True, TIP_IM_PAPER),
    MethodEntry("apf", "end-cloud", "APF", "end-cloud: only the face's gradient goes to a faceveil server, which "
                "answers the noise", "faceveil.methods.apf.probe:build_remote", preset=APF_PAPER),
    MethodEntry("apf-local", "end-cloud", "APF", "both halves of APF in this process (the packaged server networks)",
                "faceveil.methods.apf.probe:build_local", preset=APF_PAPER),
    MethodEntry("opom-convex", "person", "OPOM", "one mask per person: away from the convex hull of their features",
                _OPOM, preset=OPOM_PAPER),
    MethodEntry("opom-affine", "person", "OPOM", "away from the affine hull of the person's features", _OPOM,
                preset=OPOM_PAPER),
    MethodEntry("opom-center", "person", "OPOM", "away from the person's class centre", _OPOM, preset=OPOM_PAPER),
    MethodEntry("fi-uap", "person", "OPOM", "feature-iterative universal perturbation (OPOM's baseline, Eq. 17)",
                _OPOM, preset=OPOM_PAPER),
    MethodEntry("fi-uap-plus", "person", "OPOM", "FI-UAP against every clean feature of the person (Eq. 18)", _OPOM,
                preset=OPOM_PAPER),
    MethodEntry("fi-uap-all", "person", "OPOM", "one universal mask learned on everybody's faces (OPOM's baseline)",
                _OPOM, preset=OPOM_PAPER),
    MethodEntry("gd-uap", "person", "OPOM", "data-prior universal perturbation (OPOM's baseline, Eq. 16)", _OPOM,
                preset=OPOM_PAPER),
    MethodEntry("gap", "person", "OPOM", "a generator of the mask trained with the FI-UAP loss (OPOM's baseline)",
                _OPOM, preset=OPOM_PAPER),
    MethodEntry("advcloak-convex", "person", "AdvCloak", "a trained generator, one forward pass: away from the "
                "convex hull (Eq. 19)", _ADVCLOAK, preset=ADVCLOAK_PAPER),
    MethodEntry("advcloak-affine", "person", "AdvCloak", "the generator trained against the affine hull (Eq. 17)",
                _ADVCLOAK, preset=ADVCLOAK_PAPER),
    MethodEntry("advcloak-center", "person", "AdvCloak", "the generator trained against the class centre (Eq. 18)",
                _ADVCLOAK, preset=ADVCLOAK_PAPER),
    MethodEntry("advcloak", "person", "AdvCloak", "the generator trained with the class-wise loss (Eq. 15)",
                _ADVCLOAK, preset=ADVCLOAK_PAPER),
    MethodEntry("advfaces-plus", "person", "AdvCloak", "the image-specific generator averaged over the person's "
                "photos (AdvCloak's baseline)", _ADVCLOAK, preset=ADVCLOAK_PAPER),
]


def register(entry: MethodEntry) -> None:
    """Add a method that lives outside this list (a plug-in, or a test's throw-away method); a name is unique."""
    if any(e.name == entry.name for e in ENTRIES):
        raise ValueError(f"method {entry.name!r} is registered already")
    ENTRIES.append(entry)


def entry(name: str) -> MethodEntry:
    for e in ENTRIES:
        if e.name == name:
            return e
    raise FaceveilError(f"unknown method {name!r}; known: {', '.join(names())}")


def names(*kinds: str) -> list[str]:
    """Method names of these kinds (all kinds when none is given), in registry order."""
    return [e.name for e in ENTRIES if not kinds or e.kind in kinds]


def check_kind(name: str, *kinds: str) -> MethodEntry:
    """The entry of `name`, which must be of one of `kinds` (a one-line error naming the methods that are)."""
    found = entry(name)
    if found.kind not in kinds:
        raise FaceveilError(f"method {name!r} is of kind {found.kind}; here a {' or '.join(kinds)} method is needed: "
                            f"{', '.join(names(*kinds))}")
    return found


def image_method(name: str, options: MethodOptions | None = None, targets: TargetSet | None = None) -> ImageMethod:
    """The image or end-cloud method `name`, built with its options (targeted methods need the target set)."""
    found = check_kind(name, "image", "end-cloud")
    if found.targeted and targets is None:
        raise FaceveilError(f"method {name!r} steers faces towards targets: it needs a target set")
    return found.load()(name, options or MethodOptions(), targets)


def person_learner(name: str) -> PersonLearner:
    return check_kind(name, "person").load()(name)


def onto_visibility(masks: torch.Tensor, batch: FaceBatch, cfg: AttackConfig) -> torch.Tensor:
    """Each mask [n_M,...] scaled onto the visibility budget (face-area SSIM target, PSNR floor), measured on the
    person's faces as the mask pastes onto them (the mean over the faces)."""
    import torch

    from faceveil.attacks.perceptual import SsimBudget

    count = masks.shape[0]
    owner = torch.arange(count).repeat_interleave(len(batch))
    faces = batch if count == 1 else batch.take(torch.arange(len(batch)).repeat(count))
    return SsimBudget(faces, cfg.ssim_target, cfg.psnr_floor, owner).onto(masks)


def learn_person_masks(name: str, batch: FaceBatch, ensemble: Ensemble, cfg: AttackConfig,
                       options: PersonMaskOptions | None = None, progress: bool = False) -> MaskResult:
    """All faces in `batch` are ONE person: their n_M masks [n_M,3,256,256] and the run's figures (seconds, ...).
    Under an L2 budget the masks are scaled onto it, measured on what is pasted."""
    from faceveil.attacks.budgets import onto_pasted_l2
    from faceveil.detect.canonical import CANONICAL_SIZE

    options = options or PersonMaskOptions()
    if len(batch) == 0:
        raise FaceveilError("a person mask needs at least one face")
    if options.masks < 1:
        raise FaceveilError(f"the number of masks must be at least 1, got {options.masks}")
    learner = person_learner(name)
    start = time.perf_counter()
    masks, info = learner(batch, ensemble, cfg, options, progress)
    masks = masks.detach().float()
    if tuple(masks.shape) != (options.masks, 3, CANONICAL_SIZE, CANONICAL_SIZE):
        raise RuntimeError(f"method {name} returned masks of shape {tuple(masks.shape)}")
    if cfg.norm == "l2":  # every method's masks used at their budget, measured on what is pasted
        masks = onto_pasted_l2(masks, cfg.eps)
    if cfg.ssim_target > 0 or cfg.psnr_floor > 0:  # a visibility budget: every method's masks onto it, as above
        masks = onto_visibility(masks, batch, cfg)
    figures = {"method": name, "faces": len(batch), "masks": options.masks, "seconds": time.perf_counter() - start,
               **info}
    return MaskResult(masks, figures)
