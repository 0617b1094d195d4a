"""The optimiser's paste-back and crop sampling as fused CPU kernels (forward and backward), for photos mode.

What they compute is `FaceBatch.perturbed` followed by `canonical.sample`: each face's canonical perturbation
bilinearly warped into its window of the photo region (zeros outside the source, as grid_sample), added to the
clean pixels, clipped to [0, 1] and rounded to 8 bits with a straight-through gradient; then every model's crop
bilinearly sampled from the perturbed region. With torch ops that is a dozen passes over every window per iteration
plus grid_sample's scatter backward, twice: more than the surrogate networks themselves cost on a batch of faces.
Here the paste is one pass forward and one backward, and a crop reads the clean region and the change at once.
The paste's taps are computed once per batch (its warp is fixed); a crop's, whose jitter changes every iteration,
where they are used.

The clean regions and the change are held channels last ([B,H,W,3]): a crop pixel's 2x2 block then lies in two
runs of 24 bytes instead of six planes. The kernels are bound by memory, not arithmetic (16 faces' crops took 2.6
times as long as the same faces one by one, each still in cache). Measured with the caches flushed between calls,
16 faces: crop sampling 5.5 -> 5.1 ms forward, 3.2 -> 2.6 backward; the paste, which reads its sources channels
first, unchanged. The arithmetic, and the order of every sum, is the same in either layout (bit-identical).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numba
import numpy as np
import torch

from faceveil.detect.canonical import RegionWarp
from faceveil.runtime.jit import as_array, kernel, parallel_kernel, use_torch_threads


@dataclass(frozen=True)
class PasteTaps:
    """Where each window pixel reads its source (a canonical perturbation, maybe low-passed, [S,S]): the top-left
    of a 2x2 block (flat index, kept inside the plane) and the block's separable bilinear weights, zero for taps
    that grid_sample would read outside the source and beyond each face's window. Built once per batch from the
    paste grids, with grid_sample's float32 arithmetic: the optimiser's view matches the saved paste's to 1e-5."""

    offset: torch.Tensor  # [G,h,w] int32: y * S + x of the block's top-left pixel
    weight_x: torch.Tensor  # [G,h,w,2] float32: the block's left and right columns
    weight_y: torch.Tensor  # [G,h,w,2] float32: its top and bottom rows
    row_spans: torch.Tensor  # [G,h,2] int32: per window row, the columns the paste can change (RegionWarp)

    @classmethod
    def from_warps(cls, warps: list[RegionWarp], size: int, hw: tuple[int, int]) -> PasteTaps:
        """Each face's paste (its grid [1,h_i,w_i,2] into [S,S] sources, F.grid_sample's normalised coordinates,
        and its row spans) placed at the top left of [h, w]."""
        offset = torch.zeros(len(warps), *hw, dtype=torch.int32)
        weight_x = torch.zeros(len(warps), *hw, 2)
        weight_y = torch.zeros(len(warps), *hw, 2)
        spans = torch.zeros(len(warps), hw[0], 2, dtype=torch.int32)
        for i, warp in enumerate(warps):
            grid = warp.grid[0]
            h, w = grid.shape[:2]
            x, weight_x[i, :h, :w] = _axis_taps(grid[..., 0], size)
            y, weight_y[i, :h, :w] = _axis_taps(grid[..., 1], size)
            offset[i, :h, :w] = (y * size + x).to(torch.int32)
            spans[i, :h] = torch.tensor([[0, w]], dtype=torch.int32) if warp.row_spans is None else warp.row_spans
        return cls(offset, weight_x, weight_y, spans)

    def arrays(self) -> tuple[np.ndarray, ...]:
        return self.offset.numpy(), self.weight_x.numpy(), self.weight_y.numpy(), self.row_spans.numpy()


