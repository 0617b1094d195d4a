"""The canonical face space: one face-centred square geometry large enough to hold every recogniser's crop
(ArcFace-112 tight, loose-224, dlib-150 chip), with differentiable warps from canonical space to each model's crop
and from canonical space to the photo, a feathered face mask, and paste-back onto the full-resolution photo.

A perturbation that lives in canonical space (a person mask, or an image-specific mask) is pasted onto the photo
through the inverse similarity warp. When the face is smaller in the photo than in canonical space, the
perturbation is first low-pass resized (antialiased), so pasting never aliases.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from faceveil.detect.align import ARCFACE_112, CropGeometry, get_geometry, inverse_matrix, register, warp_matrix

CANONICAL_SIZE = 256
# ArcFace-112 units -> canonical pixels. 1.55 makes the loosest crop (loose224, 1.4x the ArcFace field of view)
# span 243 of the 256 canonical pixels, and gives ~55 px between the eyes.
CANONICAL_ZOOM = 1.55
CANONICAL = register(CropGeometry(
    "canonical", CANONICAL_SIZE,
    tuple(((x - 55.5) * CANONICAL_ZOOM + (CANONICAL_SIZE - 1) / 2,
           (y - 55.5) * CANONICAL_ZOOM + (CANONICAL_SIZE - 1) / 2) for x, y in ARCFACE_112),
))
# The perturbed area: the ArcFace-112 crop (what the papers perturb), as a rounded square with soft edges.
MASK_HALF_SIDE = 112 * CANONICAL_ZOOM / 2
MASK_FEATHER = 6.0
# A perturbation value (in [0,1] units) this small cannot change an 8-bit pixel: paste skips where all are.
_NO_CHANGE = 1e-3


def face_mask(size: int = CANONICAL_SIZE) -> torch.Tensor:
    """[1, size, size] in [0, 1]: 1 inside the face area, feathered to 0 over a few pixels (no seams)."""
    return _cached_face_mask(size).clone()


@functools.lru_cache(maxsize=4)
def _cached_face_mask(size: int) -> torch.Tensor:
    """face_mask, computed once per size (read-only: callers get clones)."""
    c = (size - 1) / 2
    k = size / CANONICAL_SIZE
    y, x = torch.meshgrid(torch.arange(size, dtype=torch.float64), torch.arange(size, dtype=torch.float64),
                          indexing="ij")
    r = ((x - c).abs() ** 4 + (y - c).abs() ** 4) ** 0.25  # superellipse: a square with rounded corners
    return torch.sigmoid((MASK_HALF_SIDE * k - r) / (MASK_FEATHER * k / 4)).float()[None]


def _affine3(m: torch.Tensor) -> torch.Tensor:
    bottom = torch.tensor([0.0, 0.0, 1.0], dtype=m.dtype).expand(*m.shape[:-2], 1, 3)
    return torch.cat([m, bottom], dim=-2)


def compose(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a after b, for 2x3 affine matrices (batched)."""
    return (_affine3(a) @ _affine3(b))[..., :2, :]


def canonical_to_crop_matrices(landmarks: torch.Tensor | np.ndarray, geometry: str) -> torch.Tensor:
    """Crop-pixel -> canonical-pixel matrices [..., 2, 3] for a model geometry: the crop taken from the canonical
    image equals the crop taken from the photo (both fitted to the same photo landmarks)."""
    photo_to_canonical = warp_matrix(landmarks, CANONICAL)
    crop_to_photo = inverse_matrix(warp_matrix(landmarks, geometry))
    return compose(photo_to_canonical, crop_to_photo)


