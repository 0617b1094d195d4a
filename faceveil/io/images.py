"""Reading and writing photos safely.

`read_image` turns any still JPEG / PNG / WebP / HEIC (HEIF) / AVIF / BMP / TIFF (also single-frame GIF, multi-picture
JPEG and multi-image HEIF: the main picture) into 8-bit RGB pixels with the EXIF orientation applied, keeping alpha,
ICC profile and original EXIF aside. HEIC/HEIF is read and written by pillow-heif (libheif), AVIF by Pillow itself.
Anything it cannot read cleanly (empty, truncated, not an image, animated, too many pixels) is a one-line
FaceveilError; decoding never starts for an image whose header claims more pixels than the limit.

`write_image` writes atomically (temp file beside the target, fsync, rename), in the input's format by
default, with alpha and ICC profile kept and all EXIF removed unless keep_metadata=True (keep_date=True keeps only
the capture date and time).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, ImageFile, ImageOps, UnidentifiedImageError

from faceveil.errors import FaceveilError
from faceveil.io.atomic import atomic_path
from faceveil.io.paths import (
    _SAME_FORMAT_FOR_EXT,
    DEFAULT_JPEG_QUALITY,
    extension_matches,
    output_path_for,
    refuse_same_file,
    target_format,
)

__all__ = [
    "DEFAULT_MAX_PIXELS", "KEEP", "Photo", "read_image", "write_image", "output_path_for",
]

DEFAULT_MAX_PIXELS = 80_000_000
READ_FORMATS = ("JPEG", "PNG", "WEBP", "HEIF", "AVIF", "BMP", "TIFF", "GIF")  # JPEG also opens MPO
ALPHA_FORMATS = frozenset({"PNG", "WEBP", "HEIF", "AVIF", "TIFF", "BMP"})
ICC_FORMATS = frozenset({"JPEG", "PNG", "WEBP", "HEIF", "AVIF", "TIFF"})
EXIF_FORMATS = frozenset({"JPEG", "PNG", "WEBP", "HEIF", "AVIF", "TIFF"})
SUPPORTED = "JPEG, PNG, WebP, HEIC/HEIF, AVIF, BMP, TIFF, GIF"
SIXTEEN_BIT_NOTE = "16-bit image reduced to 8-bit"
# Lossy outputs (quality: paths.DEFAULT_JPEG_QUALITY): JPEG's chroma subsampling, measured with the quality (README,
# "Photo formats": 4:2:0 at 85 kept every judge's verdict of 4:4:4 at 95 at half the size); optimize=True (Huffman
# tables fitted to the image) is lossless and saves a few per cent.
JPEG_SUBSAMPLING = 2  # 4:2:0
HEIF_QUALITY_FOR_JPEG_QUALITY = 0  # HEIC/AVIF: the same --jpeg-quality number, plus this

# IFD0 tags that describe the pixel layout of the source file: never copied into a new file's EXIF.
_STRUCTURAL_TAGS = frozenset({
    254, 256, 257, 258, 259, 262, 266, 273, 277, 278, 279, 284, 317, 320, 322, 323, 324, 325, 330, 338, 339,
    513, 514, 530, 531, 700, 34675,
})
_MAKER_NOTE, _PIXEL_X, _PIXEL_Y = 0x927C, 0xA002, 0xA003
# The capture date and time (--keep-date): IFD0 DateTime; Exif IFD DateTimeOriginal / Digitized, their time-zone
# offsets and sub-seconds. Nothing else, so no location, camera, lens or serial number goes along.
_DATE_TAGS_IFD0 = frozenset({0x0132})
_DATE_TAGS_EXIF = frozenset({0x9003, 0x9004, 0x9010, 0x9011, 0x9012, 0x9290, 0x9291, 0x9292})

_pil_limit_lock = threading.Lock()

# Truncated files must be refused, not silently padded with grey.
ImageFile.LOAD_TRUNCATED_IMAGES = False


class _Keep(Enum):
    KEEP = "keep"


KEEP = _Keep.KEEP
"""Default for write_image's icc_profile / alpha: take the value from the Photo."""


