"""AdvCloak's networks (Liu et al. 2023, §3.2): the generator G (face -> perturbation) and the discriminators
D_I / D_II (original vs adversarial face).

The paper gives no layer table; it builds on AdvFaces (Deb et al. 2020), whose generator is the CycleGAN-style
encoder / residual / decoder network c7s1-k, d2k, d4k, R4k x blocks, u2k, uk, c7s1-3 + tanh and whose
discriminator is a PatchGAN. Both are kept here with the width scaled down (k = 12 instead of 64): the trained
generator has ~0.16 M parameters (~0.65 MB in float32, the budget is 8 MB) and one forward pass over 10 faces
takes well under 0.5 s on a 2-core CPU, which is what makes "one forward pass per person" cheap at the user end;
it is also what lets both training stages fit in ~40 minutes of a shared 2-core CPU.

Grid: G works on the ArcFace-112 crop (the paper's 112x112 input, and the exact window the face mask of
faceveil.detect.canonical covers), taken from the canonical face space by a fixed similarity; its output is mapped
back into canonical space by the inverse similarity (`to_canonical`), so every mask ends as the canonical
[n, 3, 256, 256] tensor that .fvmask files hold. Working on the 112 window rather than on a downsampled canonical
image keeps the paper's resolution and its L2 norm (1200 on 0..255 at 112x112x3) meaningful as is, and spends no
generator capacity on background outside the mask.

Normalisation is instance norm: a face's perturbation must not depend on which other faces share its batch
(G^II runs on one person's few photos at the user end).
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from faceveil.detect import canonical as C
from faceveil.detect.align import inverse_matrix

GRID = 112  # the generator's input and output side
WINDOW = "arcface112"  # the crop geometry of that grid
GENERATOR_CONFIG = {"width": 12, "blocks": 3}
OUTPUT_INIT_SCALE = 0.03  # initial weights of G's last conv, times this
DISCRIMINATOR_CONFIG = {"width": 16}


def _conv(cin: int, cout: int, kernel: int, stride: int = 1, norm: bool = True) -> list[nn.Module]:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, kernel, stride, padding=(kernel - 1) // 2,
                                         padding_mode="reflect" if stride == 1 else "zeros")]
    if norm:
        layers.append(nn.InstanceNorm2d(cout, affine=True))
    layers.append(nn.ReLU(inplace=True))
    return layers


class ResidualBlock(nn.Module):
    """R_k: two 3x3 convolutions with a skip connection (AdvFaces / CycleGAN)."""

    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1, padding_mode="reflect"),
            nn.InstanceNorm2d(channels, affine=True), nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 3, padding=1, padding_mode="reflect"),
            nn.InstanceNorm2d(channels, affine=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class Generator(nn.Module):
    """G: faces [B,3,112,112] in [0,1] -> perturbations [B,3,112,112] in [0,1] pixel units (tanh-bounded).

    Layers: c7s1-k, d2k (4x4 stride 2), d4k, R4k x `blocks`, u2k (2x upsample + 3x3 conv), uk, c3s1-3, tanh.
    AdvFaces' decoder has 5x5 and 7x7 kernels there; on full-resolution maps with few channels they cost most of
    the CPU time (measured ~45 % of a forward pass), so the decoder uses 3x3 (same layers, same receptive role).
    The last layer starts near zero so that the first perturbations are small (norm ~eps, not ~40x it)."""

    def __init__(self, width: int = 12, blocks: int = 3):
        super().__init__()
        self.width, self.blocks = width, blocks
        k = width
        self.net = nn.Sequential(
            *_conv(3, k, 7), *_conv(k, 2 * k, 4, 2), *_conv(2 * k, 4 * k, 4, 2),
            *[ResidualBlock(4 * k) for _ in range(blocks)],
            nn.Upsample(scale_factor=2, mode="nearest"), *_conv(4 * k, 2 * k, 3),
            nn.Upsample(scale_factor=2, mode="nearest"), *_conv(2 * k, k, 3),
            nn.Conv2d(k, 3, 3, padding=1, padding_mode="reflect"), nn.Tanh())

        head = self.net[-2]
        assert isinstance(head, nn.Conv2d) and head.bias is not None
        with torch.no_grad():
            head.weight.mul_(OUTPUT_INIT_SCALE)
            head.bias.zero_()

    def forward(self, faces: torch.Tensor) -> torch.Tensor:
        # the AdvFaces input range [-1, 1]; the output is a perturbation in the faces' own [0, 1] units
        return self.net(faces * 2 - 1)

    def config(self) -> dict:
        return {"width": self.width, "blocks": self.blocks}


class Discriminator(nn.Module):
    """D: faces [B,3,112,112] in [0,1] -> one logit per face (the mean of a PatchGAN's patch logits).
    Layers: c4s2-k (no norm), c4s2-2k, c4s2-4k, c4s2-8k (instance norm, leaky ReLU 0.2), 1x1 conv -> patch logit."""

    def __init__(self, width: int = 16):
        super().__init__()
        self.width = width
        k = width
        layers: list[nn.Module] = []
        for i, (cin, cout) in enumerate([(3, k), (k, 2 * k), (2 * k, 4 * k), (4 * k, 8 * k)]):
            layers.append(nn.Conv2d(cin, cout, 4, 2, 1))
            if i > 0:
                layers.append(nn.InstanceNorm2d(cout, affine=True))
            layers.append(nn.LeakyReLU(0.2, inplace=True))
        layers.append(nn.Conv2d(8 * k, 1, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, faces: torch.Tensor) -> torch.Tensor:
        return self.net(faces * 2 - 1).mean(dim=(1, 2, 3))

    def config(self) -> dict:
        return {"width": self.width}


def parameter_bytes(module: nn.Module) -> int:
    """Bytes of the float32 parameters (what a state_dict file holds, near enough)."""
    return sum(p.numel() * 4 for p in module.parameters())


# ------------------------------------------------------------------------------------- grid <-> canonical space


@functools.lru_cache(maxsize=1)
def _window_to_canonical() -> torch.Tensor:
    """[2,3] matrix: generator-grid pixel -> canonical pixel (a fixed similarity, zoom CANONICAL_ZOOM)."""
    return C.canonical_to_crop_matrices(torch.tensor(C.CANONICAL.template), WINDOW).float()


@functools.lru_cache(maxsize=1)
def _canonical_to_window() -> torch.Tensor:
    return inverse_matrix(_window_to_canonical().double()).float()


def from_canonical(canonical: torch.Tensor) -> torch.Tensor:
    """The generator's view [B,3,112,112] of canonical faces [B,3,256,256] (the ArcFace-112 window)."""
    m = _window_to_canonical().expand(canonical.shape[0], 2, 3)
    return C.sample(canonical, m, (GRID, GRID))


def to_canonical(grid: torch.Tensor) -> torch.Tensor:
    """Perturbations on the generator grid [B,3,112,112] -> canonical space [B,3,256,256] (zero outside the
    window; the face mask feathers the edge when the mask is pasted). Differentiable."""
    m = _canonical_to_window().expand(grid.shape[0], 2, 3)
    return C.sample(grid, m, (C.CANONICAL_SIZE, C.CANONICAL_SIZE))
