"""A perceptual budget for identity masks: what the face-area SSIM (the evaluation's visibility measure) charges for a
perturbation, used to shape the budget and to bound it. Ported from branch `protection` (issue 23, item 2), which
wrote it for one perturbation per face; here a mask may be shared by several faces (OPOM's person masks: `owner`).

SSIM (Wang et al. 2004) compares each 11x11 Gaussian window of the original and the protected face. A change of local
standard deviation s added to a window whose own deviation is sigma lowers SSIM to about
(2 sigma^2 + C2) / (2 sigma^2 + s^2 + C2): on flat skin (sigma ~ 0) a change of 2/255 already costs 0.05, in hair,
brows and edges (sigma ~ 30/255) one of 10/255 costs the same. Hence:

- `texture_budget`: a per-pixel L-inf budget map proportional to sqrt(2 sigma^2 + C2) of the clean face (normalised
  to mean 1 over the face area, clipped), so the mask grows where SSIM hardly sees it and stays small on flat skin.
  A shared mask takes the mean of its faces' maps (aligned faces put brows, eyes and hair line in the same place).
- `SsimBudget`: the projection onto {face-area SSIM >= target} (and PSNR >= a floor: SSIM alone forgives smooth
  colour shifts, branch protection saw blotches at SSIM 0.93 and 28.5 dB): a mask whose faces' mean SSIM is under
  the target is scaled down until it is not; `onto` scales a finished mask up or down onto the target, so that
  masks of every setting meet the same visibility (what "compare at equal SSIM" needs).
"""

from __future__ import annotations

import functools

import torch

from faceveil.attacks.faces import FaceBatch
from faceveil.detect import canonical as C

WINDOW, SIGMA = 11, 1.5  # the evaluation's SSIM window (faceveil.evaluate.quality)
C1, C2 = 0.01**2, 0.03**2
# The face area: the perturbation mask's square in canonical space (as the evaluation protocols measure it)
FACE_LO = round(C.CANONICAL_SIZE / 2 - C.MASK_HALF_SIDE)
FACE_HI = round(C.CANONICAL_SIZE / 2 + C.MASK_HALF_SIDE)
TEXTURE_MIN, TEXTURE_MAX = 0.25, 3.0  # bounds of the texture map relative to its face-area mean
SHRINK_MARGIN = 0.995  # a projection lands a little inside the budget (the next measurement is on 8-bit pixels)
PENALTY_MARGIN = 0.005  # the SSIM hinge aims this far above the target, so the projection seldom has to act
PENALTY_ADAPT = 1.25  # per-step factor of each face's hinge weight (up while under target + margin, else down)
PENALTY_BOUNDS = (0.05, 20.0)


def _taps() -> torch.Tensor:
    x = torch.arange(WINDOW, dtype=torch.float64) - (WINDOW - 1) / 2
    g = torch.exp(-(x**2) / (2 * SIGMA**2))
    return g / g.sum()


@functools.lru_cache(maxsize=8)
def _band(size: int, padding: int, dtype: torch.dtype) -> torch.Tensor:
    """[out, size]: the 1-D Gaussian window as a banded matrix (valid windows, or `padding` zeros each side)."""
    out = size + 2 * padding - WINDOW + 1
    band = torch.zeros(out, size, dtype=torch.float64)
    taps = _taps()
    for i in range(out):
        for j in range(WINDOW):
            k = i + j - padding
            if 0 <= k < size:
                band[i, k] = taps[j]
    return band.to(dtype)


def _blur(t: torch.Tensor, padding: int = 0) -> torch.Tensor:
    """The separable Gaussian window over the last two axes as two matrix products (a depthwise 11x11 convolution
    is ~100x slower on this CPU)."""
    rows, cols = _band(t.shape[-2], padding, t.dtype), _band(t.shape[-1], padding, t.dtype)
    return rows @ t @ cols.T


def face_area(images: torch.Tensor) -> torch.Tensor:
    """The face-area square [B,C,174,174] of canonical images [B,C,256,256]."""
    return images[..., FACE_LO:FACE_HI, FACE_LO:FACE_HI]


