"""OPOM's person-mask learners, built by the registry (faceveil.methods.registry): the subspace and FI-UAP methods
and GD-UAP as one shared-perturbation run of the attack core, fi-uap-all over everybody's faces, and GAP."""

from __future__ import annotations

import contextlib
import dataclasses

import torch
import torch.nn.functional as F

from faceveil.attacks.core import AttackConfig, Ensemble, clean_embeddings, perturbed_embeddings, run_attack
from faceveil.attacks.faces import FaceBatch
from faceveil.attacks.norms import random_init
from faceveil.detect import canonical as C
from faceveil.errors import FaceveilError
from faceveil.methods.base import MaskResult, PersonLearner, PersonMaskOptions
from faceveil.methods.opom.loss import (
    DEFAULT_DIVERSITY_WEIGHT,
    SUBSPACE_METHODS,
    ActivationRecorder,
    Layout,
    PersonLoss,
)

# §4.2.1: L-inf eps 8, 16 iterations; Algorithms 1-2: Delta_0 ~ U(-eps, eps), steps of sign(g) (1 on 0..255).
PAPER_CONFIG = AttackConfig(eps=8 / 255, alpha=1 / 255, steps=16, norm="linf", momentum=0.0, random_start=True)
# Seed offsets of the methods' own random streams, apart from the core's (which uses cfg.seed itself).
DIVERSE_INIT_SEED_OFFSET = 7919


def paper_config(seed: int = 0) -> AttackConfig:
    """The OPOM paper's optimisation settings (L-inf eps 8/255, 16 iterations, alpha 1/255, random start)."""
    return dataclasses.replace(PAPER_CONFIG, seed=seed)


def learner(name: str) -> PersonLearner:
    """The registry's builder of OPOM's methods and its baselines."""
    if name == "fi-uap-all":
        return _fi_uap_all
    if name == "gap":
        return _gap
    if name not in (*SUBSPACE_METHODS, "gd-uap"):
        raise FaceveilError(f"no OPOM learner for {name!r}")

    def learn(batch, ensemble, cfg, options, progress=False):
        return _attack_masks(batch, ensemble, cfg, options, progress, name)
    return learn


def _initial_masks(layout: Layout, cfg: AttackConfig) -> torch.Tensor | None:
    """Delta_0 for the core. Diverse masks always start at different random points (from one common start
    every mask would get the same gradient and stay identical); otherwise the core's own start."""
    if layout.masks == 1 or cfg.random_start:
        return None
    gen = torch.Generator().manual_seed(cfg.seed + DIVERSE_INIT_SEED_OFFSET)
    shape = torch.Size((layout.masks, 3, C.CANONICAL_SIZE, C.CANONICAL_SIZE))
    return random_init(shape, cfg.norm, cfg.eps, gen)


def _attack_masks(batch: FaceBatch, ensemble: Ensemble, cfg: AttackConfig, options: PersonMaskOptions,
                  progress: bool, method: str) -> MaskResult:
    """The subspace / FI-UAP / GD-UAP methods: one shared-perturbation run of the attack core."""
    layout = Layout(len(batch), options.masks)
    expanded = layout.expand(batch)
    recorder = ActivationRecorder(ensemble) if method == "gd-uap" else None
    clean = clean_embeddings(batch, ensemble)
    loss = PersonLoss(method, ensemble, clean, layout, options.diversity_weight, recorder)
    with recorder.recording() if recorder is not None else contextlib.nullcontext():
        masks = run_attack(expanded, ensemble, loss.objective, cfg, delta=_initial_masks(layout, cfg),
                           progress=progress, owner=layout.owner)
    info: dict = {"steps": cfg.steps}
    if loss.hull_ms_per_step is not None:
        info["hull_solver_ms_per_step"] = loss.hull_ms_per_step
        info["hull_solves_per_step"] = layout.masks * layout.faces * len(ensemble.names)
    return MaskResult(masks, info)


def concat_batches(first: FaceBatch, second: FaceBatch) -> FaceBatch:
    """One FaceBatch of both batches' faces (regions zero-padded to a common size, as from_photos does)."""
    if first.quantise != second.quantise or set(first.crop_to_region) != set(second.crop_to_region):
        raise FaceveilError("the universal faces must be prepared like the person's (same mode and surrogates)")
    h = max(first.regions.shape[-2], second.regions.shape[-2])
    w = max(first.regions.shape[-1], second.regions.shape[-1])

    def pad(regions: torch.Tensor) -> torch.Tensor:
        return F.pad(regions, (0, w - regions.shape[-1], 0, h - regions.shape[-2]))

    return FaceBatch(torch.cat([pad(first.regions), pad(second.regions)]),
                     torch.cat([first.canonical_to_region, second.canonical_to_region]),
                     {g: torch.cat([m, second.crop_to_region[g]]) for g, m in first.crop_to_region.items()},
                     first.quantise, first.mask)


def _fi_uap_all(batch: FaceBatch, ensemble: Ensemble, cfg: AttackConfig, options: PersonMaskOptions,
                progress: bool) -> MaskResult:
    everyone = batch if options.universal_faces is None else concat_batches(batch, options.universal_faces)
    result = _attack_masks(everyone, ensemble, cfg, options, progress, "fi-uap-all")
    return MaskResult(result.masks, {**result.info, "universal_faces": len(everyone) - len(batch)})


def _gap(batch: FaceBatch, ensemble: Ensemble, cfg: AttackConfig, options: PersonMaskOptions,
         progress: bool) -> MaskResult:
    from faceveil.methods.opom.gap import train_gap

    return train_gap(batch, ensemble, cfg, options, progress)


@torch.no_grad()
def objective_value(batch: FaceBatch, ensemble: Ensemble, masks: torch.Tensor, method: str,
                    diversity_weight: float = DEFAULT_DIVERSITY_WEIGHT) -> float:
    """The method's J (summed over faces and masks; larger = better protected) for given masks: what each learner
    increases. gap is judged by its loss, Eq. 17 (fi-uap); fi-uap-all by FI-UAP on the faces given."""
    method = {"gap": "fi-uap", "fi-uap-all": "fi-uap"}.get(method, method)
    layout = Layout(len(batch), masks.shape[0])
    expanded = layout.expand(batch)
    recorder = ActivationRecorder(ensemble) if method == "gd-uap" else None
    loss = PersonLoss(method, ensemble, clean_embeddings(batch, ensemble), layout, diversity_weight, recorder)
    with recorder.recording() if recorder is not None else contextlib.nullcontext():
        emb = perturbed_embeddings(expanded, ensemble, masks[layout.owner])
        return float(loss(emb).sum())
