"""The adaptive attacker: someone who knows the photos are protected and learns to undo the protection in a
judge's embedding space (FaceCure-style: protections that looked strong fell to an attacker training on protected
images).

The attacker protects photos of people they already know (the tool is public), so they hold pairs (embedding of the
protected image, embedding of the clean image) of OTHER identities. From those pairs they fit a linear map
W: protected embedding -> clean embedding, and pass every query through W before searching the gallery.

The map is ridge regression towards the identity (x -> x + [x, 1] B, B penalised by lambda): with few training
pairs it stays the identity and can only make things better for the attacker where the data say so. It is solved
in its dual (kernel) form, n x n for n training pairs, so 1024-d embeddings cost nothing. lambda (relative to the
mean squared norm of the inputs) is chosen from a grid by an inner identity-grouped cross-validation on the
training pairs: the attacker tunes on their own data only.

`cross_fitted` evaluates the attacker honestly on the protocol's own probes: the probes' identities are split into
seeded folds and each fold is mapped by a W trained on the other folds only, so no test identity is ever seen in
training.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from faceveil.errors import FaceveilError

# lambda / mean(||x||^2) tried by the attacker's own validation: from almost unregularised to almost the identity.
LAMBDA_GRID = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)
FALLBACK_LAMBDA = 1.0  # too few training identities to validate: a middle choice
DEFAULT_FOLDS = 5
INNER_FOLDS = 3


@dataclass(frozen=True)
class LinearProbe:
    """x -> x + [x, 1] @ B with B = X^T alpha (dual ridge solution); inputs in the probe's prepared space."""

    train_inputs: torch.Tensor  # X [n, D+1]
    alpha: torch.Tensor  # [n, D]
    metric: str
    relative_lambda: float

    def __call__(self, embeddings: torch.Tensor) -> torch.Tensor:
        x = _with_bias(prepare(embeddings, self.metric))
        return x[:, :-1] + (x @ self.train_inputs.T) @ self.alpha


def prepare(embeddings: torch.Tensor, metric: str) -> torch.Tensor:
    """The space the judge compares in: unit vectors for cosine judges, raw vectors for L2 judges (dlib)."""
    x = embeddings.double()
    return F.normalize(x, dim=-1) if metric == "cosine" else x


def _with_bias(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], dim=1)


def fit(protected: torch.Tensor, clean: torch.Tensor, metric: str, relative_lambda: float) -> LinearProbe:
    """Ridge map protected -> clean embeddings (pairs [n, D] each), shrunk towards the identity map."""
    if len(protected) != len(clean) or len(protected) == 0:
        raise FaceveilError(f"the linear probe needs matching non-empty pairs, got {len(protected)} and {len(clean)}")
    x = _with_bias(prepare(protected, metric))
    residual = prepare(clean, metric) - x[:, :-1]
    gram = x @ x.T
    lam = relative_lambda * float(gram.diagonal().mean())
    alpha = torch.linalg.solve(gram + lam * torch.eye(len(x), dtype=x.dtype), residual)
    return LinearProbe(x, alpha, metric, relative_lambda)


def distance(a: torch.Tensor, b: torch.Tensor, metric: str) -> torch.Tensor:
    """Row-wise distance in the judge's terms: 1 - cosine, or L2."""
    if metric == "cosine":
        return 1 - F.cosine_similarity(a, b, dim=-1)
    return (a - b).norm(dim=-1)


def group_folds(groups: list[str], folds: int, seed: int) -> list[np.ndarray]:
    """Indices split into at most `folds` folds so that no group (identity) spans two folds; seeded."""
    names = sorted(set(groups))
    order = [names[i] for i in np.random.default_rng(seed).permutation(len(names))]
    fold_of = {name: i % max(1, min(folds, len(names))) for i, name in enumerate(order)}
    count = max(fold_of.values(), default=-1) + 1
    return [np.array([i for i, g in enumerate(groups) if fold_of[g] == f], dtype=np.int64) for f in range(count)]


def choose_lambda(protected: torch.Tensor, clean: torch.Tensor, groups: list[str], metric: str,
                  seed: int) -> float:
    """The grid value whose held-out (identity-grouped) mapped embeddings lie closest to the clean ones."""
    folds = group_folds(groups, INNER_FOLDS, seed)
    if len(folds) < 2:
        return FALLBACK_LAMBDA
    every = np.arange(len(groups))
    errors = []
    for lam in LAMBDA_GRID:
        total = 0.0
        for held in folds:
            train = np.setdiff1d(every, held)
            mapped = fit(protected[train], clean[train], metric, lam)(protected[held])
            total += float(distance(mapped, prepare(clean[held], metric), metric).sum())
        errors.append(total)
    return LAMBDA_GRID[int(np.argmin(errors))]


def train(protected: torch.Tensor, clean: torch.Tensor, groups: list[str], metric: str, seed: int) -> LinearProbe:
    """The attacker's probe from their own pairs, lambda tuned on those pairs only."""
    return fit(protected, clean, metric, choose_lambda(protected, clean, groups, metric, seed))


@dataclass
class CrossFit:
    mapped_protected: torch.Tensor  # [P, D]: each probe through a probe trained without its identity
    mapped_clean: torch.Tensor  # [P, D]: the clean probes through the same maps (what W costs on unprotected faces)
    lambdas: list[float]  # chosen per fold
    folds: int
    train_pairs: list[int]  # per fold


def cross_fitted(protected: torch.Tensor, clean: torch.Tensor, identities: list[str], metric: str,
                 folds: int = DEFAULT_FOLDS, seed: int = 0) -> CrossFit:
    """Map every probe by a linear probe trained on the OTHER identities' (protected, clean) pairs."""
    outer = group_folds(identities, folds, seed)
    if len(outer) < 2:
        raise FaceveilError("the adaptive attacker needs probes of at least 2 identities (train and test apart)")
    every = np.arange(len(identities))
    mapped_p = torch.zeros(protected.shape, dtype=torch.float64)
    mapped_c = torch.zeros(clean.shape, dtype=torch.float64)
    lambdas, sizes = [], []
    for held in outer:
        train_idx = np.setdiff1d(every, held)
        probe = train(protected[train_idx], clean[train_idx], [identities[i] for i in train_idx], metric, seed)
        mapped_p[held] = probe(protected[held])
        mapped_c[held] = probe(clean[held])
        lambdas.append(probe.relative_lambda)
        sizes.append(len(train_idx))
    return CrossFit(mapped_p.float(), mapped_c.float(), lambdas, len(outer), sizes)