@dataclass(frozen=True)
class Photo:
    """A decoded still image: 8-bit RGB pixels (orientation applied) plus what is needed to write it back."""

    rgb: np.ndarray  # H x W x 3, uint8
    alpha: np.ndarray | None = None  # H x W, uint8
    format: str = "PNG"  # PIL format name of the source: JPEG, MPO, PNG, WEBP, BMP, TIFF, GIF
    icc_profile: bytes | None = None  # an RGB ICC profile (CMYK / grey profiles are converted away)
    exif: bytes | None = None  # the source's EXIF block as read, for keep_metadata
    path: Path | None = None
    notes: tuple[str, ...] = ()  # what was changed on reading ("16-bit image reduced to 8-bit", ...)
    dpi: tuple[float, float] | None = None
    lossless: bool = False  # WebP source was lossless (VP8L)

    def __post_init__(self) -> None:
        _check_rgb(self.rgb)
        if self.alpha is not None:
            _check_alpha(self.alpha, self.rgb.shape[:2])

    @property
    def width(self) -> int:
        return int(self.rgb.shape[1])

    @property
    def height(self) -> int:
        return int(self.rgb.shape[0])

    @property
    def size(self) -> tuple[int, int]:
        """(width, height), as PIL reports it."""
        return self.width, self.height

    def with_rgb(self, rgb: np.ndarray) -> Photo:
        """The same photo (format, profile, alpha, metadata) with new pixels (same size if it has alpha)."""
        if rgb.shape[:2] != self.rgb.shape[:2] and self.alpha is not None:
            raise ValueError(f"new pixels are {rgb.shape[:2]}, the alpha channel is {self.alpha.shape}")
        return dataclasses.replace(self, rgb=rgb)


def _check_rgb(rgb: np.ndarray) -> None:
    if not isinstance(rgb, np.ndarray) or rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        got = f"{getattr(rgb, 'dtype', type(rgb))} {getattr(rgb, 'shape', '')}"
        raise ValueError(f"pixels must be an H x W x 3 uint8 array, got {got}")


def _check_alpha(alpha: np.ndarray, shape: tuple[int, ...]) -> None:
    if alpha.dtype != np.uint8 or alpha.shape != tuple(shape):
        raise ValueError(f"alpha must be an H x W uint8 array of shape {tuple(shape)}, got {alpha.shape}")


# --------------------------------------------------------------------------------------------------- reading


def read_image(path: Path | str, *, max_pixels: int = DEFAULT_MAX_PIXELS, data: bytes | None = None) -> Photo:
    """Decode a still image into a Photo; any problem is a one-line FaceveilError. The one image reader of faceveil:
    protection, evaluation and training all see the same pixels of a file.

    data: the file's bytes when the caller has read them already (e.g. to hash them): they are decoded instead of
    the file, so that the digest describes exactly these pixels."""
    path = Path(path)
    if data is None:
        _check_file(path)
    elif not data:
        raise FaceveilError(f"{path}: empty file (0 bytes)")
    with _pil_pixel_limit(max_pixels), _open(path, data) as im:
        _refuse_too_large(im.size, max_pixels, path)
        frame_note = _check_frames(im, path)
        notes, lossless = _depth_notes(im), _webp_is_lossless(path, im.format, data)
        _decode(im, path)
        exif, icc = _original_exif(im), im.info.get("icc_profile") or None
        ImageOps.exif_transpose(im, in_place=True)
        rgb, alpha, icc, mode_notes = _to_rgb_alpha(im, icc)
        all_notes = tuple(dict.fromkeys(n for n in (frame_note, *notes, *mode_notes) if n))
        return Photo(
            rgb=rgb, alpha=alpha, format=str(im.format), icc_profile=icc, exif=exif, path=path,
            notes=all_notes, dpi=_dpi(im), lossless=lossless,
        )


