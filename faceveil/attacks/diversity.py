"""Input diversity (DI, Xie et al. 2019): with probability p, shrink the input by a random factor and pad it back
to its size at a random offset, so the gradient does not overfit one exact pixel grid. Also random projective
views of an image (rotation, scale, shift, perspective, brightness), to make a batch out of one image."""

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


def random_homographies(count: int, generator: torch.Generator, rotation_deg: float = 10.0, scale: float = 0.1,
                        shift: float = 0.05, perspective: float = 0.08) -> torch.Tensor:
    """[count, 3, 3] random projective maps of normalised image coordinates, each near the identity."""
    def uniform(bound: float) -> torch.Tensor:
        return (torch.rand(count, generator=generator) * 2 - 1) * bound

    angle = uniform(rotation_deg) * torch.pi / 180
    zoom = 1 + uniform(scale)
    h = torch.zeros(count, 3, 3)
    h[:, 0, 0], h[:, 0, 1] = zoom * angle.cos(), -zoom * angle.sin()
    h[:, 1, 0], h[:, 1, 1] = zoom * angle.sin(), zoom * angle.cos()
    h[:, 0, 2], h[:, 1, 2] = uniform(shift), uniform(shift)
    h[:, 2, 0], h[:, 2, 1], h[:, 2, 2] = uniform(perspective), uniform(perspective), 1.0
    return h


def projective_views(images: torch.Tensor, homographies: torch.Tensor, size: int, extent: float = 1.0,
                     brightness: torch.Tensor | None = None) -> torch.Tensor:
    """Views [B, N, C, size, size] of images [B, C, H, W]: view n samples image point extent * H_n(u, v) for the
    output's normalised coordinates (u, v) (extent < 1 looks at the centre only), times brightness[n]."""
    n = homographies.shape[0]
    lin = torch.linspace(-1 + 1 / size, 1 - 1 / size, size)
    v, u = torch.meshgrid(lin, lin, indexing="ij")
    points = torch.stack([u, v, torch.ones_like(u)], dim=-1).reshape(-1, 3)  # [size*size, 3]
    mapped = points @ homographies.transpose(1, 2)  # [N, size*size, 3]
    grid = (extent * mapped[..., :2] / mapped[..., 2:]).reshape(n, size, size, 2).to(images.dtype)
    b = images.shape[0]
    views = F.grid_sample(images.repeat_interleave(n, 0), grid.repeat(b, 1, 1, 1), mode="bilinear",
                          padding_mode="border", align_corners=False)
    views = views.reshape(b, n, *views.shape[1:])
    return views if brightness is None else views * brightness.view(1, n, 1, 1, 1).to(images.dtype)
