"""What the app accepts as a photo, checked before anything reads its pixels: a file that is not empty, that the
image library recognises as JPEG, PNG or WebP from its bytes (never from its name), no larger than the pixel limit
(read from the header alone, so a 20000 x 20000 header costs nothing), and that then decodes in full."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from faceveil import api
from faceveil.app.sessions import FORMAT_EXTENSIONS, VIDEO_EXTENSIONS
from faceveil.errors import FaceveilError


@dataclass(frozen=True)
class Limits:
    """The app's request and upload limits (each refusal names the limit)."""

    max_upload_bytes: int = 40 * 1024 * 1024  # one photo
    max_pixels: int = 50_000_000  # width x height of one photo
    max_photos: int = 60  # photos in one session
    max_files_per_drop: int = 30  # the page refuses a larger drop before sending anything
    max_json_bytes: int = 64 * 1024  # any other request body
    max_video_bytes: int = 200 * 1024 * 1024  # one short video (person-mask tab)
    max_video_seconds: int = 120
    max_video_pixels: int = 1920 * 1080  # one frame

    def to_dict(self) -> dict[str, int]:
        return {"max_upload_bytes": self.max_upload_bytes, "max_pixels": self.max_pixels,
                "max_photos": self.max_photos, "max_files_per_drop": self.max_files_per_drop,
                "max_video_bytes": self.max_video_bytes, "max_video_seconds": self.max_video_seconds}


def is_video_name(name: str) -> bool:
    """Whether the browser's name for a file says video (its bytes are then checked as a video, never trusted)."""
    return name.lower().endswith(VIDEO_EXTENSIONS)


class RejectedUpload(ValueError):
    """One line for the page: which file, and why it was not taken."""


def check_photo(path: Path, name: str, limits: Limits) -> tuple[str, int, int]:
    """(format, width, height) of an uploaded file, or RejectedUpload saying in words what is wrong with it."""
    size = path.stat().st_size
    if size == 0:
        raise RejectedUpload(f"{name} is empty (0 bytes): nothing to protect")
    kinds = "JPEG, PNG or WebP"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(path) as image:
                fmt, width, height = str(image.format), int(image.width), int(image.height)
                if fmt not in FORMAT_EXTENSIONS:
                    raise RejectedUpload(f"{name} is a {fmt} image: only {kinds} photos are taken")
                _check_pixels(name, width, height, limits)
                image.load()  # the whole file decodes (not truncated or damaged)
        except RejectedUpload:
            raise
        except Image.DecompressionBombError:
            raise RejectedUpload(f"{name} is too large: more than {limits.max_pixels / 1e6:.0f} megapixels") from None
        except UnidentifiedImageError:
            raise RejectedUpload(f"{name} is not a photo: only {kinds} photos are taken") from None
        except (OSError, SyntaxError, ValueError) as exc:
            raise RejectedUpload(f"{name} could not be read: the file is damaged or incomplete ({exc})") from None
    return fmt, width, height


def _check_pixels(name: str, width: int, height: int, limits: Limits) -> None:
    if width * height > limits.max_pixels:
        raise RejectedUpload(f"{name} is too large: {width} x {height} pixels ({width * height / 1e6:.0f} megapixels; "
                             f"the most is {limits.max_pixels / 1e6:.0f})")
    if width < 16 or height < 16:
        raise RejectedUpload(f"{name} is too small: {width} x {height} pixels")


def check_video(path: Path, name: str, limits: Limits) -> tuple[str, int, int, dict]:
    """(extension to store it under, width, height, what it holds) of an uploaded video, or RejectedUpload."""
    if path.stat().st_size == 0:
        raise RejectedUpload(f"{name} is empty (0 bytes): nothing to protect")
    try:
        info = api.video_info(path)
    except FaceveilError:
        raise RejectedUpload(f"{name} is not a video the app can read") from None
    if info["width"] * info["height"] > limits.max_video_pixels:
        raise RejectedUpload(f"{name} is too large: {info['width']} x {info['height']} frames "
                             "(the most is 1920 x 1080)")
    if info["seconds"] > limits.max_video_seconds:
        raise RejectedUpload(f"{name} is too long: {info['seconds']:.0f} s (the most is {limits.max_video_seconds} s)")
    ext = "." + name.rsplit(".", 1)[-1].lower()
    return (ext if ext in VIDEO_EXTENSIONS else ".mp4"), info["width"], info["height"], info