def _check_file(path: Path) -> None:
    if not path.exists():
        raise FaceveilError(f"{path}: no such file")
    if not path.is_file():
        raise FaceveilError(f"{path}: not a file")
    if path.stat().st_size == 0:
        raise FaceveilError(f"{path}: empty file (0 bytes)")


@contextlib.contextmanager
def _pil_pixel_limit(max_pixels: int) -> Iterator[None]:
    """Let PIL open images up to our own limit (its bomb check would refuse above 2x its default)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        current = Image.MAX_IMAGE_PIXELS
        if current is None or max_pixels < 2 * current:
            yield
            return
        with _pil_limit_lock:
            Image.MAX_IMAGE_PIXELS = max_pixels
            try:
                yield
            finally:
                Image.MAX_IMAGE_PIXELS = current


@functools.cache
def heif_plugin() -> None:
    """Teach PIL HEIC/HEIF (pillow-heif), once. Thumbnails, depth maps and auxiliary images are never read: only
    the picture itself (a thumbnail would be an unprotected copy of the face)."""
    try:
        import pillow_heif
    except ImportError as exc:  # a pinned dependency; only a broken install lacks it
        raise FaceveilError("HEIC/HEIF needs the pillow-heif package: pip install pillow-heif") from exc
    pillow_heif.register_heif_opener(thumbnails=False, depth_images=False, aux_images=False)


@contextlib.contextmanager
def _open(path: Path, data: bytes | None = None) -> Iterator[Image.Image]:
    heif_plugin()
    try:
        im = Image.open(path if data is None else io.BytesIO(data), formats=READ_FORMATS)
    except Image.DecompressionBombError as exc:
        raise FaceveilError(
            f"{path}: image header claims over {2 * (Image.MAX_IMAGE_PIXELS or 0) / 1e6:.0f} megapixels "
            "(possible decompression bomb); refused before decoding"
        ) from exc
    except UnidentifiedImageError as exc:
        raise FaceveilError(f"{path}: not a supported image ({SUPPORTED})") from exc
    except PermissionError as exc:
        raise FaceveilError(f"{path}: permission denied") from exc
    except Exception as exc:
        raise FaceveilError(f"{path}: cannot read image header: {_one_line(exc)}") from exc
    with im:
        yield im


def _refuse_too_large(size: tuple[int, int], max_pixels: int, path: Path) -> None:
    width, height = size
    if width * height > max_pixels:
        raise FaceveilError(
            f"{path}: {width}x{height} is {width * height / 1e6:.0f} megapixels, over the limit of "
            f"{max_pixels / 1e6:g} MP (possible decompression bomb; raise the pixel limit to read it)"
        )
    if width < 1 or height < 1:
        raise FaceveilError(f"{path}: image has no pixels ({width}x{height})")


def _check_frames(im: Image.Image, path: Path) -> str:
    frames = int(getattr(im, "n_frames", 1) or 1)
    if frames <= 1:
        return ""
    if im.format == "MPO":
        return f"multi-picture JPEG ({frames} pictures): only the first (main) picture is used"
    if im.format == "HEIF":
        return f"HEIF with {frames} images: only the main image is used"
    raise FaceveilError(
        f"{path}: animated or multi-page image ({frames} frames); only still images are supported"
    )


def _original_exif(im: Image.Image) -> bytes | None:
    raw = im.info.get("exif")
    if isinstance(raw, bytes) and raw:
        return raw
    try:
        exif = im.getexif()
        return exif.tobytes() if len(exif) else None
    except Exception:
        return None



def _depth_notes(im: Image.Image) -> list[str]:
    rawmodes = [t.args if isinstance(t.args, str) else (t.args or ("",))[0] for t in im.tile]
    sixteen = im.mode.startswith("I;16") or any(";16" in str(mode) for mode in rawmodes)
    return [SIXTEEN_BIT_NOTE] if sixteen else []


def _webp_is_lossless(path: Path, fmt: str | None, data: bytes | None = None) -> bool:
    """True for a WebP whose first image chunk is VP8L (lossless)."""
    if fmt != "WEBP":
        return False
    with open(path, "rb") if data is None else io.BytesIO(data) as handle:
        handle.seek(12)  # RIFF, size, WEBP
        while len(header := handle.read(8)) == 8:
            kind, size = header[:4], int.from_bytes(header[4:], "little")
            if kind in (b"VP8L", b"VP8 "):
                return kind == b"VP8L"
            handle.seek(size + (size & 1), 1)
    return False


def _decode(im: Image.Image, path: Path) -> None:
    try:
        im.load()
    except Image.DecompressionBombError as exc:
        raise FaceveilError(f"{path}: image has too many pixels (possible decompression bomb)") from exc
    except Exception as exc:
        raise FaceveilError(f"{path}: damaged or truncated image: {_one_line(exc)}") from exc


def _dpi(im: Image.Image) -> tuple[float, float] | None:
    dpi = im.info.get("dpi")
    try:
        return (float(dpi[0]), float(dpi[1])) if dpi else None
    except (TypeError, ValueError, IndexError):
        return None


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


# ------------------------------------------------------------------------------------------ modes -> RGB


def _to_rgb_alpha(
    im: Image.Image, icc: bytes | None
) -> tuple[np.ndarray, np.ndarray | None, bytes | None, list[str]]:
    """8-bit RGB (and alpha) from any PIL mode; the ICC profile is kept only if it is an RGB one."""
    mode = im.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        gray, note = _scale_to_uint8(np.asarray(im), mode)
        return np.repeat(gray[:, :, None], 3, axis=2), None, None, [note] if note else []
    if mode == "CMYK":
        rgb_im, note = _cmyk_to_rgb(im, icc)
        return _array(rgb_im), None, None, [note]
    if im.has_transparency_data or mode in ("LA", "La", "PA", "RGBa", "RGBA"):
        rgba = _array(im if mode == "RGBA" else _convert(im, "RGBA"))
        return np.ascontiguousarray(rgba[:, :, :3]), np.ascontiguousarray(rgba[:, :, 3]), *_icc_for_rgb(icc)
    rgb_im = im if mode == "RGB" else _convert(im, "RGB")
    return _array(rgb_im), None, *_icc_for_rgb(icc)


def _array(im: Image.Image) -> np.ndarray:
    return np.asarray(im, dtype=np.uint8).copy(order="C")


def _convert(im: Image.Image, mode: str) -> Image.Image:
    try:
        return im.convert(mode)
    except (ValueError, OSError) as exc:
        raise FaceveilError(f"unsupported colour mode {im.mode} (cannot convert to {mode})") from exc


def _icc_for_rgb(icc: bytes | None) -> tuple[bytes | None, list[str]]:
    if not icc:
        return None, []
    if icc[16:20] == b"RGB ":
        return icc, []
    return None, [f"{icc[16:20].decode('latin-1').strip() or 'non-RGB'} ICC profile dropped"]


def _cmyk_to_rgb(im: Image.Image, icc: bytes | None) -> tuple[Image.Image, str]:
    """CMYK -> RGB through the embedded profile when there is one (exact colours), else PIL's formula."""
    if icc and icc[16:20] == b"CMYK":
        try:
            from PIL import ImageCms

            source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            srgb = ImageCms.createProfile("sRGB")
            converted = ImageCms.profileToProfile(im, source, srgb, outputMode="RGB")
            return converted, "CMYK converted to sRGB (ICC)"
        except Exception:
            pass
    return _convert(im, "RGB"), "CMYK converted to RGB"


