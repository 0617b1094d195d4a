"""Untargeted ensemble PGD: push every surrogate's embedding of the protected face away from the original's.
The simplest identity mask over the core; also the baseline other methods are compared with."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from faceveil.attacks.core import AttackConfig, Ensemble, clean_embeddings, ensemble_distance, run_attack
from faceveil.attacks.faces import FaceBatch
from faceveil.methods.base import ImageMethod, MethodOptions, Perturbation

if TYPE_CHECKING:
    from faceveil.methods.targets import TargetSet


def protect(batch: FaceBatch, ensemble: Ensemble, cfg: AttackConfig, progress: bool = False) -> torch.Tensor:
    original = clean_embeddings(batch, ensemble)
    return run_attack(batch, ensemble, lambda emb, _step: -ensemble_distance(ensemble, emb, original), cfg,
                      progress=progress)


def build(_name: str, _options: MethodOptions, _targets: TargetSet | None) -> ImageMethod:
    """The registry's builder: pgd has no options of its own."""
    return lambda batch, ensemble, cfg: Perturbation(protect(batch, ensemble, cfg))
