"""Image quality of a protected face against the original: PSNR and SSIM (Wang et al. 2004: Gaussian window 11x11,
sigma 1.5, K1 = 0.01, K2 = 0.03, per channel, averaged), on images in [0, 1] or uint8."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

WINDOW = 11
SIGMA = 1.5
K1, K2 = 0.01, 0.03


def _as_float(image: np.ndarray | torch.Tensor) -> torch.Tensor:
    """HxWxC uint8 / float array, or CxHxW tensor, -> float64 tensor [1,C,H,W] in [0, 1]."""
    if isinstance(image, np.ndarray):
        t = torch.from_numpy(np.ascontiguousarray(image)).double()
        t = t / 255 if image.dtype == np.uint8 else t
        t = t.permute(2, 0, 1) if t.ndim == 3 else t[None]
    else:
        t = image.detach().double()
    return t[None] if t.ndim == 3 else t


def psnr(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> float:
    """Peak signal-to-noise ratio in dB (peak 1); inf for identical images."""
    mse = float(((_as_float(a) - _as_float(b)) ** 2).mean())
    return float("inf") if mse == 0 else 10 * float(np.log10(1 / mse))


def gaussian_window(size: int = WINDOW, sigma: float = SIGMA) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return torch.outer(g, g)


def ssim(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> float:
    """Mean structural similarity over valid windows and channels."""
    x, y = _as_float(a), _as_float(b)
    channels = x.shape[1]
    w = gaussian_window().expand(channels, 1, WINDOW, WINDOW).contiguous()

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, w, groups=channels)

    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    c1, c2 = K1**2, K2**2
    value = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return float(value.mean())


# Faces are compared at this side length for the set-level MMD: the kernel sees the face area's content, and the
# pairwise distances stay cheap for hundreds of probes.
MMD_SIDE = 64


def set_mmd(protected: list[np.ndarray], originals: list[np.ndarray]) -> float:
    """TIP-IM's naturalness metric (§5.1, Table 5): the Gaussian-kernel MMD (Eq. 3) between the set of protected face
    areas and the set of original face areas, both HxWx3 uint8 / [0,1] images; smaller = more natural."""
    from faceveil.attacks.losses import gaussian_mmd

    if not protected or len(protected) != len(originals):
        raise ValueError("set_mmd needs two non-empty image sets of the same size")

    def stack(images: list[np.ndarray]) -> torch.Tensor:
        batch = torch.cat([_as_float(im).float() for im in images])
        return F.interpolate(batch, size=(MMD_SIDE, MMD_SIDE), mode="bilinear", antialias=True, align_corners=False)

    return float(gaussian_mmd(stack(protected), stack(originals)))
