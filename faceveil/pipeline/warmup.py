"""Compile the numba kernels into their on-disk cache (`python -m faceveil.pipeline.warmup`, run by ./setup.sh), so
that the first `faceveil protect` does not spend ~15 s compiling. Runs each kernel once on a tiny synthetic input."""

from __future__ import annotations

import time

import numpy as np
import torch

from faceveil.attacks.diversity import translation_invariant
from faceveil.attacks.faces import from_photos
from faceveil.attacks.norms import momentum_sign_step
from faceveil.detect.align import ARCFACE_112
from faceveil.models.prelu import PReLU


def compile_kernels() -> float:
    """Run every compiled kernel once (forward and backward); returns the seconds it took."""
    start = time.perf_counter()
    photo = np.full((160, 160, 3), 128, np.uint8)
    marks = (np.asarray(ARCFACE_112) - 56) * 0.9 + 80  # a face a little smaller than canonical space: low-passed
    batch = from_photos([photo], [marks], ["arcface112"], "photos")
    delta = torch.zeros(1, 3, 256, 256, requires_grad=True)
    batch.crops(batch.pasted(delta), "arcface112").sum().backward()
    momentum_sign_step(delta.detach(), None, delta.grad, 1.0, 1 / 255, 8 / 255)
    translation_invariant(delta.grad, 3)
    layer = PReLU(torch.full((4,), 0.25)).requires_grad_(False)
    for x in (torch.randn(2, 4, 3, 3).contiguous(memory_format=torch.channels_last), torch.randn(2, 4, 3, 3)):
        layer(x.requires_grad_(True)).sum().backward()
    return time.perf_counter() - start


if __name__ == "__main__":
    print(f"faceveil: kernels compiled and cached ({compile_kernels():.1f} s)")