def sample(src: torch.Tensor, dst_to_src: torch.Tensor, out_hw: tuple[int, int]) -> torch.Tensor:
    """Differentiable bilinear resampling: out[b, :, v, u] = src[b] at pixel dst_to_src[b] @ (u, v, 1);
    zeros outside. src [B,C,h,w], dst_to_src [B,2,3] in pixel-centre coordinates."""
    oh, ow = out_hw
    theta = _theta(src, dst_to_src, out_hw)
    grid = F.affine_grid(theta, [src.shape[0], src.shape[1], oh, ow], align_corners=False)
    return F.grid_sample(src, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _theta(src: torch.Tensor, dst_to_src: torch.Tensor, out_hw: tuple[int, int]) -> torch.Tensor:
    """F.affine_grid's theta (normalised coordinates, align_corners=False) for `sample`."""
    h, w = src.shape[-2:]
    oh, ow = out_hw
    m = torch.as_tensor(dst_to_src, dtype=torch.float64)
    to_pixels = torch.tensor([[ow / 2, 0, (ow - 1) / 2], [0, oh / 2, (oh - 1) / 2], [0, 0, 1]], dtype=torch.float64)
    to_norm = torch.tensor([[2 / w, 0, 1 / w - 1], [0, 2 / h, 1 / h - 1]], dtype=torch.float64)
    return (to_norm @ _affine3(m) @ to_pixels).to(src.dtype)


def _sample_window(src: torch.Tensor, dst_to_src: torch.Tensor, out_hw: tuple[int, int],
                   window: tuple[int, int, int, int]) -> torch.Tensor:
    """`sample(src, dst_to_src, out_hw)[..., v0:v1, u0:u1]` for window (u0, v0, u1, v1), computed on the window
    only, with the same arithmetic: F.affine_grid's base grid (its linspace formula), sliced, times theta."""
    grid = _window_grid(_theta(src, dst_to_src, out_hw), out_hw, window)
    return F.grid_sample(src, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _window_grid(theta: torch.Tensor, out_hw: tuple[int, int], window: tuple[int, int, int, int]) -> torch.Tensor:
    """F.affine_grid(theta [1,2,3], out_hw)[:, v0:v1, u0:u1] for window (u0, v0, u1, v1), built on the window only:
    the same base grid (its linspace formula), sliced, times theta."""
    oh, ow = out_hw
    u0, v0, u1, v1 = window
    xs = (torch.linspace(-1, 1, ow, dtype=theta.dtype) * (ow - 1) / ow)[u0:u1]
    ys = (torch.linspace(-1, 1, oh, dtype=theta.dtype) * (oh - 1) / oh)[v0:v1]
    base = torch.empty(1, v1 - v0, u1 - u0, 3, dtype=theta.dtype)
    base[..., 0].copy_(xs)
    base[..., 1].copy_(ys.unsqueeze(-1))
    base[..., 2].fill_(1)
    return base.view(1, -1, 3).bmm(theta.transpose(1, 2)).view(1, v1 - v0, u1 - u0, 2)


def model_crops(canonical: torch.Tensor, crop_to_canonical: torch.Tensor, geometry: str) -> torch.Tensor:
    """Model crops [B,C,S,S] from canonical images [B,C,256,256]."""
    size = get_geometry(geometry).size
    return sample(canonical, crop_to_canonical, (size, size))


def linear_scale(m: torch.Tensor) -> float:
    """Isotropic scale of a similarity matrix (pixels out per pixel in)."""
    return float(math.sqrt(abs(float(torch.linalg.det(torch.as_tensor(m, dtype=torch.float64)[..., :2])))))


def canonical_to_region(delta: torch.Tensor, canonical_to_photo: torch.Tensor, box: tuple[int, int, int, int]):
    """Warp canonical tensors [B,C,256,256] into the photo region box=(x0,y0,x1,y1) -> [B,C,y1-y0,x1-x0].
    Downscaling warps are antialiased first (resize by the warp's scale), so fine detail does not alias."""
    return RegionWarp.make(canonical_to_photo, box, delta.shape[-1], delta.dtype)(delta)


@dataclass(frozen=True)
class RegionWarp:
    """`canonical_to_region` for one fixed warp, with its sampling grid computed once: an optimiser pastes the same
    face thousands of times, and building a photo-sized grid costs as much as the grid sampling itself. With a
    `support` (where the canonical tensors can be non-zero: the face mask), only the window of the region that the
    support reaches is sampled; outside it the pasted values are below _NO_CHANGE (see _changing_window)."""

    small: int | None  # side of the low-pass copy of the canonical tensor, or None when the warp does not shrink
    grid: torch.Tensor  # [1,v1-v0,u1-u0,2] F.grid_sample grid into the (low-passed) canonical tensor
    window: tuple[int, int, int, int]  # (u0, v0, u1, v1) of the region that `grid` covers
    # with a support: per window row, the columns [start, stop) where the warped support exceeds _NO_CHANGE (the
    # support is convex: one span per row). A tilted face's window is its bounding box; these are its rows.
    row_spans: torch.Tensor | None = None  # [v1-v0, 2] int32

    @classmethod
    def make(cls, canonical_to_photo: torch.Tensor, box: tuple[int, int, int, int], size: int = CANONICAL_SIZE,
             dtype: torch.dtype = torch.float32, support: torch.Tensor | None = None) -> RegionWarp:
        x0, y0, x1, y1 = box
        out_hw = (y1 - y0, x1 - x0)
        probe = torch.ones(size, size, dtype=dtype) if support is None else support.to(dtype)
        src, region_to_src = _prepare_warp(probe.reshape(1, 1, size, size), canonical_to_photo, x0, y0)
        window = (0, 0, out_hw[1], out_hw[0])
        if support is not None:
            window = _changing_window(src, region_to_src, out_hw) or (0, 0, 0, 0)
        grid = _window_grid(_theta(src, region_to_src[None], out_hw), out_hw, window)
        spans = None if support is None else _row_spans(F.grid_sample(src, grid, align_corners=False)[0, 0])
        return cls(src.shape[-1] if src.shape[-1] != size else None, grid, window, spans)

    def __call__(self, delta: torch.Tensor) -> torch.Tensor:
        """[B,C,256,256] -> the window of the region [B,C,v1-v0,u1-u0]."""
        delta = low_pass(delta, self.small)
        grid = self.grid.expand(delta.shape[0], *self.grid.shape[1:])
        return F.grid_sample(delta, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _row_spans(warped_support: torch.Tensor) -> torch.Tensor:
    """[h, 2] int32: per row, the columns [start, stop) where the warped support [h, w] exceeds _NO_CHANGE
    (everything between the first and the last such column); (0, 0) for a row with none."""
    active = warped_support > _NO_CHANGE
    columns = torch.arange(active.shape[1])
    start = torch.where(active, columns, active.shape[1]).amin(dim=1)
    stop = torch.where(active, columns + 1, 0).amax(dim=1)
    return torch.stack([start.clamp(max=stop), stop], dim=1).to(torch.int32)


def is_identity(m: torch.Tensor) -> bool:
    """A 2x3 affine matrix that maps every pixel to itself."""
    return bool(torch.allclose(m.to(torch.float64), torch.eye(2, 3, dtype=torch.float64), rtol=0, atol=1e-9))


class BatchedRegionWarps:
    """Many faces' RegionWarps applied together: one grid_sample per group of faces whose warps read the same
    source size (its CPU kernel parallelises over the batch; one call per face runs on one thread and costs ~1.6x).
    The grids are padded to the group's largest window with points far outside the source (they sample zeros)."""

    _OUTSIDE = 4.0  # normalised grid coordinate well outside [-1, 1]

    def __init__(self, warps: list[RegionWarp]):
        self.windows = [w.window for w in warps]
        self.groups: list[tuple[int | None, torch.Tensor, torch.Tensor]] = []
        for small, index in warp_groups(warps):
            h = max(warps[i].grid.shape[1] for i in index)
            w_ = max(warps[i].grid.shape[2] for i in index)
            grid = torch.full((len(index), h, w_, 2), self._OUTSIDE, dtype=warps[index[0]].grid.dtype)
            for j, i in enumerate(index):
                g = warps[i].grid[0]
                grid[j, :g.shape[0], :g.shape[1]] = g
            self.groups.append((small, torch.tensor(index), grid))

    def __call__(self, delta: torch.Tensor) -> list[torch.Tensor]:
        """[B,C,256,256] (one per warp) -> each face's region window [1,C,v1-v0,u1-u0]."""
        out: list[torch.Tensor | None] = [None] * len(self.windows)
        for small, index, grid in self.groups:
            src = low_pass(delta if len(index) == len(delta) else delta[index], small)  # index_select: linear
            sampled = F.grid_sample(src, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
            for face, one in zip(index.tolist(), sampled.split(1), strict=True):
                u0, v0, u1, v1 = self.windows[face]
                out[face] = one[..., :v1 - v0, :u1 - u0]
        return out  # type: ignore[return-value]


def warp_groups(warps: list[RegionWarp]) -> list[tuple[int | None, list[int]]]:
    """(low-pass size, the warps' indices) for each source size the warps read, in order of first use."""
    sizes = dict.fromkeys(w.small for w in warps)
    return [(small, [i for i, w in enumerate(warps) if w.small == small]) for small in sizes]


def low_pass(delta: torch.Tensor, small: int | None) -> torch.Tensor:
    """The canonical tensors resized (antialiased) to the side a shrinking warp reads them at; as they are if None."""
    if small is None:
        return delta
    return F.interpolate(delta, size=(small, small), mode="bilinear", antialias=True, align_corners=False)


def _prepare_warp(delta: torch.Tensor, canonical_to_photo: torch.Tensor, x0: int, y0: int):
    """(source, region -> source pixel matrix) for canonical_to_region: the canonical tensors, low-pass resized
    when the warp shrinks them, and where each pixel of a region starting at photo pixel (x0, y0) samples them."""
    scale = linear_scale(canonical_to_photo)
    m = torch.as_tensor(canonical_to_photo, dtype=torch.float64)
    if scale < 0.95:
        small = max(8, round(delta.shape[-1] * scale))
        k = delta.shape[-1] / small
        delta = low_pass(delta, small)
        # small pixel p <-> canonical pixel (p + 0.5) k - 0.5
        m = compose(m, torch.tensor([[k, 0, 0.5 * k - 0.5], [0, k, 0.5 * k - 0.5]], dtype=torch.float64))
    region_to_src = compose(inverse_matrix(m), torch.tensor([[1.0, 0, x0], [0, 1.0, y0]], dtype=torch.float64))
    return delta, region_to_src


def region_box(canonical_to_photo: torch.Tensor, width: int, height: int, margin: int = 2) -> tuple[int, int, int, int]:
    """Photo pixel box (x0, y0, x1, y1) covering the canonical square, clipped to the photo."""
    c = CANONICAL_SIZE - 1
    corners = torch.tensor([[0.0, 0.0, 1.0], [c, 0, 1], [0, c, 1], [c, c, 1]], dtype=torch.float64)
    pts = corners @ torch.as_tensor(canonical_to_photo, dtype=torch.float64).T
    x0 = max(0, int(math.floor(float(pts[:, 0].min()))) - margin)
    y0 = max(0, int(math.floor(float(pts[:, 1].min()))) - margin)
    x1 = min(width, int(math.ceil(float(pts[:, 0].max()))) + margin + 1)
    y1 = min(height, int(math.ceil(float(pts[:, 1].max()))) + margin + 1)
    return x0, y0, x1, y1


def quantise_ste(x: torch.Tensor) -> torch.Tensor:
    """8-bit rounding with a straight-through gradient: the forward pass sees what a saved file holds."""
    return x + (torch.round(x * 255) / 255 - x).detach()


class _ClipQuantise(torch.autograd.Function):
    """clamp(x, 0, 1) then quantise_ste, as one op: the optimiser runs it on every face window every iteration,
    and the two separately cost eight full passes over the window (forward and backward) instead of three."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        inside = (x >= 0) & (x <= 1)
        ctx.save_for_backward(inside)
        return torch.round(x.clamp(0, 1) * 255).div_(255)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (inside,) = ctx.saved_tensors
        return grad * inside  # clamp's gradient (1 inside [0, 1], as torch.clamp's), rounding straight through


def clip_quantise_ste(x: torch.Tensor) -> torch.Tensor:
    """quantise_ste(x.clamp(0, 1)): what an 8-bit file holds, with clamp's gradient and a straight-through one
    for the rounding."""
    return _ClipQuantise.apply(x)


def paste(photo: np.ndarray, landmarks: np.ndarray, delta: torch.Tensor,
          mask: torch.Tensor | None = None) -> np.ndarray:
    """Paste a canonical-space perturbation [3,256,256] (in [0,1] units) onto a uint8 photo HxWx3 for the face with
    these landmarks: feathered by the face mask, clipped to the valid range, rounded to 8 bits. Returns a copy."""
    out = photo.copy()
    paste_into(out, landmarks, delta, mask)
    return out


def paste_into(photo: np.ndarray, landmarks: np.ndarray, delta: torch.Tensor,
               mask: torch.Tensor | None = None) -> tuple[int, int, int, int] | None:
    """`paste`, in place: only the face's region of `photo` (a writable uint8 HxWx3 array) is touched.

    Returns the region box (x0, y0, x1, y1), or None when the face lies outside the photo. Pasting several faces
    one after another gives the same pixels as chaining `paste`, without copying the frame. Only the part of the
    region where the masked perturbation can change a pixel is computed (see _changing_window), with the same
    arithmetic as the whole region: the pixels are exactly those of the original whole-region paste. The torch
    work runs on one thread: it is small, and multi-threading it on a busy CPU is many times slower.
    """
    h, w = photo.shape[:2]
    with _one_thread():
        canonical_to_photo = inverse_matrix(warp_matrix(landmarks, CANONICAL))
        box = region_box(canonical_to_photo, w, h)
        x0, y0, x1, y1 = box
        if x1 <= x0 or y1 <= y0:
            return None
        mask = _cached_face_mask(CANONICAL_SIZE) if mask is None else mask
        masked = (delta.detach().float() * mask)[None]
        src, region_to_src = _prepare_warp(masked, canonical_to_photo, x0, y0)
        window = _changing_window(src, region_to_src, (y1 - y0, x1 - x0))
        if window is None:
            return box
        region_delta = _sample_window(src, region_to_src[None], (y1 - y0, x1 - x0), window)
        region_delta = region_delta[0].permute(1, 2, 0).contiguous().numpy()
    u0, v0, u1, v1 = window
    pixels = photo[y0 + v0:y0 + v1, x0 + u0:x0 + u1]
    region = pixels.astype(np.float32)
    region /= 255
    region += region_delta
    region *= 255
    np.rint(region, out=region)
    pixels[...] = np.clip(region, 0, 255, out=region)  # whole numbers in [0, 255]: the uint8 cast is exact
    return box


def _changing_window(src: torch.Tensor, region_to_src: torch.Tensor,
                     region_hw: tuple[int, int]) -> tuple[int, int, int, int] | None:
    """The part (u0, v0, u1, v1) of the region that the perturbation can change; None if it changes nothing.

    Elsewhere every source pixel that bilinear sampling reads is at most _NO_CHANGE in size, and so is the
    sampled value (the weights are positive and sum to at most 1); 255 * _NO_CHANGE plus float32 rounding is
    far below 0.5, so rounding gives back every 8-bit pixel unchanged there: skipping it changes nothing.
    """
    active = ~(src[0].abs().amax(dim=0) <= _NO_CHANGE)  # NaN counts as active
    rows, cols = torch.nonzero(active.any(dim=1)), torch.nonzero(active.any(dim=0))
    if len(rows) == 0:
        return None
    # a sample at s reads pixels floor(s) and floor(s) + 1: grow by 1, plus 1 for float32 grid rounding
    sx0, sx1, sy0, sy1 = int(cols[0]) - 2, int(cols[-1]) + 2, int(rows[0]) - 2, int(rows[-1]) + 2
    corners = torch.tensor([[sx0, sy0, 1.0], [sx1, sy0, 1], [sx0, sy1, 1], [sx1, sy1, 1]], dtype=torch.float64)
    pts = corners @ _affine3(region_to_src).inverse()[:2].T
    oh, ow = region_hw
    u0, v0 = max(0, math.floor(float(pts[:, 0].min())) - 1), max(0, math.floor(float(pts[:, 1].min())) - 1)
    u1, v1 = min(ow, math.ceil(float(pts[:, 0].max())) + 2), min(oh, math.ceil(float(pts[:, 1].max())) + 2)
    return (u0, v0, u1, v1) if u1 > u0 and v1 > v0 else None


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Run torch on one intra-op thread inside the block (torch.set_num_threads is process-wide)."""
    previous = torch.get_num_threads()
    if previous == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
