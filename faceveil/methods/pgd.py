"""Untargeted ensemble PGD: push every surrogate's embedding of the protected face away from the original's.
The simplest identity mask over the core; also the baseline other methods are compared with."""

from __future__ import annotations

import torch

from faceveil.attacks.core import AttackConfig, Ensemble, clean_embeddings, run_attack
from faceveil.attacks.faces import FaceBatch
from faceveil.attacks.losses import feature_distance

# dlib's L2 distances are on another scale than cosine distances: divide by its decision distance (0.6).
L2_SCALE = 0.6


def distance_to_original(ensemble: Ensemble, emb: dict, original: dict) -> torch.Tensor:
    """Weighted distance [B] between protected and original embeddings, comparable across metrics."""
    total = 0
    for name, w in ensemble.weights.items():
        metric = ensemble.metric(name)
        d = feature_distance(emb[name], original[name], "l2" if metric == "l2" else "cosine")
        total = total + w * (d / L2_SCALE if metric == "l2" else d)
    return total


def protect(batch: FaceBatch, ensemble: Ensemble, cfg: AttackConfig, progress: bool = False) -> torch.Tensor:
    original = clean_embeddings(batch, ensemble)
    return run_attack(batch, ensemble, lambda emb, _step: -distance_to_original(ensemble, emb, original), cfg,
                      progress=progress)
