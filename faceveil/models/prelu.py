"""PReLU with a fast input gradient: the layer the converted MobileFaceNets use after nearly every convolution.

torch's PReLU backward always computes the slope's gradient too (a per-channel reduction over the whole batch),
even when the slope is frozen, as every recogniser's is: measured, it was 28 % of an attack's time, more than the
convolutions' backward. Here the forward is F.prelu itself (the same values) and the backward computes the input
gradient alone, in one pass; a slope that requires a gradient falls back to F.prelu.
"""

from __future__ import annotations

import numba
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from faceveil.runtime.jit import parallel_kernel, use_torch_threads


class PReLU(nn.PReLU):
    """nn.PReLU (one slope, or one per channel) with `slope` as its weight and the fast input gradient."""

    def __init__(self, slope: torch.Tensor) -> None:
        super().__init__(slope.numel())
        self.weight.data = slope.reshape(-1).float().clone()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return prelu(x, self.weight)


def prelu(x: torch.Tensor, slope: torch.Tensor) -> torch.Tensor:
    """F.prelu(x, slope); when slope is frozen, its backward computes the input gradient alone."""
    if slope.requires_grad or not x.requires_grad:
        return F.prelu(x, slope)
    return _FrozenSlopePReLU.apply(x, slope)


@parallel_kernel
def _input_gradient_channels_last(x, grad, slope, out):
    """out = grad where x > 0, else slope[c] * grad; arrays [pixels, C] (channels last), slope [C]; 64 pixels
    per task (a task per pixel costs more to schedule than its work)."""
    pixels, channels = x.shape
    one = np.float32(1)
    for block in numba.prange((pixels + 63) // 64):
        for p in range(block * 64, min(pixels, block * 64 + 64)):
            for c in range(channels):
                out[p, c] = grad[p, c] * (one if x[p, c] > 0 else slope[c])


@parallel_kernel
def _input_gradient_planes(x, grad, slope, out):
    """The same on arrays [planes, pixels] (channels first: plane i is channel i % C)."""
    for i in numba.prange(x.shape[0]):
        s = slope[i % slope.size]
        for p in range(x.shape[1]):
            out[i, p] = grad[i, p] if x[i, p] > 0 else s * grad[i, p]


class _FrozenSlopePReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, slope: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, slope)
        return F.prelu(x, slope)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        # numpy views instead of torch's reshapes: at batch 1 torch's view ops cost three times the kernel itself
        x, slope = ctx.saved_tensors
        channels = x.shape[1] if x.dim() > 1 else 1
        slopes = slope.detach().numpy().reshape(-1)
        if slopes.size != channels:  # one slope: the same for every channel
            slopes = np.full(channels, slopes[0], dtype=slopes.dtype)
        use_torch_threads()
        if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
            grad = grad.contiguous(memory_format=torch.channels_last)
            out = torch.empty_like(x, memory_format=torch.channels_last)
            x_rows, grad_rows, out_rows = (_rows(t.numpy().transpose(0, 2, 3, 1), channels)
                                           for t in (x.detach(), grad, out))
            _input_gradient_channels_last(x_rows, grad_rows, slopes, out_rows)
            return out, None
        x, grad = x.detach().contiguous(), grad.contiguous()
        out = torch.empty_like(x)
        pixels = x[0, 0].numel() if x.dim() > 1 else x.numel()
        _input_gradient_planes(_rows(x.numpy(), pixels), _rows(grad.numpy(), pixels), slopes,
                               _rows(out.numpy(), pixels))
        return out, None


def _rows(array: np.ndarray, width: int) -> np.ndarray:
    """A view of a C-ordered array as rows of `width` (never a copy: the kernel writes into `out` through it)."""
    view = array.view()
    view.shape = (-1, width)  # raises instead of copying
    return view
