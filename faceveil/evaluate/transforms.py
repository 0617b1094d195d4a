"""Robustness transforms: what a protected photo may go through before a recogniser sees it (re-compression,
rescaling, blur, bit-depth reduction, denoising, cropping). One registry, `TRANSFORMS`; `apply(name, image, seed)`.

Every transform maps an HxWx3 uint8 RGB array to another of the same shape; the random ones (`cropPad`) draw from
a generator seeded by `seed`, so the same seed gives the same output.

`realign` is not a pixel transform: `apply("realign", image)` returns the image unchanged, and the transform's
`landmark_jitter` (2 px) tells consumers to move the detected landmarks before aligning, as a re-detection by
another detector would:

    image = apply(name, image, seed)
    marks = landmarks_after(name, face.landmarks, seed)  # perturb_landmarks(..., default_rng(seed)) for realign
    crop = align(image, marks, geometry)
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter

from faceveil.errors import FaceveilError

PixelFunction = Callable[[np.ndarray, np.random.Generator], np.ndarray]


@dataclass(frozen=True)
class Transform:
    name: str
    function: PixelFunction
    description: str
    random: bool = False  # draws from the seeded generator
    landmark_jitter: float = 0.0  # pixels: consumers perturb the landmarks by this much before aligning


def _jpeg(quality: int) -> PixelFunction:
    def run(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
        buffer.seek(0)
        with Image.open(buffer) as decoded:
            return np.asarray(decoded.convert("RGB")).copy()

    return run


def _resize(factor: float) -> PixelFunction:
    def run(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        h, w = image.shape[:2]
        small_size = (max(1, round(w * factor)), max(1, round(h * factor)))
        small = Image.fromarray(image).resize(small_size, Image.LANCZOS)  # antialiased
        return np.asarray(small.resize((w, h), Image.BICUBIC)).copy()

    return run


def _pil_filter(kernel: ImageFilter.Filter) -> PixelFunction:
    def run(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return np.asarray(Image.fromarray(image).filter(kernel)).copy()

    return run


def _blur(sigma: float) -> PixelFunction:
    return _pil_filter(ImageFilter.GaussianBlur(sigma))


def _bits(depth: int) -> PixelFunction:
    step = 2 ** (8 - depth)

    def run(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return (image // step * step + step // 2).astype(np.uint8)  # centre of each bin: 2**depth levels

    return run


def _median(size: int) -> PixelFunction:
    return _pil_filter(ImageFilter.MedianFilter(size))


def _crop_pad(max_fraction: float) -> PixelFunction:
    """Cut up to max_fraction of the height/width off random sides, then pad back to the size (edge replicated),
    so the content shifts by a few per cent."""

    def run(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        h, w = image.shape[:2]
        top, bottom = (int(v) for v in rng.integers(0, int(h * max_fraction / 2) + 1, size=2))
        left, right = (int(v) for v in rng.integers(0, int(w * max_fraction / 2) + 1, size=2))
        cropped = image[top:h - bottom, left:w - right]
        return np.pad(cropped, ((bottom, top), (right, left), (0, 0)), mode="edge")

    return run


def _identity(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return image.copy()


REALIGN_PIXELS = 2.0

TRANSFORMS: dict[str, Transform] = {
    t.name: t
    for t in (
        Transform("jpeg95", _jpeg(95), "JPEG quality 95, encoded and decoded in memory"),
        Transform("jpeg75", _jpeg(75), "JPEG quality 75"),
        Transform("jpeg50", _jpeg(50), "JPEG quality 50"),
        Transform("resize0.75", _resize(0.75), "down to 75% (antialiased), back up to the original size"),
        Transform("resize0.5", _resize(0.5), "down to 50% (antialiased), back up to the original size"),
        Transform("blur0.5", _blur(0.5), "Gaussian blur, sigma 0.5 px"),
        Transform("blur1", _blur(1.0), "Gaussian blur, sigma 1 px"),
        Transform("bits5", _bits(5), "bit-depth reduction to 5 bits per channel (32 levels)"),
        Transform("median3", _median(3), "3x3 median filter"),
        Transform("cropPad", _crop_pad(0.06), "random crop of up to 6% of each side pair, padded back (seeded)",
                  random=True),
        Transform("realign", _identity, f"no pixel change: landmarks moved by {REALIGN_PIXELS:g} px before aligning",
                  random=True, landmark_jitter=REALIGN_PIXELS),
    )
}


def get(name: str) -> Transform:
    if name not in TRANSFORMS:
        raise FaceveilError(f"unknown transform {name!r}; known: {', '.join(TRANSFORMS)}")
    return TRANSFORMS[name]


def apply(name: str, image: np.ndarray, seed: int = 0) -> np.ndarray:
    """The transformed copy of an HxWx3 uint8 RGB image (same shape and dtype)."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 uint8 image, got {image.dtype} {image.shape}")
    return get(name).function(np.ascontiguousarray(image), np.random.default_rng(seed))


def parse_names(text: str | None) -> list[str]:
    """'all', None or a comma list -> validated transform names, registry order for 'all'."""
    if not text or text == "all":
        return list(TRANSFORMS)
    names = [n.strip() for n in text.split(",") if n.strip()]
    for name in names:
        get(name)
    if not names:
        raise FaceveilError("`transforms` is empty; give 'all' or a comma list")
    return names


def item_seed(seed: int, index: int) -> int:
    """The seed of item `index` of a set transformed under `seed`: independent draws per item, and the same item
    (e.g. a protected probe and its clean original) always gets the same draw."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def landmarks_after(name: str, landmarks: np.ndarray, seed: int = 0) -> np.ndarray:
    """The landmarks a consumer aligns with after transform `name`: moved by the transform's landmark_jitter
    (realign), else unchanged. Same seed as `apply`, so one seed decides both the pixels and the alignment."""
    t = get(name)
    if not t.landmark_jitter:
        return np.asarray(landmarks, dtype=np.float64)
    return perturb_landmarks(landmarks, t.landmark_jitter, np.random.default_rng(seed))


def perturb_landmarks(landmarks: np.ndarray, pixels: float, generator: np.random.Generator) -> np.ndarray:
    """Each landmark [K, 2] moved by exactly `pixels` in an independent random direction (a new array)."""
    angles = generator.uniform(0.0, 2 * np.pi, size=len(landmarks))
    offsets = np.stack([np.cos(angles), np.sin(angles)], axis=1) * pixels
    return np.asarray(landmarks, dtype=np.float64) + offsets
