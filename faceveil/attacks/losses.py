"""Losses on embeddings and images used by every method."""

from __future__ import annotations

import functools
import operator

import torch
import torch.nn.functional as F


def feature_distance(a: torch.Tensor, b: torch.Tensor, kind: str = "cosine") -> torch.Tensor:
    """D_f row-wise: squared L2 between L2-normalised features ('sqeuclidean' on the unit sphere,
    = 2 - 2 cos), 'cosine' (1 - cos), or raw 'l2' (dlib's metric)."""
    if kind == "cosine":
        return 1 - F.cosine_similarity(a, b, dim=-1)
    if kind == "sqeuclidean":
        return (F.normalize(a, dim=-1) - F.normalize(b, dim=-1)).square().sum(-1)
    if kind == "l2":
        return (a - b).norm(dim=-1)
    raise ValueError(f"unknown feature distance {kind!r}")


def gaussian_mmd(x: torch.Tensor, y: torch.Tensor, sigmas: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0, 16.0)):
    """Biased squared MMD between sample sets x [N, ...] and y [M, ...] with a sum of Gaussian kernels
    (Borgwardt et al. 2006, as TIP-IM Eq. 3). Bandwidths are relative to the median pairwise distance, so the
    term is scale-free across image sizes."""
    xf, yf = x.flatten(1), y.flatten(1)
    z = torch.cat([xf, yf])
    d2 = torch.cdist(z, z).square()
    base = d2.detach()[d2.detach() > 0].median().clamp_min(1e-12) if (d2 > 0).any() else d2.new_tensor(1.0)
    k = functools.reduce(operator.add, (torch.exp(-d2 / (2 * s * base)) for s in sigmas))
    n = len(xf)
    return k[:n, :n].mean() + k[n:, n:].mean() - 2 * k[:n, n:].mean()
