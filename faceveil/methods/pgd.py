"""Untargeted ensemble PGD: push every surrogate's embedding of the protected face away from the original's.
The simplest identity mask over the core; also the baseline other methods are compared with."""

from __future__ import annotations

import torch

from faceveil.attacks.core import AttackConfig, Ensemble, clean_embeddings, ensemble_distance, run_attack
from faceveil.attacks.faces import FaceBatch


def protect(batch: FaceBatch, ensemble: Ensemble, cfg: AttackConfig, progress: bool = False) -> torch.Tensor:
    original = clean_embeddings(batch, ensemble)
    return run_attack(batch, ensemble, lambda emb, _step: -ensemble_distance(ensemble, emb, original), cfg,
                      progress=progress)