def _scale_to_uint8(values: np.ndarray, mode: str) -> tuple[np.ndarray, str]:
    """16-bit, 32-bit integer or float grey -> uint8 (65535 -> 255, 0..1 floats -> 0..255, else min-max)."""
    data = np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    low, high = (float(data.min()), float(data.max())) if data.size else (0.0, 0.0)
    if mode.startswith("I;16") or (mode == "I" and low >= 0 and 255 < high <= 65535):
        scaled, note = data / 257.0, SIXTEEN_BIT_NOTE
    elif low >= 0 and high <= (1.0 if mode == "F" else 255.0):
        scaled, note = data * (255.0 if mode == "F" else 1.0), f"{mode} image converted to 8-bit"
    else:
        span = high - low if high > low else 1.0
        scaled, note = (data - low) * (255.0 / span), f"{mode} image stretched to 8-bit ({low:g}..{high:g})"
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8), note


# --------------------------------------------------------------------------------------------------- writing


def write_image(
    image: Photo | np.ndarray,
    out_path: Path | str,
    *,
    fmt: str = "same",
    jpeg_quality: int = DEFAULT_JPEG_QUALITY,
    keep_metadata: bool = False,
    keep_date: bool = False,
    icc_profile: bytes | None | _Keep = KEEP,
    alpha: np.ndarray | None | _Keep = KEEP,
    replace: bool = True,
    max_mode: int | None = None,
) -> Path:
    """Write atomically; returns the path written.

    replace=False: an existing out_path is an error (FaceveilError) and stays as it is. max_mode: the permission
    bits the file may have at most (a protected photo is never more readable than its original).
    fmt: 'same' (the input's format; for a bare array, the format of out_path's extension), 'png', 'jpg', 'heic' or
    'avif'. jpeg_quality: the quality of lossy outputs (JPEG, HEIC, AVIF; lossy WebP). EXIF is written only with
    keep_metadata=True (the source's EXIF, orientation reset to 1, no thumbnail or maker note) or, with
    keep_date=True, only the capture date and time. icc_profile / alpha default to the Photo's; None drops them, a
    value replaces them.
    """
    photo, out_path = _as_photo(image), Path(out_path)
    pil_format = _output_format(photo, fmt, out_path, isinstance(image, Photo))
    if photo.path is not None:
        refuse_same_file(photo.path, out_path)
    alpha_arr = photo.alpha if alpha is KEEP else alpha
    icc = photo.icc_profile if icc_profile is KEEP else icc_profile
    pil_image = _compose(photo.rgb, alpha_arr, pil_format)
    if pil_format == "HEIF":
        heif_plugin()
    params = _save_params(pil_format, photo, icc, jpeg_quality, _exif_to_write(photo, keep_metadata, keep_date))
    with atomic_path(out_path, replace=replace, max_mode=max_mode) as temp:
        try:
            pil_image.save(temp, format=pil_format, **params)
        except (OSError, ValueError, TypeError, RuntimeError) as exc:
            raise FaceveilError(f"cannot write {out_path}: {_one_line(exc)}") from exc
    return out_path


