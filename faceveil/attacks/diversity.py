"""Input diversity (DI, Xie et al. 2019): with probability p, shrink the input by a random factor and pad it back
to its size at a random offset, so the gradient does not overfit one exact pixel grid. APF (§4.1) extends DI to
three transforms, rescaling, rotation and colour conversion, each applied with probability p (`transforms`).
Also random projective views of an image (rotation, scale, shift, perspective, brightness), to make a batch out of
one image."""

from __future__ import annotations

import numba
import torch
import torch.nn.functional as F

from faceveil.attacks import eot
from faceveil.runtime.jit import parallel_kernel, use_torch_threads

# The DI transforms: "resize" is Xie et al.'s (rescale and pad); APF adds "rotate" and "colour".
DI_TRANSFORMS = ("resize", "rotate", "colour")
APF_DI_TRANSFORMS = DI_TRANSFORMS
DI_MAX_ROTATION_DEG = 10.0  # APF gives no range: small enough to keep the face aligned for the recogniser


def input_diversity(x: torch.Tensor, p: float, generator: torch.Generator, min_scale: float = 0.9,
                    transforms: tuple[str, ...] = ("resize",)) -> torch.Tensor:
    """Xie's DI (transforms=("resize",): with probability p, rescale and pad), or several DI transforms, each
    applied independently with probability p, in the order resize, rotate, colour (APF's rescaling, rotation and
    colour conversion)."""
    if tuple(transforms) != ("resize",):
        return _multi_diversity(x, p, generator, min_scale, transforms)
    return _resize_pad(x, p, generator, min_scale)


def _resize_pad(x: torch.Tensor, p: float, generator: torch.Generator, min_scale: float) -> torch.Tensor:
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


def _multi_diversity(x: torch.Tensor, p: float, generator: torch.Generator, min_scale: float,
                     transforms: tuple[str, ...]) -> torch.Tensor:
    unknown = set(transforms) - set(DI_TRANSFORMS) - set(eot.EOT_TRANSFORMS)
    if unknown:
        raise ValueError(f"unknown DI transform(s) {sorted(unknown)}; known: "
                         f"{', '.join(DI_TRANSFORMS + eot.EOT_TRANSFORMS)}")
    if "resize" in transforms:
        x = _resize_pad(x, p, generator, min_scale)
    if "rotate" in transforms and p > 0 and float(torch.rand((), generator=generator)) < p:
        x = _rotate(x, float(torch.rand((), generator=generator)) * 2 - 1)
    if "colour" in transforms and p > 0 and float(torch.rand((), generator=generator)) < p:
        x = _towards_grey(x, float(torch.rand((), generator=generator)))
    for name in eot.EOT_TRANSFORMS:  # expectation over transforms (attacks.eot), in that module's order
        if name in transforms and p > 0 and float(torch.rand((), generator=generator)) < p:
            x = eot.apply(name, x, generator)
    return x


def _rotate(x: torch.Tensor, fraction: float) -> torch.Tensor:
    """Rotate about the centre by fraction * DI_MAX_ROTATION_DEG (zeros outside), differentiably."""
    angle = torch.tensor(fraction * DI_MAX_ROTATION_DEG * torch.pi / 180, dtype=x.dtype)
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.stack([torch.stack([cos, -sin, torch.zeros_like(cos)]),
                         torch.stack([sin, cos, torch.zeros_like(cos)])]).expand(x.shape[0], 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _towards_grey(x: torch.Tensor, weight: float) -> torch.Tensor:
    """Colour conversion: blend RGB towards its luma (ITU-R BT.601) by `weight` in [0, 1] (1 = greyscale)."""
    grey = (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]).expand_as(x)
    return x + weight * (grey - x)


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


def smoothing_taps(size: int) -> torch.Tensor:
    """TI-FGSM's kernel (Dong et al. 2019) is a normalised 2-D Gaussian over size x size pixels, sigma =
    (size - 1) / 6 (the paper's normal density on [-3, 3]); it is the outer product of these 1-D taps [size]."""
    if size < 1 or size % 2 == 0:
        raise ValueError(f"smoothing kernel size must be odd and positive, got {size}")
    taps = torch.exp(-0.5 * torch.linspace(-3.0, 3.0, size) ** 2) if size > 1 else torch.ones(1)
    return taps / taps.sum()


def translation_invariant(grad: torch.Tensor, size: int) -> torch.Tensor:
    """The gradient [B,C,H,W] convolved with TI's Gaussian kernel (zero padding): the step then works for the image
    shifted by a few pixels too, which is what carries a perturbation to other model families (smoother, so also
    less visible to SSIM). A column then a row pass in one compiled kernel: 1.3 / 1.9 ms for one face and 14 / 24 ms
    for 16 (kernel 7 / 15, 256 px), where torch's depthwise convolutions took 1.9 / 3.3 and 82-144 ms on this CPU
    (an iteration of 16 faces is ~190 ms). size <= 1: the gradient unchanged."""
    if size <= 1:
        return grad
    planes = grad.detach().contiguous().float()
    columns, out = torch.empty_like(planes), torch.empty_like(planes)
    h, w = planes.shape[-2:]
    use_torch_threads()
    _smooth_planes(*(t.numpy().reshape(-1, h, w) for t in (planes, columns, out)), smoothing_taps(size).numpy())
    return out


@parallel_kernel
def _smooth_planes(src, columns, out, taps):
    """out = taps (rows) * (taps (columns) * src), zero padding, each plane of [planes, H, W] a task; every
    pixel sums its taps in order (the same value whatever the thread count); the inner loops run along rows."""
    planes, h, w = src.shape
    r = taps.size // 2
    for i in numba.prange(planes):
        columns[i] = 0
        out[i] = 0
        for y in range(h):
            for j in range(taps.size):
                yy = y + j - r
                if 0 <= yy < h:
                    for x in range(w):
                        columns[i, y, x] += taps[j] * src[i, yy, x]
        for y in range(h):
            for j in range(taps.size):
                for x in range(max(0, r - j), min(w, w + r - j)):
                    out[i, y, x] += taps[j] * columns[i, y, x + j - r]