def ssim(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image mean SSIM [B] of images [B,C,H,W] in [0, 1] (valid windows, channels averaged), differentiably:
    the formula and window of faceveil.evaluate.quality.ssim."""
    mx, my = _blur(x), _blur(y)
    vx, vy, cxy = _blur(x * x) - mx**2, _blur(y * y) - my**2, _blur(x * y) - mx * my
    value = ((2 * mx * my + C1) * (2 * cxy + C2)) / ((mx**2 + my**2 + C1) * (vx + vy + C2))
    return value.flatten(1).mean(dim=1)


def local_deviation(images: torch.Tensor) -> torch.Tensor:
    """Each pixel's standard deviation [B,C,H,W] over SSIM's Gaussian window (same size, zero padded)."""
    m = _blur(images, WINDOW // 2)
    return (_blur(images * images, WINDOW // 2) - m * m).clamp_min(0).sqrt()


def texture_budget(canonical: torch.Tensor, owner: torch.Tensor | None = None, low: float = TEXTURE_MIN,
                   high: float = TEXTURE_MAX) -> torch.Tensor:
    """The per-pixel budget map of clean canonical faces [B,C,256,256]: sqrt(2 sigma^2 + C2) (the change that costs
    every window about the same SSIM), over its mean in the face area, clipped to [low, high]; [B,...] per face, or
    with `owner` [B] (face -> mask) [M,...] per shared mask, from the mean cost of its faces."""
    cost = (2 * local_deviation(canonical.double()) ** 2 + C2).sqrt()
    if owner is not None:
        count = int(owner.max()) + 1
        cost = torch.zeros(count, *cost.shape[1:], dtype=cost.dtype).index_add_(0, owner, cost)
        cost = cost / torch.bincount(owner, minlength=count).view(-1, 1, 1, 1)
    mean = face_area(cost).flatten(1).mean(dim=1).view(-1, 1, 1, 1)
    return (cost / mean).clamp(low, high).to(canonical.dtype)


class SsimBudget:
    """Face-area SSIM (and PSNR) of perturbations as the faces will show them, and the projection onto
    SSIM >= target (PSNR >= psnr_floor when given) by scaling each perturbation.

    Each face is measured on its pasted, 8-bit-rounded pixels (photos mode) resampled to canonical space, against
    its clean face. With `owner` [B] (face -> shared mask) a mask's figure is the mean over its faces.
    1 - SSIM grows about as the square of a perturbation's scale, so a mask at SSIM s is scaled by
    sqrt((1 - target) / (1 - s)) and measured again (`rounds` times); the mean squared error grows exactly as the
    square, so a PSNR of p dB needs a scale of 10^((p - floor) / 20).

    Penalty mode (Fawkes' DSSIM budget, with an adaptive weight; branch protection measured +0.15 black-box
    Rank-1-UT at equal SSIM 0.93): `hinge` is max(0, target + margin - SSIM) of the pasted faces, differentiably; its
    gradient, normalised per face and weighted by `weight`, joins the step, so the optimiser itself looks for the
    changes SSIM hardly sees (along the face's own edges and texture) instead of having every step scaled back."""

    def __init__(self, batch: FaceBatch, target: float, psnr_floor: float = 0.0, owner: torch.Tensor | None = None,
                 rounds: int = 8):
        if not 0 <= target < 1 or (target == 0 and psnr_floor <= 0):
            raise ValueError(f"an SSIM target lies in (0, 1) (or a PSNR floor is given), got {target}")
        self.batch, self.target, self.psnr_floor, self.rounds = batch, target, psnr_floor, rounds
        self.owner = owner
        self.clean = face_area(batch.canonical(batch.regions)).float()
        self.weight = torch.ones(len(batch))

    def hinge(self, regions) -> torch.Tensor:
        """[B] max(0, target + margin - SSIM) per face of perturbed regions (as FaceBatch.pasted gives them), with a
        gradient; adapts each face's weight to whether it is under target + margin."""
        s = ssim(self.clean, face_area(self.batch.canonical(regions)).float())
        under = s.detach() < self.target + PENALTY_MARGIN
        grown = torch.where(under, self.weight * PENALTY_ADAPT, self.weight / PENALTY_ADAPT)
        self.weight = grown.clamp(*PENALTY_BOUNDS)
        return (self.target + PENALTY_MARGIN - s).clamp_min(0)

    def _per_mask(self, values: torch.Tensor) -> torch.Tensor:
        if self.owner is None:
            return values
        count = int(self.owner.max()) + 1
        total = torch.zeros(count, dtype=values.dtype).index_add_(0, self.owner, values)
        return total / torch.bincount(self.owner, minlength=count).to(values.dtype)

    @torch.no_grad()
    def measure(self, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Face-area SSIM and PSNR (dB) per perturbation ([M], the mean over each mask's faces) with `delta` pasted."""
        pasted = self.batch.pasted(delta if self.owner is None else delta[self.owner])
        protected = face_area(self.batch.canonical(pasted)).float()
        mse = (protected - self.clean).square().flatten(1).mean(dim=1).clamp_min(1e-12)
        return self._per_mask(ssim(self.clean, protected)), self._per_mask(-10 * torch.log10(mse))

    def _scale_for(self, s: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """The factor [M] each perturbation needs to reach the budget's boundary (>1: it may grow)."""
        factor = torch.full_like(s, float("inf"))
        if self.target > 0:
            factor = ((1 - self.target) / (1 - s).clamp_min(1e-6)).sqrt()
        if self.psnr_floor > 0:
            factor = torch.minimum(factor, 10 ** ((p - self.psnr_floor) / 20))
        return factor

    @torch.no_grad()
    def __call__(self, delta: torch.Tensor, rounds: int | None = None) -> torch.Tensor:
        """`delta` with each perturbation over budget scaled down (`rounds` measurements; the optimiser measures once
        per iteration, the next iteration corrects, and the final iterate gets the full `self.rounds`)."""
        scale = torch.ones(len(delta), dtype=delta.dtype)
        for _ in range(rounds or self.rounds):
            factor = self._scale_for(*self.measure(delta * scale.view(-1, 1, 1, 1)))
            if not bool((factor < 1).any()):
                break
            scale = scale * torch.where(factor < 1, factor * SHRINK_MARGIN, torch.ones_like(factor)).to(scale.dtype)
        return delta * scale.view(-1, 1, 1, 1)

    @torch.no_grad()
    def onto(self, delta: torch.Tensor, rounds: int = 6) -> torch.Tensor:
        """`delta` scaled up or down so that each perturbation sits on the budget's boundary: a finished mask uses
        its whole visibility budget (as an L2 mask is scaled onto its norm). A zero perturbation stays zero."""
        scale = torch.ones(len(delta), dtype=delta.dtype)
        for _ in range(rounds):
            factor = self._scale_for(*self.measure(delta * scale.view(-1, 1, 1, 1)))
            factor = torch.where(torch.isfinite(factor), factor, torch.ones_like(factor)).clamp(0.25, 4.0)
            scale = scale * factor.to(scale.dtype)
        return self(delta * scale.view(-1, 1, 1, 1))
