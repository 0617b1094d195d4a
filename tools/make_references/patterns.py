"""Deterministic test images shared by the reference generators (the same pattern for every runtime)."""

from __future__ import annotations

import numpy as np


def smooth_image(side: int) -> np.ndarray:
    """A smooth, face-sized pattern covering 0..255 in each channel: sums of low-frequency waves."""
    y, x = np.mgrid[0:side, 0:side].astype(np.float64) / side
    channels = [
        0.5 + 0.3 * np.sin(2 * np.pi * (1.3 * x + 0.4 * y)) + 0.2 * np.cos(2 * np.pi * 2.1 * y),
        0.5 + 0.35 * np.cos(2 * np.pi * (0.7 * x - 1.1 * y)) + 0.15 * np.sin(2 * np.pi * 3.0 * x * y),
        0.5 + 0.45 * np.sin(2 * np.pi * ((x - 0.5) ** 2 + (y - 0.4) ** 2) * 2.5),
    ]
    return np.clip(np.rint(np.stack(channels, axis=-1) * 255.0), 0, 255).astype(np.uint8)
