"""AdvCloak person masks (Liu et al. 2023, §3.2.4) as person-mask methods of faceveil.methods.opom, so that
`faceveil enroll --method advcloak-convex ...` writes the same .fvmask as OPOM and `faceveil apply` works unchanged:

    advcloak          G^II trained with the class-wise loss (Eq. 15)
    advcloak-affine   G^II trained against the affine hull of the person's features (Eq. 17)
    advcloak-center   G^II trained against the class centre (Eq. 18)
    advcloak-convex   G^II trained against the convex hull (Eq. 19)
    advfaces-plus     §3.3.2: the image-specific generator G^I (AdvFaces), its perturbations averaged over the
                      person's images

No optimisation: one forward pass of the generator over the person's faces, the mean (Eq. 2), scaled to the budget
of the run's AttackConfig (L-inf: max |mask| = eps; L2: ||mask||_2 = eps, both in canonical space as everywhere in
faceveil), taken to canonical space. The generator comes from faceveil/data/advcloak/ (trained against the
surrogates it records: the ensemble passed in does not change it), or from the file in options.extra["generator"].
The paper compares methods with every mask normalised to one L2 norm (§4.3.1): `paste_l2` measures that norm on
what is pasted (the mask times the face mask, in 112x112x3 units) and `normalised_learner` applies it to any method.
"""

from __future__ import annotations

import time

import torch

from faceveil.attacks.core import AttackConfig, Ensemble
from faceveil.attacks.faces import FaceBatch
from faceveil.detect import canonical as C
from faceveil.errors import FaceveilError
from faceveil.methods import opom
from faceveil.methods.advcloak.generator import (
    PACKAGED,
    load_generator,
    person_mask_grid,
    scale_to_budget,
)
from faceveil.methods.advcloak.networks import to_canonical

METHODS = tuple(PACKAGED)
# The paper's comparison budget (§4.1.4): L2 norm 1200 on 0..255 pixels of the 112x112x3 face.
PAPER_L2_255 = 1200.0


def generate_masks(batch: FaceBatch, cfg: AttackConfig, source: str) -> tuple[torch.Tensor, dict]:
    """[1,3,256,256]: the person's mask from one forward pass of the generator `source` (a method name or a file),
    scaled so that its norm equals cfg's budget; and figures (timing, the generator's training surrogates)."""
    trained = load_generator(source)
    start = time.perf_counter()
    faces = batch.canonical(batch.regions)
    grid = person_mask_grid(trained.generator, faces)  # Eq. 2
    seconds_generate = time.perf_counter() - start
    canonical = to_canonical(grid[None])
    mask = scale_to_budget(canonical, cfg.norm, cfg.eps)
    info = {"generator": trained.source.rsplit("/", 1)[-1], "generator_stage": trained.stage,
            "generator_subspace": trained.subspace, "generator_surrogates": trained.surrogates,
            "generate_seconds": seconds_generate, "mask_seconds": time.perf_counter() - start}
    return mask, info


def _learner(method: str) -> opom.MaskLearner:
    def learn(batch: FaceBatch, ensemble: Ensemble, cfg: AttackConfig, options: opom.PersonMaskOptions,
              progress: bool = False) -> opom.MaskResult:
        if options.masks != 1:
            raise FaceveilError(f"{method} makes one mask per person (the mean of its generator's perturbations); "
                                f"got --masks {options.masks}")
        masks, info = generate_masks(batch, cfg, options.extra.get("generator") or method)
        return opom.MaskResult(masks, info)

    return learn


for _name in METHODS:
    opom.register_method(_name, _learner(_name))


# ------------------------------------------------------------------------------------------------ equal-norm runs


def paste_l2(masks: torch.Tensor) -> torch.Tensor:
    """[n] L2 norm of what each canonical mask [n,3,256,256] pastes (times the face mask), in [0, 1] units of the
    112x112x3 face (canonical pixels are 1/CANONICAL_ZOOM of a 112-crop pixel per side): the paper's measure."""
    return (masks * C.face_mask()).flatten(1).norm(dim=1) / C.CANONICAL_ZOOM


def scale_paste_l2(masks: torch.Tensor, l2_255: float = PAPER_L2_255) -> torch.Tensor:
    """Masks scaled so that `paste_l2` equals l2_255 / 255 (the paper's normalisation of every method, §4.3.1)."""
    size = paste_l2(masks)
    factor = torch.where(size > 0, (l2_255 / 255) / size.clamp_min(1e-12), torch.zeros_like(size))
    return masks * factor.view(-1, 1, 1, 1)


def normalised_learner(method: str, l2_255: float = PAPER_L2_255, masks: int = 1):
    """The OPOM protocol's MaskLearner for a registered method, with every mask scaled to one pasted L2 norm.
    Records the seconds of each call (the per-person mask customisation time t1 of Table 3)."""
    from faceveil.evaluate.protocols.opom import registry_learner

    inner = registry_learner(method, masks)

    def learn(batch: FaceBatch, ensemble: Ensemble, cfg: AttackConfig) -> torch.Tensor:
        start = time.perf_counter()
        out = scale_paste_l2(inner(batch, ensemble, cfg), l2_255)
        learn.seconds.append(time.perf_counter() - start)
        learn.faces.append(len(batch))
        return out

    learn.seconds, learn.faces = [], []
    return learn
