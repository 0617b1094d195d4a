"""Expectation over the transforms a protected photo meets after it leaves faceveil, and the input transforms of the
transfer literature, as differentiable random transforms of a surrogate's crop (input diversity's siblings: each is
applied with the DI probability p, see attacks.diversity):

- "blur": Gaussian blur, sigma uniform in [0.3, 1.5] crop pixels.
- "downup": downscale (antialiased) by a factor uniform in [0.4, 1], then back up (bilinear): a smaller re-upload.
- "jpeg": JPEG compression at a quality uniform in [50, 95] (8x8 DCT of YCbCr, the standard quantisation tables,
  rounding with a straight-through gradient; no chroma subsampling).
- "si": scale-invariance (Lin et al. 2020), the crop's values times 1 / 2^i, i uniform in 0..4.
- "admix": Admix (Wang et al. 2021), the crop plus 0.2 times another face of the batch (its mirror image when the
  batch has one face), without a gradient through the other face.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

EOT_TRANSFORMS = ("blur", "downup", "jpeg", "si", "admix")
ADMIX_WEIGHT = 0.2

_LUMA_Q = torch.tensor([
    16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55, 14, 13, 16, 24, 40, 57, 69, 56,
    14, 17, 22, 29, 51, 87, 80, 62, 18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
    49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99], dtype=torch.float32).view(8, 8)
_CHROMA_Q = torch.full((8, 8), 99.0)
_CHROMA_Q[:4, :4] = torch.tensor([[17, 18, 24, 47], [18, 21, 26, 66], [24, 26, 56, 99], [47, 66, 99, 99]])


def _uniform(low: float, high: float, generator: torch.Generator) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


def apply(name: str, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One random draw of the transform `name` on crops x [B,3,S,S] in [0, 1]."""
    if name == "blur":
        return gaussian_blur(x, _uniform(0.3, 1.5, generator))
    if name == "downup":
        size = x.shape[-1]
        small = max(8, round(size * _uniform(0.4, 1.0, generator)))
        down = F.interpolate(x, size=(small, small), mode="bilinear", antialias=True, align_corners=False)
        return F.interpolate(down, size=(size, size), mode="bilinear", align_corners=False)
    if name == "jpeg":
        return jpeg(x, _uniform(50, 95, generator))
    if name == "si":
        return x / 2 ** int(torch.randint(0, 5, (), generator=generator))
    if name == "admix":
        other = x.flip(-1) if len(x) == 1 else x.roll(1, dims=0)
        return x + ADMIX_WEIGHT * other.detach()
    raise ValueError(f"unknown transform {name!r}; known: {', '.join(EOT_TRANSFORMS)}")


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = max(1, math.ceil(3 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype)
    taps = torch.exp(-t**2 / (2 * sigma**2))
    taps = taps / taps.sum()
    c = x.shape[1]
    x = F.pad(x, (radius, radius, radius, radius), mode="replicate")
    x = F.conv2d(x, taps.view(1, 1, -1, 1).expand(c, 1, -1, 1).contiguous(), groups=c)
    return F.conv2d(x, taps.view(1, 1, 1, -1).expand(c, 1, 1, -1).contiguous(), groups=c)


@functools.lru_cache(maxsize=1)
def _dct_matrix() -> torch.Tensor:
    n = torch.arange(8, dtype=torch.float64)
    d = torch.cos((2 * n[None, :] + 1) * n[:, None] * math.pi / 16) * math.sqrt(2 / 8)
    d[0] /= math.sqrt(2)
    return d.float()


def _quality_scale(quality: float) -> float:
    return (5000 / quality if quality < 50 else 200 - 2 * quality) / 100


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    return x + (x.round() - x).detach()


def jpeg(x: torch.Tensor, quality: float) -> torch.Tensor:
    """Differentiable JPEG of x [B,3,H,W] in [0, 1] (see the module docstring)."""
    b, _, h, w = x.shape
    ph, pw = (-h) % 8, (-w) % 8
    x = F.pad(x, (0, pw, 0, ph), mode="replicate") * 255
    r, g, bl = x[:, 0], x[:, 1], x[:, 2]
    y = 0.299 * r + 0.587 * g + 0.114 * bl
    cb = -0.168736 * r - 0.331264 * g + 0.5 * bl + 128
    cr = 0.5 * r - 0.418688 * g - 0.081312 * bl + 128
    scale = _quality_scale(quality)
    planes = []
    for plane, table in ((y, _LUMA_Q), (cb, _CHROMA_Q), (cr, _CHROMA_Q)):
        q = ((table * scale).floor() + 0.5).floor().clamp(1, 255) if scale > 0 else torch.ones(8, 8)
        planes.append(_quantise_blocks(plane - 128, q) + 128)
    y, cb, cr = planes
    r = y + 1.402 * (cr - 128)
    g = y - 0.344136 * (cb - 128) - 0.714136 * (cr - 128)
    bl = y + 1.772 * (cb - 128)
    out = torch.stack([r, g, bl], dim=1) / 255
    return out[..., :h, :w]


def _quantise_blocks(plane: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    b, h, w = plane.shape
    d = _dct_matrix()
    blocks = plane.view(b, h // 8, 8, w // 8, 8).permute(0, 1, 3, 2, 4)  # [B, H/8, W/8, 8, 8]
    coeffs = d @ blocks @ d.T
    coeffs = _round_ste(coeffs / table) * table
    out = d.T @ coeffs @ d
    return out.permute(0, 1, 3, 2, 4).reshape(b, h, w)