def _as_photo(image: Photo | np.ndarray) -> Photo:
    if isinstance(image, Photo):
        return image
    array = np.asarray(image)
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    if array.ndim == 3 and array.shape[2] == 4:
        return Photo(rgb=np.ascontiguousarray(array[:, :, :3]), alpha=np.ascontiguousarray(array[:, :, 3]))
    return Photo(rgb=array)


def _output_format(photo: Photo, fmt: str, out_path: Path, from_photo: bool) -> str:
    if from_photo:
        pil_format = target_format(fmt, photo.format)
    else:
        ext = out_path.suffix.lower()
        if fmt == "same" and ext not in _SAME_FORMAT_FOR_EXT:
            raise FaceveilError(f"{out_path}: unknown image extension; use .jpg, .png, .webp, .heic, .avif, .bmp or "
                                ".tif")
        pil_format = target_format(fmt, ext or None)
    if not extension_matches(out_path, pil_format):
        raise FaceveilError(f"{out_path}: extension does not match the output format {pil_format}")
    return pil_format


def _compose(rgb: np.ndarray, alpha: np.ndarray | None, pil_format: str) -> Image.Image:
    """PIL image to save: RGBA where the format keeps alpha, else RGB composited over white."""
    _check_rgb(rgb)
    if alpha is None:
        return Image.fromarray(np.ascontiguousarray(rgb), "RGB")
    _check_alpha(alpha, rgb.shape[:2])
    if pil_format in ALPHA_FORMATS:
        return Image.fromarray(np.dstack([rgb, alpha]), "RGBA")
    if bool((alpha == 255).all()):
        return Image.fromarray(np.ascontiguousarray(rgb), "RGB")
    weight = alpha[:, :, None].astype(np.float32) / 255.0
    flat = rgb.astype(np.float32) * weight + 255.0 * (1.0 - weight)
    return Image.fromarray(np.clip(np.rint(flat), 0, 255).astype(np.uint8), "RGB")


