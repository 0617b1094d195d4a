"""The pictures of a photo report: downscaled before/after thumbnails, face close-ups and the amplified-difference
view, each encoded as a data URI so that the HTML file needs nothing beside itself."""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from faceveil.errors import FaceveilError
from faceveil.io.images import read_image

# Longest side of a whole-photo thumbnail and of a face close-up, in pixels: the report stays a few hundred KB per
# photo whatever the size of the originals.
THUMB_SIDE = 480
FACE_SIDE = 176
# Photographs are embedded as JPEG: as PNG a 480 px photo costs ~350 KB, as JPEG q88 ~40 KB with no visible loss at
# this size. Plots (flat colours, text) stay PNG.
JPEG_QUALITY = 88
DIFF_GAIN = 10.0  # the change view shows |after - before| x 10 on mid-grey
MID_GREY = 128.0
FACE_MARGIN = 0.35  # close-ups show the face box widened by this fraction on every side


@dataclass(frozen=True)
class PhotoPair:
    """An original and its protected version as RGB uint8 arrays of the same size (the protected one is resized to
    the original's size when a tool changed it; `resized` says so)."""

    before: np.ndarray | None  # None: only the protected photo is shown (a shareable report)
    after: np.ndarray
    resized: bool = False


def data_uri(image: np.ndarray | Image.Image, fmt: str = "JPEG") -> str:
    """A base64 data URI of an RGB image (JPEG for photographs, PNG for plots)."""
    pil = Image.fromarray(image) if isinstance(image, np.ndarray) else image
    buffer = io.BytesIO()
    if fmt == "JPEG":
        pil.convert("RGB").save(buffer, format="JPEG", quality=JPEG_QUALITY, optimize=True)
    else:
        pil.save(buffer, format="PNG", optimize=True)
    mime = "image/jpeg" if fmt == "JPEG" else "image/png"
    return f"data:{mime};base64,{base64.b64encode(buffer.getvalue()).decode('ascii')}"


def png_uri(raw_png: bytes) -> str:
    return f"data:image/png;base64,{base64.b64encode(raw_png).decode('ascii')}"


def load_pair(original: Path, protected: Path) -> PhotoPair:
    """Both photos as the pipeline sees them (EXIF orientation applied); FaceveilError if either is unreadable."""
    before = read_image(original).rgb
    after = read_image(protected).rgb
    if after.shape != before.shape:
        resized = Image.fromarray(after).resize((before.shape[1], before.shape[0]), Image.Resampling.LANCZOS)
        return PhotoPair(before, np.asarray(resized), resized=True)
    return PhotoPair(before, after)


def load_protected(protected: Path) -> PhotoPair:
    """Only the protected photo (orientation applied): what a shareable report shows."""
    return PhotoPair(None, read_image(protected).rgb)


def amplified_difference(before: np.ndarray, after: np.ndarray, gain: float = DIFF_GAIN) -> np.ndarray:
    """|after - before| x gain on mid-grey, per channel: grey where nothing changed, brighter where the mask is.
    The absolute value (not the signed change) survives the area-averaging of a downscale, so a small thumbnail
    still shows where and how strongly the photo was changed."""
    change = np.abs(after.astype(np.float32) - before.astype(np.float32))
    return np.clip(MID_GREY + gain * change, 0, 255).astype(np.uint8)


def fit(image: np.ndarray, side: int, resample: Image.Resampling = Image.Resampling.LANCZOS) -> np.ndarray:
    """Downscale so that the longer side is at most `side` (never upscale)."""
    h, w = image.shape[:2]
    scale = side / max(h, w)
    if scale >= 1:
        return image
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.asarray(Image.fromarray(image).resize(size, resample))


def thumbnails(pair: PhotoPair, side: int = THUMB_SIDE) -> dict[str, str]:
    """Data URIs of the before, after and amplified-change views of the whole photo (only after without before)."""
    if pair.before is None:
        return {"after": data_uri(fit(pair.after, side))}
    diff = amplified_difference(pair.before, pair.after)
    return {"before": data_uri(fit(pair.before, side)), "after": data_uri(fit(pair.after, side)),
            "change": data_uri(fit(diff, side, Image.Resampling.BOX))}


def face_window(box: list[float], width: int, height: int, margin: float = FACE_MARGIN) -> tuple[int, int, int, int]:
    """A square (x0, y0, x1, y1) around a face box, widened by `margin`, clipped to the photo."""
    x0, y0, x1, y1 = (float(v) for v in box[:4])
    half = max(x1 - x0, y1 - y0) * (0.5 + margin)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    left, top = max(0, int(cx - half)), max(0, int(cy - half))
    right, bottom = min(width, int(np.ceil(cx + half))), min(height, int(np.ceil(cy + half)))
    if right <= left or bottom <= top:
        raise FaceveilError(f"face box {box} lies outside the {width}x{height} photo")
    return left, top, right, bottom


def face_closeups(pair: PhotoPair, box: list[float], side: int = FACE_SIDE) -> dict[str, str]:
    """Data URIs of one face's before, after and amplified-change close-ups (only after without before)."""
    h, w = pair.after.shape[:2]
    x0, y0, x1, y1 = face_window(box, w, h)
    if pair.before is None:
        return {"after": data_uri(fit(pair.after[y0:y1, x0:x1], side))}
    before, after = pair.before[y0:y1, x0:x1], pair.after[y0:y1, x0:x1]
    diff = amplified_difference(before, after)
    return {"before": data_uri(fit(before, side)), "after": data_uri(fit(after, side)),
            "change": data_uri(fit(diff, side, Image.Resampling.BOX))}


def box_percent(box: list[float], width: int, height: int) -> dict[str, float]:
    """A face box as CSS percentages of the photo, to outline it over the thumbnail without touching its pixels."""
    x0, y0, x1, y1 = (float(v) for v in box[:4])
    return {"left": 100 * x0 / width, "top": 100 * y0 / height,
            "width": 100 * (x1 - x0) / width, "height": 100 * (y1 - y0) / height}
