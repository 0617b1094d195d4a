"""Input diversity (DI, Xie et al. 2019): with probability p, shrink the input by a random factor and pad it back
to its size at a random offset, so the gradient does not overfit one exact pixel grid."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def input_diversity(x: torch.Tensor, p: float, generator: torch.Generator, min_scale: float = 0.9) -> torch.Tensor:
    if p <= 0 or float(torch.rand((), generator=generator)) >= p:
        return x
    size = x.shape[-1]
    low = max(1, int(round(size * min_scale)))
    new = int(torch.randint(low, size + 1, (), generator=generator))
    if new == size:
        return x
    resized = F.interpolate(x, size=(new, new), mode="bilinear", align_corners=False)
    pad = size - new
    left = int(torch.randint(0, pad + 1, (), generator=generator))
    top = int(torch.randint(0, pad + 1, (), generator=generator))
    return F.pad(resized, (left, pad - left, top, pad - top))