def _exif_to_write(photo: Photo, keep_metadata: bool, keep_date: bool) -> bytes | None:
    if not photo.exif:
        return None
    if keep_metadata:
        return exif_for_output(photo.exif)
    return date_exif(photo.exif) if keep_date else None


def _save_params(
    pil_format: str, photo: Photo, icc: bytes | None, quality: int, exif: bytes | None
) -> dict[str, object]:
    params: dict[str, object] = {}
    if pil_format == "JPEG":
        params.update(quality=int(quality), subsampling=JPEG_SUBSAMPLING, optimize=True)
    elif pil_format == "HEIF":
        params.update(quality=_heif_quality(quality), chroma=444)  # 4:4:4: 4:2:0 would halve the mask's colour
    elif pil_format == "AVIF":
        params.update(quality=_heif_quality(quality), subsampling="4:4:4")
    elif pil_format == "PNG":
        params.update(compress_level=3)
    elif pil_format == "WEBP":
        params.update(lossless=photo.lossless, quality=int(quality) if not photo.lossless else 80, method=4)
    elif pil_format == "TIFF":
        params.update(compression="tiff_lzw")
    if icc and pil_format in ICC_FORMATS:
        params["icc_profile"] = icc
    if photo.dpi and pil_format in ("JPEG", "PNG", "TIFF", "BMP"):
        params["dpi"] = photo.dpi
    if exif and pil_format in EXIF_FORMATS:
        params["exif"] = exif
        if pil_format == "TIFF":
            params["compression"] = "raw"  # libtiff (LZW) cannot write the EXIF / GPS sub-IFDs
    return params


def _heif_quality(jpeg_quality: int) -> int:
    return max(1, min(100, int(jpeg_quality) + HEIF_QUALITY_FOR_JPEG_QUALITY))


def exif_for_output(raw: bytes) -> bytes | None:
    """The source EXIF made safe to attach to the new pixels.

    Orientation is reset to 1 (it is baked into the pixels); tags that describe the old file's layout, the
    maker note and the IFD1 thumbnail (both may hold an unmasked preview of the face) are dropped.
    """
    exif = Image.Exif()
    try:
        exif.load(raw)
        for tag in [t for t in exif if t in _STRUCTURAL_TAGS]:
            del exif[tag]
        exif[ExifTags.Base.Orientation] = 1
        if ExifTags.IFD.Exif in exif:
            details = exif.get_ifd(ExifTags.IFD.Exif)
            for tag in (_MAKER_NOTE, _PIXEL_X, _PIXEL_Y):
                details.pop(tag, None)
        return exif.tobytes()
    except Exception:
        return None


def date_exif(raw: bytes) -> bytes | None:
    """An EXIF block with only the source's capture date and time (see _DATE_TAGS_*): no location, camera, lens,
    serial number, maker note or thumbnail. None when the source has no date."""
    source, kept = Image.Exif(), Image.Exif()
    try:
        source.load(raw)
        for tag in _DATE_TAGS_IFD0 & set(source):
            kept[tag] = source[tag]
        details = source.get_ifd(ExifTags.IFD.Exif) if ExifTags.IFD.Exif in source else {}
        dates = {tag: value for tag, value in details.items() if tag in _DATE_TAGS_EXIF}
        if dates:
            kept.get_ifd(ExifTags.IFD.Exif).update(dates)
        return kept.tobytes() if len(kept) or dates else None
    except Exception:
        return None