def _axis_taps(coordinate: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(first pixel of the 2-pixel block, its two weights [...,2]) along one axis."""
    pixel = ((coordinate + 1) * size - 1) / 2  # grid_sample's unnormalisation (align_corners=False), float32
    low = torch.floor(pixel)
    frac = pixel - low
    low = low.to(torch.int64)
    first = low.clamp(0, size - 2)
    weights = torch.zeros(*coordinate.shape, 2)
    for tap, w in ((low, 1 - frac), (low + 1, frac)):
        for slot in range(2):  # the tap lands in slot `tap - first` of the block, if it is a real pixel
            weights[..., slot] += torch.where((tap - first == slot) & (tap >= 0) & (tap < size), w, 0)
    return first, weights


@parallel_kernel
def _paste_forward(src, rows, offset, weight_x, weight_y, row_spans, clean, change, inside):
    """change = round8(clip(clean + warp(src))) - clean; inside = clean + warp(src) within [0, 1], on each row's
    span, 0 beyond it (the masked perturbation is below _NO_CHANGE there: with 8-bit clean pixels, as FaceBatch's
    regions are, it changes none). src [G,3,S,S]; face g's taps and clean window are row rows[g] of theirs
    ([R,...], [R,h,w,3]); change [G,h,w,3], inside uint8 [G,h,w,3]. One task per window row, the three channels
    together: their taps are read once (25 % faster than a task per channel)."""
    groups, size, h = src.shape[0], src.shape[2], clean.shape[1]
    for task in numba.prange(groups * h):
        g = task // h
        v = task - g * h
        r = rows[g]
        at, wx, wy = offset[r, v], weight_x[r, v], weight_y[r, v]
        start, stop = row_spans[r, v, 0], row_spans[r, v, 1]
        change[g, v, :start] = 0
        change[g, v, stop:] = 0
        inside[g, v, :start] = 0
        inside[g, v, stop:] = 0
        red, green, blue = (src[g, 0].reshape(size * size), src[g, 1].reshape(size * size),
                            src[g, 2].reshape(size * size))
        for u in range(start, stop):
            o = at[u]
            w00, w01 = wy[u, 0] * wx[u, 0], wy[u, 0] * wx[u, 1]
            w10, w11 = wy[u, 1] * wx[u, 0], wy[u, 1] * wx[u, 1]
            _round_paste(clean[r, v, u, 0], change, inside, g, v, u, 0, _bilinear(red, o, size, w00, w01, w10, w11))
            _round_paste(clean[r, v, u, 1], change, inside, g, v, u, 1, _bilinear(green, o, size, w00, w01, w10, w11))
            _round_paste(clean[r, v, u, 2], change, inside, g, v, u, 2, _bilinear(blue, o, size, w00, w01, w10, w11))


@kernel
def _bilinear(plane, o, size, w00, w01, w10, w11):
    """The 2x2 block at flat index o of a [size, size] plane, weighted."""
    return (w00 * plane[o] + w01 * plane[o + 1]) + (w10 * plane[o + size] + w11 * plane[o + size + 1])


@kernel
def _round_paste(before, change, inside, g, v, u, c, warped):
    """The pasted pixel before + warped, clipped and rounded to 8 bits: its change and whether clip let it through."""
    zero, one, levels = np.float32(0), np.float32(1), np.float32(255)
    pixel = before + warped
    inside[g, v, u, c] = (pixel >= zero) & (pixel <= one)
    change[g, v, u, c] = np.rint(min(max(pixel, zero), one) * levels) / levels - before


@parallel_kernel
def _paste_backward(grad_change, rows, offset, weight_x, weight_y, row_spans, inside, grad_src, per_channel):
    """The adjoint of the warp, through clip (zero gradient outside [0, 1]) and rounding (straight through). Each
    task owns one face's planes of grad_src [G,C,S,S] (zeroed), reading its taps once for the three channels; or,
    with `per_channel` (fewer faces than threads), one (face, channel) plane: no two threads add to the same
    pixel, and every pixel sums its terms in the same order either way."""
    groups, channels, size = grad_src.shape[0], grad_src.shape[1], grad_src.shape[2]
    parts = channels if per_channel else 1
    for task in numba.prange(groups * parts):
        g = task // parts
        first = task - g * parts
        last = first + 1 if per_channel else channels
        r = rows[g]
        planes = grad_src[g].reshape(channels, size * size)
        for v in range(grad_change.shape[1]):
            at, wx, wy = offset[r, v], weight_x[r, v], weight_y[r, v]
            for u in range(row_spans[r, v, 0], row_spans[r, v, 1]):
                o = at[u]
                for c in range(first, last):
                    if not inside[g, v, u, c]:
                        continue
                    grad = grad_change[g, v, u, c]
                    top, bottom = wy[u, 0] * grad, wy[u, 1] * grad
                    planes[c, o] += wx[u, 0] * top
                    planes[c, o + 1] += wx[u, 1] * top
                    planes[c, o + size] += wx[u, 0] * bottom
                    planes[c, o + size + 1] += wx[u, 1] * bottom


class PasteChange(torch.autograd.Function):
    """(src [G,3,S,S]: canonical perturbations, masked and low-passed; PasteTaps [R,...] and clean windows
    [R,h,w,3] of the faces, face g at row rows[g]) -> what pasting src changes in each window [G,h,w,3], 8-bit
    rounded; the gradient flows to src."""

    @staticmethod
    def forward(ctx, src: torch.Tensor, taps: PasteTaps, rows: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
        if src.shape[1] != 3:
            raise ValueError(f"the paste kernel takes RGB perturbations, got {src.shape[1]} channels")
        use_torch_threads()
        change = clean.new_empty(len(src), *clean.shape[1:])
        inside = torch.empty(change.shape, dtype=torch.uint8)
        _paste_forward(as_array(src), rows.numpy(), *taps.arrays(), as_array(clean), change.numpy(), inside.numpy())
        ctx.save_for_backward(rows, inside)
        ctx.taps, ctx.src_shape = taps, src.shape
        return change

    @staticmethod
    def backward(ctx, grad_change: torch.Tensor):
        rows, inside = ctx.saved_tensors
        use_torch_threads()
        grad_src = torch.zeros(ctx.src_shape, dtype=grad_change.dtype)
        per_channel = len(grad_src) < torch.get_num_threads()
        _paste_backward(as_array(grad_change), rows.numpy(), *ctx.taps.arrays(), inside.numpy(), grad_src.numpy(),
                        per_channel)
        return grad_src, None, None, None


@kernel
def _source_pixel(m, u, v):
    """Where dst pixel (u, v) samples through the affine m: the 2x2 block's top-left pixel and the fractions
    (float32, as the weights of torch's sampling are)."""
    x = m[0, 0] * u + m[0, 1] * v + m[0, 2]
    y = m[1, 0] * u + m[1, 1] * v + m[1, 2]
    x0, y0 = math.floor(x), math.floor(y)
    return x0, y0, np.float32(x - x0), np.float32(y - y0)


@parallel_kernel
def _sample_forward(clean, change, corner, dst_to_region, out, block, fraction):
    """out [B,C,oh,ow] = bilinear samples of (clean [B,H,W,C] + change) at dst_to_region @ (u, v, 1), zeros
    outside the region; change [B,h,w,C] is the region's window starting at corner[b] = (u0, v0), zero beyond
    it. Each crop pixel's 2x2 block (top-left region pixel [B,oh,ow,2] int32) and fractions (float32) are kept for
    the backward.
    Blocks wholly inside the region, and wholly inside or outside the window (nearly all), take a path without
    per-tap tests."""
    batch, height, width, channels = clean.shape
    h, w = change.shape[1], change.shape[2]
    oh, ow = out.shape[2], out.shape[3]
    one = np.float32(1)
    for task in numba.prange(batch * oh):
        b = task // oh
        v = task - b * oh
        u0, v0, m = corner[b, 0], corner[b, 1], dst_to_region[b]
        for u in range(ow):
            x0, y0, fx, fy = _source_pixel(m, u, v)
            block[b, v, u, 0], block[b, v, u, 1] = x0, y0
            fraction[b, v, u, 0], fraction[b, v, u, 1] = fx, fy
            wx, wy = x0 - u0, y0 - v0
            in_region = 0 <= x0 < width - 1 and 0 <= y0 < height - 1
            in_window = 0 <= wx < w - 1 and 0 <= wy < h - 1
            off_window = wx < -1 or wx >= w or wy < -1 or wy >= h
            if not in_region or not (in_window or off_window):  # leaves the region, or straddles the window's edge
                for c in range(channels):
                    out[b, c, v, u] = _edge_sample(clean, change, b, c, x0, y0, fx, fy, u0, v0)
                continue
            w00, w01 = (one - fy) * (one - fx), (one - fy) * fx
            w10, w11 = fy * (one - fx), fy * fx
            for c in range(channels):
                p00, p01 = clean[b, y0, x0, c], clean[b, y0, x0 + 1, c]
                p10, p11 = clean[b, y0 + 1, x0, c], clean[b, y0 + 1, x0 + 1, c]
                if in_window:
                    p00 += change[b, wy, wx, c]
                    p01 += change[b, wy, wx + 1, c]
                    p10 += change[b, wy + 1, wx, c]
                    p11 += change[b, wy + 1, wx + 1, c]
                out[b, c, v, u] = w00 * p00 + w01 * p01 + w10 * p10 + w11 * p11


@kernel
def _edge_sample(clean, change, b, c, x0, y0, fx, fy, u0, v0):
    """One crop pixel whose block leaves the region (zeros there) or straddles the window's edge: tap by tap."""
    height, width = clean.shape[1], clean.shape[2]
    h, w = change.shape[1], change.shape[2]
    one, value = np.float32(1), np.float32(0)
    for ty in range(y0, y0 + 2):
        if ty < 0 or ty >= height:
            continue
        weight_y = fy if ty > y0 else one - fy
        for tx in range(x0, x0 + 2):
            if tx < 0 or tx >= width:
                continue
            pixel = clean[b, ty, tx, c]
            if 0 <= ty - v0 < h and 0 <= tx - u0 < w:
                pixel += change[b, ty - v0, tx - u0, c]
            value += weight_y * (fx if tx > x0 else one - fx) * pixel
    return value


@parallel_kernel
def _sample_backward(grad_out, corner, block, fraction, grad_change):
    """The adjoint of `_sample_forward` for change, scattered into grad_change [B,h,w,C] (zeroed), one face per
    task: no two threads add to the same pixel, and every pixel sums its terms in a fixed order (taps outside the
    window carry no gradient: change is zero there). A task per (face, channel), as the channels-first layout had,
    would make two threads write the same cache lines; one face alone runs on one thread (0.2 ms)."""
    batch, channels, oh, ow = grad_out.shape
    h, w = grad_change.shape[1], grad_change.shape[2]
    for b in numba.prange(batch):
        plane, u0, v0 = grad_change[b], corner[b, 0], corner[b, 1]
        for v in range(oh):
            for u in range(ow):
                x0, y0 = block[b, v, u, 0] - u0, block[b, v, u, 1] - v0  # in window pixels
                if x0 < -1 or x0 >= w or y0 < -1 or y0 >= h:
                    continue
                for c in range(channels):
                    _scatter_tap(plane, grad_out[b, c, v, u], x0, y0, fraction[b, v, u, 0], fraction[b, v, u, 1],
                                 c, h, w)


@kernel
def _scatter_tap(plane, grad, x0, y0, fx, fy, c, h, w):
    """Adds one crop pixel's gradient to channel c of its 2x2 block of plane [h,w,C] (the parts inside it)."""
    one = np.float32(1)
    if 0 <= x0 < w - 1 and 0 <= y0 < h - 1:
        top, bottom = grad * (one - fy), grad * fy
        plane[y0, x0, c] += top * (one - fx)
        plane[y0, x0 + 1, c] += top * fx
        plane[y0 + 1, x0, c] += bottom * (one - fx)
        plane[y0 + 1, x0 + 1, c] += bottom * fx
        return
    for ty in range(max(y0, 0), min(y0 + 2, h)):
        g = grad * (fy if ty > y0 else one - fy)
        for tx in range(max(x0, 0), min(x0 + 2, w)):
            plane[ty, tx, c] += g * (fx if tx > x0 else one - fx)


class SamplePasted(torch.autograd.Function):
    """Crops [B,C,oh,ow] of perturbed regions (clean [B,H,W,C] plus change [B,h,w,C] at corner [B,2], channels
    last) through dst -> region pixel matrices [B,2,3]: `canonical.sample` of the pasted regions; the gradient flows
    to change."""

    @staticmethod
    def forward(ctx, clean: torch.Tensor, change: torch.Tensor, corner: torch.Tensor, dst_to_region: torch.Tensor,
                out_hw: tuple[int, int]) -> torch.Tensor:
        use_torch_threads()
        out = torch.empty(clean.shape[0], clean.shape[3], *out_hw, dtype=clean.dtype)
        block = torch.empty(clean.shape[0], *out_hw, 2, dtype=torch.int32)
        fraction = torch.empty(clean.shape[0], *out_hw, 2)
        matrices = dst_to_region.to(torch.float64).contiguous().numpy()
        _sample_forward(as_array(clean), as_array(change), corner.numpy(), matrices, out.numpy(), block.numpy(),
                        fraction.numpy())
        ctx.save_for_backward(corner, block, fraction)
        ctx.change_shape = change.shape
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        corner, block, fraction = ctx.saved_tensors
        use_torch_threads()
        grad_change = torch.zeros(ctx.change_shape, dtype=grad_out.dtype)
        _sample_backward(as_array(grad_out), corner.numpy(), block.numpy(), fraction.numpy(), grad_change.numpy())
        return None, grad_change, None, None, None
