"""AdvCloak person masks (Liu et al. 2023, §3.2.4) as person methods (faceveil.methods.registry), so that
`faceveil enroll --method advcloak-convex ...` writes the same .fvmask as OPOM and `faceveil apply` works unchanged:

    advcloak          G^II trained with the class-wise loss (Eq. 15)
    advcloak-affine   G^II trained against the affine hull of the person's features (Eq. 17)
    advcloak-center   G^II trained against the class centre (Eq. 18)
    advcloak-convex   G^II trained against the convex hull (Eq. 19)
    advfaces-plus     §3.3.2: the image-specific generator G^I (AdvFaces), its perturbations averaged over the
                      person's images

No optimisation: one forward pass of the generator over the person's faces, the mean (Eq. 2), taken to canonical
space and put on the budget of the run's AttackConfig (`onto_budget`: L2, the paper's, scaled so that the norm of
what is pasted equals eps; L-inf, eps times its sign). The generator comes from faceveil/data/advcloak/ (trained
against the surrogates it records: the ensemble passed in does not change it), or from the file in
options.extra["generator"].
The paper compares methods with every mask normalised to one L2 norm (§4.3.1): faceveil.attacks.budgets.paste_l2
measures that norm on what is pasted, and faceveil.evaluate.protocols.advcloak applies it to every method.
"""

from __future__ import annotations

import time

import torch

from faceveil.attacks.budgets import onto_pasted_l2
from faceveil.attacks.core import AttackConfig, Ensemble
from faceveil.attacks.faces import FaceBatch
from faceveil.errors import FaceveilError
from faceveil.methods.advcloak.generator import PACKAGED, load_generator, person_mask_grid
from faceveil.methods.advcloak.networks import to_canonical
from faceveil.methods.base import MaskResult, PersonLearner, PersonMaskOptions

METHODS = tuple(PACKAGED)


def generate_masks(batch: FaceBatch, cfg: AttackConfig, source: str) -> tuple[torch.Tensor, dict]:
    """[1,3,256,256]: the person's mask from one forward pass of the generator `source` (a method name or a file),
    scaled so that its norm equals cfg's budget; and figures (timing, the generator's training surrogates)."""
    trained = load_generator(source)
    start = time.perf_counter()
    faces = batch.canonical(batch.regions)
    grid = person_mask_grid(trained.generator, faces)  # Eq. 2
    seconds_generate = time.perf_counter() - start
    mask = onto_budget(to_canonical(grid[None]), cfg.norm, cfg.eps)
    info = {"generator": trained.source.rsplit("/", 1)[-1], "generator_stage": trained.stage,
            "generator_subspace": trained.subspace, "generator_surrogates": trained.surrogates,
            "generate_seconds": seconds_generate, "mask_seconds": time.perf_counter() - start}
    return mask, info


def onto_budget(masks: torch.Tensor, norm: str, eps: float) -> torch.Tensor:
    """Generator masks [n,3,256,256] that use their whole budget. L2 (the paper's): scaled so that the norm of what
    is pasted is eps. L-inf: eps * sign(mask), the point of the eps-box furthest along the mask. Scaled only until its
    largest value reaches eps, the mean mask of a generator trained under an L2 norm is peaky: its typical value is a
    tenth of eps (pasted L2 ~160 at eps 8, against 1200), which 8-bit rounding mostly removes."""
    if norm == "l2":
        return onto_pasted_l2(masks, eps)
    if norm == "linf":
        return masks.sign() * eps
    raise FaceveilError(f"unknown norm {norm!r} (l2 or linf)")


def learner(name: str) -> PersonLearner:
    """The registry's builder of AdvCloak's methods: the generator of that name (or the file in
    options.extra["generator"])."""
    if name not in METHODS:
        raise FaceveilError(f"no AdvCloak generator for {name!r}; known: {', '.join(METHODS)}")

    def learn(batch: FaceBatch, _ensemble: Ensemble, cfg: AttackConfig, options: PersonMaskOptions,
              _progress: bool = False) -> MaskResult:
        if options.masks != 1:
            raise FaceveilError(f"{name} makes one mask per person (the mean of its generator's perturbations); "
                                f"got {options.masks} masks")
        masks, info = generate_masks(batch, cfg, options.extra.get("generator") or name)
        return MaskResult(masks, info)

    return learn
